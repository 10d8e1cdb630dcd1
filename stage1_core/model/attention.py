"""Decode attention over each row's live KV only: a Triton kernel for the engine's decode step on CUDA.

The engine's cache is `(slots, kv_heads, context, head_dim)` per layer; at a decode step row `b` attends to
its own keys `[lo, pos[b]]` of slot `b`, with `lo = max(0, pos - window + 1)` on sliding-window layers and 0
otherwise (the same keys as decoder.py's masks). `decode_attention` reads exactly those keys, where the
two batched matmuls of `Decoder._attend_one` read the whole `[:context]` slice and mask it.

One program handles one (row, KV head): the query heads of that KV head are processed together as the
rows of one `tl.dot` (padded to 16), so K/V are read once per KV head and never repeated. Scores and the
online softmax are float32 (scores are not rounded to the input dtype first, as the matmul path's are);
the probabilities are cast to q's dtype for the P·V product, as there. An e4m3 cache (decoder.py's
`kv_fp8`) is converted to q's dtype as it is loaded (unit scale), so it reads half the bytes. float32 inputs use IEEE
products (no TF32). The grid is fixed by the shapes and positions are read from the device tensor `pos`,
so a launch can be captured in a CUDA graph and replayed as positions advance. With `splits > 1` each
row's live range is split along keys over that many programs (flash-decoding) and a second kernel
combines their partial results; the engine uses one split unless its measurement says otherwise.

`reference_attention` is the same contract in plain torch (each row sliced to its live range), for tests
and for the benchmark's numerics check. Triton is imported lazily: on a machine without it (the CPU venv)
`available()` is False and the decoder keeps its matmul path.

Run it: the engine uses it on CUDA by default (`STAGE1_ENGINE_ATTENTION=0` turns it off; see decoder.py); the GPU numerics and
timings are `python bench/gpu_engine.py --attention both`; tests: `python -m pytest -q tests/core/test_attention.py`.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

BLOCK_N = 32
"""Keys per loop iteration of the kernel."""
NUM_WARPS = 4
NUM_STAGES = 2


def reference_attention(q: "torch.Tensor", k: "torch.Tensor", v: "torch.Tensor", pos: "torch.Tensor", scale: float,
                        window: int | None) -> "torch.Tensor":
    """Decode attention of each row over its live keys only, in plain torch (float64 if `q` is float64).

    Args:
        q: (s, heads, 1, d) one query per row.
        k, v: (s, kv_heads, context, d) the cache (rows = slots).
        pos: (s,) each row's position; its keys are [max(0, pos - window + 1), pos] (window None: from 0).
        scale: the scores' scaling.
        window: the layer's sliding window, or None.
    Returns:
        (s, 1, heads * d) in q's dtype.
    """
    import torch

    s, heads, _, d = q.shape
    kv = k.shape[1]
    group = heads // kv
    out = torch.empty(s, heads, d, dtype=q.dtype, device=q.device)
    for b, p in enumerate(pos.tolist()):
        lo = 0 if window is None else max(0, p - window + 1)
        kb, vb = k[b, :, lo:p + 1].to(q.dtype), v[b, :, lo:p + 1].to(q.dtype)  # (kv, n, d)
        qb = q[b, :, 0].reshape(kv, group, d)
        w = torch.softmax((qb @ kb.transpose(-1, -2)).double() * scale, dim=-1).to(q.dtype)  # (kv, group, n)
        out[b] = (w @ vb).reshape(heads, d)
    return out.reshape(s, 1, heads * d)


@functools.cache
def available() -> str | None:
    """None when triton imports and a CUDA device is there, else why not (the decoder then keeps its matmuls)."""
    try:
        import torch
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception as e:  # noqa: BLE001 - any import failure means no kernel
        return f"triton does not import: {type(e).__name__}: {e}"
    if not torch.cuda.is_available():
        return "no CUDA device"
    return None


@functools.cache
def _kernels() -> tuple[Any, Any]:
    """The two jitted kernels (defined on first use, so importing this module needs no triton)."""
    import triton
    import triton.language as tl

    @triton.jit
    def live_decode(Q, K, V, POS, O, MID_O, MID_L, scale,
                    sq_b, sq_h, sk_b, sk_h, sk_n, sv_b, sv_h, sv_n, so_b, so_h, sm_b, sm_h, sm_s, sl_b, sl_h,
                    WINDOW: tl.constexpr, GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                    BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr, SPLITS: tl.constexpr, IEEE: tl.constexpr):
        b = tl.program_id(0).to(tl.int64)  # b * stride passes 2**31 in large caches
        kvh = tl.program_id(1)
        split = tl.program_id(2)
        p = tl.load(POS + b).to(tl.int32)
        hi = p + 1
        if WINDOW > 0:
            lo = tl.maximum(p - WINDOW + 1, 0)
        else:
            lo = p * 0
        if SPLITS > 1:
            per = tl.cdiv(tl.cdiv(hi - lo, SPLITS), BLOCK_N) * BLOCK_N
            start = lo + split * per
            end = tl.minimum(start + per, hi)
        else:
            start = lo
            end = hi
        hh = tl.arange(0, BLOCK_H)
        heads = kvh * GROUP + hh
        mh = hh < GROUP
        dd = tl.arange(0, BLOCK_D)
        md = dd < HEAD_DIM  # all true when HEAD_DIM is a power of two: the K/V masks then vary along keys only
        q = tl.load(Q + b * sq_b + heads[:, None] * sq_h + dd[None, :], mask=mh[:, None] & md[None, :], other=0.0)
        m_i = tl.full([BLOCK_H], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_H], dtype=tl.float32)
        acc = tl.zeros([BLOCK_H, BLOCK_D], dtype=tl.float32)
        kbase = K + b * sk_b + kvh * sk_h
        vbase = V + b * sv_b + kvh * sv_h
        for n0 in range(start, end, BLOCK_N):
            nn = n0 + tl.arange(0, BLOCK_N)
            mn = nn < end
            if BLOCK_D == HEAD_DIM:
                kt = tl.load(kbase + nn[None, :] * sk_n + dd[:, None], mask=mn[None, :], other=0.0)
            else:
                kt = tl.load(kbase + nn[None, :] * sk_n + dd[:, None], mask=mn[None, :] & md[:, None], other=0.0)
            kt = kt.to(q.dtype)  # an e4m3 cache is converted here (unit scale); else a no-op
            if IEEE:
                sc = tl.dot(q, kt, input_precision="ieee")
            else:
                sc = tl.dot(q, kt)
            sc = tl.where(mn[None, :], sc * scale, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(sc, 1))
            alpha = tl.exp(m_i - m_new)
            pr = tl.exp(sc - m_new[:, None])
            l_i = l_i * alpha + tl.sum(pr, 1)
            if BLOCK_D == HEAD_DIM:
                vv = tl.load(vbase + nn[:, None] * sv_n + dd[None, :], mask=mn[:, None], other=0.0)
            else:
                vv = tl.load(vbase + nn[:, None] * sv_n + dd[None, :], mask=mn[:, None] & md[None, :], other=0.0)
            vv = vv.to(q.dtype)
            if IEEE:
                pv = tl.dot(pr.to(vv.dtype), vv, input_precision="ieee")
            else:
                pv = tl.dot(pr.to(vv.dtype), vv)
            acc = acc * alpha[:, None] + pv
            m_i = m_new
        if SPLITS > 1:
            safe = tl.where(l_i > 0, l_i, 1.0)
            offs = b * sm_b + heads[:, None] * sm_h + split * sm_s + dd[None, :]
            tl.store(MID_O + offs, acc / safe[:, None], mask=mh[:, None] & md[None, :])
            lse = tl.where(l_i > 0, m_i + tl.log(safe), float("-inf"))
            tl.store(MID_L + b * sl_b + heads * sl_h + split, lse, mask=mh)
        else:
            o = acc / l_i[:, None]
            tl.store(O + b * so_b + heads[:, None] * so_h + dd[None, :], o.to(O.dtype.element_ty),
                     mask=mh[:, None] & md[None, :])

    @triton.jit
    def combine(MID_O, MID_L, O, so_b, so_h, sm_b, sm_h, sm_s, sl_b, sl_h,
                HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, SPLITS: tl.constexpr):
        b = tl.program_id(0).to(tl.int64)
        h = tl.program_id(1)
        ss = tl.arange(0, SPLITS)
        dd = tl.arange(0, BLOCK_D)
        md = dd < HEAD_DIM
        lse = tl.load(MID_L + b * sl_b + h * sl_h + ss)
        m = tl.max(lse, 0)
        w = tl.exp(lse - m)  # an empty split has lse -inf: weight 0 (split 0 is never empty)
        part = tl.load(MID_O + b * sm_b + h * sm_h + ss[:, None] * sm_s + dd[None, :], mask=md[None, :], other=0.0)
        o = tl.sum(w[:, None] * part, 0) / tl.sum(w, 0)
        tl.store(O + b * so_b + h * so_h + dd, o.to(O.dtype.element_ty), mask=md)

    return live_decode, combine


def decode_attention(q: "torch.Tensor", k: "torch.Tensor", v: "torch.Tensor", pos: "torch.Tensor", scale: float,
                     window: int | None, splits: int = 1, block_n: int = BLOCK_N, num_warps: int = NUM_WARPS,
                     num_stages: int = NUM_STAGES) -> "torch.Tensor":
    """Decode attention of each row over its live keys only (the Triton kernel; CUDA tensors).

    Args:
        q: (s, heads, 1, d) one query per row, last dimension contiguous.
        k, v: (s, kv_heads, context, d) the cache rows of the s slots (views of the static cache are fine).
        pos: (s,) int64 on the device: each row's position (its K/V at `pos` already written).
        scale: the scores' scaling (`self_attn.scaling`).
        window: the layer's sliding window, or None.
        splits: programs per (row, KV head) along the keys (a power of two; 1 = no split).
        block_n, num_warps, num_stages: launch settings (the benchmark sweeps them).
    Returns:
        (s, 1, heads * d) in q's dtype.
    Raises:
        ValueError: shapes or dtypes the kernel does not take.
    """
    import torch

    s, heads, t, d = q.shape
    kv = k.shape[1]
    if t != 1 or heads % kv or k.shape[-1] != d or v.shape != k.shape or k.shape[0] < s:
        raise ValueError(f"decode_attention: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)} do not "
                         "fit (s, heads, 1, d) / (slots, kv_heads, context, d)")
    e4m3 = getattr(torch, "float8_e4m3fn", None)
    if (q.dtype not in (torch.float32, torch.bfloat16, torch.float16) or k.dtype != v.dtype
            or k.dtype not in (q.dtype, e4m3)):
        raise ValueError(f"decode_attention: dtypes q {q.dtype}, k {k.dtype}, v {v.dtype}; expected one of "
                         "float32, bfloat16, float16 for q, and K/V in q's dtype or both float8_e4m3fn")
    if splits < 1 or splits & (splits - 1):
        raise ValueError(f"decode_attention: splits={splits}; expected a power of two >= 1")
    if q.stride(-1) != 1:
        q = q.contiguous()
    if k.stride(-1) != 1 or v.stride(-1) != 1:
        raise ValueError("decode_attention: the cache's last dimension must be contiguous")
    live_decode, combine = _kernels()
    group = heads // kv
    block_d = max(16, 1 << (d - 1).bit_length())
    block_h = max(16, 1 << (group - 1).bit_length())
    out = torch.empty(s, heads, d, dtype=q.dtype, device=q.device)
    if splits > 1:
        mid_o = torch.empty(s, heads, splits, block_d, dtype=torch.float32, device=q.device)
        mid_l = torch.empty(s, heads, splits, dtype=torch.float32, device=q.device)
    else:
        mid_o = mid_l = out  # unused
    sm = (heads * splits * block_d, splits * block_d, block_d, heads * splits, splits)  # mid_o's, mid_l's strides
    live_decode[(s, kv, splits)](
        q, k, v, pos, out, mid_o, mid_l, float(scale),
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1), v.stride(2),
        out.stride(0), out.stride(1), *sm,
        WINDOW=int(window or 0), GROUP=group, HEAD_DIM=d, BLOCK_D=block_d, BLOCK_H=block_h, BLOCK_N=block_n,
        SPLITS=splits, IEEE=q.dtype == torch.float32, num_warps=num_warps, num_stages=num_stages)
    if splits > 1:
        combine[(s, heads)](mid_o, mid_l, out, out.stride(0), out.stride(1), *sm, HEAD_DIM=d, BLOCK_D=block_d,
                            SPLITS=splits, num_warps=4)
    return out.reshape(s, 1, heads * d)
