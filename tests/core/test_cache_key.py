"""Which model settings the phase cache key hashes: everything that can change outputs, not the batch
size (sampling is per item id, so batching changes speed only)."""

from __future__ import annotations

from pathlib import Path

import pytest

from stage1_core import pipeline
from stage1_core.config import ModelConfig


def _call(tmp_path: Path, phase: str = "generate_responses", **model: object) -> dict:
    return {"phase": phase, "out_dir": str(tmp_path / "iterations" / "01"),
            "params": {"response_generation": {"max_new_tokens": 96}, "count": 12, "seed": 7, "iteration": 1},
            "inputs": {"kept": {"path": str(tmp_path / "kept.jsonl"), "rows": 3, "sha256": "ab" * 32}},
            "model": ModelConfig(**{"id": "fake:1", **model}).model_dump(mode="json"), "model_sha": "cd" * 32,
            "meta": {"run_id": "r1"}}


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
    hashed = set(pipeline.model_settings(ModelConfig().model_dump(mode="json")))
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
    # the 270M (at most loader.SMALL_MODEL_PARAMS), bfloat16 for a 4B.
    assert (auto == cuda) if gpu else (auto == cpu)
    assert auto != cuda_other
    assert cpu != cuda
