"""deployments/prefect.yaml: it parses, every entrypoint imports as a flow named stage1, pools and
schedules are as documented, and every flow's default parameters validate against its schema."""

from __future__ import annotations

import yaml

from deployments import stack

EXPECTED = {"pilot": "gpu", "scale": "cpu", "scale-shard": "gpu", "approval-timeout": "cpu", "sft": "gpu", "eval": "gpu"}


def _deployments() -> dict[str, dict]:
    doc = yaml.safe_load(stack.PREFECT_FILE.read_text())
    return {d["name"]: d for d in doc["deployments"]}


def test_prefect_yaml_declares_the_deployments_on_their_pools():
    deps = _deployments()
    assert set(deps) == set(EXPECTED)
    for name, pool in EXPECTED.items():
        assert deps[name]["work_pool"]["name"] == pool, name
        assert deps[name]["enforce_parameter_schema"] is True, name
    (schedule,) = deps["scale"]["schedules"]
    assert schedule["cron"] and schedule["active"] is False
    doc = yaml.safe_load(stack.PREFECT_FILE.read_text())
    (pull,) = doc["pull"]
    assert pull["prefect.deployments.steps.set_working_directory"]["directory"] == "{{ stage1-repo.stdout }}"


def test_every_entrypoint_imports_and_default_parameters_validate(monkeypatch):
    from prefect.flows import load_flow_from_entrypoint
    from prefect.utilities import schema_tools
    from prefect.utilities.callables import parameter_schema

    monkeypatch.chdir(stack.REPO)
    for name, dep in _deployments().items():
        flow = load_flow_from_entrypoint(str(stack.REPO / dep["entrypoint"].split(":")[0]) + ":" + dep["entrypoint"].split(":")[1])
        assert flow.name == "stage1", name
        schema = parameter_schema(flow).model_dump_for_openapi()
        assert schema["type"] == "object"
        # every default (the flow's, overlaid with the deployment's) validates against the schema the
        # server enforces; parameters without a default stay required
        params = {k: v["default"] for k, v in schema["properties"].items() if "default" in v}
        params.update(dep.get("parameters") or {})
        errors = schema_tools.validate(params, {**schema, "required": []}, raise_on_error=False)
        assert not errors, (name, errors)
        if not schema.get("required"):
            flow.validate_parameters(params)


def test_pilot_schema_refuses_what_it_can_express():
    from prefect.utilities.callables import parameter_schema

    from flows.pilot import pilot

    props = parameter_schema(pilot).model_dump_for_openapi()["properties"]
    count = next(a for a in props["count"]["anyOf"] if a.get("type") == "integer")  # null: the config's count
    assert count["exclusiveMinimum"] == 0 and count["maximum"] == 1_000_000
    assert props["scale_count"]["minimum"] == 0
    assert props["approval_timeout_s"]["exclusiveMinimum"] == 0
    assert set(props["bos_policy"]["anyOf"][0]["enum"]) == {"auto", "always", "never"}


def test_visible_gpus_follow_cuda_visible_devices():
    assert stack.visible_gpus({"CUDA_VISIBLE_DEVICES": "0,1"}) == ["0", "1"]
    assert stack.visible_gpus({"CUDA_VISIBLE_DEVICES": ""}) == []


def test_status_shows_each_worker_pinned_to_its_gpu(tmp_path):
    import json
    import os

    procs = {f"worker-gpu-{i}": {"pid": os.getpid(), "log": f"w{i}.log", "cuda_visible_devices": str(i)} for i in (0, 1)}
    procs["worker-cpu"] = {"pid": os.getpid(), "log": "c.log", "cuda_visible_devices": ""}
    (tmp_path / "procs.json").write_text(json.dumps(procs))
    lines = stack.status(tmp_path).splitlines()
    assert [line.split("  ")[-1] for line in lines] == ["GPU 0 (CUDA_VISIBLE_DEVICES=0)", "GPU 1 (CUDA_VISIBLE_DEVICES=1)",
                                                        "no GPU (CUDA_VISIBLE_DEVICES='')"]
    assert stack.pinning(None) == "CUDA_VISIBLE_DEVICES unset (every GPU visible)"
