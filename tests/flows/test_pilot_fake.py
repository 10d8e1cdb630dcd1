"""The pilot flow end to end on the fake backend, in-process against the Prefect test harness:
files, schema of outputs, provenance, iterate, and the cache invalidation matrix."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml

from stage1_core.phases import pipeline
from tests.flows.conftest import read_jsonl

FAKE = "fake:1"


def run_pilot(out: Path, **kw):
    from flows.pilot import pilot

    params = dict(count=12, output=str(out), seed=7, model=FAKE, max_iterations=0)
    params.update(kw)
    return pilot(**params)


def cached(out: Path) -> set[str]:
    m = json.loads((out / "session_manifest.json").read_text())
    return set(m["timings"]["cached_phases"])


def phases_of(names: set[str]) -> set[str]:
    return {n.split("-")[0] for n in names}


ALL = {"generate_instructions", "filter_instructions", "generate_responses", "filter_pairs", "qc"}


def test_pilot_writes_every_file_with_schema(tmp_path):
    out = tmp_path / "pilot"
    result = run_pilot(out)
    assert result["decision"] in {"scale", "iterate", "halt"}
    for name in ("pilot_data.jsonl", "rejected.jsonl", "qc_summary.json", "session_manifest.json", "config.yaml",
                 ".stage1_run.json"):
        assert (out / name).is_file(), name
    summary = json.loads((out / "qc_summary.json").read_text())
    assert summary["gate"]["decision"] == result["decision"] and summary["gate"]["reasons"]
    assert set(summary["metrics"]) >= {"runaway_rate", "token_limit_rate", "delimiter_leakage", "median_response_tokens",
                                      "instruction_acceptance", "pair_acceptance", "critic_dev_accuracy", "diversity"}
    assert summary["metrics"]["runaway_rate"]["ci95"][0] <= summary["metrics"]["runaway_rate"]["value"]
    assert set(summary["thresholds"]) >= {"runaway_rate_max", "min_n"}
    manifest = json.loads((out / "session_manifest.json").read_text())
    assert set(manifest["seeds"]) == {"path", "format", "count", "usable", "sha256"}
    assert manifest["seeds"]["count"] == 175 and manifest["seeds"]["format"] == "self_instruct"
    assert manifest["model"]["weights_sha256"] and manifest["model"]["id"] == FAKE
    for key in ("environment", "git", "timings", "tokens", "artifacts"):
        assert key in manifest
    arts = {Path(a["path"]).name: a for a in manifest["artifacts"]}
    data = read_jsonl(out / "pilot_data.jsonl")
    assert arts["pilot_data.jsonl"]["rows"] == len(data) == result["kept"]
    assert data, "the fake model should keep some pairs"
    row = data[0]
    assert set(row) >= {"instruction", "response", "instruction_critique", "pair_critique", "provenance"}
    prov = row["provenance"]
    assert prov["run_id"] == manifest["run_id"] and prov["config_hash"] == manifest["config_hash"]
    assert prov["model"]["weights_sha256"] == manifest["model"]["weights_sha256"] and prov["seed"] == 7
    assert prov["generation"]["response"]["max_new_tokens"] == 96
    rejected = read_jsonl(out / "rejected.jsonl")
    assert {r["phase"] for r in rejected} <= {"instruction_filter", "pair_filter"}
    # Every generated instruction is accounted for exactly once: kept pool or rejected.
    generated = [g["id"] for f in sorted((out / "instructions").glob("round-*.generated.jsonl")) for g in read_jsonl(f)]
    last_kept = sorted((out / "instructions").glob("round-*.kept.jsonl"))[-1]
    pool = [k["id"] for k in read_jsonl(last_kept)]
    dropped = [r["id"] for r in rejected if r["phase"] == "instruction_filter" and r["reason"] != "surplus_over_count"]
    assert sorted(generated) == sorted(pool + dropped) and len(set(generated)) == len(generated)
    pairs = [r["id"] for r in rejected if r["phase"] == "pair_filter"] + [d["id"] for d in data]
    assert sorted(pairs) == sorted(pool[:12])
    assert all(r["reason"] for r in rejected)
    # config.yaml is the resolved config: rerunning with it is the same run identity (all cached).
    cfg = yaml.safe_load((out / "config.yaml").read_text())
    assert cfg["count"] == 12 and cfg["model"]["id"] == FAKE
    again = run_pilot(out, config=str(out / "config.yaml"))
    assert again["decision"] == result["decision"]
    assert phases_of(cached(out)) == ALL
    assert read_jsonl(out / "pilot_data.jsonl") == data


def test_count_is_reached_over_rounds(tmp_path):
    out = tmp_path / "p"
    run_pilot(out, count=100)
    rows = read_jsonl(out / "iterations" / "01" / "responses.jsonl")
    assert len(rows) == 100
    # one round of 16 prompts is not enough (it keeps 74 with this seed), the second one is, and no third runs
    assert len(read_jsonl(out / "instructions" / "round-01.kept.jsonl")) < 100
    assert len(read_jsonl(out / "instructions" / "round-02.kept.jsonl")) >= 100
    assert not (out / "instructions" / "round-03.generated.jsonl").exists()


def test_iterate_lowers_temperature_until_runaway_passes(tmp_path):
    out = tmp_path / "it"
    result = run_pilot(out, model="fake:1,runaway=0.12", count=30, max_iterations=2)
    manifest = json.loads((out / "session_manifest.json").read_text())
    its = manifest["iterations"]
    assert len(its) >= 2 and its[0]["decision"]["decision"] == "iterate"
    assert "runaway_rate" in its[0]["decision"]["failed"]
    assert its[1]["response_generation"]["temperature"] == pytest.approx(0.6)
    assert (out / "iterations" / "02" / "qc_summary.json").exists()
    assert "temperature" in " ".join(its[0]["changes_for_next"])
    top = json.loads((out / "qc_summary.json").read_text())
    last = json.loads((Path(its[-1]["dir"]) / "qc_summary.json").read_text())
    assert top == last and result["decision"] == last["gate"]["decision"]


def test_iterate_with_no_reruns_writes_suggested_config(tmp_path):
    out = tmp_path / "s"
    result = run_pilot(out, model="fake:1,runaway=0.5", count=30, max_iterations=0)
    assert result["decision"] == "iterate" and result["exit_code"] == 3
    suggested = yaml.safe_load((out / "suggested_config.yaml").read_text())
    assert suggested["response_generation"]["temperature"] == pytest.approx(0.6)


LOW_TEMPERATURE = "instruction_generation:\n  temperature: 0.7\n"


def instruction_counts(folder: Path) -> dict[str, int]:
    """generated / kept / rejected-by-the-instruction-filter counted from an instruction folder's files."""
    generated = sum(len(read_jsonl(p)) for p in folder.glob("round-*.generated.jsonl"))
    kept = len(read_jsonl(sorted(folder.glob("round-*.kept.jsonl"))[-1]))
    rejected = sum(len(read_jsonl(p)) for p in folder.glob("round-*.rejected.jsonl"))
    return {"generated": generated, "kept": kept, "rejected": rejected}


def test_repeats_iterate_the_instruction_settings_then_scale(tmp_path):
    """A model that repeats itself at 0.7: near-duplicates iterate (not halt), the instruction temperature
    rises, phases 1-5 rerun into iterations/02/, and the counts agree with the files of each iteration."""
    cfg = tmp_path / "cool.yaml"
    cfg.write_text(LOW_TEMPERATURE)
    out = tmp_path / "rep"
    result = run_pilot(out, model="fake:1,repeat=0.8", count=30, max_iterations=2, config=str(cfg))
    manifest = json.loads((out / "session_manifest.json").read_text())
    its = manifest["iterations"]
    assert [it["decision"]["decision"] for it in its] == ["iterate", "scale"] and result["decision"] == "scale"
    assert "near_duplicate_share" in its[0]["decision"]["failed"]
    assert its[0]["changes_for_next"] == ["instruction temperature 0.7 → 0.9 (instruction_acceptance, "
                                          "near_duplicate_share failed: near-duplicates)"]
    assert [it["instruction_generation"]["temperature"] for it in its] == [0.7, 0.9]
    assert its[1]["response_generation"] == its[0]["response_generation"]  # only the instruction setting moved
    assert its[0]["instructions_dir"] == str(out / "instructions")
    assert its[1]["instructions_dir"] == str(out / "iterations" / "02" / "instructions")
    for it in its:  # qc_summary's counts are those of the iteration's own files
        summary = json.loads((Path(it["dir"]) / "qc_summary.json").read_text())
        files = instruction_counts(Path(it["instructions_dir"]))
        rejected = read_jsonl(Path(it["dir"]) / "rejected.jsonl")
        instr_rejected = [r for r in rejected if r["phase"] == "instruction_filter" and r["reason"] != "surplus_over_count"]
        assert summary["counts"]["instructions_generated"] == files["generated"]
        assert summary["counts"]["instructions_kept"] == files["kept"]
        assert len(instr_rejected) == files["rejected"] == files["generated"] - files["kept"]
        near = sum(1 for r in instr_rejected if r["reason"] in ("near_duplicate", "copies_seed"))
        m = summary["metrics"]
        assert (m["near_duplicate_share"]["k"], m["near_duplicate_share"]["n"]) == (near, files["generated"])
        critic = sum(1 for r in instr_rejected if r["reason"] == "critic")
        assert m["instruction_critic_acceptance"]["n"] == files["kept"] + critic
        pair_critic = sum(1 for r in rejected if r["phase"] == "pair_filter" and r["reason"] == "critic")
        assert m["pair_critic_acceptance"]["n"] == summary["counts"]["pairs_kept"] + pair_critic
        assert sum(summary["rejected_by_reason"].values()) == len(rejected) == summary["counts"]["rejected"]
    first, second = (json.loads((Path(it["dir"]) / "qc_summary.json").read_text())["metrics"] for it in its)
    assert first["near_duplicate_share"]["value"] >= 0.3 > second["near_duplicate_share"]["value"]
    data = read_jsonl(out / "pilot_data.jsonl")  # the kept rows carry the settings that made them
    assert {r["provenance"]["generation"]["instruction"]["temperature"] for r in data} == {0.9}
    assert {r["provenance"]["iteration"] for r in data} == {2}
    phases = manifest["timings"]["phases"]  # the rerun's rounds are timed apart from the first ones
    assert "generate_instructions-round-01" in phases and "generate_instructions-round-01-iter-02" in phases


def test_repeats_with_no_reruns_suggest_the_instruction_change(tmp_path):
    cfg = tmp_path / "cool.yaml"
    cfg.write_text(LOW_TEMPERATURE)
    out = tmp_path / "rep0"
    result = run_pilot(out, model="fake:1,repeat=0.8", count=30, max_iterations=0, config=str(cfg))
    assert result["decision"] == "iterate" and result["exit_code"] == 3
    suggested = yaml.safe_load((out / "suggested_config.yaml").read_text())
    assert suggested["instruction_generation"]["temperature"] == pytest.approx(0.9)
    assert suggested["response_generation"] == yaml.safe_load((out / "config.yaml").read_text())["response_generation"]


def test_a_critic_that_rejects_most_items_halts_naming_it(tmp_path):
    out = tmp_path / "harsh"
    result = run_pilot(out, model="fake:1,critic_bad=0.7", count=30, max_iterations=2)
    assert result["decision"] == "halt" and result["exit_code"] == 4
    summary = json.loads((out / "qc_summary.json").read_text())
    assert "instruction_critic_acceptance" in summary["gate"]["failed"]
    assert any("the instruction critic accepted" in r and "quality bar" in r for r in summary["gate"]["reasons"])
    assert not (out / "iterations" / "02").exists()  # a halt does not rerun


class TestCacheMatrix:
    """Pinned: which phases hit after which change (same output folder)."""

    def test_matrix(self, tmp_path, monkeypatch):
        out = tmp_path / "m"
        run_pilot(out)
        assert cached(out) == set()
        run_pilot(out)  # a new run (not a retry) of the same config: all hit
        assert phases_of(cached(out)) == ALL

        cfg = tmp_path / "tokens.yaml"
        cfg.write_text("response_generation:\n  max_new_tokens: 64\n")
        run_pilot(out, config=str(cfg), overwrite=True)
        assert phases_of(cached(out)) == {"generate_instructions", "filter_instructions"}

        # Edit the QC module (a copy of the core with one more line in qc.py): only phase 5 misses.
        core = tmp_path / "core"
        shutil.copytree(pipeline.CORE_DIR, core, ignore=shutil.ignore_patterns("__pycache__"))
        (core / "phases" / "qc.py").write_text((core / "phases" / "qc.py").read_text() + "\n# edited\n")
        run_pilot(out, config=str(cfg), overwrite=True)
        assert phases_of(cached(out)) == ALL
        monkeypatch.setattr(pipeline, "CORE_DIR", core)
        run_pilot(out, config=str(cfg), overwrite=True)
        assert phases_of(cached(out)) == ALL - {"qc"}
        monkeypatch.undo()

        run_pilot(out, config=str(cfg), overwrite=True, model="fake:2")  # new model: all miss
        assert cached(out) == set()

        seeds = tmp_path / "seeds.jsonl"
        lines = (pipeline.CORE_DIR / "data" / "self_instruct_seed_tasks.jsonl").read_text().splitlines()
        seeds.write_text("\n".join(lines[:-1]) + "\n")
        run_pilot(out, config=str(cfg), overwrite=True, model="fake:2", seeds=str(seeds))  # new seeds: all miss
        assert cached(out) == set()
        run_pilot(out, config=str(cfg), overwrite=True, model="fake:2", seeds=str(seeds))
        assert phases_of(cached(out)) == ALL

        hot = tmp_path / "hot.yaml"  # an instruction setting (what the iterate step may change): phases 1-5 rerun
        hot.write_text("response_generation:\n  max_new_tokens: 64\ninstruction_generation:\n  temperature: 1.1\n")
        run_pilot(out, config=str(hot), overwrite=True, model="fake:2", seeds=str(seeds))
        assert cached(out) == set()

    def test_deleted_or_modified_output_reruns(self, tmp_path):
        out = tmp_path / "d"
        run_pilot(out)
        run_pilot(out)
        assert phases_of(cached(out)) == ALL
        shutil.rmtree(out)  # delete the output: all rerun
        run_pilot(out)
        assert cached(out) == set()
        # A modified phase file invalidates that phase; it is recomputed identically (deterministic
        # backend), so the phases that read it keep their keys and hit.
        responses = out / "iterations" / "01" / "responses.jsonl"
        original = responses.read_text()
        responses.write_text(original + "\n")
        run_pilot(out)
        assert phases_of(cached(out)) == ALL - {"generate_responses"}
        assert responses.read_text() == original


def test_an_edited_phase_file_reruns_with_remote_result_storage(tmp_path):
    """Remote result storage (an fsspec memory filesystem here): a record cannot be deleted from the
    client, yet an edited phase file still makes its phase rerun (it used to be a stale hit)."""
    from prefect.filesystems import RemoteFileSystem

    from flows.pilot import pilot

    storage = RemoteFileSystem(basepath=f"memory://stage1/{tmp_path.name}")
    storage.save("stage1-remote-results", overwrite=True)
    remote = pilot.with_options(result_storage=storage)
    out = tmp_path / "r"
    params = dict(count=12, output=str(out), seed=7, model=FAKE, max_iterations=0)
    remote(**params)
    remote(**params)
    assert phases_of(cached(out)) == ALL
    responses = out / "iterations" / "01" / "responses.jsonl"
    original = responses.read_text()
    responses.write_text(original.replace('"', "'", 1))
    remote(**params)
    assert phases_of(cached(out)) == ALL - {"generate_responses"}
    assert responses.read_text() == original
    remote(**params)  # the rerun's record was stored under the same key: a hit again
    assert phases_of(cached(out)) == ALL


def test_sample_too_small_stops_without_pointless_reruns(tmp_path):
    out = tmp_path / "small"
    result = run_pilot(out, count=6, max_iterations=2)  # 6 < min_n: the gate can never say scale
    assert result["decision"] == "halt" and result["exit_code"] == 4
    assert not (out / "iterations" / "02").exists()
    summary = json.loads((out / "qc_summary.json").read_text())
    assert summary["gate"]["decision"] == "halt"
    assert any("sample too small" in r for r in summary["gate"]["reasons"])
    assert any("no further adjustment possible" in r for r in summary["gate"]["reasons"])


def test_seed_file_edit_in_place_invalidates(tmp_path):
    seeds = tmp_path / "seeds.jsonl"
    lines = (pipeline.CORE_DIR / "data" / "self_instruct_seed_tasks.jsonl").read_text().splitlines()
    seeds.write_text("\n".join(lines) + "\n")
    out = tmp_path / "e"
    run_pilot(out, seeds=str(seeds))
    seeds.write_text("\n".join(lines[1:]) + "\n")  # same path, new content
    run_pilot(out, seeds=str(seeds), overwrite=True)
    assert cached(out) == set()


def test_artifacts_show_the_final_decision_also_when_every_phase_is_cached(tmp_path):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    out = tmp_path / "a"
    for attempt in range(2):  # the second run: every phase a cache hit
        state = run_pilot(out, count=3, max_iterations=1, return_state=True)
    result = state.result()
    manifest = json.loads((out / "session_manifest.json").read_text())
    # count 3 < min_n: iteration 1 says iterate, the exhausted iterations make the run's decision halt
    assert manifest["iterations"][0]["decision"]["decision"] == "iterate" and result["decision"] == "halt"
    assert {n.split("-")[0] for n in manifest["timings"]["cached_phases"]} >= {"generate_instructions", "qc"}
    with get_client(sync_client=True) as client:
        arts = client.read_artifacts(artifact_filter=ArtifactFilter(
            flow_run_id=ArtifactFilterFlowRunId(any_=[state.state_details.flow_run_id])))
    by_key = {a.key: a for a in arts if a.key}
    assert set(by_key) >= {"stage1-decision", "stage1-qc", "stage1-preview"}
    assert by_key["stage1-decision"].description == "Final decision: halt"
    assert by_key["stage1-qc"].description == "QC — final decision: halt"
    assert "**Gate: halt**" in by_key["stage1-preview"].data and str(out) in by_key["stage1-decision"].data
    assert not [a for a in arts if "iterate" in (a.description or "")]


def test_machine_examples_mix_kept_instructions_into_later_rounds_deterministically(tmp_path):
    cfg = tmp_path / "mix.yaml"
    cfg.write_text("instruction_generation:\n  machine_examples: 2\n  prompts_per_round: 4\n")
    a, b = tmp_path / "a", tmp_path / "b"
    run_pilot(a, config=str(cfg), count=40)
    run_pilot(b, config=str(cfg), count=40)
    first = read_jsonl(a / "instructions" / "round-01.completions.jsonl")
    assert all(c["machine_ids"] == [] and len(c["seed_ids"]) == 8 for c in first)  # nothing kept before round 1
    second = read_jsonl(a / "instructions" / "round-02.completions.jsonl")
    kept_ids = {k["id"] for k in read_jsonl(a / "instructions" / "round-01.kept.jsonl")}
    assert second and all(len(c["machine_ids"]) == 2 and set(c["machine_ids"]) <= kept_ids and len(c["seed_ids"]) == 6
                          for c in second)
    assert len({tuple(c["machine_ids"]) for c in second}) > 1  # drawn per prompt
    for name in ("round-01.completions.jsonl", "round-02.completions.jsonl"):
        pick = lambda rows: [(r["seed_ids"], r["machine_ids"], r["raw"]) for r in rows]  # noqa: E731
        assert pick(read_jsonl(a / "instructions" / name)) == pick(read_jsonl(b / "instructions" / name))
