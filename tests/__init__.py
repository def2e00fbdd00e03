"""vtprune test suite (a regular package: lmms-eval pulls in a dependency that installs a top-level `tests`)."""
