"""Which model settings the phase cache key hashes: everything that can change outputs, not the batch
size (sampling is per item id, so batching changes speed only)."""

from __future__ import annotations

from pathlib import Path

import pytest

from stage1_core.phases import pipeline, run
from stage1_core.phases.plans import FileRef, ModelRecord, PhaseCall, PilotPlan, RunIdentity, RunMeta, SeedsSummary
from stage1_core.infra.config import ModelConfig, load_pilot_config


def _call(tmp_path: Path, phase: str = "generate_responses", **model: object) -> PhaseCall:
    """A real call of `phase` (run.make_call) on a fake plan whose model section is `model`."""
    cfg = load_pilot_config(None, {"model": {"id": "fake:1", **model}})
    plan = PilotPlan(config=cfg, config_hash="ef" * 32, output=str(tmp_path), folder_state="new",
                     seeds=SeedsSummary(path="seeds.jsonl", format="stage1", count=10, usable=10, sha256="01" * 32),
                     model=ModelRecord(id=cfg.model.id, weights_sha256="cd" * 32),
                     identity=RunIdentity(config_sha256="ef" * 32, seeds_sha256="01" * 32, model_weights_sha256="cd" * 32))
    ref = FileRef(path=str(tmp_path / "kept.jsonl"), rows=3, sha256="ab" * 32)
    inputs = {"generate_instructions": {}, "filter_instructions": {"generated": ref},
              "generate_responses": {"kept": ref}, "filter_pairs": {"responses": ref},
              "qc": {"generated": [ref], "instruction_rejected": [ref], "kept": ref, "responses": ref,
                     "pairs_kept": ref, "pairs_rejected": ref}}[phase]
    return run.make_call(plan, phase, meta=RunMeta(run_id="r1"), round=1, iteration=1, inputs=inputs)


@pytest.mark.parametrize("phase", ["generate_instructions", "generate_responses", "filter_pairs"])
def test_batch_size_does_not_change_the_key(tmp_path: Path, phase: str) -> None:
    keys = {pipeline.cache_key(_call(tmp_path, phase, batch_size=b)) for b in (16, 64, "auto")}
    assert len(keys) == 1


@pytest.mark.parametrize("change", [{"dtype": "bfloat16"}, {"engine": "reference"}, {"quantize": "4bit"},
                                   {"bos_policy": "always"}, {"device": "cuda:0"}, {"id": "fake:2"}])
def test_output_changing_settings_change_the_key(tmp_path: Path, change: dict) -> None:
    base = pipeline.cache_key(_call(tmp_path, batch_size=16))
    assert pipeline.cache_key(_call(tmp_path, batch_size=16, **change)) != base
    assert pipeline.cache_key(_call(tmp_path, batch_size=64, **change)) != base


def test_every_model_key_but_batch_size_is_hashed() -> None:
    hashed = set(pipeline.model_settings(ModelConfig()))
    assert hashed == set(ModelConfig.model_fields) - {"batch_size"}
    assert {"engine", "quantize", "dtype"} <= hashed


def test_qc_ignores_the_model(tmp_path: Path) -> None:
    assert pipeline.cache_key(_call(tmp_path, "qc", dtype="bfloat16")) == pipeline.cache_key(_call(tmp_path, "qc"))


@pytest.mark.parametrize("gpu", [False, True])
@pytest.mark.parametrize("model_id, gpu_dtype", [("embedded:gemma-3-270m", "float32"), ("random:gemma3-4b", "bfloat16")])
def test_auto_device_and_dtype_are_hashed_resolved(tmp_path: Path, monkeypatch, gpu: bool, model_id: str,
                                                   gpu_dtype: str) -> None:
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: gpu)
    real = {"id": model_id}
    auto = pipeline.cache_key(_call(tmp_path, **real, device="auto", dtype="auto"))
    cpu = pipeline.cache_key(_call(tmp_path, **real, device="cpu", dtype="float32"))
    cuda = pipeline.cache_key(_call(tmp_path, **real, device="cuda", dtype=gpu_dtype))
    cuda_other = pipeline.cache_key(_call(tmp_path, **real, device="cuda",
                                          dtype="bfloat16" if gpu_dtype == "float32" else "float32"))
    # "auto" is a hit exactly for what it resolves to here: float32 on the CPU; on a GPU float32 for
    # the 270M (at most sizing.SMALL_MODEL_PARAMS), bfloat16 for a 4B.
    assert (auto == cuda) if gpu else (auto == cpu)
    assert auto != cuda_other
    assert cpu != cuda


def test_a_phase_hashes_the_modules_its_function_reaches_computed_from_imports(tmp_path: Path, monkeypatch) -> None:
    """The code part of the key follows real imports (issue 21): a helper module added on a phase's
    path enters that phase's key and no other's; a module only another phase reaches stays out."""
    import shutil

    core = tmp_path / "stage1_core"
    shutil.copytree(pipeline.CORE_DIR, core, ignore=shutil.ignore_patterns("__pycache__"))
    monkeypatch.setattr(pipeline, "CORE_DIR", core)
    before = {ph: pipeline.code_hash(ph) for ph in pipeline.PHASES}
    assert "model.backend" in pipeline.phase_modules("generate_responses")  # once missing from the hand list
    assert "phases.qc" not in pipeline.phase_modules("generate_instructions")
    assert "phases.critic" not in pipeline.phase_modules("generate_responses")

    # a new helper module, imported lazily inside a function of prompts.py (on the generation path)
    (core / "phases" / "wording.py").write_text("def tidy(s):\n    return s.strip()\n")
    prompts_py = core / "phases" / "prompts.py"
    prompts_py.write_text(prompts_py.read_text() + "\n\ndef _tidy(s):\n    from stage1_core.phases.wording import tidy\n"
                          "    return tidy(s)\n")
    after = {ph: pipeline.code_hash(ph) for ph in pipeline.PHASES}
    assert "phases.wording" in pipeline.phase_modules("generate_responses")
    assert after["generate_responses"] != before["generate_responses"]
    assert after["qc"] == before["qc"]  # qc does not reach prompts.py

    (core / "phases" / "wording.py").write_text("def tidy(s):\n    return s.strip().lower()\n")  # edit the helper alone
    assert pipeline.code_hash("generate_responses") != after["generate_responses"]
    assert pipeline.code_hash("qc") == before["qc"]
    generation = pipeline.code_hash("generate_instructions")

    qc_py = core / "phases" / "qc.py"
    qc_py.write_text(qc_py.read_text() + "\n# an edit only the qc phase reaches\n")
    assert pipeline.code_hash("qc") != before["qc"]
    assert pipeline.code_hash("generate_instructions") == generation


def test_function_modules_follows_same_module_helpers_and_not_other_functions(tmp_path: Path) -> None:
    from stage1_core.infra import codehash

    pkg = tmp_path
    (pkg / "main.py").write_text(
        "from stage1_core import a\nfrom stage1_core.b import thing\nimport stage1_core.c as c\n\n"
        "def phase():\n    return _helper() + a.x\n\n"
        "def _helper():\n    return thing\n\n"
        "def other():\n    return c.y\n")
    (pkg / "a.py").write_text("x = 1\n")
    (pkg / "b.py").write_text("def g():\n    from stage1_core import d\n    return d\nthing = 2\n")
    (pkg / "c.py").write_text("y = 3\n")
    (pkg / "d.py").write_text("from stage1_core import b\n")  # a cycle is fine
    assert codehash.function_modules(pkg, "main", "phase") == {"main", "a", "b", "d"}
    assert codehash.function_modules(pkg, "main", "other") == {"main", "c"}
    with pytest.raises(KeyError):
        codehash.function_modules(pkg, "main", "nope")


def test_function_modules_names_nested_modules_and_the_packages_they_run(tmp_path: Path) -> None:
    """Packages (issue 21): `from stage1_core.p import m` binds the module p.m, `from stage1_core.p.m
    import f` binds p.m, and importing p.m also runs (so depends on) p/__init__.py."""
    from stage1_core.infra import codehash

    (tmp_path / "p").mkdir()
    (tmp_path / "q").mkdir()
    (tmp_path / "p" / "__init__.py").write_text("")
    (tmp_path / "q" / "__init__.py").write_text("from stage1_core.q.inner import z\n")  # a facade
    (tmp_path / "p" / "m.py").write_text("x = 1\n")
    (tmp_path / "p" / "n.py").write_text("def f():\n    return 2\n")
    (tmp_path / "q" / "inner.py").write_text("z = 3\n")
    (tmp_path / "main.py").write_text("from stage1_core.p import m\nfrom stage1_core.p.n import f\n"
                                      "from stage1_core.q import z\n\n"
                                      "def phase():\n    return m.x + f() + z\n\ndef other():\n    return m.x\n")
    assert codehash.function_modules(tmp_path, "main", "phase") == {"main", "p", "p.m", "p.n", "q", "q.inner"}
    assert codehash.function_modules(tmp_path, "main", "other") == {"main", "p", "p.m"}
    assert codehash.module_path(tmp_path, "q") == tmp_path / "q" / "__init__.py"
    assert codehash.module_path(tmp_path, "p.m") == tmp_path / "p" / "m.py"
    assert codehash.module_path(tmp_path, "p.nope") is None


@pytest.mark.parametrize("env", ["STAGE1_ENGINE_FP8", "STAGE1_ENGINE_KV_FP8"])
def test_a_lossy_engine_switch_changes_the_key_of_a_real_model_on_the_engine(tmp_path: Path, monkeypatch,
                                                                           env: str) -> None:
    real = {"id": "embedded:gemma-3-270m", "device": "cpu", "dtype": "float32"}
    monkeypatch.delenv("STAGE1_ENGINE_FP8", raising=False)
    monkeypatch.delenv("STAGE1_ENGINE_KV_FP8", raising=False)
    keys = {}
    for value in ("0", "1"):
        monkeypatch.setenv(env, value)
        keys[value] = {kind: pipeline.cache_key(_call(tmp_path, **cfg)) for kind, cfg in
                       (("real", real), ("reference", {**real, "engine": "reference"}), ("fake", {}))}
    assert keys["1"]["real"] != keys["0"]["real"]
    assert keys["1"]["reference"] == keys["0"]["reference"]  # plain generate runs no engine switch
    assert keys["1"]["fake"] == keys["0"]["fake"]
    monkeypatch.delenv(env)
    assert pipeline.cache_key(_call(tmp_path, **real)) == keys["0"]["real"]  # off is unset: keys stay as they were
