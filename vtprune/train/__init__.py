"""Training entry points of the trained methods (``python -m vtprune.train.<method> --model embedded``): DyVTE's
exit gates, ATP-LLaVA's pruning modules, TokenFLEX's flexible projector. Each run is seeded, writes the method's
``model.safetensors`` (read by ``vtprune.wrap(model, "<method>", keep, weights=PATH)``) and ``training.json`` (recipe,
time, held-out figures); the shipped instances for the embedded LLaVA live in ``vtprune/embedded/trained/``."""
