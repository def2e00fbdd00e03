"""The tour (``vtprune tour``): wrap tiny models of every family, generate, and show what each method kept.

The models are random-initialised (built from the real transformers configs), so the generated text is
meaningless; the token bookkeeping printed here is real. For accuracy, see ``vtprune demo``.
"""

from __future__ import annotations

import torch
from rich.console import Console
from rich.table import Table

import vtprune
from vtprune.testing import FAMILIES, Image, Video, make_batch, tiny_model

PROMPTS = {
    "llava": [[6, Image(), 9], [3, Image(), 4, Image(), 5]],
    "llava_next": [[6, Image((32, 48)), 9], [3, Image((64, 64)), 5]],
    "qwen2_vl": [[6, Image((32, 32)), 9], [3, Image((16, 24)), 4, Video(2, (16, 16)), 5]],
    "qwen2_5_vl": [[6, Image((32, 32)), 9], [3, Image((24, 24)), 5]],
    "qwen3_vl": [[6, Image((32, 32)), 9], [3, Image((16, 24)), 4, Video(2, (16, 16)), 5]],
    "llava_onevision": [[6, Image((32, 48)), 9], [3, Image(), 4, Video(2), 5]],
    "qwen3_5": [[6, Image((32, 32)), 9], [3, Image((16, 24)), 4, Video(2, (16, 16)), 5]],
    "gemma3": [[6, Image(), 9], [3, Image(), 4, Image(), 5]],
    "mistral3": [[6, Image((64, 64)), 9], [3, Image((32, 64)), 4, Image((48, 32)), 5]],
    "internvl": [[6, Image((32, 64)), 9], [3, Image((32, 32)), 4, Image((64, 64)), 5]],
    # GLM-4V's forward takes no images and videos in one call
    "glm4v": [[6, Image((32, 32)), 9], [3, Image((16, 24)), 4, Image((16, 16)), 5]],
    "smolvlm": [[6, Image((32, 64)), 9], [3, Image(), 4, Image((64, 64)), 5]],
    "paligemma": [[6, Image(), 9], [3, Image(), 4, Image(), 5]],
}


def kept_map(kept: torch.Tensor, height: int, width: int) -> str:
    """A text picture of a grid: # for kept patches, . for dropped ones."""
    grid = torch.zeros(height * width, dtype=torch.bool)
    grid[kept[kept < height * width]] = True
    return "\n".join("".join("#" if grid[r * width + c] else "." for c in range(width)) for r in range(height))


def run_tour(
    families: list[str] | None = None, methods: list[str] | None = None, keep: int | float = 0.25, new_tokens: int = 6
) -> None:
    console = Console(width=max(Console().width, 120))
    methods = methods or ["random", "uniform", "fastv", "vtc_cls", "visionzip", "transprune"]
    for family in families or list(FAMILIES):
        torch.manual_seed(0)
        model = tiny_model(family)
        batch = make_batch(model, PROMPTS[family])
        with torch.no_grad():
            dense_length = model(**batch).logits.shape[1]
        layers = len(vtprune.adapter_for(model).decoder_layers)
        table = Table(title=f"{type(model).__name__} (tiny, random weights) - keep={keep} per image")
        table.add_column("method")
        table.add_column("pruned at")
        table.add_column("visual tokens per image (kept/all)")
        table.add_column("sequence length entering each decoder layer")
        table.add_column("generated ids (sample 0)")
        rows, pictures = [], []
        for name in methods:
            vtprune.method_class(name)  # an unknown name is the caller's error, not a method's
            try:
                pruning = vtprune.wrap(model, name, keep=keep)
            except ValueError as error:  # e.g. a [CLS] method on Qwen
                rows.append((name, "n/a", str(error).split(";")[0], "", ""))
                continue
            with pruning, torch.no_grad():
                out = model.generate(**batch, max_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
                record = pruning.last
            stage = record.stages[-1]
            sizes = ", ".join(f"{k.numel()}/{item['num_tokens']}" for k, item in zip(stage.kept_per_item, record.items))
            if not any(row[0] == "dense" for row in rows):
                all_tokens = ", ".join(str(item["num_tokens"]) for item in record.items)
                rows.insert(0, ("dense", "-", all_tokens, " ".join([str(dense_length)] * layers), ""))
            where = ", ".join(s.where for s in record.stages)
            rows.append((
                name,
                where,
                sizes,
                " ".join(map(str, record.seq_lens)),
                " ".join(map(str, out[0, batch["input_ids"].shape[1] :].tolist())),
            ))
            if family == "llava":
                side = int(record.items[0]["num_tokens"] ** 0.5)
                pictures.append((name, kept_map(stage.kept_per_item[0], side, side)))
        for row in rows:
            table.add_row(*row)
        console.print(table)
        if pictures:
            console.print("kept patches of the first image (# kept):")
            rows = [p.splitlines() for _, p in pictures]
            console.print("   ".join(f"{name:<{len(rows[0][0])}}" for name, _ in pictures))
            for line in zip(*rows):
                console.print("   ".join(line))
        console.print()

