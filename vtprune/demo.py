"""The main job (``make demo`` / ``vtprune demo``): every method at several budgets on the embedded digits model,
through lmms-eval, into a table, ``results.jsonl`` and a Pareto plot."""

from __future__ import annotations

import vtprune
from vtprune.eval.inputs import load_model


def applicable_methods(keep: int = 4, model_name: str = "embedded") -> tuple[list[str], dict[str, str]]:
    """(registered methods the embedded model ``model_name`` takes at ``keep`` tokens per image, LLM-side and
    tower-side, {method: why not} for the others)."""
    model, _ = load_model(model_name)
    usable, skipped = [], {}
    for name in vtprune.list_methods(kind=("llm", "vit")):
        try:
            with vtprune.wrap(model, name, keep=keep) as pruning:
                if "image" not in pruning.modalities:  # the demo's questions are about still images
                    skipped[name] = f"{name} prunes videos only; the demo asks about images"
                    continue
            usable.append(name)
        except ValueError as error:
            skipped[name] = str(error).split(";")[0]
    return usable, skipped
