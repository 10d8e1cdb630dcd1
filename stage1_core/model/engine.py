"""The Stage 1 generation engine: continuous batching over a static KV cache, stops found on the device.

`Engine(model, tokenizer, eos_ids, device)` wraps a loaded transformers decoder (Gemma 3, Llama,
Mistral, Qwen2/3: `supports(model)` says which) and completes token-id prompts:
- a fixed number of *slots* decode together; a slot whose row stopped is refilled with the next
  waiting prompt (prefill into that slot's rows of the cache), so a batch stays full until the queue
  is empty;
- the KV cache is static, `(slots, kv_heads, context, head_dim)` per layer; each slot has its own
  positions, so rows never wait for each other and never see padding (the layers: decoder.py, with
  q/k/v and gate/up fused into one GEMM each: fusion.py);
- stop sequences are found on the device: an Aho-Corasick automaton over the stop strings' characters
  is compiled into a `(states, vocab)` transition table, so one gather per step advances every row's
  match state (no decode, no host sync per step; stops.py);
- sampling randomness of a row comes from (run seed, item id, step) through a counter-based hash, so
  the same seed gives the same text at any batch size, in any batch company, after any OOM back-off
  (sampling.py); the draw reads the logits in the LM head's dtype, and its top-k/top-p part is compiled
  with the layers (`Sampler`);
- on CUDA the decode step is captured once per (slots, context, mode) in a CUDA graph and replayed;
  on the CPU it runs eagerly (step.py). Rows are harvested every `sync_every` steps (1 on the CPU);
- an eager step's tail is compacted: once no prompt waits and at most half the decoded slots hold a row,
  those rows (state and K/V) move into the first slots and the step decodes them alone
  (`Engine.compact_tail`; graph-replayed steps keep every slot);
- on CUDA the layers' stretches around attention and the top-k/top-p draw are compiled with
  `torch.compile` before the graph is captured (decoder.py, sampling.py; `STAGE1_ENGINE_COMPILE=0` or
  `Engine(compile=False)` turns both off);
- on CUDA decode attention is a Triton kernel that reads only each row's live KV, so one graph is
  captured per call, not one per 64-token context bucket (attention.py; `STAGE1_ENGINE_ATTENTION=0` or
  `Engine(attention=False)`: two batched matmuls over the bucket with a mask);
- opt-in, lossy: FP8 projections (`STAGE1_ENGINE_FP8=1`) and an e4m3 KV cache (`STAGE1_ENGINE_KV_FP8=1`,
  half the cache bytes per row; fp8.py, decoder.py);
- on CUDA the critic's prompts without a shared prefix are scored through the same compiled prefill
  (`Decoder.next_token_logprobs`, no KV cache; `STAGE1_ENGINE_SCORE=0` turns it off).
The engine reuses the model's own modules (projections, norms, MLP, rotary tables), so its numerics
follow transformers'; `HFBackend` keeps plain `model.generate` as the reference path
(`model.engine: reference`).

Run it: `PYTHONPATH=. python -m stage1_core.cli.engine [--prompt TEXT] [--max-new-tokens N]` completes a
prompt greedily with the embedded model through both paths and prints both.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any, Callable, Sequence

from stage1_core.infra.errors import DeviceOOM
from stage1_core.model.decoder import Decoder, attention_enabled, compile_enabled
from stage1_core.model.fusion import fusion_enabled
from stage1_core.model.rows import pad_right, slot_slice
from stage1_core.model.sampling import Sampler, Sampling, row_seed, sampling_mode
from stage1_core.model.sizing import AUTO_BATCH, cuda_free_bytes
from stage1_core.model.step import EngineStats, GraphedStep, StepState, compact, decode_step
from stage1_core.model.stops import cached_stop_tables, cached_token_strings, vocab_key

if TYPE_CHECKING:
    import torch

log = logging.getLogger("stage1.engine")

SUPPORTED_CLASSES = frozenset({"Gemma3ForCausalLM", "LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM",
                               "Qwen3ForCausalLM"})
"""Decoder classes whose layers the engine knows how to run (others use the reference path)."""


class EngineOOM(DeviceOOM):
    """The engine ran out of device memory with a single slot: nothing smaller can be tried."""


def supports(model: Any) -> str | None:
    """Why the engine cannot run `model`, or None when it can.

    Args:
        model: a transformers causal LM.
    Returns:
        None, or a short reason (unknown class, attention soft-capping, missing modules).
    """
    name = type(model).__name__
    if name not in SUPPORTED_CLASSES:
        return f"{name} is not one of {sorted(SUPPORTED_CLASSES)}"
    inner = getattr(model, "model", None)
    if inner is None or not hasattr(inner, "layers") or not hasattr(model, "lm_head"):
        return f"{name} lacks model.layers / lm_head"
    if getattr(model.config, "attn_logit_softcapping", None):
        return "attention logit soft-capping is not implemented in the engine"
    attn = inner.layers[0].self_attn
    if not all(hasattr(attn, k) for k in ("q_proj", "k_proj", "v_proj", "o_proj", "head_dim", "scaling")):
        return f"{type(attn).__name__} lacks q/k/v/o projections, head_dim or scaling"
    return None


# --------------------------------------------------------------------------- the engine

class Engine:
    """Continuous-batching generation over a static KV cache (see the module docstring)."""

    def __init__(self, model: Any, tokenizer: Any, eos_ids: Sequence[int], *, slots: int | None = None,
                 use_graphs: bool | None = None, sync_every: int | None = None,
                 prefill_tokens: int | None = None, fuse: bool | None = None,
                 compile: Any = None, attention: bool | None = None) -> None:
        """Prepare the engine for a loaded model (nothing is allocated until the first call).

        Args:
            model: a supported transformers causal LM (see `supports`), in eval mode on its device.
            tokenizer: its tokenizer (token texts feed the stop automaton).
            eos_ids: token ids that end a row.
            slots: rows decoded together; None = 16 on the CPU, from free memory on CUDA.
            use_graphs: capture the decode step in a CUDA graph (default: on CUDA).
            sync_every: decode steps between harvests (default 1 on the CPU, 8 on CUDA).
            prefill_tokens: padded prompt tokens per prefill forward (default 2048 CPU, 32768 CUDA).
            fuse: fuse q/k/v and gate/up into one GEMM each (default on; `STAGE1_ENGINE_FUSE=0` turns
                the default off). The model's modules keep working: their weights become views.
            compile: torch.compile the layers' stretches around attention and the top-k/top-p draw
                (default on CUDA; `STAGE1_ENGINE_COMPILE=0/1` sets the default; a backend name may be given).
            attention: decode attention by the live-KV Triton kernel (CUDA with triton only; default on there,
                `STAGE1_ENGINE_ATTENTION=0/1` sets the default; a failing kernel falls back to the matmuls).
        Raises:
            ValueError: the model is not supported (`supports` says why).
        """
        why = supports(model)
        if why:
            raise ValueError(f"the stage1 engine cannot run this model: {why}")
        import torch

        self.model, self.tokenizer = model, tokenizer
        device = next(model.parameters()).device
        comp = compile_enabled(device.type) if compile is None else compile
        att = attention_enabled(device.type) if attention is None else attention
        self.dec = Decoder(model, fuse=fusion_enabled() if fuse is None else fuse, compile=comp, attention=att)
        self.sampler = Sampler(compile=comp)
        """The token draw; its `use_compiled` may be switched per call (the benchmark does)."""
        self.device = self.dec.device
        self.cuda = self.device.type == "cuda"
        self.eos_ids = sorted({int(e) for e in eos_ids})
        self.slots_cfg = slots
        self.use_graphs = self.cuda if use_graphs is None else (use_graphs and self.cuda)
        self.sync_every = sync_every or (8 if self.cuda else 1)
        self.prefill_tokens = prefill_tokens or (32768 if self.cuda else 2048)
        self.vocab = int(model.lm_head.weight.shape[0]) if hasattr(model.lm_head, "weight") else len(tokenizer)
        self._pieces: list[str] | None = None
        self._stop_tables: dict[tuple[str, ...], tuple[torch.Tensor, torch.Tensor]] = {}
        self._eos_mask = torch.zeros(self.vocab, dtype=torch.bool, device=self.device)
        self._eos_mask[[e for e in self.eos_ids if e < self.vocab]] = True
        self._cache: list[tuple[torch.Tensor, torch.Tensor]] | None = None
        self._cache_shape: tuple[int, int] = (0, 0)
        self._cache_gen = 0  # counts allocations: a kept graph is valid only over the cache it captured
        self._kept: tuple[tuple[Any, ...], StepState, Sampling, Callable[[int], None]] | None = None
        """The last call's decode state, sampling tensors and step (graphs), with what they depend on."""
        self.keep_step = True
        """Keep the decode step and its graphs for the next call like this one (the benchmark switches it)."""
        self.compact_tail = True
        """Once no prompt waits, move the rows left into the first slots and decode those alone (eager steps
        only; `_compact`). Off: the tail decodes every slot, as a graph-replayed step does."""
        self.stats = EngineStats()
        self._spans: list[tuple[str, Any, Any]] = []
        self.on_alloc: Callable[[int, int], None] | None = None  # test hook: (slots, context) before allocation

    # -- sizing ---------------------------------------------------------------------------------
    def kv_bytes_per_token(self) -> int:
        """Bytes of K and V for one token of one row, all layers."""
        import torch

        return 2 * len(self.dec.layers) * self.dec.n_kv * self.dec.head_dim * torch.finfo(self.dec.cache_dtype).bits // 8

    def choose_slots(self, n_prompts: int, context: int) -> int:
        """Slots for a call: the configured number, else 16 on the CPU, else what free GPU memory holds
        (KV cache for `context` tokens per row + sampling workspace), at most 512 and n_prompts. Free counts
        the caching allocator's unused blocks and the engine's own cache (sizing.cuda_free_bytes)."""
        if self.slots_cfg:
            return max(1, min(self.slots_cfg, n_prompts))
        if not self.cuda:
            return max(1, min(AUTO_BATCH["cpu"], n_prompts))
        free = cuda_free_bytes(self.device)
        if self._cache is not None:
            free += sum(k.numel() * k.element_size() * 2 for k, _ in self._cache)
        per_row = self.kv_bytes_per_token() * context + self.vocab * 4 * 6  # KV + logits/softmax/cumsum
        fit = int(free * 0.7 // per_row)
        return max(1, min(512, n_prompts, fit))

    # -- stops ------------------------------------------------------------------------------------
    def _tables(self, stops: Sequence[str]) -> tuple["torch.Tensor", "torch.Tensor"]:
        import torch

        key = tuple(sorted({s for s in stops if s}))
        if key not in self._stop_tables:
            if self._pieces is None:
                self._vocab_key = vocab_key(self.tokenizer)
                self._pieces = cached_token_strings(self.tokenizer, self._vocab_key)[: self.vocab]
                self._pieces += [""] * (self.vocab - len(self._pieces))
            nxt, fires = cached_stop_tables(self._pieces, key, self._vocab_key)
            self._stop_tables[key] = (torch.from_numpy(nxt).long().to(self.device),
                                      torch.from_numpy(fires).to(self.device))
        return self._stop_tables[key]

    # -- cache --------------------------------------------------------------------------------
    def _ensure_cache(self, slots: int, context: int) -> None:
        import torch

        have_s, have_c = self._cache_shape
        dtype = self.dec.cache_dtype
        if self._cache is not None and have_s >= slots and have_c >= context and self._cache[0][0].dtype == dtype:
            return
        if self.on_alloc is not None:
            self.on_alloc(slots, context)
        self._cache = self._kept = None  # the kept step's graphs read the old cache: both go
        if self.cuda:
            torch.cuda.empty_cache()
        shape = (slots, self.dec.n_kv, context, self.dec.head_dim)
        def zeros() -> "torch.Tensor":  # e4m3 zeros as uint8 zeros (0x00 is +0.0): fill kernels need no e4m3
            if dtype == torch.float8_e4m3fn:
                return torch.zeros(shape, dtype=torch.uint8, device=self.device).view(dtype)
            return torch.zeros(shape, dtype=dtype, device=self.device)
        self._cache = [(zeros(), zeros()) for _ in self.dec.layers]
        self._cache_shape = (slots, context)
        self._cache_gen += 1

    def release(self) -> None:
        """Free the KV cache and the kept decode step with its captured graphs."""
        self._cache = None
        self._cache_shape = (0, 0)
        self._kept = None

    # -- public ---------------------------------------------------------------------------------
    def generate(self, prompts: Sequence[Sequence[int]], ids: Sequence[str], max_new_tokens: int,
                 temperature: float, top_p: float, top_k: int, stop_sequences: Sequence[str], seed: int,
                 progress: Callable[[int], None] | None = None,
                 tokens_progress: Callable[[int], None] | None = None) -> list[list[int]]:
        """Complete token-id prompts; each row stops at EOS, a stop sequence or max_new_tokens.

        Args:
            prompts: encoded prompts (BOS already added by the caller's policy).
            ids: one stable id per prompt; its randomness is derived from (seed, id).
            max_new_tokens, temperature, top_p, top_k: sampling settings (temperature 0 = greedy).
            stop_sequences: strings that end a row once its generated text contains one.
            seed: the call's seed.
            progress: called with the number of prompts finished, as they finish.
            tokens_progress: called with the number of tokens generated since the last call.
        Returns:
            Per prompt, in input order, the generated token ids (an ending EOS included; the caller
            cuts at the stop sequence).
        Raises:
            EngineOOM: out of device memory even with one slot.
            ValueError: ids and prompts differ in length, or ids repeat.
        """
        import torch

        from stage1_core.model.backend import item_ids

        ids = item_ids(prompts, ids)
        if not prompts:
            return []
        t0 = time.perf_counter()
        self.stats = EngineStats()
        longest = max(len(p) for p in prompts)
        context = -(-(longest + max_new_tokens + 1) // 64) * 64
        results: dict[int, list[int]] = {}
        slots = self.choose_slots(len(prompts), context)
        if self._kept is not None and self._kept[0][0] != slots and self.cuda:
            self._kept = None  # its graphs' memory may be what made fewer slots fit: free it, size again
            torch.cuda.empty_cache()
            slots = self.choose_slots(len(prompts), context)
        while True:
            try:
                with torch.inference_mode():
                    self._run(prompts, ids, results, slots, context, max_new_tokens, temperature, top_p, top_k,
                              stop_sequences, seed, progress, tokens_progress)
                break
            except torch.OutOfMemoryError as e:  # back off: every finished row is kept, the rest rerun
                self.release()
                if self.cuda:
                    torch.cuda.empty_cache()
                if slots == 1:
                    raise EngineOOM(f"out of device memory with a single slot (context {context} tokens): "
                                    f"{e}. Use a smaller model, model.quantize: 4bit, or shorter prompts / "
                                    "max_new_tokens") from None
                slots = max(1, slots // 2)
                self.stats.oom_backoffs.append(slots)
                log.warning("engine: out of memory; retrying the %d unfinished prompts with %d slots",
                            len(prompts) - len(results), slots)
        self.stats.seconds = time.perf_counter() - t0
        self.stats.compiled = self.dec.use_compiled  # off when compilation failed during the call
        nucleus = sampling_mode(temperature, top_p, top_k) == "nucleus"
        self.stats.sampler_compiled = self.sampler.use_compiled and nucleus  # the draw the decode steps ran
        self.stats.attention_kernel = self.dec.use_attention_kernel  # off when the kernel failed during the call
        self._collect_spans()
        return [results[i] for i in range(len(prompts))]

    # -- device-time spans (for the stats; CUDA only, no host sync until the call's end) ------------
    def _span_start(self) -> Any:
        import torch

        if not self.cuda:
            return None
        ev = torch.cuda.Event(enable_timing=True)
        ev.record()
        return ev

    def _span_end(self, kind: str, start: Any) -> None:
        import torch

        if start is not None:
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            self._spans.append((kind, start, ev))

    def _collect_spans(self) -> None:
        if self._spans:
            self._spans[-1][2].synchronize()
        for kind, a, b in self._spans:
            ms = a.elapsed_time(b)
            if kind == "prefill":
                self.stats.prefill_ms += ms
            else:
                self.stats.capture_ms += ms
        self.stats.prefill_ms = round(self.stats.prefill_ms, 1)
        self.stats.capture_ms = round(self.stats.capture_ms, 1)
        self._spans = []

    # -- the loop -------------------------------------------------------------------------------
    def _run(self, prompts: Sequence[Sequence[int]], ids: Sequence[str], results: dict[int, list[int]], slots: int,
             context: int, max_new: int, temperature: float, top_p: float, top_k: int, stops: Sequence[str],
             seed: int, progress: Callable[[int], None] | None, tokens_progress: Callable[[int], None] | None) -> None:
        import torch

        todo = [i for i in range(len(prompts)) if i not in results]
        # longest first: big prefills early, short stragglers fill the tail
        queue = sorted(todo, key=lambda i: (-len(prompts[i]), i))
        slots = max(1, min(slots, len(queue)))
        self._ensure_cache(slots, context)
        assert self._cache is not None
        self.dec.rope_tables(context)
        nxt_tab, fire_tab = self._tables(stops)
        st, smp, step = self._step_for(slots, context, max_new, sampling_mode(temperature, top_p, top_k),
                                       (max(temperature, 1e-6), top_p, top_k), nxt_tab, fire_tab)
        owner: list[int | None] = [None] * slots
        reach = [0] * slots  # per occupied slot: an upper bound of the position it decodes next
        self.stats.slots = slots
        self.stats.graphs = self.use_graphs
        self.stats.compiled = self.dec.use_compiled
        harvested = reported = 0
        width = slots  # the slots the step decodes: all of them, until the tail is compacted
        firsts = drawn = 0  # rows admitted (each drew its first token in its prefill); tokens decode steps drew
        while queue or any(o is not None for o in owner):
            free = [s for s in range(slots) if owner[s] is None]
            if free and queue and (len(free) * 8 >= slots or len(free) == slots or len(queue) <= len(free)):
                take = [queue.pop(0) for _ in range(min(len(free), len(queue)))]
                span = self._span_start()
                self._admit(take, free[: len(take)], prompts, ids, seed, st, smp, nxt_tab, fire_tab, owner)
                self._span_end("prefill", span)
                for s, i in zip(free, take):
                    reach[s] = len(prompts[i])
                firsts += len(take)
            queued = bool(queue)
            # attend only as far as any occupied row can reach before the next harvest (64-token buckets);
            # the live-KV kernel reads each row's own range whatever the bucket: one bucket, one graph
            need = max(reach[s] for s in range(slots) if owner[s] is not None) + self.sync_every
            bucket = context if self.dec.use_attention_kernel else min(context, -(-need // 64) * 64)
            for _ in range(self.sync_every):
                step(bucket)
            for s in range(slots):
                reach[s] += self.sync_every
            self.stats.steps += self.sync_every
            self.stats.slot_steps += width * self.sync_every
            live, ngen = torch.stack((st.live.long(), st.ngen)).tolist()  # the one host sync per sync_every steps
            done = [s for s in range(slots) if owner[s] is not None and not live[s]]
            made = harvested + sum(ngen)  # tokens generated so far, first tokens included
            new = made - firsts - drawn  # what these decode steps drew
            self.stats.row_steps += new
            if queued:
                self.stats.queued_steps += self.sync_every
                self.stats.queued_row_steps += new
            drawn += new
            if tokens_progress is not None and made > reported:
                tokens_progress(made - reported)
                reported = made
            if done:
                outs = st.out[done].tolist()
                for r, s in enumerate(done):
                    i = owner[s]
                    assert i is not None
                    results[i] = outs[r][: ngen[s]]
                    owner[s] = None
                harvested += sum(ngen[s] for s in done)
                self.stats.tokens += sum(ngen[s] for s in done)
                if progress is not None:
                    progress(len(done))
                st.ngen[done] = 0  # freed slots count nothing towards the tokens bar
                held = [s for s in range(slots) if owner[s] is not None]
                if self.compact_tail and not queue and not self.use_graphs and 0 < len(held) <= width // 2:
                    width = len(held)
                    step = self._compact(st, smp, nxt_tab, fire_tab, owner, reach, held, context)

    def _compact(self, st: StepState, smp: Sampling, nxt_tab: "torch.Tensor", fire_tab: "torch.Tensor",
                 owner: list[int | None], reach: list[int], held: list[int], context: int) -> Callable[[int], None]:
        """Move the rows of slots `held` (no prompt waits) into the first slots (step.compact) and return an
        eager step over those slots alone: the tail of a call then decodes `len(held)` rows a step, not every
        slot. `owner` and `reach` are reordered in place."""
        assert self._cache is not None
        width = len(held)
        compact(st, [(Decoder._writable(k), Decoder._writable(v)) for k, v in self._cache], held, context)
        owner[:] = [owner[s] for s in held] + [None] * (len(owner) - width)
        reach[:] = [reach[s] for s in held] + [0] * (len(reach) - width)
        self.stats.compactions += 1
        return decode_step(self.dec, self.sampler, self._eos_mask, st.head(width), smp, nxt_tab, fire_tab,
                           [(k[:width], v[:width]) for k, v in self._cache])

    def _admit(self, take: list[int], slots: list[int], prompts: Sequence[Sequence[int]], ids: Sequence[str],
               seed: int, st: StepState, smp: Sampling, nxt_tab: "torch.Tensor", fire_tab: "torch.Tensor",
               owner: list[int | None]) -> None:
        """Prefill prompts `take` into `slots` (chunked by padded tokens) and draw their first tokens."""
        import torch

        dev = self.device
        assert self._cache is not None
        k = 0
        while k < len(take):
            width = len(prompts[take[k]])  # longest first: the chunk's first prompt is its widest
            n = max(1, min(len(take) - k, self.prefill_tokens // max(width, 1)))
            chunk, cslots = take[k:k + n], slots[k:k + n]
            k += n
            toks, lengths = pad_right(prompts, chunk, dev)
            sl = torch.tensor(cslots, dtype=torch.long, device=dev)
            h = self.dec.prefill(toks, lengths, slot_slice(cslots) or sl, self._cache)
            seeds = torch.tensor([row_seed(seed, ids[i]) for i in chunk], dtype=torch.long, device=dev)
            zero = torch.zeros(n, dtype=torch.long, device=dev)
            first = self.sampler(self.dec.logits(h, float32=False), smp, seeds, zero, compiled=False)
            stop_state = nxt_tab[zero, first]
            ended = fire_tab[zero, first] | self._eos_mask[first] | (st.max_new <= 1)
            st.tok[sl] = first
            st.pos[sl] = lengths
            st.ngen[sl] = 1
            st.seed[sl] = seeds
            st.stop[sl] = stop_state
            st.out[sl, 0] = first
            st.live[sl] = ~ended
            self.stats.prefills += 1
            for s, i in zip(cslots, chunk):
                owner[s] = i

    def _step_for(self, slots: int, context: int, max_new: int, mode: str, values: tuple[float, float, int],
                  nxt_tab: "torch.Tensor", fire_tab: "torch.Tensor") -> tuple[StepState, Sampling, Callable[[int], None]]:
        """The call's decode state, sampling tensors and step: the last call's, cleared and refilled in
        place, when everything its graphs read is the same (the same cache, stop tables (cached per stop set)
        and paths; `kept_step` in the stats), else new ones (and the old graphs freed)."""
        import torch

        key = (slots, context, max_new, mode, id(nxt_tab), self._cache_gen, self.dec.paths(),
               id(self.sampler), self.sampler.use_compiled, self.use_graphs)
        if self.keep_step and self._kept is not None and self._kept[0] == key:
            _, st, smp, step = self._kept
            st.clear()
            for t, v in zip((smp.temperature, smp.top_p, smp.top_k), values):
                t.fill_(v)
            self.stats.kept_step = True
            return st, smp, step
        self._kept = None  # its graphs' memory pool goes before new graphs take one
        dev = self.device
        smp = Sampling(mode, torch.tensor(values[0], dtype=torch.float32, device=dev),
                       torch.tensor(values[1], dtype=torch.float32, device=dev),
                       torch.tensor(values[2], dtype=torch.long, device=dev))
        st = StepState.zeros(slots, max_new, dev)
        step = self._step_fn(st, smp, nxt_tab, fire_tab, context, slots)
        self._kept = (key, st, smp, step) if self.keep_step else None
        return st, smp, step

    def _step_fn(self, st: StepState, smp: Sampling, nxt_tab: "torch.Tensor", fire_tab: "torch.Tensor", context: int,
                 slots: int) -> Callable[[int], None]:
        """One decode step for every slot (masked for rows that are not live), eager or graph-replayed (step.py)."""
        assert self._cache is not None
        cache = self._cache if self._cache_shape[0] == slots else [(k[:slots], v[:slots]) for k, v in self._cache]
        eager = decode_step(self.dec, self.sampler, self._eos_mask, st, smp, nxt_tab, fire_tab, cache)
        if not self.use_graphs:
            return eager
        graphed = GraphedStep(eager, st, self.device, timed=self._timed_capture)

        def replay(bucket: int) -> None:
            graphed(bucket)
            if graphed.failed is not None:
                self.use_graphs = False  # this engine decodes eagerly from now on
        return replay

    def _timed_capture(self, capture: Callable[[], Any]) -> Any:
        """Run a graph capture inside a device-time span (EngineStats.capture_ms), counted."""
        self.stats.captures += 1
        span = self._span_start()
        try:
            return capture()
        finally:
            self._span_end("capture", span)
