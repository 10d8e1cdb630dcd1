"""Tests of stage1_core.model's resolve, sizing, random_weights, dequantized and loader modules for
GPU-sized models, on the CPU: the fits-in-memory arithmetic and its error, quantize validation,
safetensors header parameter counts, random-weight models (tiny), and the QC gate halting a
random-weight run."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from stage1_core.model import dequantized, fingerprint, loader, random_weights, resolve, sizing
from stage1_core.phases import qc
from stage1_core.infra.config import ModelConfig, QCThresholds
from stage1_core.infra.errors import InputError
from stage1_core.infra.schemas import GenerationParams

GB = 1024 ** 3


# ----------------------------------------------------------------------------- fits in memory


def test_estimate_memory_arithmetic() -> None:
    shape = sizing.ModelShape(n_params=4_000_000_000, layers=34, kv_heads=4, head_dim=256)
    est = sizing.estimate_memory(shape, weight_bytes=2, kv_bytes=2, batch=64, context=1024, available=80 * GB)
    assert est.weights == 8_000_000_000
    assert est.kv_cache == 34 * 2 * 4 * 256 * 2 * 64 * 1024 == 9_126_805_504
    assert est.needed == est.weights + est.kv_cache and est.available == 80 * GB
    half = sizing.estimate_memory(shape, weight_bytes=0.5, kv_bytes=2, batch=1, context=1024)
    assert half.weights == 2_000_000_000 and half.kv_cache == 34 * 2 * 4 * 256 * 2 * 1024 and half.available is None


def test_check_fits_error_prints_the_numbers_and_fix() -> None:
    est = sizing.MemoryEstimate(weights=54 * GB, kv_cache=10 * GB, available=40 * GB)
    with pytest.raises(InputError) as e:
        sizing.check_fits(est, device="cuda", batch=64, quantize="none", dtype="bfloat16")
    text = e.value.render()
    assert "needs 64.0 GB" in text and "weights 54.0 GB in bfloat16" in text and "KV cache 10.0 GB" in text
    assert "40.0 GB available" in text and "64 rows x 1024 tokens" in text
    assert e.value.field == "model.batch_size"
    assert "smaller model.batch_size (now 64)" in e.value.fix and "quantize: 4bit" in e.value.fix
    assert "bigger GPU" in e.value.fix


def test_check_fits_passes_when_it_fits_or_memory_unknown() -> None:
    sizing.check_fits(sizing.MemoryEstimate(30 * GB, 10 * GB, 40 * GB), device="cuda", batch=8, quantize="none",
                      dtype="bfloat16")
    sizing.check_fits(sizing.MemoryEstimate(30 * GB, 10 * GB, None), device="mps", batch=8, quantize="none",
                      dtype="bfloat16")
    with pytest.raises(InputError, match="needs 40.0 GB"):
        sizing.check_fits(sizing.MemoryEstimate(30 * GB, 10 * GB, 40 * GB - 1), device="cuda", batch=8,
                          quantize="none", dtype="bfloat16")


def test_check_memory_uses_batch_and_quantize(monkeypatch: pytest.MonkeyPatch) -> None:
    r = resolve.resolve_model(ModelConfig(id="random:gemma3-27b", device="cpu"))
    monkeypatch.setattr(sizing, "available_memory", lambda device: 1000 * GB)
    est = sizing.check_memory(r, ModelConfig(id="random:gemma3-27b", device="cpu", dtype="bfloat16", batch_size=2), "cpu")
    assert est is not None
    assert est.weights == random_weights.random_param_count(random_weights.RANDOM_MODELS["gemma3-27b"]) * 2
    assert est.kv_cache == 62 * 2 * 16 * 128 * 2 * 2 * 1024
    monkeypatch.setattr(sizing, "available_memory", lambda device: 10 * GB)
    with pytest.raises(InputError, match=r"weights 5\d\.\d GB in bfloat16"):
        sizing.check_memory(r, ModelConfig(id="random:gemma3-27b", device="cpu", dtype="bfloat16"), "cpu")


def test_random_param_count_matches_known_sizes() -> None:
    # Gemma 3 text decoders: 4B ~3.88e9, 12B ~11.77e9, 27B ~27.0e9 parameters
    assert round(random_weights.random_param_count(random_weights.RANDOM_MODELS["gemma3-4b"]) / 1e9, 2) == 3.88
    assert round(random_weights.random_param_count(random_weights.RANDOM_MODELS["gemma3-12b"]) / 1e9, 1) == 11.8
    assert round(random_weights.random_param_count(random_weights.RANDOM_MODELS["gemma3-27b"]) / 1e9, 1) == 27.0


def test_safetensors_header_param_count(tmp_path: Path) -> None:
    import torch
    from safetensors.torch import save_file

    save_file({"a.weight": torch.zeros(3, 4), "b.bias": torch.zeros(5)}, str(tmp_path / "model-00001-of-00002.safetensors"),
              metadata={"format": "pt"})
    save_file({"c.weight": torch.zeros(2, 3, 7, dtype=torch.bfloat16)}, str(tmp_path / "model-00002-of-00002.safetensors"))
    files = sorted(tmp_path.glob("*.safetensors"))
    assert sizing.safetensors_param_count(files) == 12 + 5 + 42
    (tmp_path / "bad.safetensors").write_bytes(b"\x05\x00\x00\x00\x00\x00\x00\x00{oops")
    with pytest.raises(InputError, match="bad header"):
        sizing.safetensors_param_count([tmp_path / "bad.safetensors"])


def test_param_count_reads_the_headers_of_each_kind(tmp_path: Path) -> None:
    import torch
    from safetensors.torch import save_file

    embedded = resolve.resolve_model(ModelConfig())
    # google/gemma-3-270m: 268,098,176 parameters (the GGUF's tensor table, no weights loaded)
    assert sizing.param_count(embedded) == 268_098_176
    assert sizing.param_count(resolve.resolve_model(ModelConfig(id="random:gemma3-4b"))) == \
        random_weights.random_param_count(random_weights.RANDOM_MODELS["gemma3-4b"])
    assert sizing.param_count(resolve.resolve_model(ModelConfig(id="fake:1"))) is None
    save_file({"w": torch.zeros(10, 10)}, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gemma3_text"}))
    folder = resolve.ResolvedModel(kind="hf_folder", id=str(tmp_path), path=str(tmp_path), gguf_file=None,
                                   family="gemma3_text", bos_policy="always")
    assert sizing.param_count(folder) == 100


@pytest.mark.parametrize("model_id, on_gpu", [("embedded:gemma-3-270m", "float32"), ("random:gemma3-tiny", "float32"),
                                              ("random:gemma3-4b", "bfloat16"), ("random:gemma3-12b", "bfloat16")])
def test_auto_dtype_keeps_float32_for_small_models_on_a_gpu(monkeypatch: pytest.MonkeyPatch, model_id: str,
                                                            on_gpu: str) -> None:
    import torch

    r = resolve.resolve_model(ModelConfig(id=model_id))
    assert sizing.resolve_dtype("auto", "cpu", r) == "float32"
    assert sizing.resolve_dtype("auto", "cuda", r) == on_gpu
    assert sizing.resolve_dtype("bfloat16", "cuda", r) == "bfloat16"  # an explicit dtype is never overridden
    assert sizing.resolve_dtype("float32", "cuda", r) == "float32"
    assert sizing.resolve_dtype("auto", "cuda") == "bfloat16"  # size unknown: the accelerator default
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert fingerprint.model_fingerprint(ModelConfig(id=model_id))["dtype"] == on_gpu  # what the manifest records


def test_shape_of_a_saved_tiny_model(tmp_path: Path) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    model.save_pretrained(str(tmp_path))
    r = resolve.ResolvedModel("hf_folder", str(tmp_path), str(tmp_path), None, "llama", "always")
    shape = sizing._shape_of(r, tmp_path)
    assert shape == sizing.ModelShape(sum(p.numel() for p in model.state_dict().values()), 2, 2, 8)


# ----------------------------------------------------------------------------- quantize


@pytest.mark.parametrize("quantize", ["8bit", "4bit"])
def test_quantize_on_cpu_is_an_input_error(quantize: str) -> None:
    with pytest.raises(InputError) as e:
        resolve.resolve_model(ModelConfig(id="random:gemma3-tiny", device="cpu", quantize=quantize))
    assert e.value.field == "model.quantize" and e.value.fix
    with pytest.raises(InputError) as e:
        resolve.check_quantize(ModelConfig(id="x", device="cpu", quantize=quantize),
                               resolve.ResolvedModel("hf_folder", "x", "/x", None, "llama", "always"))
    assert e.value.field == "model.quantize" and "CUDA" in e.value.message and "quantize: none" in e.value.fix


def test_quantize_without_bitsandbytes_on_a_gpu_host(monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(resolve, "_bitsandbytes_importable", lambda: False)
    r = resolve.ResolvedModel("hf_folder", "x", "/x", None, "llama", "always")
    with pytest.raises(InputError) as e:
        resolve.check_quantize(ModelConfig(id="x", device="cuda", quantize="4bit"), r)
    assert e.value.field == "model.quantize" and "bitsandbytes" in e.value.message and "stage1[gpu]" in e.value.fix
    monkeypatch.setattr(resolve, "_bitsandbytes_importable", lambda: True)
    resolve.check_quantize(ModelConfig(id="x", device="cuda", quantize="4bit"), r)  # passes
    resolve.check_quantize(ModelConfig(id="x", device="cpu", quantize="none"), r)


def test_quantize_is_in_the_fingerprint() -> None:
    fp = fingerprint.model_fingerprint(ModelConfig(id="random:gemma3-tiny", device="cpu"))
    assert fp["quantize"] == "none"


# ----------------------------------------------------------------------------- random models


def test_random_ids_resolve_without_files() -> None:
    for name in ("gemma3-tiny", "gemma3-4b", "gemma3-12b", "gemma3-27b"):
        r = resolve.resolve_model(ModelConfig(id=f"random:{name}", device="cpu"))
        assert (r.kind, r.path, r.gguf_file, r.family, r.bos_policy) == ("random", None, None, "gemma3_text", "always")
    fp = fingerprint.model_fingerprint(ModelConfig(id="random:gemma3-4b", device="cpu"))
    assert fp["sentinels"] == "skipped (random weights)" and fp["kind"] == "random"
    assert fp["weights_sha256"] == hashlib.sha256(b"random:gemma3-4b:random-weights-v1").hexdigest()
    with pytest.raises(InputError) as e:
        resolve.resolve_model(ModelConfig(id="random:gemma3-70b"))
    assert e.value.field == "model.id" and "random:gemma3-27b" in (e.value.expected or "")


def test_random_config_dims() -> None:
    class Tok:
        bos_token_id, eos_token_id, pad_token_id = 2, 1, 0

    c = random_weights.random_gemma3_config(random_weights.RANDOM_MODELS["gemma3-27b"], Tok())
    assert (c.hidden_size, c.num_hidden_layers, c.num_attention_heads, c.num_key_value_heads, c.head_dim,
            c.intermediate_size, c.query_pre_attn_scalar, c.vocab_size) == (5376, 62, 32, 16, 128, 21504, 168, 262144)
    assert c.layer_types[:6] == ["sliding_attention"] * 5 + ["full_attention"] and c.sliding_window == 1024
    assert c.layer_types.count("full_attention") == 10
    assert c.rope_parameters["full_attention"] == {"rope_type": "linear", "factor": 8.0, "rope_theta": 1000000.0}
    assert c.rope_parameters["sliding_attention"]["rope_theta"] == 10000.0


@pytest.fixture(scope="module")
def tiny_backend():
    from stage1_core.model.hf_backend import HFBackend

    return HFBackend(ModelConfig(id="random:gemma3-tiny", device="cpu", engine="reference"))


def test_random_tiny_loads_without_sentinels(tiny_backend) -> None:
    fp = tiny_backend.fingerprint
    assert fp["sentinels"] == "skipped (random weights)" and fp["kind"] == "random"
    assert fp["chat_template_disabled"] is True and tiny_backend.tokenizer.chat_template is None
    model = tiny_backend.model
    assert model.config.hidden_size == 64 and model.config.vocab_size == 262144
    assert sum(p.numel() for p in model.parameters()) == \
        random_weights.random_param_count(random_weights.RANDOM_MODELS["gemma3-tiny"])
    std = float(model.model.layers[0].mlp.up_proj.weight.detach().std())
    assert 0.015 < std < 0.025


def test_random_tiny_encodes_with_bos_and_generates(tiny_backend) -> None:
    bos = tiny_backend.tokenizer.bos_token_id
    ids = tiny_backend.encode(["Hello there", "1, 2, 3,"])
    assert bos == 2 and all(x[0] == bos and x.count(bos) == 1 for x in ids)
    params = GenerationParams(max_new_tokens=5, temperature=0.0, stop_sequences=["\n\n"])
    out = tiny_backend.generate(["Instruction: Name a fruit.\nResponse:", "The sky is"], params, seed=0)
    assert len(out) == 2 and all(1 <= c.n_tokens <= 5 for c in out)
    again = tiny_backend.generate(["Instruction: Name a fruit.\nResponse:", "The sky is"], params, seed=0)
    assert [c.text for c in again] == [c.text for c in out]


def test_gate_always_halts_a_random_weight_run() -> None:
    th = QCThresholds.model_validate({})
    ok = {"passed": True, "value": 0.0, "op": "<", "threshold": 0.05, "n": 100}
    metrics = {m: dict(ok) for m in (*qc.FIXABLE, *qc.HALTING)}
    assert qc.gate(metrics, th, pairs_generated=10_000, iteration=1, max_iterations=2).decision == "scale"
    d = qc.gate(metrics, th, pairs_generated=10_000, iteration=1, max_iterations=2, model_id="random:gemma3-4b")
    assert d.decision == "halt" and d.reasons[0] == "random-weight model (benchmark only): random:gemma3-4b"
    assert qc.gate(metrics, th, pairs_generated=10_000, iteration=1, max_iterations=2,
                   model_id="embedded:gemma-3-270m").decision == "scale"


def test_a_damaged_cached_model_folder_is_detected(tmp_path, monkeypatch) -> None:
    import json

    from stage1_core.infra.storage import sha256_file

    monkeypatch.setenv("STAGE1_CACHE_DIR", str(tmp_path / "cache"))
    folder = tmp_path / "models" / "gemma3-abc-float32"
    folder.mkdir(parents=True)
    (folder / "config.json").write_text("{}")
    (folder / "model.safetensors").write_bytes(b"weights" * 1000)
    files = {p.name: sha256_file(p) for p in sorted(folder.iterdir())}
    (folder / dequantized.SOURCE_RECORD).write_text(json.dumps({"files": files}))
    assert dequantized.cached_folder_problem(folder) is None
    (folder / "model.safetensors").write_bytes(b"weights" * 500)  # truncated
    assert "model.safetensors does not match" in dequantized.cached_folder_problem(folder)
    (folder / "model.safetensors").unlink()
    assert dequantized.cached_folder_problem(folder) == "model.safetensors missing"
    (folder / dequantized.SOURCE_RECORD).unlink()  # a folder of an older version, or a half-copied one
    assert "missing or unreadable" in dequantized.cached_folder_problem(folder)


def test_a_cached_folder_built_for_another_gguf_or_dtype_is_not_trusted(tmp_path) -> None:
    from stage1_core.infra.storage import sha256_file

    folder = tmp_path / "gemma3-abc"
    folder.mkdir()
    (folder / "model.safetensors").write_bytes(b"w" * 100)
    files = {p.name: sha256_file(p) for p in sorted(folder.iterdir())}
    (folder / dequantized.SOURCE_RECORD).write_text(json.dumps({"files": files, "gguf_sha256": "a" * 64,
                                                                "dtype": "float32"}))
    assert dequantized.cached_folder_problem(folder, gguf_sha256="a" * 64, dtype="float32") is None
    assert "gguf_sha256" in dequantized.cached_folder_problem(folder, gguf_sha256="b" * 64, dtype="float32")
    assert "dtype" in dequantized.cached_folder_problem(folder, gguf_sha256="a" * 64, dtype="bfloat16")
    record = dequantized.dequantized_record(folder)
    assert record["weights_sha256"] == hashlib.sha256(files["model.safetensors"].encode()).hexdigest()


@pytest.mark.parametrize("device", ["cpu", "cuda:0"])
def test_every_model_load_passes_use_kernels_false(tmp_path, monkeypatch, device: str) -> None:
    """transformers >= 5.25 fetches hub kernels on CUDA unless told not to (issue 19): the keyword must
    reach from_pretrained on the CUDA branch (device_map, quantization) as on the CPU one, and for
    the GGUF dequantization too."""
    import transformers

    calls: list[dict] = []

    class FakeModel:
        def eval(self):
            return self

        def to(self, *a, **k):
            return self

    def fake_model_from_pretrained(path, **kw):
        calls.append(kw)
        return FakeModel()

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", staticmethod(fake_model_from_pretrained))
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", staticmethod(lambda *a, **k: object()))
    monkeypatch.setattr(loader, "check_quantize", lambda cfg, r: None)
    monkeypatch.setattr(loader, "check_memory", lambda *a, **k: None)
    monkeypatch.setattr(loader, "_quantization_config", lambda q: object())
    folder = tmp_path / "hf"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    (folder / "model.safetensors").write_bytes(b"x")
    r = resolve.ResolvedModel(kind="hf_folder", id=str(folder), path=str(folder), gguf_file=None,
                              family="gemma3_text", bos_policy="always")
    for quantize in ("none", "4bit") if device != "cpu" else ("none",):
        loader.load_hf_model(r, ModelConfig(id=str(folder), quantize=quantize), device)
    gguf = resolve.ResolvedModel(kind="gguf", id="x.gguf", path=str(tmp_path / "x.gguf"), gguf_file="x.gguf",
                                 family="gemma3", bos_policy="always")
    (tmp_path / "x.gguf").write_bytes(b"GGUF")
    monkeypatch.setenv("STAGE1_CACHE_DIR", str(tmp_path / "cache"))
    with pytest.raises(Exception):  # the fake model cannot be saved; the load call is what is checked
        loader._gguf_as_hf_folder(gguf, "float32")
    assert calls and all(kw.get("use_kernels") is False for kw in calls), calls
    assert all(kw.get("local_files_only") is True for kw in calls)
    if device != "cpu":
        assert any("device_map" in kw for kw in calls) and any("quantization_config" in kw for kw in calls)
