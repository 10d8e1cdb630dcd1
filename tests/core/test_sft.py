"""SFT without a model: the response-only label mask, padding, the held-out split, the run folder's
gate, and config errors."""

from __future__ import annotations

import json

import pytest

from stage1_core.train import sft, sft_data, trainer
from stage1_core.infra.errors import InputError
from tests.sft_support import make_run_dir


def test_labels_ignore_every_prompt_token_and_keep_response_and_eos():
    ex = sft.build_example([2, 10, 11, 12], [20, 21], eos_id=1)
    assert ex["input_ids"] == [2, 10, 11, 12, 20, 21, 1]
    assert ex["labels"] == [-100, -100, -100, -100, 20, 21, 1]


def test_collator_pads_right_and_masks_padding_out_of_the_loss():
    batch = sft.Collator(pad_id=0)([sft.build_example([2, 5], [7], 1), sft.build_example([2, 5, 6, 8], [7, 9], 1)])
    assert batch["input_ids"].tolist() == [[2, 5, 7, 1, 0, 0, 0], [2, 5, 6, 8, 7, 9, 1]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1, 0, 0, 0], [1] * 7]
    assert batch["labels"].tolist() == [[-100, -100, 7, 1, -100, -100, -100], [-100, -100, -100, -100, 7, 9, 1]]


def test_split_is_deterministic_disjoint_and_holds_out_at_least_one():
    rows = [{"id": f"r{i}", "instruction": f"q{i}", "response": f"a{i}"} for i in range(24)]
    train, held = sft_data.split_pairs(rows, 0.1, seed=42)
    assert len(held) == 3 and len(train) == 21
    assert {r["id"] for r in train}.isdisjoint(r["id"] for r in held)
    assert sft_data.split_pairs(rows, 0.1, seed=42) == (train, held)
    assert sft_data.split_pairs(rows, 0.1, seed=7)[1] != held
    assert [len(x) for x in sft_data.split_pairs(rows[:2], 0.4, seed=0)] == [1, 1]


def test_a_run_whose_gate_did_not_say_scale_is_refused_unless_forced(tmp_path):
    d = make_run_dir(tmp_path / "run", decision="halt")
    with pytest.raises(InputError) as e:
        sft_data.read_run(d)
    assert "'halt'" in e.value.message and "--force" in e.value.fix and e.value.file.endswith("session_manifest.json")
    run = sft_data.read_run(d, force=True)
    assert run.forced is True and run.decision == "halt" and run.kind == "pilot"
    assert run.model.id == "embedded:gemma-3-270m"


def test_a_scale_folder_is_read_from_its_qc_decision(tmp_path):
    run = sft_data.read_run(make_run_dir(tmp_path / "s", kind="scale"))
    assert run.kind == "scale" and run.forced is False and run.data.endswith("scale_data.jsonl")


def test_an_unfinished_run_folder_is_bad_input(tmp_path):
    d = make_run_dir(tmp_path / "run")
    (d / "session_manifest.json").unlink()
    with pytest.raises(InputError, match="not a finished run"):
        sft_data.read_run(d)


def test_a_data_row_without_a_response_names_the_line(tmp_path):
    p = tmp_path / "pilot_data.jsonl"
    p.write_text(json.dumps({"id": "a", "instruction": "x", "response": "y"}) + "\n"
                 + json.dumps({"id": "b", "instruction": "x", "response": " "}) + "\n")
    with pytest.raises(InputError) as e:
        sft_data.read_pairs(p)
    assert (e.value.line, e.value.field) == (2, "response")


def test_unknown_sft_config_key_names_file_line_and_key(tmp_path):
    cfg = tmp_path / "sft.yaml"
    cfg.write_text("epochs: 1\nlora:\n  rank: 8\n")
    with pytest.raises(InputError) as e:
        sft.load_sft_config(cfg)
    assert (e.value.file, e.value.line, e.value.field) == (str(cfg), 3, "lora.rank")


def test_4bit_on_the_cpu_is_refused_before_anything_loads(tmp_path):
    d = make_run_dir(tmp_path / "run")
    cfg = tmp_path / "q.yaml"
    cfg.write_text("model:\n  quantize: 4bit\n  device: cpu\n")
    with pytest.raises(InputError) as e:
        sft.prepare_sft(data=str(d), output=str(tmp_path / "out"), config=str(cfg))
    assert e.value.field == "model.quantize" and "CUDA" in e.value.message
    assert not (tmp_path / "out").exists()


def test_complete_checkpoints_ignore_staging_folders(tmp_path):
    for name in ("checkpoint-10", "checkpoint-2", ".staging-123", "checkpoint-x"):
        (tmp_path / name).mkdir()
    (tmp_path / ".staging-123" / "checkpoint-20").mkdir()
    assert [p.name for p in trainer.complete_checkpoints(tmp_path)] == ["checkpoint-2", "checkpoint-10"]


def test_sft_data_goes_through_the_hardened_reader(tmp_path):
    p = tmp_path / "pilot_data.jsonl"
    p.write_text(json.dumps({"id": "a", "instruction": "x", "response": "y"}) + "\n"
                 + '{"id": "b", "instruction": "x", "response": "y", "response": "z"}\n')
    with pytest.raises(InputError) as e:
        sft_data.read_pairs(p)
    assert (e.value.line, e.value.field) == (2, "response") and "appears twice" in e.value.message
    p.write_bytes(b'{"id": "a", "instruction": "x", "response": "y"}\n{"id": "b", "instruction": "caf\xe9"}\n')
    with pytest.raises(InputError) as e:
        sft_data.read_pairs(p)
    assert e.value.line == 2 and "SFT data file is not valid UTF-8" in e.value.message
