"""The phase cache policy: a key you can trust.

Key = the phase's config slice + sha256 of its input artifacts + hash of the stage1_core modules it
uses + the model fingerprint + the resolved output folder (`stage1_core.pipeline.cache_key`).
A stored result counts as a hit only while the files it references still exist with their recorded
sha256 (the sidecar that `pipeline.run_phase` writes); otherwise the stale record is forgotten and
the phase reruns. Prefect's TASK_SOURCE (wrapper text only) and DEFAULT (includes the run id) would
be wrong here.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect.cache_policies import CachePolicy
from prefect.context import TaskRunContext
from prefect.results import get_result_store

from stage1_core import pipeline


def _forget(key: str) -> None:
    """Delete a stored result record (local result storage) so the transaction misses."""
    store = get_result_store()
    for storage in (store.metadata_storage, store.result_storage):
        resolve = getattr(storage, "_resolve_path", None)
        if resolve is None:
            continue
        try:
            Path(resolve(key)).unlink(missing_ok=True)
        except (OSError, ValueError):
            pass


class PhaseCachePolicy(CachePolicy):
    """Cache key from the `call` argument of a phase task; stale hits are forgotten."""

    def compute_key(self, task_ctx: TaskRunContext, inputs: dict[str, Any], flow_parameters: dict[str, Any],
                    **kwargs: Any) -> str | None:
        call = inputs["call"]
        key = pipeline.cache_key(call)
        if not pipeline.outputs_valid(call, key):
            _forget(key)
        return key


PHASE_CACHE = PhaseCachePolicy()
