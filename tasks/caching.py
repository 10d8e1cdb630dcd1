"""The phase cache policy: a key you can trust.

Key = the phase's config slice + sha256 of its input artifacts + hash of the stage1_core modules it
uses + the model fingerprint + the resolved output folder (`stage1_core.phases.pipeline.cache_key`).
A stored result counts as a hit only while the files it references still exist with their recorded
sha256 (the sidecar that `pipeline.run_phase` writes): `tasks.phases` checks that before each call
and runs the task with `refresh_cache` when it fails, so the phase reruns and its record is
overwritten under the same key. Nothing is deleted from result storage, so this holds for local and
remote storage alike. Prefect's TASK_SOURCE (wrapper text only) and DEFAULT (includes the run id)
would be wrong here.
"""

from __future__ import annotations

from typing import Any

from prefect.cache_policies import CachePolicy
from prefect.context import TaskRunContext

from stage1_core.phases import pipeline


class PhaseCachePolicy(CachePolicy):
    """Cache key from the `call` argument of a phase task (`pipeline.cache_key`)."""

    def compute_key(self, task_ctx: TaskRunContext, inputs: dict[str, Any], flow_parameters: dict[str, Any],
                    **kwargs: Any) -> str | None:
        return pipeline.cache_key(inputs["call"])


PHASE_CACHE = PhaseCachePolicy()
