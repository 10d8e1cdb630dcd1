"""Flow tests run against a real Prefect: one session-scoped test harness (a temporary server);
subprocess runs are pointed at the same server through PREFECT_API_URL."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session", autouse=True)
def prefect_harness():
    from prefect.settings import PREFECT_FLOWS_HEARTBEAT_FREQUENCY, temporary_settings
    from prefect.testing.utilities import prefect_test_harness

    # Heartbeats stay on in what ships; here they only add ~1 s per in-process flow run.
    with prefect_test_harness(server_startup_timeout=120), \
            temporary_settings(updates={PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None}):
        yield


@pytest.fixture(scope="session")
def api_url(prefect_harness) -> str:
    from prefect.settings import PREFECT_API_URL

    return PREFECT_API_URL.value()


@pytest.fixture()
def run_cli(api_url, tmp_path):
    """Run `python -m flows.pilot ARGS` in a subprocess from `tmp_path`; returns CompletedProcess."""

    def _run(*args: str, env: dict[str, str] | None = None, cwd: Path | None = None, timeout: float = 300):
        e = dict(os.environ, PREFECT_API_URL=api_url, PYTHONPATH=str(REPO))
        e.update(env or {})
        return subprocess.run([sys.executable, "-m", "flows.pilot", *args], cwd=cwd or tmp_path, env=e,
                              capture_output=True, text=True, timeout=timeout)

    return _run


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
