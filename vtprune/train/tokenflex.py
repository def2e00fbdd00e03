"""Train TokenFLEX's flex projector (:mod:`vtprune.methods.tokenflex`) on the frozen embedded LLaVA.

Each step draws a token count uniformly from 1..64, pools the tower features (the layer LLaVA's projector reads,
without [CLS]) to that count's :func:`~vtprune.core.budget.pooled_shape` grid, projects them with the flex projector
and puts them in place of the first ``rows * cols`` image placeholders (the others leave the prompt; positions are
contiguous, as the method renumbers them). Loss: cross-entropy on the dialogue's answers; only the flex projector
learns. The held-out figures of ``training.json`` compare it with the ``pool`` method (``where="before"``) at
equal counts.

    python -m vtprune.train.tokenflex --model embedded [--out DIR] [--steps N] [--seed S] [--threads T]

The shipped weights are this command's defaults with ``--threads 1`` (about 10 minutes on a shared CPU).
"""

from __future__ import annotations

import math
import random
import time
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from vtprune.core.budget import pooled_shape
from vtprune.core.weights import WEIGHTS_FILE, save_weights
from vtprune.embedded import EMBEDDED, trained_dir
from vtprune.embedded.train import dialogue_batch
from vtprune.methods.tokenflex import NAME, FlexProjector
from vtprune.train.common import (
    arguments,
    evaluate,
    held_out_docs,
    load_frozen,
    training_docs,
    write_training,
)

STEPS = 600  # the shipped run (1 thread: see training.json's seconds)
EVAL_KEEPS = (64, 32, 16, 8, 4)


def tower_grid(model: nn.Module, pixel_values: Tensor) -> Tensor:
    """The features LLaVA's projector reads as ``[batch, side, side, width]`` (no [CLS])."""
    tower = model.model.vision_tower
    out = tower(pixel_values, output_hidden_states=True)
    features = out.hidden_states[model.config.vision_feature_layer][:, 1:]
    side = math.isqrt(features.shape[1])
    return features.reshape(features.shape[0], side, side, -1)


def flex_inputs(
    model: nn.Module, flex: FlexProjector, inputs: dict[str, Tensor], grid: Tensor, count: int, image_id: int
) -> dict[str, Tensor]:
    """Model inputs whose image holds ``count``'s pooled grid: the first ``rows * cols`` placeholders of each row
    carry the flex projector's tokens (raster order), the other placeholders are removed."""
    rows, cols = pooled_shape(grid.shape[1], grid.shape[2], count)
    ids = inputs["input_ids"]
    is_image = ids == image_id
    kept_image = is_image & (is_image.cumsum(1) <= rows * cols)
    keep = ~is_image | kept_image
    # every row has one image of the same size, so every row drops the same number of placeholders
    index = torch.stack([row.nonzero().flatten() for row in keep])
    ids = ids.gather(1, index)
    embeds = model.get_input_embeddings()(ids)
    tokens = flex(grid, rows, cols).to(embeds.dtype)
    embeds = embeds.masked_scatter((ids == image_id)[..., None], tokens.flatten(0, 1))
    return {
        "inputs_embeds": embeds,
        "attention_mask": inputs["attention_mask"].gather(1, index),
        "labels": inputs["labels"].gather(1, index),
    }


def train(
    steps: int = STEPS, seed: int = 0, *, batch_size: int = 16, turns: int = 8, lr: float = 3e-3,
    hidden_width: int = 512, eval_docs: int = 400, log_every: int = 50, out: Path | None = None,
    model_name: str = EMBEDDED, evaluate_at: tuple[int, ...] = EVAL_KEEPS, compare: bool = True,
) -> dict[str, Any]:
    """Train the flex projector for ``steps`` steps; with ``out``, write ``model.safetensors`` and
    ``training.json`` (recipe, seconds, held-out figures of tokenflex and ``pool`` at ``evaluate_at``); returns the
    training record (``path``: the weights file, when written)."""
    started = time.time()
    recipe = {"steps": steps, "seed": seed, "batch_size": batch_size, "turns": turns, "lr": lr,
              "hidden_width": hidden_width, "count": "uniform 1..64 per batch", "optimizer": "AdamW",
              "trained": "flex projector only (LLM and tower frozen)", "loss": "cross-entropy on answers",
              "threads": torch.get_num_threads()}  # fmt: skip
    torch.manual_seed(seed)
    rng = random.Random(seed)
    model, processor = load_frozen(model_name)
    text = model.config.text_config
    meta_widths = {"vision_width": model.config.vision_config.hidden_size, "hidden_width": hidden_width,
                   "text_width": text.hidden_size}  # fmt: skip
    flex = FlexProjector(**meta_widths)
    image_id = processor.tokenizer.convert_tokens_to_ids(processor.image_token)
    optimizer = torch.optim.AdamW(flex.parameters(), lr=lr, weight_decay=0.01)
    warmup = max(1, steps // 20)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / warmup) * (0.5 * (1 + math.cos(math.pi * s / max(1, steps)))))
    losses: list[float] = []
    with torch.enable_grad():  # callers (tests) may run under no_grad
        flex.train()
        for step in range(steps):
            docs = training_docs(batch_size, seed, step)
            inputs = dialogue_batch(processor, docs, turns, rng, read_share=0.0)
            with torch.no_grad():
                grid = tower_grid(model, inputs["pixel_values"])
            count = rng.randint(1, grid.shape[1] * grid.shape[2])
            loss = model(**flex_inputs(model, flex, inputs, grid, count, image_id)).loss
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(flex.parameters(), 1.0)
            optimizer.step()
            scheduler.step()
            losses.append(loss.item())
            if log_every and (step + 1) % log_every == 0:
                recent = sum(losses[-log_every:]) / len(losses[-log_every:])
                print(f"step {step + 1}/{steps}  loss {recent:.3f}  {time.time() - started:.0f}s", flush=True)
    flex.eval()
    record: dict[str, Any] = {"method": NAME, "recipe": recipe, "final_loss": sum(losses[-20:]) / len(losses[-20:]),
                              "train_seconds": round(time.time() - started)}  # fmt: skip
    if out is None:
        record["module"] = flex
        return record
    out = Path(out)
    meta = {"method": NAME, "family": "llava", "hidden_size": text.hidden_size, "num_layers": text.num_hidden_layers,
            "trained_on": f"the embedded digits LLaVA ({model_name})", **meta_widths}  # fmt: skip
    path = save_weights(out, flex.state_dict(), meta)
    if eval_docs:
        docs = held_out_docs(eval_docs)
        record["held_out"] = {"documents": eval_docs, "tokenflex": {}, "pool (where=before)": {}}
        for keep in evaluate_at:
            record["held_out"]["tokenflex"][str(keep)] = evaluate(model, processor, docs, NAME, keep, weights=str(path))
            if compare:
                pooled = evaluate(model, processor, docs, "pool", keep, where="before")
                record["held_out"]["pool (where=before)"][str(keep)] = pooled
    record = write_training(out, record, started)
    return {**record, "path": str(out / WEIGHTS_FILE)}


def main() -> None:
    args = arguments(__doc__.split("\n\n")[0], STEPS, trained_dir(NAME))
    record = train(args.steps, args.seed, eval_docs=args.eval_docs, out=args.out, model_name=args.model)
    print({k: v for k, v in record.items() if k != "recipe"})


if __name__ == "__main__":
    main()
