"""Models and inputs for the command line: a checkpoint (``from_pretrained`` + its processor and chat template),
``embedded`` (the trained digits model shipped in the package), or a random model (``tiny:<family>``,
``shaped:llava``) for trying the tools without weights."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from vtprune.testing import FAMILIES

# OpenAI CLIP's normalisation, which LLaVA and Qwen-VL processors both use.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
SYNTHETIC = (*(f"tiny:{family}" for family in FAMILIES), "shaped:llava")
# random models with a word-level processor (tools that build prompts from text)
WITH_PROCESSOR = ("tiny:llava", "tiny:qwen2_vl", "tiny:qwen2_5_vl")
DEFAULT_PROMPT = "Describe the image in detail."


def check_model_spec(spec: str) -> None:
    """Fail with one short message when ``spec`` cannot name a model: every command checks it the same way.

    Accepted: ``embedded`` or ``embedded-qwen``, a random model (``tiny:<family>``, ``shaped:llava``), an existing
    local folder, or an ``organisation/name`` hub id. Anything else that looks like a path (``./x``, ``/x``, ``~/x``,
    ``a/b/c``) must exist, so a typo'd folder is reported as such instead of becoming a hub request. A local
    folder's ``*.safetensors`` headers are read, so truncated weights are named before anything slow starts.
    """
    from vtprune.embedded import MODELS

    if spec in SYNTHETIC or spec in MODELS:
        return
    path = Path(spec).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ValueError(f"model: {spec!r} is a file; give the checkpoint's folder (with config.json)")
        if not (path / "config.json").is_file():
            raise ValueError(f"model: {spec!r} has no config.json; give a folder saved by save_pretrained")
        _check_weights(path)
        return
    if ":" in spec:
        raise ValueError(f"model must be a checkpoint folder, an organisation/name hub id, embedded, embedded-qwen, "
                         f"or one of {', '.join(SYNTHETIC)}; got {spec!r}")  # fmt: skip
    if spec.count("/") != 1 or spec.startswith((".", "/", "~")):
        raise ValueError(f"model: no checkpoint folder at {spec!r} (and it is not an organisation/name hub id)")
    if _offline():
        raise ValueError(f"model: {spec!r} is not a local folder and the hub is offline (HF_HUB_OFFLINE); give "
                         "the folder the checkpoint was downloaded or saved to")  # fmt: skip


def _offline() -> bool:
    import os

    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def _check_weights(folder: Path) -> None:
    """A truncated or corrupt ``*.safetensors`` file named with what is wrong, before from_pretrained's long trace."""
    from safetensors import SafetensorError, safe_open

    for file in sorted(folder.glob("*.safetensors")):
        try:
            with safe_open(str(file), "pt"):
                pass
        except (SafetensorError, OSError) as error:
            reason = str(error).removeprefix("Error while deserializing header: ")
            raise ValueError(f"model: {file} is truncated or corrupt ({reason}); download or save it again") from None


# what AutoProcessor needs in a local folder: a tokenizer and an image processor config
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json")
_PROCESSOR_FILES = ("preprocessor_config.json", "processor_config.json")


def _check_processor_files(folder: Path) -> None:
    missing = [
        what for what, names in (("a tokenizer", _TOKENIZER_FILES), ("an image processor config", _PROCESSOR_FILES))
        if not any((folder / name).is_file() for name in names)
    ]  # fmt: skip
    if missing:
        raise ValueError(f"model: {str(folder)!r} has no usable processor: it lacks {' and '.join(missing)} "
                         f"({' / '.join(_PROCESSOR_FILES)}); save the processor beside the weights")  # fmt: skip


def load_model(
    spec: str, *, dtype: str = "auto", device: str = "cpu", text_processor: bool = False
) -> tuple[nn.Module, Any]:
    """``(model, processor)`` for a checkpoint path / hub id, or ``(model, None)`` for an embedded random model.

    The one loader of ``sweep``, ``report``, ``show`` and the lmms-eval model, so a bad ``spec`` (see
    :func:`check_model_spec`), a truncated weights file, a failed hub request or a missing processor gives the same
    short ``ValueError`` whichever command loaded it. ``dtype``: ``auto`` (the checkpoint's own), ``float32``,
    ``bfloat16`` or ``float16``. ``text_processor``: give embedded tiny models (LLaVA, Qwen) a word-level processor
    too, for tools that build prompts from text.
    """
    check_model_spec(spec)
    if spec in SYNTHETIC:
        from vtprune.testing import llava_shaped_model, tiny_model, tiny_processor

        family = spec.split(":", 1)[1]
        model = llava_shaped_model() if spec == "shaped:llava" else tiny_model(family)
        processor = None
        if text_processor:
            if spec not in WITH_PROCESSOR:
                raise ValueError(f"{spec} has no processor; use {', '.join(WITH_PROCESSOR)}")
            processor = tiny_processor(family, model)
        return model.to(device), processor
    from vtprune.embedded import MODELS, model_dir

    if spec in MODELS:
        spec = str(model_dir(spec))
    dtypes = {"auto": "auto", "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if dtype not in dtypes:
        raise ValueError(f"dtype must be one of {', '.join(dtypes)}, got {dtype!r}")
    folder = Path(spec).expanduser()
    if folder.is_dir():
        _check_processor_files(folder)
        spec = str(folder)
    from transformers import AutoModelForImageTextToText, AutoProcessor

    try:
        model = AutoModelForImageTextToText.from_pretrained(spec, dtype=dtypes[dtype], attn_implementation="sdpa")
    except (OSError, ValueError) as error:  # hub errors are OSErrors; an unknown architecture is a ValueError
        where = "" if folder.is_dir() else " (not a local folder, so it was asked of the hub)"
        raise ValueError(f"model: could not load {spec!r}{where}: {_first_line(error)}") from None
    try:
        processor = AutoProcessor.from_pretrained(spec)
    except (OSError, ValueError, TypeError) as error:
        raise ValueError(f"model: {spec!r} has no usable processor (tokenizer + image processor), which prompts "
                         f"are built with: {_first_line(error)}") from None  # fmt: skip
    return model.to(device).eval(), processor


def _first_line(error: BaseException) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return lines[0] if lines else type(error).__name__


def prepare_inputs(
    model: nn.Module,
    processor: Any,
    *,
    image: str | Path | Any | None = None,
    prompt: str = DEFAULT_PROMPT,
    video: str | Path | list[Any] | None = None,
) -> dict[str, Tensor]:
    """One prompt with one image (a file or a ``PIL.Image``), or with one video (``video``: a folder of frame images,
    read in name order, or a list of ``PIL.Image`` frames), as the model's processor and chat template build it.

    Embedded random models have no tokenizer: their prompt is random text tokens around the image (LLaVA-shaped:
    35 before and 20 after, like LLaVA-1.5's system prompt and a short question), and ``image`` (if given)
    replaces the random pixels, resized to what the tower takes; a video there is random frames, as many as given.
    """
    device = next(model.parameters()).device
    if video is not None:
        return _video_inputs(model, processor, video, prompt, device)
    picture = _open(image) if isinstance(image, (str, Path)) else image
    if processor is not None:
        if picture is None:
            raise ValueError("image is required with a checkpoint (the processor builds the prompt around it)")
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
        text = processor.apply_chat_template(messages, add_generation_prompt=True)
        batch = processor(images=[picture], text=[text], return_tensors="pt")
        dtype = next(model.parameters()).dtype
        return {k: (v.to(device, dtype) if v.is_floating_point() else v.to(device)) for k, v in batch.items()}
    from vtprune.testing import Image, llava_shaped_batch, make_batch

    vision = model.config.vision_config
    qwen = hasattr(vision, "spatial_merge_size")
    if not qwen and vision.image_size == 336:
        batch = llava_shaped_batch(model)
    else:
        batch = make_batch(model, [[35, Image(size=(64, 64) if qwen else (32, 32)), 20]])
    if picture is not None:
        _replace_pixels(model, batch, picture)
    return {k: v.to(device) for k, v in batch.items()}


def _video_inputs(model: nn.Module, processor: Any, video: str | Path | list[Any], prompt: str, device: Any) -> dict:
    """:func:`prepare_inputs` for a video: refused on families without video input, frames read from a folder."""
    from vtprune.api import adapter_for, model_info

    info = model_info(adapter_for(model))
    if "video" not in info.modalities:
        raise ValueError(f"video: {info.family_name or info.family} takes no video input; use --image, or a family "
                         "with video input (Qwen2-VL, Qwen2.5-VL, Qwen3-VL, LLaVA-OneVision, GLM-4V)")  # fmt: skip
    frames = _frames(video) if isinstance(video, (str, Path)) else list(video)
    if not frames:
        raise ValueError("video: no frames given")
    if processor is not None:
        messages = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": prompt}]}]
        text = processor.apply_chat_template(messages, add_generation_prompt=True)
        batch = processor(videos=[frames], text=[text], return_tensors="pt")
        dtype = next(model.parameters()).dtype
        return {k: (v.to(device, dtype) if v.is_floating_point() else v.to(device)) for k, v in batch.items()}
    from vtprune.testing import Video, make_batch

    # a random model's video: random pixels; Qwen packs two raw frames into one temporal slice
    slices = max(1, len(frames) // 2) if info.mrope else len(frames)
    batch = make_batch(model, [[35, Video(slices), 20]])
    return {k: v.to(device) for k, v in batch.items()}


def _frames(folder: str | Path) -> list[Any]:
    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"video: {str(folder)!r} is not a folder of frame images")
    names = sorted(p for p in folder.iterdir() if p.suffix.lower() in (".png", ".jpg", ".jpeg", ".bmp", ".webp"))
    if not names:
        raise ValueError(f"video: no frame images (.png, .jpg, ...) in {str(folder)!r}")
    return [_open(name) for name in names]


def embedded_example(prompt: str = DEFAULT_PROMPT) -> tuple[Any, str]:
    """The embedded digits model's default picture and question: a held-out grid and its own question (the
    model was trained on digit-grid questions, so the default prompt becomes the grid's question)."""
    from vtprune.data.digit_grids import generate, render

    doc = generate("test", 1, seed=0)[0]
    return render(doc), (doc["question"] if prompt == DEFAULT_PROMPT else prompt)


def _open(path: str | Path) -> Any:
    from PIL import Image as PILImage

    if not Path(path).is_file():
        raise ValueError(f"image: no such file {str(path)!r}")
    return PILImage.open(path).convert("RGB")


def _normalised(picture: Any, height: int, width: int) -> Tensor:
    import numpy as np

    resized = picture.resize((width, height))
    pixels = torch.from_numpy(np.asarray(resized, dtype=np.float32) / 255.0).permute(2, 0, 1)
    return (pixels - torch.tensor(CLIP_MEAN)[:, None, None]) / torch.tensor(CLIP_STD)[:, None, None]


def _replace_pixels(model: nn.Module, batch: dict[str, Tensor], picture: Any) -> None:
    """Put the picture where the random pixels of the batch's first image were."""
    vision = model.config.vision_config
    pixels = batch["pixel_values"]
    if hasattr(vision, "spatial_merge_size"):  # Qwen: flattened patches of a (t, h, w) grid
        from vtprune.adapters.qwen_vl import _patchify

        _, height, width = batch["image_grid_thw"][0].tolist()
        image = _normalised(picture, height * vision.patch_size, width * vision.patch_size)
        rows = _patchify(image, vision.spatial_merge_size, vision.patch_size, vision.temporal_patch_size)
        pixels[: rows.shape[0]] = rows.to(pixels.dtype)
        return
    # LLaVA: [images, 3, S, S]; LLaVA-NeXT: [images, views, 3, S, S], where every view gets the whole picture (the
    # base view exactly; the crops only approximately, which a random model cannot tell apart)
    image = _normalised(picture, vision.image_size, vision.image_size).to(pixels.dtype)
    pixels[0] = image
