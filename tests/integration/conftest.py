"""Integration tests use the real embedded model and a real Prefect (the flows' harness)."""

from tests.flows.conftest import api_url, prefect_harness, run_cli  # noqa: F401  (shared fixtures)
