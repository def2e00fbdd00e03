"""The engine, in its parts: the orchestrator installs the hooks (``hooks.py``) and dispatches them; the vision
observer notes what the encoder produced (``observer.py``); the prefill planner lays out items, budgets and a
shorter prompt (``prefill.py``); the stage runner asks the method and records its selection (``stages.py``);
decode steps reuse the prefill's layouts (``decode.py``); per-forward state lives in ``state.py``."""

from vtprune.core.engine.orchestrator import PruningEngine

__all__ = ["PruningEngine"]
