"""Sampling for the engine: per-row counter-based randomness and the graph-safe token draw.

A row's randomness comes from (run seed, item id, step) through a 32-bit integer hash, so the same seed
gives the same text at any batch size, in any batch company, after any OOM back-off: there is no
generator state to share or advance. `sample` draws greedy, full-vocabulary or top-k/top-p tokens with
fixed shapes and no host sync, so it runs inside the engine's captured CUDA graph.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

TOP_CANDIDATES = 1024
"""Top-p / top-k sampling draws from the 1024 most likely tokens: the nucleus lies inside them unless
the distribution is nearly flat (then the draw is limited to those 1024)."""

_M32 = 0xFFFFFFFF


def row_seed(seed: int, item_id: str) -> int:
    """A row's 31-bit sampling seed from the run seed and the item's stable id (never its position).

    Args:
        seed: the call's seed.
        item_id: the item's id.
    Returns:
        An int in [0, 2**31).
    """
    return int.from_bytes(hashlib.sha256(f"{seed}\x1f{item_id}".encode()).digest()[:4], "big") & 0x7FFFFFFF


def _mul32(x: "torch.Tensor", c: int) -> "torch.Tensor":
    """(x * c) mod 2**32 for 0 <= x < 2**32 in int64 without overflow (split in 16-bit halves)."""
    return ((x & 0xFFFF) * c + ((((x >> 16) * c) & 0xFFFF) << 16)) & _M32


def _mix32(x: "torch.Tensor") -> "torch.Tensor":
    """A 32-bit integer hash (lowbias32) on int64 tensors; same bits on every device."""
    x = x & _M32
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def uniform(seeds: "torch.Tensor", steps: "torch.Tensor") -> "torch.Tensor":
    """One uniform in [0, 1) per row from (row seed, step): counter-based, no generator state.

    Args:
        seeds: (n,) int64 row seeds.
        steps: (n,) int64 step numbers (tokens generated so far in that row).
    Returns:
        (n,) float32 uniforms, multiples of 2**-24.
    """
    h = _mix32(_mix32(seeds) ^ _mul32(steps & _M32, 0x9E3779B1))
    return (h >> 8).float() * (1.0 / (1 << 24))


@dataclass
class Sampling:
    """Sampling settings as device tensors (so one captured graph serves every call of a mode)."""

    mode: str  # "greedy" | "nucleus" | "full"
    temperature: "torch.Tensor"
    top_p: "torch.Tensor"
    top_k: "torch.Tensor"


def sampling_mode(temperature: float, top_p: float, top_k: int) -> str:
    """greedy (temperature 0), full (plain temperature sampling over the whole vocabulary), or nucleus."""
    if temperature == 0:
        return "greedy"
    return "full" if top_p >= 1.0 and top_k == 0 else "nucleus"


def sample(logits: "torch.Tensor", s: Sampling, seeds: "torch.Tensor", steps: "torch.Tensor") -> "torch.Tensor":
    """Draw one token per row, deterministically from (row seed, step).

    Temperature, then top-k, then top-p (transformers' order); the draw is an inverse-CDF lookup with
    the row's counter-based uniform. Graph-safe: no host sync, fixed shapes.

    Args:
        logits: (n, vocab) float32.
        s: the call's sampling settings.
        seeds, steps: (n,) int64.
    Returns:
        (n,) int64 token ids.
    """
    import torch

    if s.mode == "greedy":
        return logits.argmax(dim=-1)
    scaled = logits / s.temperature
    u = uniform(seeds, steps)
    if s.mode == "full":
        cdf = torch.softmax(scaled, dim=-1).cumsum(dim=-1)
        pick = torch.searchsorted(cdf, (u * cdf[:, -1]).unsqueeze(-1).contiguous(), right=True).squeeze(-1)
        return pick.clamp(max=logits.shape[-1] - 1)
    k = min(TOP_CANDIDATES, logits.shape[-1])
    vals, idx = scaled.topk(k, dim=-1)
    probs = torch.exp(vals - torch.logsumexp(scaled, dim=-1, keepdim=True))
    ranks = torch.arange(k, device=logits.device)
    limit = torch.where(s.top_k > 0, s.top_k, torch.full_like(s.top_k, k))
    probs = probs * (ranks < limit).to(probs.dtype)
    probs = probs / probs.sum(dim=-1, keepdim=True)  # renormalised over top-k (= 1 without top-k)
    cum = probs.cumsum(dim=-1)
    keep = (cum - probs) < s.top_p  # the mass strictly before a token is < top_p: always keeps the first
    kept = probs * keep.to(probs.dtype)
    kcum = kept.cumsum(dim=-1)
    j = (kcum <= (u * kcum[:, -1]).unsqueeze(-1)).sum(dim=-1).clamp(max=k - 1)
    return idx.gather(-1, j.unsqueeze(-1)).squeeze(-1)
