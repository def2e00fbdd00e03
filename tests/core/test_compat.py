"""What breaks when transformers moves: padded batched generate with in-LLM pruning, Qwen positions, the cache's
two names, and the declared version range (run by `make test` on the pinned release and `make test-latest` on the
newest one pyproject.toml allows)."""

from __future__ import annotations

import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import tomllib
import torch
import transformers
from packaging.specifiers import SpecifierSet
from torch.testing import assert_close

import vtprune
from tests.helpers import FAMILIES, Image, inapplicable, make_batch, tiny_model
from vtprune.core import compat

ROOT = Path(__file__).resolve().parents[2]
# Random models may emit any id; keep placeholder/special ids out of generated text.
NO_SPECIAL = {"suppress_tokens": list(range(120, 128)), "pad_token_id": 0}
IN_LLM = [
    ("fastv", {}),
    ("pdrop", {}),
    ("entropyprune", {}),
    ("random", {"layer": 2}),
]
PROMPTS = [[2, Image(), 2], [3, Image(), 5]]  # different lengths: the shorter one is padded


def _new_tokens(model, batch: dict, steps: int) -> torch.Tensor:
    out = model.generate(**batch, max_new_tokens=steps, min_new_tokens=steps, do_sample=False, **NO_SPECIAL)
    return out[:, -steps:]


@pytest.mark.parametrize("method,options", IN_LLM, ids=[m for m, _ in IN_LLM])
@pytest.mark.parametrize("family", FAMILIES)
def test_padded_batch_generate_equals_each_prompt_alone(family, method, options):
    """Decode steps after an in-LLM pruning point must get each pruned segment's own (shorter) mask; greedy tokens
    of a left-padded batch equal each prompt's generated alone."""
    if reason := inapplicable(family, method, options):
        pytest.skip(reason)
    model = tiny_model(family)
    steps = 4
    batch = make_batch(model, PROMPTS)
    with vtprune.wrap(model, method, keep=8, **options) as pruning:
        batched = _new_tokens(model, batch, steps)
        assert pruning.seq_lens[-1] < pruning.seq_lens[0]  # it did prune inside the LLM
        for sample, prompt in enumerate(PROMPTS):
            alone = _new_tokens(model, make_batch(model, [prompt], seed=sample), steps)
            assert torch.equal(batched[sample], alone[0]), f"sample {sample}: {batched[sample]} vs {alone[0]}"


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl"])
def test_qwen_keep_all_equals_dense(family):
    """The wrapped forward computes the full prompt's M-RoPE positions itself (compute_3d_position_ids)."""
    model = tiny_model(family)
    batch = make_batch(model, PROMPTS)
    dense = model(**batch).logits
    for method, options in [("random", {}), *IN_LLM]:
        with vtprune.wrap(model, method, keep=1.0, **options):
            assert_close(model(**batch).logits, dense, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_cache_under_either_name_continues_a_pruned_prefill(family):
    """Callers spell the cache `past_key_values` (transformers <= 5.23) or `cache` (5.24+); both reach the engine."""
    model = tiny_model(family)
    batch = make_batch(model, PROMPTS)
    steps = []
    with vtprune.wrap(model, "fastv", keep=4) as pruning:
        for name in compat.CACHE_NAMES:
            prefill = model(**batch, use_cache=True)
            cache = compat.output_cache(prefill)
            token = prefill.logits[:, -1:].argmax(-1)
            mask = torch.cat([batch["attention_mask"], torch.ones_like(token)], 1)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # the old name is deprecated from 5.24
                steps.append(model(input_ids=token, attention_mask=mask, **{name: cache}).logits)
            # the layers after the pruning point cached only the kept tokens, then the new one
            last = len(cache.layers) - 1
            assert cache.get_seq_length(last) == pruning.seq_lens[last] + 1 < cache.get_seq_length(0)
    assert_close(steps[0], steps[1])


def test_pyproject_declares_the_tested_transformers_range():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    spec = next(d for d in project["dependencies"] if d.startswith("transformers"))
    assert SpecifierSet(spec.removeprefix("transformers")) == SpecifierSet(compat.tested_range())


def test_installed_transformers_lies_in_the_tested_range():
    assert compat.check_transformers_version(), transformers.__version__


def test_outside_the_tested_range_wrap_warns_once_and_still_wraps(monkeypatch):
    low, high = compat.TESTED_TRANSFORMERS
    monkeypatch.setattr(compat.transformers, "__version__", f"{high}.1")
    model = tiny_model("llava")
    with pytest.warns(UserWarning, match=rf"tested with transformers >={low},<{high}, but {high}\.1"):
        vtprune.wrap(model, "random", keep=4).unwrap()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        vtprune.wrap(model, "random", keep=4).unwrap()  # once is enough
    assert compat.check_transformers_version(f"{low}.0.dev0")
    with pytest.warns(UserWarning, match="but 5.0.0 is installed"):
        assert not compat.check_transformers_version("5.0.0")


def test_python_dash_m_runs_the_cli():
    result = subprocess.run(
        [sys.executable, "-m", "vtprune", "methods"], capture_output=True, text=True, cwd=ROOT, check=False
    )
    assert result.returncode == 0, result.stderr
    assert "fastv" in result.stdout and "vtprune methods" in result.stdout


def test_readme_states_the_tested_range():
    low, high = compat.TESTED_TRANSFORMERS
    assert f">= {low}, < {high}" in (ROOT / "README.md").read_text()
