"""The README's method example must work as written."""

import re
from pathlib import Path

import torch

import vtprune
from vtprune.testing import Image, make_batch, tiny_model

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_method_example_registers_and_prunes():
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    example = next(b for b in blocks if "register_method" in b)
    namespace = {"vtprune": vtprune}
    exec("from dataclasses import dataclass\n" + example, namespace)
    try:
        model = tiny_model("llava")
        batch = make_batch(model, [[3, Image(), 4]])
        with vtprune.wrap(model, "my_norm", keep=5) as pruning, torch.no_grad():
            model(**batch)
        assert pruning.seq_lens[2] == batch["input_ids"].shape[1] - 64 + 5
    finally:
        from vtprune.core.registry import unregister_method

        unregister_method("my_norm")


def test_readme_what_if_flops_example_runs():
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    example = next(b for b in blocks if "schedule_flops" in b)
    namespace: dict = {}
    exec(example.replace("print(", "saved = ("), namespace)
    assert 0.5 < namespace["saved"] < 0.9  # FastV at 64 of 576 tokens from layer 2 of 32


def test_readme_dtop_example_runs():
    block = next(b for b in re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S) if "load_segmenter" in b)
    namespace: dict = {}
    exec(block, namespace)
    assert namespace["out"].labels((64, 64)).shape == (8, 64, 64)
