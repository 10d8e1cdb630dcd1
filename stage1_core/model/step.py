"""The engine's decode step for every slot, and its CUDA graphs.

`decode_step` builds the step as a function of the context bucket: one token per row through the layers
(decoder.py), the draw (sampling.py), the stop automaton's move (stops.py) and the row bookkeeping, all on
the device with fixed shapes and no host sync, masked for rows that are not live. `GraphedStep` captures
that function once per context bucket in CUDA graphs that share one memory pool, and replays them; a
capture that fails leaves the step eager (`failed` says why). The engine (engine.py) owns the state, the
cache and the loop around them.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

if TYPE_CHECKING:
    import torch

    from stage1_core.model.decoder import Decoder
    from stage1_core.model.sampling import Sampler, Sampling

log = logging.getLogger("stage1.engine")


@dataclass
class StepState:
    """Per-slot decode state, all on the device (fixed shapes, updated in place)."""

    tok: "torch.Tensor"  # (s,) the token to feed next
    pos: "torch.Tensor"  # (s,) its position
    ngen: "torch.Tensor"  # (s,) tokens generated so far
    live: "torch.Tensor"  # (s,) bool: generating
    seed: "torch.Tensor"  # (s,) row seeds
    stop: "torch.Tensor"  # (s,) automaton state
    out: "torch.Tensor"  # (s, max_new) generated tokens
    max_new: "torch.Tensor"  # () int64

    @classmethod
    def zeros(cls, slots: int, max_new: int, device: "torch.device") -> "StepState":
        """Every slot empty (not live), for calls of at most `max_new` new tokens."""
        import torch

        z = lambda: torch.zeros(slots, dtype=torch.long, device=device)  # noqa: E731
        return cls(tok=z(), pos=z(), ngen=z(), live=torch.zeros(slots, dtype=torch.bool, device=device), seed=z(),
                   stop=z(), out=torch.zeros(slots, max_new, dtype=torch.long, device=device),
                   max_new=torch.tensor(max_new, dtype=torch.long, device=device))

    def head(self, k: int) -> "StepState":
        """The first `k` slots, as views of these tensors (a step built on them decodes only those rows)."""
        return StepState(tok=self.tok[:k], pos=self.pos[:k], ngen=self.ngen[:k], live=self.live[:k],
                         seed=self.seed[:k], stop=self.stop[:k], out=self.out[:k], max_new=self.max_new)

    def mutable(self) -> tuple["torch.Tensor", ...]:
        """The tensors a step writes (what a graph capture's warm-up must put back)."""
        return (self.tok, self.pos, self.ngen, self.live, self.stop, self.out)

    def clear(self) -> None:
        """Every slot empty again, in place (a kept graph reads these same tensors)."""
        for t in (*self.mutable(), self.seed):
            t.zero_()


def decode_step(dec: "Decoder", sampler: "Sampler", eos_mask: "torch.Tensor", st: StepState, smp: "Sampling",
                nxt_tab: "torch.Tensor", fire_tab: "torch.Tensor",
                cache: list[tuple["torch.Tensor", "torch.Tensor"]]) -> Callable[[int], None]:
    """One decode step for every slot, eager: `step(bucket)` attends over `bucket` context positions.

    Args:
        dec: the engine's decoder.
        sampler: its token draw.
        eos_mask: (vocab,) bool, the tokens that end a row.
        st: the slots' state, updated in place.
        smp: the call's sampling settings.
        nxt_tab, fire_tab: the stop automaton's transition and firing tables (stops.py).
        cache: the KV cache of these slots, per layer.
    Returns:
        The step.
    """
    import torch

    rows = torch.arange(st.tok.shape[0], device=st.tok.device)
    last = st.out.shape[1] - 1

    def step(bucket: int) -> None:
        h = dec.decode(st.tok, st.pos, cache, bucket)
        nxt = sampler(dec.logits(h, float32=False), smp, st.seed, st.ngen)
        live = st.live
        st.out[rows, st.ngen.clamp(max=last)] = torch.where(live, nxt, st.out[rows, st.ngen.clamp(max=last)])
        new_stop = nxt_tab[st.stop, nxt]
        fired = fire_tab[st.stop, nxt]
        ngen = st.ngen + live.long()
        ended = fired | eos_mask[nxt] | (ngen >= st.max_new)
        st.stop.copy_(torch.where(live, new_stop, st.stop))
        st.tok.copy_(torch.where(live, nxt, st.tok))
        st.pos.copy_(st.pos + live.long())
        st.ngen.copy_(ngen)
        st.live.copy_(live & ~ended)

    return step


class GraphedStep:
    """`step` captured once per context bucket in CUDA graphs that share one memory pool, then replayed.

    A capture runs two eager warm-up steps on a side stream and the captured one, then puts the state back
    (rows rewrite the same K/V when they run the step for real). A capture that fails is logged, `failed`
    says why, and every later call runs the step eagerly.
    """

    def __init__(self, step: Callable[[int], None], state: StepState, device: "torch.device",
                 timed: Callable[[Callable[[], Any]], Any] | None = None) -> None:
        """step: the eager step (`decode_step`); state: what it writes; device: a CUDA device; timed: runs a
        capture and returns its result, e.g. inside a device-time span (default: just runs it)."""
        import torch

        self.step, self.state, self.device = step, state, device
        self.timed = timed or (lambda fn: fn())
        self.graphs: dict[int, Any] = {}
        self.pool = torch.cuda.graph_pool_handle()
        self.failed: str | None = None

    def _capture(self, bucket: int) -> Any:
        import torch

        saved = [t.clone() for t in self.state.mutable()]
        side = torch.cuda.Stream(device=self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            for _ in range(2):
                self.step(bucket)  # warm-up (allocator, kernels) before capture
        torch.cuda.current_stream(self.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            self.step(bucket)
        for t, s in zip(self.state.mutable(), saved):
            t.copy_(s)
        return graph

    def __call__(self, bucket: int) -> None:
        if self.failed is not None:
            self.step(bucket)
            return
        if bucket not in self.graphs:
            try:
                self.graphs[bucket] = self.timed(lambda: self._capture(bucket))
            except Exception as e:  # noqa: BLE001 - a model whose kernels cannot be captured runs eagerly
                self.failed = f"{type(e).__name__}: {e}"[:500]
                log.warning("engine: CUDA graph capture failed (%s); decoding eagerly", self.failed)
                self.step(bucket)
                return
        self.graphs[bucket].replay()
