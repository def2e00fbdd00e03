"""The embedded default model: a tiny LLaVA trained here on grids of real handwritten digits, shipped in the
package (safetensors, a few MB), so sweeps give real accuracy curves with no download.

``vtprune sweep`` and ``vtprune demo`` use it when no ``--model`` is given; elsewhere pass ``--model embedded`` or
load it yourself::

    from transformers import AutoProcessor, LlavaForConditionalGeneration
    model = LlavaForConditionalGeneration.from_pretrained(vtprune.embedded.model_dir())
    processor = AutoProcessor.from_pretrained(vtprune.embedded.model_dir())

It is retrained with ``python -m vtprune.embedded.train`` (seeded; see that module for the recipe).
"""

from __future__ import annotations

from pathlib import Path

EMBEDDED = "embedded"
MODEL_DIR = Path(__file__).resolve().parent / "digits-llava"


def model_dir() -> Path:
    """Folder of the embedded checkpoint (``config.json``, ``model.safetensors``, tokenizer, processor)."""
    if not (MODEL_DIR / "model.safetensors").exists():
        raise FileNotFoundError(f"the embedded model is missing from {MODEL_DIR}; retrain it with "
                                "python -m vtprune.embedded.train")  # fmt: skip
    return MODEL_DIR
