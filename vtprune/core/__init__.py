"""The small core where methods and model adapters meet: registry, budgets, layouts, the engine, the handle."""
