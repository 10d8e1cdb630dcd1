"""The engine's decode step for every slot, and its CUDA graphs.

`decode_step` builds the step as a function of the context bucket: one token per row through the layers
(decoder.py), the draw (sampling.py), the stop automaton's move (stops.py) and the row bookkeeping, all on
the device with fixed shapes and no host sync, masked for rows that are not live. `GraphedStep` captures
that function once per context bucket in CUDA graphs that share one memory pool, and replays them; a
capture that fails leaves the step eager (`failed` says why). `compact` moves the rows still held into the
first slots (the engine's tail, eager steps only); `EngineStats` counts a call. The engine (engine.py) owns
the state, the cache and the loop around them.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
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


@dataclass
class EngineStats:
    """Counters of the last generate call (for benchmarks and logs)."""

    slots: int = 0
    steps: int = 0
    prefills: int = 0
    tokens: int = 0
    seconds: float = 0.0
    graphs: bool = False
    compiled: bool = False
    sampler_compiled: bool = False  # the top-k/top-p draw ran compiled (sampling.Sampler)
    attention_kernel: bool = False  # decode attention ran the live-KV kernel (attention.py)
    prefill_ms: float = 0.0  # device-timeline spans (CUDA events) of the prefills and of the graph captures
    capture_ms: float = 0.0  # (warm-up steps and compilation included)
    captures: int = 0
    kept_step: bool = False  # the decode step (and its graphs) came from the previous call
    compactions: int = 0  # times the tail's rows moved into fewer slots (eager steps only: `compact`)
    slot_steps: int = 0  # slots decoded, summed over steps (fewer than slots x steps once the tail is compacted)
    row_steps: int = 0  # tokens the decode steps drew (a row's first token comes from its prefill)
    queued_steps: int = 0  # decode steps run while prompts waited for a slot
    queued_row_steps: int = 0  # tokens those steps drew
    oom_backoffs: list[int] = field(default_factory=list)

    @property
    def occupancy(self) -> float | None:
        """Of the slot-steps decoded, the share that drew a token: the rest were slots free, or holding a row
        that had ended and waited for the next harvest."""
        return round(self.row_steps / self.slot_steps, 4) if self.slot_steps else None

    @property
    def queued_occupancy(self) -> float | None:
        """`occupancy` over the steps while prompts waited for a slot (what refills and harvests cost; the
        tail, once the queue is empty, is left out)."""
        return round(self.queued_row_steps / (self.slots * self.queued_steps), 4) if self.queued_steps else None


def compact(st: StepState, cache: list[tuple["torch.Tensor", "torch.Tensor"]], held: list[int], context: int) -> None:
    """Move the rows of slots `held` (ascending) into slots 0..len(held)-1, in place: their state and their K/V
    up to `context` (no row's keys lie beyond it); the slots emptied are left not live, with nothing generated.
    Rows keep their seeds, positions and tokens, so their texts do not change (a row's draws depend on (seed,
    id, step) only). `cache` as its writes take it (an e4m3 cache as uint8: `Decoder._writable`)."""
    import torch

    width = len(held)
    src = torch.tensor(held, dtype=torch.long, device=st.tok.device)
    for t in (*st.mutable(), st.seed):
        t[:width] = t[src]
        t[width:] = 0
    for ck, cv in cache:
        for c in (ck, cv):
            c[:width, :, :context] = c[src, :, :context]


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
