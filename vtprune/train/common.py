"""What the trained methods' training runs share: the frozen embedded model, seeded documents, a held-out
evaluation that also reads the wrapped model's records (visual tokens per layer, LLM FLOPs), the command line and
``training.json``."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vtprune.data.digit_grids import generate
from vtprune.embedded import EMBEDDED, model_dir
from vtprune.embedded.train import answer_accuracy

HELD_OUT_SEED = 1000  # the test split's documents the embedded models' tests score; never seen in training
TRAINABLE = (EMBEDDED,)


def load_frozen(name: str = EMBEDDED) -> tuple[nn.Module, Any]:
    """The embedded model (eval mode, no gradients) and its processor."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    if name not in TRAINABLE:
        raise ValueError(f"--model must be one of {', '.join(TRAINABLE)} (the trained methods' modules are trained "
                         f"on the embedded LLaVA here), got {name!r}")  # fmt: skip
    folder = model_dir(name)
    model = AutoModelForImageTextToText.from_pretrained(folder).eval().requires_grad_(False)
    return model, AutoProcessor.from_pretrained(folder)


def training_docs(count: int, seed: int, step: int) -> list[dict[str, Any]]:
    """``count`` documents of the train split for one step of a seeded run."""
    return generate("train", count, seed=seed * 1_000_003 + step + 7)


def held_out_docs(count: int) -> list[dict[str, Any]]:
    return generate("test", count, seed=HELD_OUT_SEED)


def evaluate(
    model: nn.Module, processor: Any, docs: list[dict[str, Any]], method: str | None, keep: Any = 1.0,
    batch: int = 100, **options: Any,
) -> dict[str, Any]:
    """Held-out accuracy of ``model`` wrapped with ``method`` (None: dense), with the mean visual tokens per layer
    and LLM prefill GFLOPs per sample read off the wrapped model's records."""
    import vtprune
    from vtprune.eval.flops import model_shape, sample_llm_flops

    if method is None:  # random keeping every token is the dense model, with a record to count from
        method, keep, options = "random", 1.0, {}
    shape = model_shape(model)
    visual: list[float] = []
    flops: list[float] = []
    exits: list[int | None] = []
    with vtprune.wrap(model, method, keep, **options) as handle:

        def read() -> None:
            record = handle.last
            visual.extend(record.visual_tokens_per_layer())
            flops.extend(sample_llm_flops(shape.language, record.tokens_per_layer))
            exits.extend(record.exit_layers())

        accuracy = answer_accuracy(model, processor, docs, batch=batch, after_batch=read)
    result = {
        "accuracy": accuracy,
        "visual_tokens_per_layer": sum(visual) / len(visual),
        "llm_gflops": sum(flops) / len(flops) / 1e9,
    }
    if any(e is not None for e in exits):
        result["exit_layers"] = {str(k): sum(1 for e in exits if e == k) for k in sorted(set(exits), key=str)}
    return result


def arguments(description: str, steps: int, out: Path) -> argparse.Namespace:
    """The command line every training entry point takes."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--model", default=EMBEDDED, choices=TRAINABLE, help="the model whose modules are trained")
    parser.add_argument("--out", type=Path, default=out, help="folder for model.safetensors and training.json")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=steps)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--eval-docs", type=int, default=400, help="held-out documents scored at the end")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    return args


def write_training(folder: Path, record: dict[str, Any], started: float) -> dict[str, Any]:
    record = {**record, "seconds": round(time.time() - started), "torch": torch.__version__}
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "training.json").write_text(json.dumps(record, indent=2) + "\n")
    return record
