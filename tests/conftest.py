"""Shared test setup: offline, telemetry off, Prefect results in a temp folder (set before prefect
is imported), flow heartbeats off (tests/flows/conftest.py), and a session-wide real embedded model when a test asks for it."""

from __future__ import annotations

import os
import tempfile

_TMP = tempfile.mkdtemp(prefix="stage1-tests-")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("USE_HUB_KERNELS", "0")
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
os.environ["PREFECT_LOCAL_STORAGE_PATH"] = os.path.join(_TMP, "prefect-results")
os.environ.setdefault("PREFECT_HOME", os.path.join(_TMP, "prefect-home"))
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def real_backend():
    """The embedded gemma-3-270m base model, loaded once per test session (cached on disk)."""
    from stage1_core.infra.config import ModelConfig
    from stage1_core.model import load_backend

    return load_backend(ModelConfig())


def pytest_collection_modifyitems(config, items) -> None:
    """The fast tier (`pytest -m fast`, docs/testing.md): tests/core without the real model or a
    `not_fast` mark: pure functions and the fake backend, no Prefect server, no model weights."""
    for item in items:
        if "/tests/core/" in item.path.as_posix() and not any(item.iter_markers("real_model")) \
                and not any(item.iter_markers("not_fast")):
            item.add_marker(pytest.mark.fast)
