"""Deployment tests run against a real local stack: `prefect server start`, the `gpu` and `cpu`
process pools, one worker each (started by deployments.stack, exactly as users do), and the
deployments of deployments/prefect.yaml. The fake backend keeps the runs short."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from deployments import stack

SCALE_VERDICT = "qc:\n  instruction_acceptance_min: 0.2\n  min_n: 3\n"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def live_stack(tmp_path_factory):
    """A running stack with everything deployed; yields its environment (PREFECT_API_URL etc.)."""
    state = tmp_path_factory.mktemp("stack")
    port = _free_port()
    os.environ["PREFECT_WORKER_QUERY_SECONDS"] = "1"  # stack_env keeps it: workers poll every second
    os.environ["PREFECT_WORKER_PREFETCH_SECONDS"] = "2"
    try:
        stack.up(state, port, cpu_limit=4)
        stack.deploy(state, port)
        env = stack.stack_env(state, port)
        env["STAGE1_TEST_STATE"] = str(state)
        from prefect.settings import PREFECT_API_AUTH_STRING, PREFECT_API_URL, temporary_settings

        assert env["PREFECT_API_AUTH_STRING"]  # the stack runs with API auth on, as users get it
        with temporary_settings(updates={PREFECT_API_URL: env["PREFECT_API_URL"],
                                         PREFECT_API_AUTH_STRING: env["PREFECT_API_AUTH_STRING"]}):
            yield env
    finally:
        stack.down(state)


@pytest.fixture(scope="session")
def scale_config(tmp_path_factory) -> str:
    """A config whose gate says scale on a 3-example fake run (thresholds lowered, min_n 3)."""
    path = tmp_path_factory.mktemp("cfg") / "scale_verdict.yaml"
    path.write_text(SCALE_VERDICT)
    return str(path)


def prefect_cli(env: dict, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "prefect", *args], env=env, capture_output=True, text=True,
                          timeout=timeout, cwd=stack.REPO)


def wait_state(flow_run_id, done, timeout: float = 240):
    """Poll a flow run until `done(state)`; returns the flow run."""
    from prefect.client.orchestration import get_client

    deadline = time.monotonic() + timeout
    with get_client(sync_client=True) as client:
        while True:
            fr = client.read_flow_run(flow_run_id)
            if fr.state is not None and done(fr.state):
                return fr
            if time.monotonic() > deadline:
                raise TimeoutError(f"flow run {flow_run_id} still {fr.state.name if fr.state else None}")
            time.sleep(1.0)


def start_run(deployment: str, parameters: dict, job_variables: dict | None = None):
    from prefect.deployments import run_deployment

    return run_deployment(deployment, parameters=parameters, timeout=0, as_subflow=False, job_variables=job_variables)


def output_of(env: dict, fr) -> Path:
    """A deployment run's output folder: ${STAGE1_OUTPUT_ROOT}/{deployment}/{flow_run_name}."""
    return Path(env["STAGE1_OUTPUT_ROOT"]) / "pilot" / fr.name
