"""The sampler's top candidates on CUDA: a Triton radix select in place of `torch.topk` over the vocabulary.

`top_candidates(logits, k)` returns each row's k largest logits and their token ids, sorted by value
descending and, among equal values, by id ascending (the boundary too: of the tokens tied at the k-th
value, the lowest ids are taken). That order is defined, so the draw does not depend on how a top-k
implementation breaks ties; `reference_top` is the same contract in plain torch.

How the kernel works, one program per row:
- Each logit becomes an order-preserving unsigned key (16 bits for bf16/fp16, 32 for float32: the sign bit
  flipped for positives, every bit for negatives), so larger keys are larger values.
- Radix select, 8 bits a pass, from the top: a 256-bin histogram of the key's next byte among the keys
  that match the bytes chosen so far gives the byte of the k-th largest key. Two passes for bf16, four for
  float32. The result is the threshold key T and `need`, how many keys equal to T belong in the top k.
- A last pass writes every key above T, and the first `need` keys equal to T in id order, to k slots as
  `key << 31 | (2**31 - 1 - id)`; those are distinct, so one `torch.sort` of the k per row gives the order
  above. Every pass reads the row once (three reads for bf16, 512 KB a row at Gemma 3's vocabulary).

The launch has a fixed grid and no host sync, so it runs inside the compiled draw and the engine's CUDA
graph (dynamo traces a user-defined Triton kernel). Without triton or CUDA, `available()` says why and
the sampler keeps `torch.topk`. Tests: `python -m pytest -q tests/core/test_topk.py`; GPU numerics and
timing: `python bench/gpu_topk.py`.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

BLOCK = 4096
"""Logits per loop iteration of the kernel."""
NUM_WARPS = 8
_ID_BITS = 31
_ID_MASK = (1 << _ID_BITS) - 1


@functools.cache
def available() -> str | None:
    """None when triton imports and a CUDA device is there, else why not (the sampler then keeps torch.topk)."""
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


def _define() -> Any:
    """Define the radix-select kernel (see the module docstring)."""
    import triton
    import triton.language as tl

    @triton.jit
    def radix_top(X, OUT, sx, V, K: tl.constexpr, KEY_BITS: tl.constexpr, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        base = X + row * sx
        offs = tl.arange(0, BLOCK)
        bins = tl.arange(0, 512)
        real = bins < 256  # bin 256 collects what is masked out (tl.histogram has no mask)
        prefix = tl.zeros([], dtype=tl.int64)
        remaining = tl.full([], K, dtype=tl.int64)
        for p in tl.static_range(KEY_BITS // 8):
            shift = KEY_BITS - 8 * (p + 1)
            hist = tl.zeros([512], dtype=tl.int32)
            for start in range(0, V, BLOCK):
                idx = start + offs
                m = idx < V
                if KEY_BITS == 16:
                    bits = tl.load(base + idx, mask=m, other=0).to(tl.int64) & 0xFFFF
                    key = tl.where(bits >= 0x8000, bits ^ 0xFFFF, bits | 0x8000)
                else:
                    bits = tl.load(base + idx, mask=m, other=0).to(tl.int64) & 0xFFFFFFFF
                    key = tl.where(bits >= 0x80000000, bits ^ 0xFFFFFFFF, bits | 0x80000000)
                byte = (key >> shift) & 255
                if p > 0:
                    m = m & ((key >> (shift + 8)) == prefix)
                hist += tl.histogram(tl.where(m, byte, 256).to(tl.int32), 512)
            c = tl.where(real, hist, 0).to(tl.int64)
            above = tl.sum(c, 0) - tl.cumsum(c, 0)  # keys in bins above each bin
            chosen = tl.sum((real & (above >= remaining)).to(tl.int64), 0)
            remaining = remaining - tl.sum(tl.where(bins == chosen, above, 0), 0)
            prefix = (prefix << 8) | chosen
        written = tl.zeros([], dtype=tl.int64)
        eq_seen = tl.zeros([], dtype=tl.int64)
        for start in range(0, V, BLOCK):
            idx = start + offs
            m = idx < V
            if KEY_BITS == 16:
                bits = tl.load(base + idx, mask=m, other=0).to(tl.int64) & 0xFFFF
                key = tl.where(bits >= 0x8000, bits ^ 0xFFFF, bits | 0x8000)
            else:
                bits = tl.load(base + idx, mask=m, other=0).to(tl.int64) & 0xFFFFFFFF
                key = tl.where(bits >= 0x80000000, bits ^ 0xFFFFFFFF, bits | 0x80000000)
            eq = m & (key == prefix)
            take = (m & (key > prefix)) | (eq & (eq_seen + tl.cumsum(eq.to(tl.int64), 0) <= remaining))
            at = written + tl.cumsum(take.to(tl.int64), 0) - 1
            tl.store(OUT + row * K + at, (key << 31) | (0x7FFFFFFF - idx.to(tl.int64)), mask=take)
            written += tl.sum(take.to(tl.int64), 0)
            eq_seen += tl.sum(eq.to(tl.int64), 0)

    return radix_top


def top_candidates(logits: "torch.Tensor", k: int, block: int = BLOCK,
                   num_warps: int = NUM_WARPS) -> tuple["torch.Tensor", "torch.Tensor"]:
    """Each row's k largest logits and their ids by the Triton kernel (CUDA tensors; the contract of
    `reference_top`).

    Args:
        logits: (n, vocab) bf16, fp16 or float32, last dimension contiguous.
        k: candidates per row, 1 <= k <= vocab.
        block, num_warps: launch settings (the benchmark sweeps them).
    Returns:
        values (n, k) in logits' dtype, ids (n, k) int64.
    Raises:
        ValueError: a dtype, layout or k the kernel does not take.
    """
    import torch

    n, vocab = logits.shape
    bits = {torch.bfloat16: 16, torch.float16: 16, torch.float32: 32}.get(logits.dtype)
    if bits is None or logits.stride(-1) != 1 or not 1 <= k <= vocab or vocab > _ID_MASK:
        raise ValueError(f"top_candidates: logits {logits.dtype} {tuple(logits.shape)} stride {logits.stride()}, "
                         f"k={k}; expected bf16/fp16/float32 (n, vocab) with a contiguous last dimension, "
                         "1 <= k <= vocab < 2**31")
    raw = logits.view(torch.int16 if bits == 16 else torch.int32)
    packed = torch.empty(n, k, dtype=torch.int64, device=logits.device)
    kernel()[(n,)](raw, packed, raw.stride(0), vocab, K=k, KEY_BITS=bits, BLOCK=block, num_warps=num_warps)
    top = packed.sort(dim=-1, descending=True).values
    idx = _ID_MASK - (top & _ID_MASK)
    return logits.gather(-1, idx), idx
