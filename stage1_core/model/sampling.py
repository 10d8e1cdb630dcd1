"""Sampling for the engine: per-row counter-based randomness and the graph-safe token draw.

A row's randomness comes from (run seed, item id, step) through a 32-bit integer hash, so the same seed
gives the same text at any batch size, in any batch company, after any OOM back-off: there is no
generator state to share or advance. `sample` draws greedy, full-vocabulary or top-k/top-p tokens with
fixed shapes and no host sync, so it runs inside the engine's captured CUDA graph.

The logits may come in the LM head's own dtype (bf16 on the GPU): greedy takes their argmax, and the
top-k/top-p draw selects its TOP_CANDIDATES on them (half the bytes of a float32 copy, and half the radix
passes), then works in float32 on those candidates and on one fused pass for the normaliser. A bf16
value is exactly a float32 one, so the candidates and their probabilities are those of the float32
logits.

`Sampler` (the engine's) runs that draw through `torch.compile` when the engine compiles (on CUDA by
default, `STAGE1_ENGINE_COMPILE`; decoder.py): the temperature, the normaliser over the vocabulary, the
hash, the top-k/top-p masks and cumulative sums become a few fused kernels around the top-k, without CUDA
graphs of its own (the engine captures the decode step). A compile that fails falls back to the same
function run eagerly. The candidates come from one `torch.topk` over the vocabulary (a two-stage
selection, the top k of each slice then of those, was measured slower at every slice count on an H100
and removed: docs/performance.md).
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

if TYPE_CHECKING:
    import torch

log = logging.getLogger("stage1.engine")

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


def _draw_top(logits: "torch.Tensor", temperature: "torch.Tensor", top_p: "torch.Tensor", top_k: "torch.Tensor",
              seeds: "torch.Tensor", steps: "torch.Tensor") -> "torch.Tensor":
    """The top-k/top-p draw of `sample` among the TOP_CANDIDATES most likely tokens (a pure tensor function:
    `Sampler` compiles it). logits (n, vocab) in any float dtype; temperature, top_p, top_k 0-d tensors."""
    import torch

    k = min(TOP_CANDIDATES, logits.shape[-1])
    # on the logits as they come: a temperature > 0 keeps their order
    top, idx = logits.topk(k, dim=-1)
    vals = top.float() / temperature  # = (logits / temperature)[idx], exactly (a bf16 value is a float32 one)
    m = vals[:, :1]  # the row's largest scaled logit: torch.logsumexp's shift, and the same formula after it
    lse = m + torch.log(torch.exp(logits.float() / temperature - m).sum(dim=-1, keepdim=True))
    probs = torch.exp(vals - lse)
    ranks = torch.arange(k, device=logits.device)
    limit = torch.where(top_k > 0, top_k, torch.full_like(top_k, k))
    probs = probs * (ranks < limit).to(probs.dtype)
    probs = probs / probs.sum(dim=-1, keepdim=True)  # renormalised over top-k (= 1 without top-k)
    cum = probs.cumsum(dim=-1)
    keep = (cum - probs) < top_p  # the mass strictly before a token is < top_p: always keeps the first
    kept = probs * keep.to(probs.dtype)
    kcum = kept.cumsum(dim=-1)
    u = uniform(seeds, steps)
    j = (kcum <= (u * kcum[:, -1]).unsqueeze(-1)).sum(dim=-1).clamp(max=k - 1)
    return idx.gather(-1, j.unsqueeze(-1)).squeeze(-1)


def sample(logits: "torch.Tensor", s: Sampling, seeds: "torch.Tensor", steps: "torch.Tensor",
           draw: Callable[..., "torch.Tensor"] | None = None) -> "torch.Tensor":
    """Draw one token per row, deterministically from (row seed, step).

    Temperature, then top-k, then top-p (transformers' order); the draw is an inverse-CDF lookup with
    the row's counter-based uniform. Graph-safe: no host sync, fixed shapes.

    Args:
        logits: (n, vocab), float32 or the LM head's dtype (exactly upcast where float32 is needed).
        s: the call's sampling settings.
        seeds, steps: (n,) int64.
        draw: the top-k/top-p draw to use (`_draw_top`, or its compiled form).
    Returns:
        (n,) int64 token ids.
    """
    import torch

    if s.mode == "greedy":
        return logits.argmax(dim=-1)
    if s.mode == "full":
        u = uniform(seeds, steps)
        cdf = torch.softmax(logits.float() / s.temperature, dim=-1).cumsum(dim=-1)
        pick = torch.searchsorted(cdf, (u * cdf[:, -1]).unsqueeze(-1).contiguous(), right=True).squeeze(-1)
        return pick.clamp(max=logits.shape[-1] - 1)
    return (draw or _draw_top)(logits, s.temperature, s.top_p, s.top_k, seeds, steps)


class Sampler:
    """`sample` with its top-k/top-p draw compiled or not (the engine holds one; see the module docstring).

    `use_compiled` may be switched later (the benchmark measures each way on one engine); the draw is
    compiled on its first use. A draw whose compilation fails turns `use_compiled` off
    (logged, `compile_failed` says why) and runs eagerly; out of device memory is re-raised as such (the
    engine backs off)."""

    def __init__(self, compile: Any = False) -> None:
        """compile: False, True (inductor) or a torch.compile backend. Static shapes first; a second slot
        count makes dynamo's automatic dynamic shapes take over (as for the decoder's decode stretches)."""
        self.backend = ("inductor" if compile is True else compile) or None
        self._compiled: Callable[..., Any] | None = None
        self.use_compiled = self.backend is not None
        self.compile_failed: str | None = None

    def draw(self, compiled: bool) -> Callable[..., "torch.Tensor"]:
        """The top-k/top-p draw, compiled (once) or eager."""
        if not compiled:
            return _draw_top
        if self._compiled is None:
            import torch

            self._compiled = torch.compile(_draw_top, backend=self.backend, fullgraph=True)
        return self._compiled

    def __call__(self, logits: "torch.Tensor", s: Sampling, seeds: "torch.Tensor", steps: "torch.Tensor",
                 compiled: bool = True) -> "torch.Tensor":
        """`sample`, through the compiled draw when on and `compiled` (the engine's decode step; its
        prefills, at varying row counts, draw eagerly)."""
        if s.mode != "nucleus":
            return sample(logits, s, seeds, steps)
        if compiled and self.use_compiled:
            try:
                return sample(logits, s, seeds, steps, draw=self.draw(True))
            except Exception as e:  # noqa: BLE001 - inductor/triton missing or failing: the eager draw is the same
                self.compile_failed = _failure(e)
                self.use_compiled = False
                log.warning("engine: torch.compile of the sampler failed (%s); drawing eagerly", self.compile_failed)
        return sample(logits, s, seeds, steps, draw=self.draw(False))


def _failure(e: Exception) -> str:
    """Why a compiled draw failed, for the fallback's log; out of device memory is re-raised as
    torch.OutOfMemoryError instead (the engine backs off rather than falling back)."""
    import torch

    from stage1_core.model.rows import out_of_memory

    if out_of_memory(e):
        raise torch.OutOfMemoryError(str(e)) from e
    return f"{type(e).__name__}: {e}"[:500]
