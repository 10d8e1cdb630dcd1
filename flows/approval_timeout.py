"""The deadline of a pilot's approval: scheduled by the pilot at its deadline, it resumes the pilot
if it is still waiting, with a rejection that the pilot records as `rejected (timeout)`.

Deployed as `stage1/approval-timeout` on the `cpu` pool (deployments/prefect.yaml).
"""

from __future__ import annotations

from uuid import UUID

from prefect import flow, get_run_logger

from stage1_core.phases.approval import TIMEOUT_NOTE


@flow(name="stage1", flow_run_name="approval-timeout-{flow_run_id}")
def approval_timeout(flow_run_id: str) -> str:
    """Resume the pilot `flow_run_id` as rejected (timeout) if it still waits; otherwise do nothing."""
    from prefect.client.orchestration import get_client
    from prefect.flow_runs import resume_flow_run

    with get_client(sync_client=True) as client:
        state = client.read_flow_run(UUID(flow_run_id)).state
    if state is None or not state.is_paused():
        get_run_logger().info("flow run %s is %s: already decided", flow_run_id, state.name if state else "gone")
        return "already decided"
    resume_flow_run(UUID(flow_run_id), run_input={"decision": "reject", "note": TIMEOUT_NOTE})
    get_run_logger().info("flow run %s resumed as rejected (timeout)", flow_run_id)
    return "rejected (timeout)"
