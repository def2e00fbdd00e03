"""The kernel tests' fixture: Triton's interpreter on CPU."""

from __future__ import annotations

import pytest


@pytest.fixture
def interpreter(monkeypatch):
    # Triton reads the flag when a kernel is defined; vtprune defines kernels lazily, per flag value.
    monkeypatch.setenv("TRITON_INTERPRET", "1")
