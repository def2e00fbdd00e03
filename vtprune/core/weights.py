"""Weights of trained methods (DyVTE, ATP-LLaVA, TokenFLEX): one safetensors file per trained instance, its
metadata saying what it was trained for, loaded once per file and device."""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

if TYPE_CHECKING:
    from vtprune.core.registry import ModelInfo

WEIGHTS_FILE = "model.safetensors"


def save_weights(folder: str | Path, tensors: dict[str, Tensor], meta: dict[str, Any]) -> Path:
    """Write ``tensors`` and ``meta`` (JSON-able: the module's shape and what it was trained on) to
    ``folder/model.safetensors``; returns the file."""
    path = Path(folder) / WEIGHTS_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(path), {"vtprune": json.dumps(meta)})
    return path


def weights_path(method: str, given: str | Path | None, shipped: Path) -> Path:
    """The weights file a trained method loads: ``given`` (a file or a folder holding ``model.safetensors``), or
    the ``shipped`` one; a clear error naming the path when it is missing."""
    path = Path(given) if given is not None else shipped
    if path.is_dir():
        path = path / WEIGHTS_FILE
    if not path.is_file():
        raise FileNotFoundError(
            f"{method}: weights={str(path)!r} does not exist; pass weights= a {WEIGHTS_FILE} file (or its folder) "
            f"written by python -m vtprune.train.{method}"
        )
    return path


@lru_cache(maxsize=16)
def _read(path: str, mtime: float) -> tuple[dict[str, Tensor], dict[str, Any]]:
    from safetensors import safe_open

    with safe_open(path, framework="pt") as handle:
        meta = json.loads((handle.metadata() or {}).get("vtprune", "{}"))
    return load_file(path), meta


def load_weights(method: str, path: Path) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """The tensors and metadata of a weights file (read once while the file is unchanged)."""
    tensors, meta = _read(str(path), path.stat().st_mtime)
    if meta.get("method") != method:
        raise ValueError(f"{method}: {path} holds weights for {meta.get('method')!r}, not {method!r}")
    return tensors, meta


def check_trained_for(
    method: str, path: Path, meta: dict[str, Any], hidden_size: int, num_layers: int, family: str = ""
) -> None:
    """Refuse a model of another family (``ModelInfo.family``, where the weights name theirs) or whose language model
    differs in width or depth from the one the weights were trained on."""
    want = (meta.get("hidden_size"), meta.get("num_layers"))
    if family and meta.get("family") and family != meta["family"]:
        raise ValueError(
            f"{method}: the weights at {path} were trained on {meta.get('trained_on', 'another model')} (family "
            f"{meta['family']!r}), not on a {family!r} model; train weights for it with "
            f"python -m vtprune.train.{method}"
        )
    if hidden_size and (hidden_size, num_layers) != want:
        raise ValueError(
            f"{method}: the weights at {path} were trained on {meta.get('trained_on', 'another model')} (a "
            f"{want[1]}-layer language model of width {want[0]}), but this model's has {num_layers} layers of width "
            f"{hidden_size}; train weights for it with python -m vtprune.train.{method}"
        )


def checked_weights(
    method: str, given: str | Path | None, shipped: Path, model: ModelInfo
) -> tuple[Path, dict[str, Any]]:
    """The weights file a trained method loads (:func:`weights_path`) and its metadata; a clear error when they were
    trained on another model than ``model`` (what a method's ``stages()`` calls, so a wrap refuses at once)."""
    path = weights_path(method, given, shipped)
    _, meta = load_weights(method, path)
    check_trained_for(method, path, meta, model.hidden_size, model.num_layers, model.family)
    return path, meta


class ModuleCache:
    """A trained module built once per (weights file, device, dtype)."""

    def __init__(self) -> None:
        self._modules: dict[tuple[str, float, str, torch.dtype], torch.nn.Module] = {}

    def get(self, path: Path, build: Any, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
        key = (str(path), path.stat().st_mtime, str(device), dtype)
        if key not in self._modules:
            tensors, meta = _read(str(path), key[1])
            module = build(meta)
            module.load_state_dict(tensors)
            self._modules[key] = module.to(device=device, dtype=dtype).eval().requires_grad_(False)
        return self._modules[key]
