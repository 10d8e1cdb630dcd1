"""Decode attention over each row's live KV (stage1_core/model/attention.py) and how the decoder dispatches
to it: the live-range contract of `reference_attention` against the masked paths the decoder already has,
the decoder's wiring of the kernel (a CPU stand-in with the kernel's signature), its fallback to the matmul
path, and the switch. The Triton kernel itself runs only on CUDA: its numerics against the matmul path are
measured by `bench/gpu_engine.py --attention both` into the benchmark record."""

from __future__ import annotations

import logging
import random
from typing import Any

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from stage1_core.model import attention as A  # noqa: E402
from stage1_core.model import decoder as D  # noqa: E402
from stage1_core.model import engine as E  # noqa: E402


def _tiny_gemma3() -> Any:
    """A 3-layer Gemma 3 with a sliding window of 6 (prompts and generations run past it), 2 query heads per KV head."""
    torch.manual_seed(0)
    cfg = transformers.Gemma3TextConfig(
        vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, sliding_window=6, query_pre_attn_scalar=16,
        layer_types=["sliding_attention", "sliding_attention", "full_attention"], max_position_embeddings=256,
        pad_token_id=0, bos_token_id=1, eos_token_id=2)
    model = transformers.Gemma3ForCausalLM(cfg)
    with torch.no_grad():
        for p in model.parameters():  # spread the logits: no near-ties for greedy to flip on
            p.normal_(0.0, 0.35)
    return model.float().eval()


class _Tok:
    def __init__(self, vocab: int = 96) -> None:
        self.pieces = [f"w{i}" for i in range(vocab)]

    def __len__(self) -> int:
        return len(self.pieces)

    def batch_decode(self, seqs: list[list[int]], **_: Any) -> list[str]:
        return ["".join(self.pieces[t] for t in s) for s in seqs]


def _prompts(n: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[1] + [rng.randrange(3, 96) for _ in range(rng.randint(2, 17))] for _ in range(n)]


def _inputs(rows: int, heads: int, kv: int, ctx: int, d: int, seed: int) -> tuple[Any, Any, Any, Any]:
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(rows, heads, 1, d, generator=g, dtype=torch.float64) * 2
    k = torch.randn(rows, kv, ctx, d, generator=g, dtype=torch.float64)
    v = torch.randn(rows, kv, ctx, d, generator=g, dtype=torch.float64)
    pos = torch.randint(0, ctx, (rows,), generator=g)
    pos[:3] = torch.tensor([0, 1, ctx - 1])  # a row at position 0, one at 1, one at the last key
    return q, k, v, pos


@pytest.mark.parametrize("window", [None, 1, 5, 24])
def test_reference_reads_exactly_the_live_keys_of_each_row(window: int | None) -> None:
    """Keys [max(0, pos - window + 1), pos] of the row's own slot: the same result as a softmax masked the way
    the decoder masks its decode step; keys outside the range, even huge ones, change nothing."""
    heads, kv, ctx, d = 6, 2, 20, 8
    q, k, v, pos = _inputs(9, heads, kv, ctx, d, seed=1)
    scale = 0.3
    got = A.reference_attention(q, k, v, pos, scale, window)
    keys = torch.arange(ctx)
    live = keys[None, :] <= pos[:, None]
    if window is not None:
        live &= keys[None, :] > pos[:, None] - window
    qg = q[:, :, 0].reshape(9, kv, heads // kv, d)
    scores = torch.einsum("bhgd,bhnd->bhgn", qg, k) * scale
    w = torch.softmax(scores.masked_fill(~live[:, None, None, :], float("-inf")), dim=-1)
    want = torch.einsum("bhgn,bhnd->bhgd", w, v).reshape(9, 1, heads * d)
    assert torch.allclose(got, want, atol=1e-12)
    assert torch.allclose(got[0].reshape(heads, d), v[0, :, 0].repeat_interleave(heads // kv, 0))  # pos 0: one key
    poisoned_k, poisoned_v = k.clone(), v.clone()
    poisoned_k[~live[:, None, :, None].expand_as(k)] = 1e6
    poisoned_v[~live[:, None, :, None].expand_as(v)] = float("nan")
    assert torch.allclose(A.reference_attention(q, poisoned_k, poisoned_v, pos, scale, window), got, atol=1e-12)


def test_reference_equals_the_decoders_matmul_and_sdpa_paths() -> None:
    """The kernel's contract is the decode step's: the decoder's matmul path (CUDA today) and SDPA path (CPU)
    over the masked `[:context]` slice give what `reference_attention` gives over the live keys."""
    dec = D.Decoder(_tiny_gemma3(), fuse=False)
    heads, kv, d = dec.n_heads, dec.n_kv, dec.head_dim
    for window in (None, 6):
        q, k, v, pos = (x.float() if x.is_floating_point() else x for x in _inputs(12, heads, kv, 40, d, seed=2))
        keys = torch.arange(40)
        m = keys[None, :] <= pos[:, None]
        if window:
            m = m & (keys[None, :] > pos[:, None] - window)
        mask = m[:, None, None, :]
        want = A.reference_attention(q.double(), k.double(), v.double(), pos, 0.25, window).float()
        assert torch.allclose(dec._attend_one(q, k, v, mask, 0.25), want, atol=1e-5)
        assert torch.allclose(dec._attend(q, k, v, mask, 0.25), want, atol=1e-5)


def test_the_kernel_refuses_inputs_it_does_not_take_before_any_launch() -> None:
    q, k, v, pos = _inputs(4, 4, 2, 16, 16, seed=3)
    q, k, v = q.float(), k.float(), v.float()
    with pytest.raises(ValueError, match="splits=3"):
        A.decode_attention(q, k, v, pos, 0.25, None, splits=3)
    with pytest.raises(ValueError, match="dtypes"):
        A.decode_attention(q, k.half(), v, pos, 0.25, None)
    with pytest.raises(ValueError, match="dtypes"):  # an e4m3 cache is K and V both in e4m3
        A.decode_attention(q, k.to(torch.float8_e4m3fn), v, pos, 0.25, None)
    with pytest.raises(ValueError, match="do not fit"):
        A.decode_attention(q.expand(4, 4, 2, 16), k, v, pos, 0.25, None)  # two queries per row: not decode
    with pytest.raises(ValueError, match="do not fit"):
        A.decode_attention(q[:, :3], k, v, pos, 0.25, None)  # 3 query heads over 2 KV heads


def _stand_in(calls: list[Any]) -> Any:
    """The kernel's signature, computed by the reference in the inputs' dtype (the decoder's wiring under test)."""
    def run(q: Any, k: Any, v: Any, pos: Any, scale: float, window: int | None, splits: int = 1) -> Any:
        calls.append((tuple(q.shape), tuple(k.shape), window, scale, splits))
        return A.reference_attention(q, k, v, pos, scale, window)
    return run


def test_decoder_wires_the_kernel_per_layer_and_keeps_greedy_tokens(monkeypatch: pytest.MonkeyPatch) -> None:
    """With the kernel on, decode passes each layer's window and scaling, the whole cache and the positions,
    and reads the output as (s, 1, heads * d): the same greedy tokens as the SDPA path, past the window."""
    model = _tiny_gemma3()
    prompts = _prompts(6)
    want = E.Engine(model, _Tok(), eos_ids=[], slots=3, compile=False).generate(
        prompts, [f"p{i}" for i in range(6)], 12, 0.0, 1.0, 0, [], seed=0)
    calls: list[Any] = []
    monkeypatch.setattr(A, "decode_attention", _stand_in(calls))
    eng = E.Engine(model, _Tok(), eos_ids=[], slots=3, compile=False)
    assert not eng.dec.attention_kernel  # the CPU default: SDPA
    eng.dec.use_attention_kernel = True
    got = eng.generate(prompts, [f"p{i}" for i in range(6)], 12, 0.0, 1.0, 0, [], seed=0)
    assert got == want and eng.stats.attention_kernel and eng.dec.attention_failed is None
    scaling = model.model.layers[0].self_attn.scaling
    assert {c[2] for c in calls} == {6, None} and {c[3] for c in calls} == {scaling} and {c[4] for c in calls} == {1}
    assert all(c[0][1:] == (4, 1, 16) and c[1][1] == 2 and c[1][2] >= 12 + 18 for c in calls)
    sampled = {}
    for live in (True, False):  # sampling: the same draws either way (same seed, same text)
        eng.dec.use_attention_kernel = live
        sampled[live] = eng.generate(prompts, [f"p{i}" for i in range(6)], 10, 0.8, 0.9, 0, [], seed=3)
    assert sampled[True] == sampled[False]


def test_an_e4m3_cache_reaches_the_kernel_as_e4m3_and_decodes_as_the_sdpa_path_over_it(
        monkeypatch: pytest.MonkeyPatch) -> None:
    model = _tiny_gemma3()
    prompts, ids = _prompts(6), [f"p{i}" for i in range(6)]
    eng = E.Engine(model, _Tok(), eos_ids=[], slots=3, compile=False)
    eng.dec.kv_fp8 = eng.dec.use_kv_fp8 = True
    want = eng.generate(prompts, ids, 12, 0.0, 1.0, 0, [], seed=0)  # SDPA over slices converted from e4m3
    dtypes: set[Any] = set()
    stand_in = _stand_in([])
    monkeypatch.setattr(A, "decode_attention", lambda q, k, v, *a, **kw: dtypes.add((k.dtype, v.dtype)) or
                        stand_in(q, k, v, *a, **kw))
    eng.dec.use_attention_kernel = True
    got = eng.generate(prompts, ids, 12, 0.0, 1.0, 0, [], seed=0)
    assert got == want and eng.stats.attention_kernel
    assert dtypes == {(torch.float8_e4m3fn, torch.float8_e4m3fn)}


def test_a_failing_kernel_falls_back_to_the_matmul_path_once(monkeypatch: pytest.MonkeyPatch,
                                                              caplog: pytest.LogCaptureFixture) -> None:
    model = _tiny_gemma3()
    prompts = _prompts(5, seed=4)
    ids = [str(i) for i in range(5)]
    want = E.Engine(model, _Tok(), eos_ids=[], slots=2, compile=False).generate(prompts, ids, 8, 0.0, 1.0, 0, [], 0)

    def broken(*a: Any, **k: Any) -> Any:
        raise RuntimeError("triton: no kernel here")

    monkeypatch.setattr(A, "decode_attention", broken)
    eng = E.Engine(model, _Tok(), eos_ids=[], slots=2, compile=False)
    eng.dec.use_attention_kernel = True
    eng.dec.matmul_decode = True  # the CUDA path's fallback: the two batched matmuls
    with caplog.at_level(logging.WARNING, logger="stage1.engine"):
        assert eng.generate(prompts, ids, 8, 0.0, 1.0, 0, [], 0) == want
    assert not eng.dec.use_attention_kernel and "no kernel here" in (eng.dec.attention_failed or "")
    assert not eng.stats.attention_kernel
    assert sum("decode attention kernel failed" in r.getMessage() for r in caplog.records) == 1

    def oom(*a: Any, **k: Any) -> Any:
        raise torch.OutOfMemoryError("fake: no room")

    monkeypatch.setattr(A, "decode_attention", oom)
    eng = E.Engine(model, _Tok(), eos_ids=[], slots=2, compile=False)
    eng.dec.use_attention_kernel = True
    with pytest.raises(E.EngineOOM):  # out of memory is no kernel failure: the engine backs off, then gives up
        eng.generate(prompts, ids, 8, 0.0, 1.0, 0, [], 0)
    assert eng.dec.use_attention_kernel and eng.dec.attention_failed is None


def test_the_kernel_is_the_default_on_cuda_when_triton_imports(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(D.ATTENTION_ENV, raising=False)
    monkeypatch.setattr(A, "available", lambda: None)
    assert D.attention_enabled("cuda") and not D.attention_enabled("cpu")  # measured faster at 4B and 12B
    monkeypatch.setenv(D.ATTENTION_ENV, "0")
    assert not D.attention_enabled("cuda")
    monkeypatch.setenv(D.ATTENTION_ENV, "1")
    assert D.attention_enabled("cuda") and not D.attention_enabled("cpu")  # the CPU keeps SDPA
    monkeypatch.setattr(A, "available", lambda: "triton does not import: ModuleNotFoundError")
    assert not D.attention_enabled("cuda")
    eng = E.Engine(_tiny_gemma3(), _Tok(), eos_ids=[], attention=True)
    assert not eng.dec.attention_kernel and not eng.dec.use_attention_kernel  # asked for on a CPU: not there
