"""The golden run: a fake-backend pilot and scale run with fixed seeds must write the same data files,
byte for byte, as the run recorded in tests/data/golden_fake_run.json. A refactor that changes no
behaviour keeps it green; a change that moves data fails it and is regenerated on purpose with

    STAGE1_WRITE_GOLDEN=1 .venv/bin/python -m pytest tests/flows/test_golden.py

What differs between any two runs by design is masked before hashing: the provenance fields `run_id`
(a fresh uuid per run) and `git_sha` (the commit), and wall-clock `seconds` (the critic dev-set time in
qc_summary.json). Everything else in every JSONL file, the QC summary and the written config is
compared."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

GOLDEN = Path(__file__).resolve().parents[1] / "data" / "golden_fake_run.json"
MASKED = ("run_id", "git_sha")


def _drop_seconds(value):
    if isinstance(value, dict):
        return {k: _drop_seconds(v) for k, v in value.items() if k != "seconds"}
    if isinstance(value, list):
        return [_drop_seconds(v) for v in value]
    return value


def _normalized(path: Path) -> bytes:
    if path.suffix == ".json":
        return json.dumps(_drop_seconds(json.loads(path.read_text())), sort_keys=True).encode()
    if path.suffix != ".jsonl":
        return path.read_bytes()
    lines = []
    for line in path.read_bytes().splitlines():
        row = json.loads(line)
        prov = row.get("provenance") if isinstance(row, dict) else None
        if isinstance(prov, dict):
            for key in MASKED:
                if key in prov:
                    prov[key] = "<masked>"
        lines.append(json.dumps(row, ensure_ascii=False, sort_keys=True).encode())
    return b"\n".join(lines)


def data_hashes(base: Path) -> dict[str, str]:
    """sha256 of every data file under base (JSONL, qc_summary.json, config.yaml), masked as above."""
    out = {}
    for f in sorted(base.rglob("*")):
        if f.is_file() and not f.name.startswith(".") and (f.suffix == ".jsonl"
                                                           or f.name in ("qc_summary.json", "config.yaml")):
            out[f.relative_to(base).as_posix()] = hashlib.sha256(_normalized(f)).hexdigest()
    return out


def test_fake_pilot_and_scale_write_the_golden_files(tmp_path, monkeypatch):
    from flows.pilot import pilot
    from flows.scale import scale

    monkeypatch.chdir(tmp_path)
    pilot(count=30, output="pilot", seed=7, model="fake:1", max_iterations=2)
    scale(output="scale", count=11, shard_size=4, seed=5, model="fake:4")
    got = data_hashes(tmp_path)
    assert len(got) > 20 and "pilot/pilot_data.jsonl" in got and "scale/scale_data.jsonl" in got
    if os.environ.get("STAGE1_WRITE_GOLDEN") == "1":
        GOLDEN.write_text(json.dumps(got, indent=1, sort_keys=True) + "\n")
    want = json.loads(GOLDEN.read_text())
    changed = sorted(k for k in set(got) | set(want) if got.get(k) != want.get(k))
    assert not changed, f"data files differ from the golden run: {changed}"


def test_masking_keeps_everything_but_run_id_and_git_sha(tmp_path):
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    a.write_text(json.dumps({"x": 1, "provenance": {"run_id": "1", "git_sha": "a", "seed": 7}}) + "\n")
    b.write_text(json.dumps({"x": 1, "provenance": {"run_id": "2", "git_sha": "b", "seed": 7}}) + "\n")
    assert _normalized(a) == _normalized(b)
    b.write_text(json.dumps({"x": 1, "provenance": {"run_id": "2", "git_sha": "b", "seed": 8}}) + "\n")
    assert _normalized(a) != _normalized(b)
