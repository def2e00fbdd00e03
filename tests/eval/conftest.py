"""Evaluation tests run offline: no hub, no dataset downloads, and the local task YAMLs in a per-session folder."""

from __future__ import annotations

import pytest


@pytest.fixture(autouse=True)
def _offline_task_dir(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("VTPRUNE_TASKS_DIR", str(tmp_path_factory.getbasetemp() / "lmms_tasks"))
