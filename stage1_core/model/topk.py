"""The sampler's top candidates on CUDA: a Triton radix select in place of `torch.topk` over the vocabulary.

`top_candidates(logits, k)` returns each row's k largest logits and their token ids, sorted by value
descending and, among equal values, by id ascending (the boundary too: of the tokens tied at the k-th
value, the lowest ids are taken). That order is defined, so the draw does not depend on how a top-k
implementation breaks ties; `reference_top` is the same contract in plain torch.

How the kernels work, each row split over SPLITS programs (one slice of the vocabulary each):
- Each logit becomes an order-preserving unsigned key (16 bits for bf16/fp16, 32 for float32: the sign bit
  flipped for positives, every bit for negatives), so larger keys are larger values.
- Radix select, 8 bits a pass, from the top. A pass's programs each write a 256-bin histogram of the key's
  next byte in their slice, among the keys that match the bytes chosen so far; then one small program per
  row sums them and picks the byte of the k-th largest key. Two passes for bf16, four for float32. The
  result is the threshold key T and `need`, how many keys equal to T belong in the top k; along the way
  each slice's count of keys above T, and after the last pass its count of keys equal to T, are kept.
- The compaction pass: from those counts each program knows where its slice's keys go and which of its
  keys equal to T are among the first `need` in id order. It writes every key above T, and those, to k
  slots as `key << 31 | (2**31 - 1 - id)`; those are distinct, so one `torch.sort` of the k per row gives
  the order above. Every pass reads the row once (three reads for bf16, 512 KB a row at Gemma 3's
  vocabulary).

Status (docs/performance.md): off by default (`STAGE1_ENGINE_TOPK=1` turns it on). On an H100 at 256 bf16
rows a first version, one program per row, took 1.48 ms against `torch.topk`'s 0.585 (2026-12-06); this
split version takes 1.24 ms, 0.94 at its best launch setting (2026-12-07): exact, ties included, and
still slower.

The launch has a fixed grid and no host sync, so it runs inside the compiled draw and the engine's CUDA
graph (dynamo traces a user-defined Triton kernel). Without triton or CUDA, `available()` says why and
the sampler keeps `torch.topk`. Tests: `python -m pytest -q tests/core/test_topk.py`; GPU numerics and
timing: `python bench/gpu_topk.py`.
"""

from __future__ import annotations

import inspect
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

BLOCK = 2048
"""Logits per loop iteration of the kernels."""
NUM_WARPS = 8
SPLITS = 16
"""Programs per row: each takes one slice of the row's vocabulary."""
_ID_BITS = 31
_ID_MASK = (1 << _ID_BITS) - 1


def available() -> str | None:
    """None when triton imports and a CUDA device is there, else why not (the sampler then keeps torch.topk):
    the attention kernel's check (cached there)."""
    from stage1_core.model import attention

    return attention.available()


def _keys(logits: "torch.Tensor") -> "torch.Tensor":
    """Order-preserving int64 keys of the logits' float32 values (32 bits, larger key = larger value)."""
    import torch

    b = logits.float().view(torch.int32).to(torch.int64) & 0xFFFFFFFF
    return torch.where(b >= 1 << 31, b ^ 0xFFFFFFFF, b | (1 << 31))


def reference_top(logits: "torch.Tensor", k: int) -> tuple["torch.Tensor", "torch.Tensor"]:
    """`top_candidates` in plain torch (for tests and the benchmark's check; slow: a top-k over int64 keys).

    Args:
        logits: (n, vocab) float logits.
        k: candidates per row (<= vocab).
    Returns:
        values (n, k) in logits' dtype and ids (n, k) int64: value descending, id ascending among ties.
    """
    import torch

    vocab = logits.shape[-1]
    ids = torch.arange(vocab, device=logits.device)
    top = ((_keys(logits) << _ID_BITS) | (_ID_MASK - ids)).topk(k, dim=-1).values
    idx = _ID_MASK - (top & _ID_MASK)
    return logits.gather(-1, idx), idx


TOPK_ENV = "STAGE1_ENGINE_TOPK"
_RADIX: Any = None


DEFAULT = False
"""Whether the kernel is on when `STAGE1_ENGINE_TOPK` is unset: off until a GPU record measures it."""


def enabled() -> bool:
    """Whether the sampler takes its candidates with the kernel: `STAGE1_ENGINE_TOPK` 1/0, else `DEFAULT`
    (either way only on CUDA logits where triton imports; `usable()`)."""
    from stage1_core.model.decoder import _flag

    v = _flag(TOPK_ENV)
    return DEFAULT if v is None else v


def usable(logits: "torch.Tensor") -> bool:
    """Whether the kernel can take these logits' candidates (CUDA tensors, triton imports); defines the
    kernel if so, before any trace of the draw (which then reads it as a constant)."""
    if not logits.is_cuda or available() is not None:
        return False
    kernel()
    return True


def kernel() -> Any:
    """The jitted kernel, defined on first use (so importing this module needs no triton). A plain global
    rather than functools.cache: dynamo reads it as a constant when it traces `top_candidates`."""
    global _RADIX
    if _RADIX is None:
        _RADIX = _define()
    return _RADIX


def _define() -> tuple[Any, Any, Any, bool]:
    """Define the three kernels (see the module docstring): a pass's partial histograms, the per-row choice
    of the pass's byte, and the compaction; and whether this triton's histogram takes a mask."""
    import triton
    import triton.language as tl

    masked = "mask" in inspect.signature(tl.histogram).parameters  # triton >= 3.3; else a sink bin

    @triton.jit
    def hist_pass(X, ST, H, sx, V, CHUNK, P: tl.constexpr, KEY_BITS: tl.constexpr, SPLITS: tl.constexpr,
                  BLOCK: tl.constexpr, MASKED: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        sp = tl.program_id(1)
        lo = sp * CHUNK
        hi = tl.minimum(lo + CHUNK, V)
        offs = tl.arange(0, BLOCK)
        bins = tl.arange(0, 256 if MASKED else 512)
        shift = KEY_BITS - 8 * (P + 1)
        if P > 0:
            prefix = tl.load(ST + row * 2)
        hist = tl.zeros([256 if MASKED else 512], dtype=tl.int32)
        for start in range(lo, hi, BLOCK):
            idx = start + offs
            m = idx < hi
            if KEY_BITS == 16:  # order-preserving keys: int32 for 16-bit dtypes, int64 for float32
                bits = tl.load(X + row * sx + idx, mask=m, other=0).to(tl.int32) & 0xFFFF
                key = tl.where(bits >= 0x8000, bits ^ 0xFFFF, bits | 0x8000)
            else:
                bits = tl.load(X + row * sx + idx, mask=m, other=0).to(tl.int64) & 0xFFFFFFFF
                key = tl.where(bits >= 0x80000000, bits ^ 0xFFFFFFFF, bits | 0x80000000)
            byte = ((key >> shift) & 255).to(tl.int32)
            if P > 0:
                m = m & ((key >> (shift + 8)).to(tl.int64) == prefix)
            if MASKED:
                hist += tl.histogram(byte, 256, mask=m)
            else:
                hist += tl.histogram(tl.where(m, byte, 256), 512)  # bin 256 collects the rest
        tl.store(H + (row * SPLITS + sp) * 256 + bins, hist, mask=bins < 256)

    @triton.jit
    def choose(ST, H, GT, EQ, K: tl.constexpr, P: tl.constexpr, LAST: tl.constexpr, SPLITS: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        ss = tl.arange(0, SPLITS)
        bins = tl.arange(0, 256)
        h = tl.load(H + (row * SPLITS + ss[:, None]) * 256 + bins[None, :]).to(tl.int64)  # (splits, 256)
        c = tl.sum(h, 0)
        if P == 0:
            prefix = tl.zeros([], dtype=tl.int64)
            remaining = tl.full([], K, dtype=tl.int64)
            gt = tl.zeros([SPLITS], dtype=tl.int64)
        else:
            prefix = tl.load(ST + row * 2)
            remaining = tl.load(ST + row * 2 + 1)
            gt = tl.load(GT + row * SPLITS + ss)
        above = tl.sum(c, 0) - tl.cumsum(c, 0)  # keys (matching the prefix) in bins above each bin
        chosen = tl.sum((above >= remaining).to(tl.int64), 0)
        remaining = remaining - tl.sum(tl.where(bins == chosen, above, 0), 0)
        gt = gt + tl.sum(tl.where(bins[None, :] > chosen, h, 0), 1)  # each split's keys above the threshold
        tl.store(GT + row * SPLITS + ss, gt)
        tl.store(ST + row * 2, (prefix << 8) | chosen)
        tl.store(ST + row * 2 + 1, remaining)
        if LAST:
            tl.store(EQ + row * SPLITS + ss, tl.sum(tl.where(bins[None, :] == chosen, h, 0), 1))

    @triton.jit
    def compact(X, ST, GT, EQ, OUT, sx, V, CHUNK, K: tl.constexpr, KEY_BITS: tl.constexpr, SPLITS: tl.constexpr,
                BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        sp = tl.program_id(1)
        lo = sp * CHUNK
        hi = tl.minimum(lo + CHUNK, V)
        offs = tl.arange(0, BLOCK)
        thr = tl.load(ST + row * 2)
        need = tl.load(ST + row * 2 + 1)  # keys equal to thr to take, lowest ids first
        ss = tl.arange(0, SPLITS)
        gt = tl.load(GT + row * SPLITS + ss)
        eq = tl.load(EQ + row * SPLITS + ss)
        eq_before = tl.cumsum(eq, 0) - eq
        taken = tl.minimum(tl.maximum(need - eq_before, 0), eq)
        earlier = ss < sp
        written = tl.sum(tl.where(earlier, gt + taken, 0), 0)
        eq_seen = tl.sum(tl.where(earlier, eq, 0), 0)
        for start in range(lo, hi, BLOCK):
            idx = start + offs
            m = idx < hi
            if KEY_BITS == 16:  # order-preserving keys: int32 for 16-bit dtypes, int64 for float32
                bits = tl.load(X + row * sx + idx, mask=m, other=0).to(tl.int32) & 0xFFFF
                key = tl.where(bits >= 0x8000, bits ^ 0xFFFF, bits | 0x8000)
            else:
                bits = tl.load(X + row * sx + idx, mask=m, other=0).to(tl.int64) & 0xFFFFFFFF
                key = tl.where(bits >= 0x80000000, bits ^ 0xFFFFFFFF, bits | 0x80000000)
            key = key.to(tl.int64)
            is_eq = m & (key == thr)
            take = (m & (key > thr)) | (is_eq & (eq_seen + tl.cumsum(is_eq.to(tl.int64), 0) <= need))
            at = written + tl.cumsum(take.to(tl.int64), 0) - 1
            tl.store(OUT + row * K + at, (key << 31) | (0x7FFFFFFF - idx.to(tl.int64)), mask=take)
            written += tl.sum(take.to(tl.int64), 0)
            eq_seen += tl.sum(is_eq.to(tl.int64), 0)

    return hist_pass, choose, compact, masked


def top_candidates(logits: "torch.Tensor", k: int, block: int = BLOCK, num_warps: int = NUM_WARPS,
                   splits: int = SPLITS) -> tuple["torch.Tensor", "torch.Tensor"]:
    """Each row's k largest logits and their ids by the Triton kernel (CUDA tensors; the contract of
    `reference_top`).

    Args:
        logits: (n, vocab) bf16, fp16 or float32, last dimension contiguous.
        k: candidates per row, 1 <= k <= vocab.
        block, num_warps, splits: launch settings (the benchmark sweeps them); splits is the programs per
            row, a power of two.
    Returns:
        values (n, k) in logits' dtype, ids (n, k) int64.
    Raises:
        ValueError: a dtype, layout or k the kernel does not take.
    """
    import torch

    n, vocab = logits.shape
    bits = {torch.bfloat16: 16, torch.float16: 16, torch.float32: 32}.get(logits.dtype)
    if splits < 1 or splits & (splits - 1):
        raise ValueError(f"top_candidates: splits={splits}; expected a power of two >= 1")
    if bits is None or logits.stride(-1) != 1 or not 1 <= k <= vocab or vocab > _ID_MASK:
        raise ValueError(f"top_candidates: logits {logits.dtype} {tuple(logits.shape)} stride {logits.stride()}, "
                         f"k={k}; expected bf16/fp16/float32 (n, vocab) with a contiguous last dimension, "
                         "1 <= k <= vocab < 2**31")
    raw = logits.view(torch.int16 if bits == 16 else torch.int32)
    hist_pass, choose, compact, masked = kernel()
    dev = logits.device
    per = -(-vocab // splits)
    chunk = -(-per // block) * block  # each split's share of the row, in whole blocks
    hist = torch.empty(n, splits, 256, dtype=torch.int32, device=dev)
    state = torch.empty(n, 2, dtype=torch.int64, device=dev)  # per row: the key prefix so far, keys still to take
    gt = torch.empty(n, splits, dtype=torch.int64, device=dev)
    eq = torch.empty(n, splits, dtype=torch.int64, device=dev)
    packed = torch.empty(n, k, dtype=torch.int64, device=dev)
    passes = bits // 8
    for p in range(passes):
        hist_pass[(n, splits)](raw, state, hist, raw.stride(0), vocab, chunk, P=p, KEY_BITS=bits, SPLITS=splits,
                               BLOCK=block, MASKED=masked, num_warps=num_warps)
        choose[(n,)](state, hist, gt, eq, K=k, P=p, LAST=p == passes - 1, SPLITS=splits, num_warps=4)
    compact[(n, splits)](raw, state, gt, eq, packed, raw.stride(0), vocab, chunk, K=k, KEY_BITS=bits, SPLITS=splits,
                         BLOCK=block, num_warps=num_warps)
    top = packed.sort(dim=-1, descending=True).values
    idx = _ID_MASK - (top & _ID_MASK)
    return logits.gather(-1, idx), idx
