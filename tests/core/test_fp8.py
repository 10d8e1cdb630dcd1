"""FP8 projections (stage1_core/model/fp8.py): the quantization, the GEMM against its float emulation, and
the decoder's wiring (opt-in, switchable per call), on the CPU's `torch._scaled_mm`."""

from __future__ import annotations

from typing import Any

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from stage1_core.model import decoder as D  # noqa: E402
from stage1_core.model import engine as E  # noqa: E402
from stage1_core.model import fp8 as Q  # noqa: E402
from stage1_core.model import rows as R  # noqa: E402
from tests.core.test_engine import _prompts, _tiny, _TinyTokenizer  # noqa: E402


def test_rows_are_scaled_to_the_e4m3_range_and_come_back_within_its_precision() -> None:
    torch.manual_seed(0)
    x = torch.randn(8, 64) * torch.logspace(-3, 3, 8)[:, None]  # rows six decades apart
    q, s = Q.quantize_rows(x)
    assert q.dtype == torch.float8_e4m3fn and s.shape == (8, 1) and s.dtype == torch.float32
    assert torch.allclose(q.float().abs().amax(-1), torch.full((8,), Q.E4M3_MAX))  # each row's max hits 448
    back = q.float() * s
    assert ((back - x).abs() <= x.abs() * 2 ** -4 + 1e-30).all()  # 3 mantissa bits: within half an ulp
    zq, zs = Q.quantize_rows(torch.zeros(2, 16))  # an all-zero row: no division by zero
    assert torch.equal(zq.float(), torch.zeros(2, 16)) and (zs > 0).all()


def _emulated(f: Q.Fp8Linear, x: Any) -> Any:
    """What the FP8 GEMM computes, in float64: the quantized input times the quantized weight, both scaled."""
    xq, xs = Q.quantize_rows(x.reshape(-1, x.shape[-1]))
    w = f.weight.double() * f.scale.double().t()
    y = (xq.double() * xs.double()) @ w.t()
    return y if f.bias is None else y + f.bias.double()


@pytest.mark.parametrize("bias", [False, True])
def test_fp8_linear_equals_its_emulation_and_is_near_the_float_gemm(bias: bool) -> None:
    torch.manual_seed(1)
    mods = [torch.nn.Linear(64, n, bias=bias) for n in (32, 16, 16)]
    f = Q.quantize(mods)
    assert f is not None and f.sizes == (32, 16, 16) and f.weight.shape == (64, 64) and f.scale.shape == (1, 64)
    x = torch.randn(3, 5, 64)
    q, k, v = f(x)
    assert q.shape == (3, 5, 32) and k.shape == v.shape == (3, 5, 16) and q.dtype == torch.float32
    got = torch.cat([q, k, v], dim=-1).reshape(15, 64).double()
    assert torch.allclose(got, _emulated(f, x), atol=1e-5, rtol=1e-5)  # the scales land on the right axes
    exact = torch.cat([m(x) for m in mods], dim=-1).reshape(15, 64).double()
    cos = torch.nn.functional.cosine_similarity(got.flatten(), exact.flatten(), dim=0)
    assert cos > 0.998 and not torch.allclose(got, exact, atol=1e-6)  # close, and really quantized
    for m in mods:  # the modules keep their own float weights
        assert m.weight.dtype == torch.float32


def test_only_aligned_plain_linears_are_quantized() -> None:
    class Wrapped(torch.nn.Linear):
        pass

    assert Q.quantize([torch.nn.Linear(64, 24)]) is None  # 24 output rows: not a multiple of 16
    assert Q.quantize([torch.nn.Linear(40, 32)]) is None  # 40 input columns
    assert Q.quantize([Wrapped(64, 32)]) is None
    assert Q.quantize([torch.nn.Linear(64, 32), torch.nn.Linear(64, 32, bias=False)]) is None
    assert Q.quantize([torch.nn.Linear(64, 32)]) is not None


@pytest.mark.parametrize("bias", [False, True])
def test_fused_modules_are_quantized_from_fusions_rows_without_a_second_concatenation(
        bias: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    from stage1_core.model import fusion as F

    torch.manual_seed(0)
    mods = [torch.nn.Linear(64, n, bias=bias) for n in (32, 16, 16)]
    want = Q.quantize(mods)  # unfused: concatenated here
    assert want is not None and F.fuse(mods) is not None  # now the modules' weights are rows of one tensor
    cats: list[int] = []
    real_cat = torch.cat
    monkeypatch.setattr(torch, "cat", lambda *a, **k: cats.append(1) or real_cat(*a, **k))
    got = Q.quantize(mods)
    assert got is not None and not cats
    assert torch.equal(got.weight.float(), want.weight.float()) and torch.equal(got.scale, want.scale)
    assert got.sizes == want.sizes and (got.bias is None) == (not bias)
    if bias:
        assert torch.equal(got.bias, want.bias)


def test_fp8_is_opt_in_and_switchable_per_call(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(Q.ENV, raising=False)
    model = _tiny("gemma3", std=0.1)
    assert not E.Engine(model, _TinyTokenizer(96), eos_ids=[], slots=4).dec.use_fp8
    monkeypatch.setenv(Q.ENV, "1")
    eng = E.Engine(model, _TinyTokenizer(96), eos_ids=[], slots=4)
    dec = eng.dec
    assert dec.use_fp8 and len(dec.fp8) == 3
    assert all(x is not None for lay in dec.fp8 for x in (lay.qkv, lay.gate_up, lay.o, lay.down))
    assert dec.fp8[0].qkv.sizes == (64, 32, 32) and dec.fp8[0].down.weight.shape == (64, 128)

    prompts, ids = _prompts(6, 96, seed=3), [f"q{i}" for i in range(6)]
    logits = {}
    for on in (True, False):
        dec.use_fp8 = on
        logits[on] = dec.next_token_logprobs(prompts, list(range(96)))
    a, b = logits[True], logits[False]
    assert not torch.allclose(a, b, atol=1e-6)  # the FP8 path ran
    assert torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0) > 0.99
    dec.use_fp8 = True
    out = eng.generate(prompts, ids, 8, 0.0, 1.0, 0, [], seed=0)
    assert len(out) == 6 and all(len(o) == 8 for o in out)


def test_a_device_without_fp8_gemms_says_why_and_keeps_the_float_path(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(Q, "available", lambda device, dtype=None: "no FP8 tensor cores here")
    dec = D.Decoder(_tiny("llama"), fp8=True)
    assert not dec.use_fp8 and dec.fp8 == [] and dec.fp8_unavailable == "no FP8 tensor cores here"


@pytest.mark.parametrize("cap,dtype,ok", [((9, 0), "float32", True), ((9, 0), "bfloat16", True),
                                          ((8, 9), "bfloat16", True), ((8, 9), "float32", False),
                                          ((8, 0), "bfloat16", False)])
def test_which_cuda_devices_take_fp8(monkeypatch: pytest.MonkeyPatch, cap: tuple[int, int], dtype: str,
                                     ok: bool) -> None:
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: cap)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "GPU")
    why = Q.available(torch.device("cuda"), getattr(torch, dtype))
    assert (why is None) == ok
    assert Q.available(torch.device("cpu"), torch.float32) is None


# ----------------------------------------------------------------------------- the e4m3 KV cache

def test_e4m3_saturates_instead_of_overflowing() -> None:
    x = torch.tensor([1000.0, -1000.0, 448.0, 0.3, float("inf")])
    got = Q.to_e4m3(x).float()
    assert got.tolist()[:3] == [448.0, -448.0, 448.0] and got[4] == 448.0
    assert abs(got[3].item() - 0.3) <= 0.3 * 2 ** -4  # 3 mantissa bits


def _prefilled(dec: Any, cache_dtype: Any, prompts: list[list[int]]) -> tuple[Any, Any, Any]:
    """A cache of `cache_dtype` with `prompts` prefilled into slots 0.., and the rows' positions and last tokens."""
    prompts = sorted(prompts, key=len, reverse=True)  # pad_right: the first row sets the width
    slots, ctx = len(prompts), 64
    shape = (slots, dec.n_kv, ctx, dec.head_dim)
    cache = [(torch.zeros(shape).to(cache_dtype), torch.zeros(shape).to(cache_dtype)) for _ in dec.layers]
    dec.rope_tables(ctx)
    toks, lengths = R.pad_right(prompts, list(range(slots)), torch.device("cpu"))
    with torch.inference_mode():
        dec.prefill(toks, lengths, torch.arange(slots), cache)
    return cache, lengths, toks[torch.arange(slots), lengths - 1]


def test_an_e4m3_cache_holds_the_float_cache_rounded_and_decodes_near_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(Q.KV_ENV, raising=False)
    dec = D.Decoder(_tiny("gemma3", std=0.1), kv_fp8=True)
    assert dec.kv_fp8 and dec.use_kv_fp8 and dec.cache_dtype == torch.float8_e4m3fn
    prompts = _prompts(4, 96, seed=5)
    out, caches = {}, {}
    for on in (False, True):
        dec.use_kv_fp8 = on
        cache, lengths, last = _prefilled(dec, dec.cache_dtype, prompts)
        with torch.inference_mode():
            out[on] = dec.decode(last, lengths, cache, 64)  # one step at each row's next position
        caches[on] = cache
    # prefill's slice writes everywhere; decode's index_put (through uint8 views) in layer 0, whose K/V at the
    # new position do not depend on the cache (later layers' do: they read the rounded one)
    for li, ((kf, vf), (k8, v8)) in enumerate(zip(caches[False], caches[True])):
        assert k8.dtype == v8.dtype == torch.float8_e4m3fn
        for b, n in enumerate(lengths.tolist()):
            upto = n + 1 if li == 0 else n
            for f, e in ((kf, k8), (vf, v8)):
                assert torch.equal(e[b, :, :upto].float(), Q.to_e4m3(f[b, :, :upto]).float())
            assert k8[b, :, n].float().any()  # the decode step wrote its position (prefill's padding may too)
    a, b = out[False], out[True]
    assert not torch.allclose(a, b, atol=1e-6)  # the step read the rounded cache
    assert torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0) > 0.99


def test_the_engine_allocates_its_cache_in_e4m3_when_asked_and_anew_when_switched(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(Q.KV_ENV, raising=False)
    model = _tiny("gemma3", std=0.1)
    plain = E.Engine(model, _TinyTokenizer(96), eos_ids=[], slots=4)
    assert not plain.dec.use_kv_fp8 and plain.dec.cache_dtype == torch.float32
    monkeypatch.setenv(Q.KV_ENV, "1")
    eng = E.Engine(model, _TinyTokenizer(96), eos_ids=[], slots=4)
    assert eng.kv_bytes_per_token() * 4 == plain.kv_bytes_per_token()  # one byte an element, not four
    prompts, ids = _prompts(6, 96, seed=3), [f"q{i}" for i in range(6)]
    texts = {}
    for on in (True, False, True):
        eng.dec.use_kv_fp8 = on
        texts.setdefault(on, []).append(eng.generate(prompts, ids, 8, 0.0, 1.0, 0, [], seed=0))
        assert eng._cache is not None and eng._cache[0][0].dtype == (torch.float8_e4m3fn if on else torch.float32)
        assert not eng.stats.kept_step  # every switch reallocated the cache: no step is kept over it
    assert texts[True][0] == texts[True][1]  # deterministic on its own cache
    assert all(len(o) == 8 for o in texts[True][0])
    agree = sum(x == y for a, b in zip(texts[True][0], texts[False][0]) for x, y in zip(a, b))
    assert agree >= 0.75 * 48  # lossy, but near: the first tokens come from prefill's own K/V


def test_a_decode_over_a_cache_of_the_other_dtype_is_refused() -> None:
    dec = D.Decoder(_tiny("gemma3", std=0.1), kv_fp8=True)
    dec.use_kv_fp8 = False
    cache, lengths, last = _prefilled(dec, torch.float8_e4m3fn, _prompts(2, 96, seed=1))
    with pytest.raises(ValueError, match="use_kv_fp8 switched"):
        with torch.inference_mode():
            dec.decode(last, lengths, cache, 64)


@pytest.mark.parametrize("cap,ok", [((9, 0), True), ((8, 9), True), ((8, 0), False)])
def test_which_cuda_devices_take_an_e4m3_cache(monkeypatch: pytest.MonkeyPatch, cap: tuple[int, int], ok: bool) -> None:
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: cap)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "GPU")
    assert (Q.kv_available(torch.device("cuda")) is None) == ok
    assert Q.kv_available(torch.device("cpu")) is None


def test_a_device_without_e4m3_keeps_the_models_cache_dtype(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(Q, "kv_available", lambda device: "no e4m3 here")
    dec = D.Decoder(_tiny("llama"), kv_fp8=True)
    assert not dec.use_kv_fp8 and dec.kv_fp8_unavailable == "no e4m3 here" and dec.cache_dtype == torch.float32
