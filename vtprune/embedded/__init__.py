"""The embedded default models: a tiny LLaVA and its Qwen2-VL twin, trained here on grids of real handwritten
digits and shipped in the package (safetensors, a few MB each), so sweeps give real accuracy curves with no
download.

``vtprune sweep`` and ``vtprune demo`` use the LLaVA when no ``--model`` is given; elsewhere pass ``--model
embedded`` (the LLaVA) or ``--model embedded-qwen`` (the twin: M-RoPE, no [CLS], a 2 x 2 patch merger), or load
one yourself::

    from transformers import AutoModelForImageTextToText, AutoProcessor
    model = AutoModelForImageTextToText.from_pretrained(vtprune.embedded.model_dir())
    processor = AutoProcessor.from_pretrained(vtprune.embedded.model_dir())

They are retrained with ``python -m vtprune.embedded.train`` and ``python -m vtprune.embedded.train_qwen``
(seeded; see those modules for the recipe).
"""

from __future__ import annotations

from pathlib import Path

EMBEDDED = "embedded"
EMBEDDED_QWEN = "embedded-qwen"
HERE = Path(__file__).resolve().parent
# model name -> (folder, the module that retrains it)
MODELS = {
    EMBEDDED: (HERE / "digits-llava", "vtprune.embedded.train"),
    EMBEDDED_QWEN: (HERE / "digits-qwen2-vl", "vtprune.embedded.train_qwen"),
}
MODEL_DIR = MODELS[EMBEDDED][0]
# weights of the trained methods (DyVTE, ATP-LLaVA, TokenFLEX) for the embedded LLaVA, one folder per method
TRAINED = HERE / "trained"


def trained_dir(method: str) -> Path:
    """Folder of a trained method's weights and ``training.json`` shipped for the embedded LLaVA."""
    return TRAINED / method


def model_dir(name: str = EMBEDDED) -> Path:
    """Folder of an embedded checkpoint (``config.json``, ``model.safetensors``, tokenizer, processor);
    ``name``: ``embedded`` (the LLaVA) or ``embedded-qwen`` (its Qwen2-VL twin)."""
    if name not in MODELS:
        raise ValueError(f"embedded model must be one of {', '.join(MODELS)}, got {name!r}")
    folder, trainer = MODELS[name]
    if not (folder / "model.safetensors").exists():
        raise FileNotFoundError(f"the embedded model {name} is missing from {folder}; retrain it with "
                                f"python -m {trainer}")  # fmt: skip
    return folder
