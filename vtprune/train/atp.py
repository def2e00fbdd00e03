"""Train ATP-LLaVA's threshold networks (:mod:`vtprune.methods.atp`) on the frozen embedded LLaVA.

``python -m vtprune.train.atp --model embedded [--out DIR] [--steps N] [--seed S] [--threads T] [--eval-docs N]``

Recipe (the paper trains with the LM loss plus a budget-constrained loss; the rest is ours or the unofficial
reimplementation's, as marked):

* The LLM is frozen; only the ATP modules train (ours; the paper's Tab. 3 shows a frozen LLM works).
* The model runs eager attention. Before each module's decoder layer a forward pre-hook scores the visual tokens from
  the head-averaged softmax attention of the layer before it (captured by a forward hook on that layer's attention;
  scores detached: ours) exactly as :class:`~vtprune.methods.atp.ATPLLaVA` does at inference, and turns the
  thresholds into soft masks ``M = max(sigmoid((S_red - theta_r) T), lattice * sigmoid((S_sp - theta_s) T))``
  (unofficial, T = 10). The cumulative mask (product over the modules so far) enters every later layer's attention
  as an additive bias ``log M`` on the visual keys (unofficial: an attention mask, no straight-through estimator).
* Loss: cross-entropy of the answer token at the prompt's last position (single-question prompts, left padded, as
  :func:`vtprune.embedded.train.answer_accuracy` asks) + ``lambda * |batch mean of the layer-averaged kept fraction
  - r|`` (ours: the layer average is what ``keep`` stands for; the unofficial loss adds a per-layer term). ``r`` is
  drawn per batch uniformly from [1/16, 1] and fed to the threshold networks.

``training.json`` holds the recipe, the seconds, the held-out figures of the wrapped (hard-mask) model at keep 32,
16, 8 and 4 next to PyramidDrop and FastV at the same keeps, and the soft-mask model's held-out accuracy and kept
tokens at those keeps. The temperature is annealed from 10 to 200 (ours): at the unofficial fixed T = 10 a mask of
0.1-0.3 still let a token through (a bias of only -1 to -2), the LM loss never saw the hard drop and the wrapped model
fell to 0.775 at keep 16 where the soft model held 0.985; annealed, the two agree (0.985 and 0.985 at keep 16,
within 0.005 at every keep). A straight-through variant (hard forward, soft gradient) tried first did not learn the
dependence on ``r`` in 125 steps (kept ~0.47 whatever r).
"""

from __future__ import annotations

import math
import random
import time
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from vtprune.core.registry import ModelInfo
from vtprune.core.weights import save_weights
from vtprune.embedded import trained_dir
from vtprune.embedded.train import answer_accuracy, prompt_batch
from vtprune.methods.atp import (
    AUTHORS_LAYERS,
    REFERENCE_DEPTH,
    TEMPERATURE,
    WIDTH,
    ATPModules,
    image_features,
    normalised_log,
    redundancy,
    soft_keep,
)
from vtprune.train.common import (
    arguments,
    evaluate,
    held_out_docs,
    load_frozen,
    training_docs,
    write_training,
)

STEPS, BATCH, LR = 400, 16, 3e-3
BUDGET_WEIGHT = 2.0  # lambda of the budget term
FINAL_TEMPERATURE = 200.0  # a log-score margin of 0.025 then gives a mask of 0.99
RATIO_RANGE = (1 / 16, 1.0)
EVAL_KEEPS = (32, 16, 8, 4)
IMAGE_TOKENS = 64


class SoftMasks:
    """The hooks that run the ATP modules as soft masks inside the frozen model's eager attention."""

    def __init__(self, model: nn.Module, modules: ATPModules, layers: list[int]) -> None:
        self.model, self.modules, self.layers = model, modules, layers
        self.decoder = model.model.language_model.layers
        self.image_token = model.config.image_token_id
        self.ratio: Tensor | None = None  # [B] target ratio per sample
        self.fixed_ratio: float | None = None  # evaluation: every forward's samples get this ratio
        self.probs: Tensor | None = None
        self.temperature = TEMPERATURE
        self.handles = [model.register_forward_pre_hook(self._start, with_kwargs=True)]
        for layer in layers:
            self.handles.append(self.decoder[layer - 1].self_attn.register_forward_hook(self._capture))
        for index in range(layers[0], len(self.decoder)):
            hook = self._layer_hook(index)
            self.handles.append(self.decoder[index].register_forward_pre_hook(hook, with_kwargs=True))
        from vtprune.core.layout import GridPart, VisualItem
        from vtprune.methods.atp import lattice_tokens

        side = math.isqrt(IMAGE_TOKENS)
        item = VisualItem(0, 0, "image", IMAGE_TOKENS, 0, (GridPart(0, side, side, side),))
        self.lattice = lattice_tokens(item)

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()

    def _start(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        ids = kwargs["input_ids"]
        valid = kwargs["attention_mask"].bool()
        self.visual = ids == self.image_token
        slots = torch.arange(ids.shape[1])[None].expand_as(ids)
        last_visual = torch.where(self.visual, slots, -1).max(1).values
        self.instruction = valid & (slots > last_visual[:, None])
        # visual slots per sample, [B, 64] (one image per prompt)
        self.slots = torch.argsort((~self.visual).to(torch.int8), dim=1, stable=True)[:, :IMAGE_TOKENS]
        if self.fixed_ratio is not None:
            self.ratio = torch.full((ids.shape[0],), self.fixed_ratio)
        self.keep = torch.ones(ids.shape, dtype=torch.float32)  # cumulative mask per slot
        self.fractions: list[Tensor] = []  # per module, [B] kept fraction from its layer on
        self.probs = None

    def _capture(self, module: nn.Module, args: tuple, output: tuple) -> None:
        self.probs = output[1].detach().float().mean(1)  # [B, Q, K], head-averaged (scores detached: ours)

    def _layer_hook(self, index: int):
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
            if self.ratio is None:
                return args, kwargs
            if index in self.layers:
                self._prune(self.layers.index(index))
            bias = self.keep.clamp_min(1e-6).log().to(kwargs["attention_mask"].dtype)
            kwargs["attention_mask"] = kwargs["attention_mask"] + bias[:, None, None, :]
            return args, kwargs

        return hook

    def _prune(self, stage: int) -> None:
        batch = torch.arange(self.slots.shape[0])
        probs, slots = self.probs, self.slots
        weight = self.keep[batch[:, None], slots]  # [B, 64]
        vv = probs[batch[:, None, None], slots[:, :, None], slots[:, None, :]]  # [B, 64 queries, 64 keys]
        s_self = (vv * weight[..., None]).sum(1) / weight.sum(1, keepdim=True).clamp_min(1e-6)
        tv = probs[batch[:, None], :, slots].transpose(1, 2)  # [B, Q, 64]
        text = self.instruction.float()
        s_cross = (tv * text[..., None]).sum(1) / text.sum(1, keepdim=True).clamp_min(1)
        log_self, log_cross = normalised_log(s_self, weight), normalised_log(s_cross, weight)
        theta_r, theta_s = self.modules.stages[stage](image_features(log_self, log_cross, weight, self.ratio))
        mask = soft_keep(
            redundancy(log_self, log_cross), self.lattice.expand_as(weight), theta_r, theta_s, self.temperature
        )
        mask = torch.where((self.ratio >= 1)[:, None], torch.ones_like(mask), mask)  # keep extreme = dense
        self.keep = self.keep.clone()
        self.keep[batch[:, None], slots] = weight * mask
        self.fractions.append((weight * mask).sum(1) / IMAGE_TOKENS)

    def layer_average(self, num_layers: int) -> Tensor:
        """Per sample, the kept visual fraction averaged over the decoder layers ``[B]``."""
        bounds = [*self.layers, num_layers]
        total = torch.full_like(self.fractions[0], float(self.layers[0]))  # layers before the first module: all
        for stage, fraction in enumerate(self.fractions):
            total = total + fraction * (bounds[stage + 1] - bounds[stage])
        return total / num_layers


def annealed(step: int, steps: int) -> float:
    """The soft masks' temperature at ``step``: geometric from the unofficial T = 10 to ``FINAL_TEMPERATURE`` (ours:
    near-binary masks by the end, so the LM loss sees what the hard rule at inference does)."""
    return TEMPERATURE * (FINAL_TEMPERATURE / TEMPERATURE) ** (step / max(steps - 1, 1))


def soft_figures(model: nn.Module, processor: Any, masks: SoftMasks, docs: list[dict[str, Any]], keep: int) -> dict:
    """Held-out accuracy and visual tokens per layer of the soft-mask (training) model at ``keep``."""
    kept: list[Tensor] = []
    num_layers = model.config.text_config.num_hidden_layers
    masks.fixed_ratio = keep / IMAGE_TOKENS
    try:
        with torch.no_grad():
            accuracy = answer_accuracy(
                model, processor, docs, after_batch=lambda: kept.append(masks.layer_average(num_layers))
            )
    finally:
        masks.fixed_ratio = masks.ratio = None
    return {"accuracy": accuracy, "visual_tokens_per_layer": float(torch.cat(kept).mean()) * IMAGE_TOKENS}


def train(
    steps: int = STEPS, seed: int = 0, batch: int = BATCH, lr: float = LR, budget_weight: float = BUDGET_WEIGHT,
    eval_docs: int = 400, keeps: tuple[int, ...] = EVAL_KEEPS, compare: tuple[str, ...] = ("pdrop", "fastv"),
    out: str | Path | None = None, model_name: str = "embedded", log: Any = print,
) -> dict[str, Any]:
    """Train the ATP modules, write ``model.safetensors`` and ``training.json`` to ``out`` (default: the shipped
    folder) and return the training record."""
    started = time.time()
    folder = Path(out) if out is not None else trained_dir("atp")
    torch.manual_seed(seed)
    rng = random.Random(seed)
    model, processor = load_frozen(model_name)
    text = model.config.text_config
    info = ModelInfo(family="llava", num_layers=text.num_hidden_layers, has_cls_token=True, mrope=False)
    layers = info.scale_layers(AUTHORS_LAYERS, REFERENCE_DEPTH)
    modules = ATPModules(len(layers), WIDTH)
    optimiser = torch.optim.AdamW(modules.parameters(), lr=lr, weight_decay=0.0)
    implementation = model.config._attn_implementation
    model.set_attn_implementation("eager")  # the soft masks need the probabilities and an additive mask
    masks = SoftMasks(model, modules, layers)
    history = []
    try:
        for step in range(steps):
            inputs, answers = prompt_batch(processor, training_docs(batch, seed, step))
            ratio = rng.uniform(*RATIO_RANGE)
            masks.ratio = torch.full((len(answers),), ratio)
            masks.temperature = annealed(step, steps)
            with torch.enable_grad():  # also under a caller's no_grad (the tests run in one)
                logits = model(**inputs).logits[:, -1]
                task = nn.functional.cross_entropy(logits.float(), answers)
                kept = masks.layer_average(text.num_hidden_layers).mean()
                loss = task + budget_weight * (kept - ratio).abs()
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
            if step % 25 == 0 or step == steps - 1:
                entry = {"step": step, "ratio": round(ratio, 3), "kept": round(float(kept.detach()), 3),
                         "task": round(float(task.detach()), 4), "loss": round(float(loss.detach()), 4)}  # fmt: skip
                history.append(entry)
                log(entry)
        masks.ratio = None
        meta = {
            "method": "atp", "family": "llava", "hidden_size": text.hidden_size, "num_layers": text.num_hidden_layers,
            "trained_on": f"the embedded digits LLaVA ({model_name})", "layers": layers, "width": WIDTH,
            "features": 6, "seed": seed, "steps": steps,
        }  # fmt: skip
        path = save_weights(folder, modules.state_dict(), meta)
        docs = held_out_docs(eval_docs) if eval_docs else []
        soft = {str(k): soft_figures(model, processor, masks, docs, k) for k in keeps} if docs else {}
    finally:
        masks.remove()
        model.set_attn_implementation(implementation)
    held_out: dict[str, Any] = {}
    if docs:
        held_out["dense"] = evaluate(model, processor, docs, None)
        held_out["atp"] = {str(k): evaluate(model, processor, docs, "atp", k, weights=str(path)) for k in keeps}
        for name in compare:
            held_out[name] = {str(k): evaluate(model, processor, docs, name, k) for k in keeps}
    record = {
        "method": "atp",
        "recipe": {
            "model": model_name, "steps": steps, "batch": batch, "lr": lr, "budget_weight": budget_weight,
            "ratio_range": list(RATIO_RANGE), "seed": seed, "layers": layers, "width": WIDTH,
            "temperature": [TEMPERATURE, FINAL_TEMPERATURE],
            "threads": torch.get_num_threads(), "llm": "frozen", "eval_docs": eval_docs,
        },
        "history": history,
        "held_out": held_out,
        "soft_mask_held_out": soft,
    }
    return write_training(folder, record, started)


def main() -> None:
    args = arguments("Train ATP-LLaVA's threshold networks on the frozen embedded LLaVA.", STEPS, trained_dir("atp"))
    train(steps=args.steps, seed=args.seed, eval_docs=args.eval_docs, out=args.out, model_name=args.model)


if __name__ == "__main__":
    main()
