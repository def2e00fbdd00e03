"""The embedded DToP segmenter: a small timm ViT with three stage heads, trained here on digit scenes
(:mod:`vtprune.data.digit_scenes`), shipped as ``digits-dtop/`` (``config.json`` + ``model.safetensors``).

    from vtprune.embedded.segmenter import load_segmenter, to_tensor
    model = load_segmenter()
    out = model(to_tensor(images), thresh=0.95)   # images: [B, 64, 64, 3] uint8
    labels = out.labels((64, 64))

Retrain with ``python -m vtprune.embedded.train_dtop`` (seeded).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from vtprune.data.digit_scenes import CLASSES, SceneSpec
from vtprune.methods.dtop import DToPSegmenter

SEGMENTER_DIR = Path(__file__).resolve().parent / "digits-dtop"
BACKBONE = {"img_size": SceneSpec.size, "patch_size": 4, "embed_dim": 128, "depth": 6, "num_heads": 4}
MEAN, STD = 0.5, 0.25


def build_segmenter(seed: int = 0, backbone: dict[str, Any] | None = None, **options: Any) -> DToPSegmenter:
    """A freshly initialised (seeded) segmenter: timm ``VisionTransformer`` without [CLS] (as DToP) + heads;
    ``options`` go to :class:`DToPSegmenter` (``stages``, ``head_layers``, ``keep_per_class``)."""
    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(seed)
    vit = VisionTransformer(**(backbone or BACKBONE), num_classes=0, global_pool="", class_token=False)
    return DToPSegmenter(vit, len(CLASSES), **options)


def to_tensor(images: np.ndarray | Tensor) -> Tensor:
    """``[B, H, W, 3]`` uint8 -> the normalised ``[B, 3, H, W]`` float input."""
    pixels = torch.as_tensor(images).permute(0, 3, 1, 2).float() / 255.0
    return (pixels - MEAN) / STD


def save_segmenter(model: DToPSegmenter, out: Path, backbone: dict[str, Any], extra: dict[str, Any]) -> None:
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(out / "model.safetensors"))
    (out / "config.json").write_text(json.dumps({"backbone": backbone, **model.config()}, indent=2))
    (out / "training.json").write_text(json.dumps(extra, indent=2))


def load_segmenter(path: Path | str | None = None) -> DToPSegmenter:
    """The shipped segmenter (or one saved by the training script at ``path``), in eval mode."""
    from safetensors.torch import load_file

    folder = Path(path) if path is not None else SEGMENTER_DIR
    if not (folder / "model.safetensors").exists():
        raise FileNotFoundError(f"no segmenter in {folder}; train one with python -m vtprune.embedded.train_dtop")
    config = json.loads((folder / "config.json").read_text())
    options = {k: config[k] for k in ("stages", "head_layers", "keep_per_class")}
    model = build_segmenter(backbone=config["backbone"], **options)
    model.load_state_dict(load_file(str(folder / "model.safetensors")))
    return model.eval()
