"""The Hugging Face backend: a transformers causal LM in completion mode (implements `Backend`).

`HFBackend(cfg)` loads the model through `stage1_core.loader` and runs the contamination guards of
`stage1_core.guards` (chat template disabled, BOS by family policy, no chat-control ids, sentinels).
It encodes, generates (the reference path: transformers `generate` with `_NucleusTopP` and
`_StopOnSequences`), and scores next-token / continuation log-probabilities for the critic
(prefix-cached). Use `stage1_core.model.load_backend` for the per-process cache.

Run it: `PYTHONPATH=. python -m stage1_core.model [--id MODEL] [--prompt TEXT]`; tests:
`python -m pytest -q tests/core/test_model.py`.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import TYPE_CHECKING, Any, Callable, Sequence

from stage1_core import faults, guards
from stage1_core.backend import ProgressFn, item_ids
from stage1_core.config import ModelConfig
from stage1_core.errors import InputError
from stage1_core.generation import classify_stop, find_stop
from stage1_core.guards import Sentinel, check_control_tokens, find_control_token_ids, run_sentinels
from stage1_core.loader import (RANDOM_SENTINELS_NOTE, ResolvedModel, _fingerprint_of, load_hf_model, resolve_batch_size,
                                resolve_device, resolve_model)
from stage1_core.schemas import Completion, GenerationParams

log = logging.getLogger("stage1.model")

if TYPE_CHECKING:
    import torch


class _NucleusTopP:
    """Exact top-p (nucleus) filtering that sorts only the top candidates.

    transformers' TopPLogitsWarper sorts the whole vocabulary every step: with Gemma's 262k tokens
    that costs ~0.5 s per step at batch 32 on 2 CPU cores, more than the forward pass. The nucleus
    almost always lies in the top 1024 tokens, and then the kept set is identical to a full-vocabulary
    top-p; rows where it does not fall back to a full sort (which can differ from transformers' by a
    boundary token, from float summation order).
    """

    def __init__(self, top_p: float, k: int = 1024) -> None:
        self.top_p, self.k = top_p, k

    def __call__(self, input_ids: "torch.Tensor", scores: "torch.Tensor") -> "torch.Tensor":
        import torch

        k = min(self.k, scores.shape[-1])
        probs = torch.softmax(scores.float(), dim=-1)
        top_p, top_i = probs.topk(k, dim=-1)
        cum = top_p.cumsum(-1)
        # keep a token if the mass strictly before it is < top_p (always keeps the first)
        keep_sorted = (cum - top_p) < self.top_p
        covered = cum[:, -1] >= self.top_p
        out = torch.full_like(scores, float("-inf"))
        rows = covered.nonzero().flatten()
        if len(rows):
            kept_scores = torch.where(keep_sorted[rows], scores[rows].gather(-1, top_i[rows]),
                                      torch.tensor(float("-inf"), dtype=scores.dtype))
            out[rows] = out[rows].scatter(-1, top_i[rows], kept_scores)
        for r in (~covered).nonzero().flatten().tolist():  # nucleus wider than k: exact full sort
            p_sorted, i_sorted = probs[r].sort(descending=True)
            keep = (p_sorted.cumsum(-1) - p_sorted) < self.top_p
            out[r, i_sorted[keep]] = scores[r, i_sorted[keep]]
        return out


class _StopOnSequences:
    """Generation stopping criterion: per row, stop once the tail of the continuation holds a stop sequence."""

    def __init__(self, tokenizer: Any, prompt_len: int, stops: list[str], batch: int) -> None:
        self.tokenizer, self.prompt_len, self.stops = tokenizer, prompt_len, [s for s in stops if s]
        self.window = 2 * max((len(s) for s in self.stops), default=0) + 8
        self.done_at: list[int | None] = [None] * batch

    def __call__(self, input_ids: "torch.Tensor", scores: Any, **kwargs: Any) -> "torch.Tensor":
        import torch

        n_new = input_ids.shape[1] - self.prompt_len
        if self.stops:
            for r, d in enumerate(self.done_at):
                if d is None:
                    tail = input_ids[r, max(self.prompt_len, input_ids.shape[1] - self.window):].tolist()
                    if find_stop(self.tokenizer.decode(tail, skip_special_tokens=False), self.stops):
                        self.done_at[r] = n_new
        return torch.tensor([d is not None for d in self.done_at], dtype=torch.bool, device=input_ids.device)


class HFBackend:
    """A transformers causal LM in completion mode with the contamination guards (implements Backend).

    Attributes:
        fingerprint: model_fingerprint(cfg) plus device, dtype, load_seconds, transformers/torch
            versions, chat_template_disabled, had_chat_template, bos_token, control_token_ids, sentinels.
        resolved: the ResolvedModel.
        tokenizer, model: the loaded transformers objects (chat template removed).
    """

    def __init__(self, cfg: ModelConfig, resolved: ResolvedModel | None = None,
                 sentinels: Sequence[Sentinel] | None = None) -> None:
        """Load the model (uncached; use load_backend for the per-process cache) and run the guards.

        Args:
            cfg: the model config (not fake:).
            resolved: resolve_model(cfg), if already computed.
            sentinels: sentinels to run; default: stage1_core.guards.SENTINELS, read at call time.
        Raises:
            InputError: bad config (as resolve_model), or BOS policy "always" on a tokenizer without BOS.
            ModelGuardError: a sentinel failed.

        Random-weight models (`random:<name>`, benchmarks only) skip the sentinels; nothing else does.
        """
        import torch
        import transformers

        t0 = time.monotonic()
        self.cfg = cfg
        self.resolved = r = resolved or resolve_model(cfg)
        if r.kind == "fake":
            raise ValueError("HFBackend cannot load a fake: model; use load_backend")
        self._lock = threading.RLock()
        self.device = resolve_device(cfg.device)
        self.batch_size: int = resolve_batch_size(cfg.batch_size, self.device)
        model, tok = load_hf_model(r, cfg, self.device)
        self.model = model
        had_template = bool(getattr(tok, "chat_template", None))
        tok.chat_template = None
        self.tokenizer = tok
        self.bos_id: int | None = tok.bos_token_id if r.bos_policy == "always" else None
        if r.bos_policy == "always" and tok.bos_token_id is None:
            raise InputError(f"bos_policy is 'always' but the {r.family} tokenizer has no BOS token", field="model.bos_policy",
                             expected="never", fix="pass --bos-policy never")
        self.control_ids = find_control_token_ids(tok)
        gen_eos = model.generation_config.eos_token_id if model.generation_config is not None else None
        eos = set(gen_eos if isinstance(gen_eos, list) else [gen_eos]) | {tok.eos_token_id}
        self.eos_ids = sorted(int(e) for e in eos if e is not None)
        pad = tok.pad_token_id if tok.pad_token_id is not None else (self.eos_ids[0] if self.eos_ids else 0)
        self.pad_id = int(pad)
        # a neutral generation config: no sampling defaults inherited from the checkpoint
        self.model.generation_config = transformers.GenerationConfig(
            bos_token_id=tok.bos_token_id, eos_token_id=self.eos_ids, pad_token_id=self.pad_id)
        sentinel_results: list[dict[str, Any]] | str = RANDOM_SENTINELS_NOTE if r.kind == "random" else \
            self._run_sentinels(list(guards.SENTINELS if sentinels is None else sentinels))
        self.fingerprint: dict[str, Any] = {
            **_fingerprint_of(r, cfg), "device": self.device, "load_seconds": round(time.monotonic() - t0, 2),
            "transformers": transformers.__version__, "torch": torch.__version__, "chat_template_disabled": True,
            "had_chat_template": had_template, "bos_token": tok.bos_token if self.bos_id is not None else None,
            "control_token_ids": {str(k): v for k, v in sorted(self.control_ids.items())}, "sentinels": sentinel_results,
        }

    # -- encoding ---------------------------------------------------------------------------

    def _raw_encode(self, texts: list[str]) -> list[list[int]]:
        if not texts:
            return []
        return [list(x) for x in self.tokenizer(texts, add_special_tokens=False, split_special_tokens=True)["input_ids"]]

    def encode(self, prompts: list[str], what: str = "prompt") -> list[list[int]]:
        """Encode prompts in completion mode: no special tokens added, literal control text split, BOS by policy.

        Args:
            prompts: plain-text prompts (without BOS).
            what: label for error messages.
        Returns:
            One id list per prompt.
        Raises:
            ModelGuardError: an encoded prompt holds a chat-control token id.
            ValueError: a prompt encodes to no tokens at all.
        """
        ids = self._raw_encode(prompts)
        if self.bos_id is not None:
            ids = [[self.bos_id] + x for x in ids]
        check_control_tokens(ids, self.control_ids, what)
        for i, x in enumerate(ids):
            if not x:
                raise ValueError(f"{what} {i} is empty")
        return ids

    def count_tokens(self, text: str) -> int:
        """Number of tokens `text` encodes to (no special tokens added, no BOS).

        Args:
            text: any text.
        Returns:
            The token count.
        """
        return len(self._raw_encode([text])[0])

    def _batches(self, encoded: list[list[int]]) -> list[list[int]]:
        order = sorted(range(len(encoded)), key=lambda i: (len(encoded[i]), i))
        bs = self.batch_size
        return [order[k:k + bs] for k in range(0, len(order), bs)]

    def _pad_left(self, seqs: list[list[int]]) -> tuple["torch.Tensor", "torch.Tensor"]:
        import torch

        width = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(seqs), width), dtype=torch.long)
        for r, s in enumerate(seqs):
            ids[r, width - len(s):] = torch.tensor(s, dtype=torch.long)
            mask[r, width - len(s):] = 1
        return ids.to(self.device), mask.to(self.device)

    # -- sentinels --------------------------------------------------------------------------

    def _run_sentinels(self, sentinels: list[Sentinel]) -> list[dict[str, Any]]:
        return run_sentinels(self.model, self.tokenizer, self.bos_id, self.control_ids, sentinels, self._lock,
                             device=self.device, model_id=self.resolved.id, bos_policy=self.resolved.bos_policy)

    # -- Backend protocol -------------------------------------------------------------------

    def generate(self, prompts: list[str], params: GenerationParams, seed: int,
                 progress: ProgressFn | None = None, ids: Sequence[str] | None = None) -> list[Completion]:
        """Complete each prompt (completion mode; see Backend.generate).

        `model.engine: stage1` (default) runs the continuous-batching engine (stage1_core.engine):
        each prompt's randomness comes from (seed, its id), so texts do not depend on the batch.
        `model.engine: reference`, and models the engine does not support, run plain
        `model.generate` in length-sorted batches (batch b under torch seed `seed + b`).

        Args:
            prompts: plain-text prompts without BOS.
            params: sampling settings (temperature 0 = greedy; top_k 0 = no top-k).
            seed: the call's seed.
            progress: called with the number of prompts finished, as they finish.
            ids: stable item ids (default: the prompt indices).
        Returns:
            One Completion per prompt, in input order.
        Raises:
            ModelGuardError: a prompt encodes to a chat-control token.
            ValueError: an empty prompt, or bad ids.
            EngineOOM: out of device memory even at one row.
        """
        item = item_ids(prompts, ids)
        encoded = self.encode(prompts)
        engine = self.engine()
        if engine is None:
            return self._generate_reference(encoded, params, seed, progress)

        def finished(n: int) -> None:
            if progress is not None:
                progress(n)
            faults.maybe_fault("generate")

        with self._lock:
            tokens = engine.generate(encoded, item, params.max_new_tokens, params.temperature, params.top_p,
                                     params.top_k, params.stop_sequences, seed, progress=finished,
                                     tokens_progress=self.tokens_progress)
        return [self._completion(t, params.stop_sequences) for t in tokens]

    tokens_progress: Callable[[int], None] | None = None
    """Optional callback with the number of tokens generated since its last call (progress bars)."""

    def engine(self) -> Any:
        """The stage1 engine for this model (built once), or None for the reference path."""
        if "_engine" not in self.__dict__:
            from stage1_core.engine import Engine, supports

            self._engine = None
            if self.cfg.engine == "stage1":
                why = supports(self.model)
                if why is None:
                    self._engine = Engine(self.model, self.tokenizer, self.eos_ids,
                                          slots=self.cfg.batch_size if isinstance(self.cfg.batch_size, int) else None)
                else:
                    log.warning("stage1 engine unavailable for %s (%s); using transformers generate", self.resolved.id, why)
        return self._engine

    def _generate_reference(self, encoded: list[list[int]], params: GenerationParams, seed: int,
                            progress: ProgressFn | None) -> list[Completion]:
        """Plain transformers `generate`, batched by length (the reference path)."""
        import torch
        from transformers import LogitsProcessorList, StoppingCriteriaList

        out: list[Completion | None] = [None] * len(encoded)
        for b, idx in enumerate(self._batches(encoded)):
            input_ids, mask = self._pad_left([encoded[i] for i in idx])
            crit = _StopOnSequences(self.tokenizer, input_ids.shape[1], params.stop_sequences, len(idx))
            kw: dict[str, Any] = {"max_new_tokens": params.max_new_tokens, "pad_token_id": self.pad_id,
                                  "eos_token_id": self.eos_ids, "stopping_criteria": StoppingCriteriaList([crit])}
            if params.temperature == 0:
                kw["do_sample"] = False
            else:
                # top_p runs in _NucleusTopP (after temperature and top_k, as transformers orders them)
                kw.update(do_sample=True, temperature=params.temperature, top_p=1.0, top_k=params.top_k)
                if params.top_p < 1.0:
                    kw["logits_processor"] = LogitsProcessorList([_NucleusTopP(params.top_p)])
            with self._lock, torch.inference_mode():
                torch.manual_seed(seed + b)
                seqs = self.model.generate(input_ids=input_ids, attention_mask=mask, **kw)
            new = seqs[:, input_ids.shape[1]:].tolist()
            for r, i in enumerate(idx):
                out[i] = self._completion(new[r][: crit.done_at[r] or len(new[r])], params.stop_sequences)
            if progress is not None:
                progress(len(idx))
            faults.maybe_fault("generate")
        return [c for c in out if c is not None]

    def _completion(self, ids: list[int], stops: list[str]) -> Completion:
        eos = set(self.eos_ids)
        n = next((j + 1 for j, t in enumerate(ids) if t in eos), len(ids))
        ids, hit_eos = ids[:n], bool(ids[:n]) and ids[n - 1] in eos
        body = ids[:-1] if hit_eos else ids
        decode = lambda x: self.tokenizer.decode(x, skip_special_tokens=False)  # noqa: E731
        text = decode(body)
        if stops and find_stop(text, stops):  # shortest prefix whose text holds a stop (binary search)
            lo, hi = 1, len(body)
            while lo < hi:
                mid = (lo + hi) // 2
                if find_stop(decode(body[:mid]), stops):
                    hi = mid
                else:
                    lo = mid + 1
            body, n, hit_eos = body[:lo], lo, False
            text = decode(body)
        return Completion(text=text, stop_reason=classify_stop(text, stops, hit_eos), n_tokens=n)

    def next_token_logprobs(self, prompts: list[str], candidates: list[str]) -> list[dict[str, float]]:
        """Log-probability of each single-token candidate as the next token (no sampling, no generation).

        Prompts that share a long token prefix (critic prompts of one rubric and swap order) are scored
        from that prefix's KV cache: the prefixes run once (and are memoized across calls while the
        weights are unchanged), then only the suffixes run, batched (`_prefix_groups`,
        `_score_with_prefixes`); on CPU this roughly halves the critic's time.
        Results match the plain full-prompt forward (`_next_token_logprobs_plain`) up to float rounding
        (~1e-5 in float32). Prompts without a worthwhile shared prefix, and models whose cache is not a
        plain DynamicCache, take the plain path (one left-padded forward per batch).

        Args:
            prompts: plain-text prompts without BOS.
            candidates: strings that each encode to exactly one token (e.g. "A", " A").
        Returns:
            One dict candidate -> natural-log probability (full float32 softmax) per prompt, input order.
        Raises:
            ValueError: a candidate does not encode to exactly one token, or a prompt is empty.
            ModelGuardError: a prompt encodes to a chat-control token.
        """
        cand_ids = self._candidate_ids(candidates)
        encoded = self.encode(prompts, "critic prompt")
        out: list[dict[str, float]] = [{} for _ in prompts]
        groups, rest = self._prefix_groups(encoded) if self._prefix_cache_kwarg() else ([], list(range(len(encoded))))
        if groups:
            rest.extend(self._score_with_prefixes(encoded, groups, cand_ids, out))
        self._score_plain(encoded, sorted(rest), cand_ids, out)
        return out

    def continuation_logprobs(self, prompts: list[str], continuations: list[str]) -> list[tuple[float, int]]:
        """Sum of log p(continuation tokens | prompt) per (prompt, continuation) pair (teacher forcing).

        The prompt is encoded as in next_token_logprobs (BOS by policy) and the continuation on its own
        (no BOS); the ids are concatenated, so the same continuation has the same tokens after any prompt
        (what a PMI difference needs). Batched by total length, left padded; only the continuation
        positions go through the LM head.

        Args:
            prompts: plain-text prompts without BOS (non-empty).
            continuations: one text per prompt; it must encode to at least one token.
        Returns:
            One (sum of natural-log probabilities, number of continuation tokens) per pair, input order.
        Raises:
            ValueError: lengths differ, or a prompt or continuation encodes to no tokens.
            ModelGuardError: a prompt or continuation encodes to a chat-control token.
        """
        import torch

        if len(prompts) != len(continuations):
            raise ValueError(f"continuation_logprobs: {len(prompts)} prompts but {len(continuations)} continuations")
        if not prompts:
            return []
        heads = self.encode(prompts, "scoring prompt")
        tails = self._raw_encode(list(continuations))
        check_control_tokens(tails, self.control_ids, "scored continuation")
        for i, t in enumerate(tails):
            if not t:
                raise ValueError(f"continuation {i} encodes to no tokens")
        full = [h + t for h, t in zip(heads, tails)]
        out: list[tuple[float, int]] = [(0.0, 0)] * len(full)
        for idx in self._batches(full):
            ids, mask = self._pad_left([full[i] for i in idx])
            keep = max(len(tails[i]) for i in idx) + 1
            pos = (mask.cumsum(-1) - 1).clamp(min=0)
            with self._lock, torch.inference_mode():
                logits = self.model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=False,
                                    logits_to_keep=keep).logits  # (b, keep, vocab): predictions of the last keep-1 tokens
                for r, i in enumerate(idx):
                    n = len(tails[i])
                    rows = torch.log_softmax(logits[r, keep - 1 - n:keep - 1, :].float(), dim=-1)
                    target = torch.tensor(tails[i], dtype=torch.long, device=rows.device)
                    out[i] = (float(rows.gather(-1, target[:, None]).sum()), n)
            faults.maybe_fault("critic")
        return out

    def _next_token_logprobs_plain(self, prompts: list[str], candidates: list[str]) -> list[dict[str, float]]:
        """next_token_logprobs without prefix caching: one left-padded full-prompt forward per batch."""
        cand_ids = self._candidate_ids(candidates)
        encoded = self.encode(prompts, "critic prompt")
        out: list[dict[str, float]] = [{} for _ in prompts]
        self._score_plain(encoded, list(range(len(encoded))), cand_ids, out)
        return out

    def _candidate_ids(self, candidates: list[str]) -> dict[str, int]:
        cand_ids: dict[str, int] = {}
        for c, ids in zip(candidates, self._raw_encode(list(candidates))):
            if len(ids) != 1:
                raise ValueError(f"critic candidate {c!r} encodes to {len(ids)} tokens {ids}; it must be exactly one")
            cand_ids[c] = ids[0]
        return cand_ids

    def _store_logprobs(self, logits: "torch.Tensor", rows: list[int], cand_ids: dict[str, int],
                        out: list[dict[str, float]]) -> None:
        import torch

        lp = torch.log_softmax(logits.float(), dim=-1)[:, list(cand_ids.values())].cpu().tolist()
        for r, i in enumerate(rows):
            out[i] = {c: float(v) for c, v in zip(cand_ids, lp[r])}

    def _score_plain(self, encoded: list[list[int]], subset: list[int], cand_ids: dict[str, int],
                     out: list[dict[str, float]]) -> None:
        """Score encoded[i] for i in subset: whole prompts, left padded, batched by length."""
        import torch

        for sub in self._batches([encoded[i] for i in subset]):
            idx = [subset[k] for k in sub]
            input_ids, mask = self._pad_left([encoded[i] for i in idx])
            pos = (mask.cumsum(-1) - 1).clamp(min=0)
            with self._lock, torch.inference_mode():
                logits = self.model(input_ids=input_ids, attention_mask=mask, position_ids=pos,
                                    use_cache=False, logits_to_keep=1).logits[:, -1, :]
                self._store_logprobs(logits, idx, cand_ids, out)
            faults.maybe_fault("critic")

    _PREFIX_MIN_TOKENS = 16
    """A shared prefix shorter than this is not cached (the saving would not pay for the extra pass)."""
    _PREFIX_PASS_COST = 8
    """Fixed cost of one prefix pass, in prompt tokens, when choosing prefix groups."""

    def _prefix_cache_kwarg(self) -> str | None:
        """The forward() keyword that takes a KV cache ("cache" in transformers >= 5.2x, else
        "past_key_values"), or None when prefix caching is off for this model."""
        if getattr(self, "_prefix_kwarg_checked", False):
            return self._prefix_kwarg
        import inspect

        kw = None
        config = getattr(self.model, "config", None)
        if config is not None and not getattr(config, "is_encoder_decoder", False):
            try:
                params = inspect.signature(self.model.forward).parameters
            except (TypeError, ValueError):
                params = {}
            kw = next((k for k in ("cache", "past_key_values") if k in params), None)
        self._prefix_kwarg, self._prefix_kwarg_checked = kw, True
        return kw

    def _prefix_groups(self, encoded: list[list[int]]) -> tuple[list[tuple[int, list[int]]], list[int]]:
        """Partition prompts into shared-prefix groups worth caching, and the rest.

        Prompts are sorted by token ids, so any group's longest common prefix is the minimum LCP of
        its sorted neighbours; a dynamic program over the sorted order picks the contiguous groups that
        minimise the tokens run (prefix once + suffixes, + a fixed cost per prefix pass). Every suffix
        keeps at least one token (the prefix shrinks when a prompt equals it).

        Returns:
            ([(prefix_len, indices)], rest): cached groups (2+ prompts, prefix >= _PREFIX_MIN_TOKENS)
            and the indices to score plainly.
        """
        n = len(encoded)
        order = sorted(range(n), key=lambda i: encoded[i])
        lens = [len(encoded[i]) for i in order]
        lcp = []
        for a, b in zip(order, order[1:]):
            x, y, k = encoded[a], encoded[b], 0
            m = min(len(x), len(y))
            while k < m and x[k] == y[k]:
                k += 1
            lcp.append(k)
        csum = [0]
        for ln in lens:
            csum.append(csum[-1] + ln)
        best: list[float] = [0.0] * (n + 1)
        choice: list[tuple[int, int]] = [(0, 0)] * (n + 1)  # (group start, prefix length; 0 = plain)
        for j in range(1, n + 1):
            best[j], choice[j] = best[j - 1] + lens[j - 1], (j - 1, 0)
            common, shortest = 1 << 30, lens[j - 1]
            for i in range(j - 2, -1, -1):  # group order[i:j]
                common, shortest = min(common, lcp[i]), min(shortest, lens[i])
                p = min(common, shortest - 1)
                if p < self._PREFIX_MIN_TOKENS:
                    break  # p only shrinks as the group grows leftwards
                cost = best[i] + csum[j] - csum[i] - (j - i - 1) * p + self._PREFIX_PASS_COST
                if cost < best[j]:
                    best[j], choice[j] = cost, (i, p)
        groups: list[tuple[int, list[int]]] = []
        rest: list[int] = []
        j = n
        while j > 0:
            i, p = choice[j]
            if p:
                groups.append((p, order[i:j]))
            else:
                rest.extend(order[i:j])
            j = i
        groups.reverse()
        return groups, rest

    _HEAD_IS_LM_HEAD = frozenset({"GemmaForCausalLM", "Gemma2ForCausalLM", "Gemma3ForCausalLM", "LlamaForCausalLM",
                                  "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM"})
    """Causal LM classes whose forward is `logits = lm_head(model(...).last_hidden_state)` (transformers 5.x),
    followed for those in _HEAD_SOFTCAPS by final_logit_softcapping. For these the prefix-cached critic
    runs the decoder per batch and the vocabulary projection once per call (it reads the whole
    embedding matrix, a large fixed cost per forward on CPU)."""
    _HEAD_SOFTCAPS = frozenset({"Gemma2ForCausalLM", "Gemma3ForCausalLM"})

    def _split_head(self) -> tuple[Any, Any] | None:
        """(decoder, head) with model(x).logits == head(decoder(x).last_hidden_state), or None when
        this model class is not known to be built that way."""
        import torch

        name = type(self.model).__name__
        decoder, lm_head = getattr(self.model, "model", None), getattr(self.model, "lm_head", None)
        if name not in self._HEAD_IS_LM_HEAD or decoder is None or lm_head is None:
            return None
        cap = getattr(self.model.config, "final_logit_softcapping", None) if name in self._HEAD_SOFTCAPS else None

        def head(hidden: "torch.Tensor") -> "torch.Tensor":
            logits = lm_head(hidden)
            if cap is not None:  # exactly as Gemma2/3ForCausalLM.forward
                logits = logits / cap
                logits = torch.tanh(logits)
                logits = logits * cap
            return logits

        return decoder, head

    _PREFIX_MEMO_SIZE = 8
    """Prefix KV states kept across calls (the critic scores one rubric's prefixes call after call)."""

    def _weights_token(self) -> tuple[int, int]:
        """Changes when the model object, or any parameter's storage or in-place version, changes."""
        return id(self.model), hash(tuple((p.data_ptr(), getattr(p, "_version", 0)) for p in self.model.parameters()))

    def _prefix_states(self, prefixes: list[tuple[int, ...]], kw: str) -> dict[tuple[int, ...], list[Any]] | None:
        """Per distinct prefix, per layer, its (keys, values), each (1, kv_heads, len(prefix), head_dim).

        Taken from a small LRU memo (valid while _weights_token is unchanged), else computed by one
        batched pass over the missing prefixes (left padded, as the plain path pads; no logits).
        Returns None (and turns prefix caching off for this backend) when the model's cache is not a
        plain DynamicCache of full / sliding-window layers.
        """
        from collections import OrderedDict

        import torch
        from transformers import DynamicCache
        from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer

        config = self.model.config
        with self._lock, torch.inference_mode():
            token = self._weights_token()
            memo = self.__dict__.get("_prefix_memo")
            if memo is None or self.__dict__.get("_prefix_memo_token") != token:
                memo = self._prefix_memo = OrderedDict()
                self._prefix_memo_token = token
            wanted = list(dict.fromkeys(prefixes))
            missing = [p for p in wanted if p not in memo]
            if missing:
                ids, mask = self._pad_left([list(p) for p in missing])
                width = ids.shape[1]
                cache = DynamicCache(config=config)
                self.model(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0),
                           use_cache=True, logits_to_keep=torch.empty(0, dtype=torch.long, device=self.device),
                           **{kw: cache})
                layers = getattr(cache, "layers", None) or []
                ok = bool(layers) and len(layers) == getattr(config, "num_hidden_layers", len(layers))
                for layer in layers:
                    ok = ok and type(layer) in (DynamicLayer, DynamicSlidingWindowLayer) \
                        and bool(getattr(layer, "is_initialized", False)) \
                        and all(t.shape[0] == len(missing) and t.shape[-2] == width for t in (layer.keys, layer.values))
                if not ok:
                    self._prefix_kwarg = None  # not a cache layout this path knows: plain from now on
                    return None
                for g, p in enumerate(missing):
                    cut = width - len(p)
                    memo[p] = [(layer.keys[g:g + 1, :, cut:].clone(), layer.values[g:g + 1, :, cut:].clone())
                               for layer in layers]
            states = {}
            for p in wanted:
                memo.move_to_end(p)
                states[p] = memo[p]
            while len(memo) > self._PREFIX_MEMO_SIZE:
                memo.popitem(last=False)
        return states

    def _score_with_prefixes(self, encoded: list[list[int]], groups: list[tuple[int, list[int]]],
                             cand_ids: dict[str, int], out: list[dict[str, float]]) -> list[int]:
        """Score prefix groups from their prefixes' KV states (_prefix_states).

        Every cached prompt's suffix runs, batched by suffix length across groups: a batch's cache holds
        each row's prefix states left padded to the batch's longest prefix, its suffix is left padded
        after them (mask: pad zeros, prefix ones, pad zeros, suffix ones; positions continue from the
        row's prefix length), so the last column is each row's last real token, as in the plain path.
        Where _split_head knows the model, the batches run the decoder only and the last hidden states
        of the whole call go through the head at the end; otherwise each batch runs the full model
        with logits_to_keep=1.

        Returns:
            The indices not scored here (to score plainly): all of them when the model's cache is not
            a plain DynamicCache of full / sliding-window layers, and the rows of a batch that would
            reach past a sliding attention window (the padding between prefix and suffix counts there)
            or whose logits are not finite.
        """
        import inspect

        import torch
        import torch.nn.functional as F
        from transformers import DynamicCache

        members = [i for _, m in groups for i in m]
        kw = self._prefix_cache_kwarg()
        config = self.model.config
        limits = (getattr(config, "sliding_window", None), getattr(config, "attention_chunk_size", None))
        window = min((w for w in limits if isinstance(w, int) and w > 0), default=None)
        if kw is None or (window is not None and max(p for p, _ in groups) + 2 >= window):
            return members
        prefix_of = {i: tuple(encoded[m[0]][:p]) for p, m in groups for i in m}
        states = self._prefix_states(list(prefix_of.values()), kw)
        if states is None:
            return members
        for layer in getattr(DynamicCache(config=config), "layers", None) or []:
            w = getattr(layer, "sliding_window", None)  # a sliding layer's own window, if the cache knows one
            window = min(window or w, w) if isinstance(w, int) and w > 0 else window
        split = self._split_head()
        decoder_kw = None
        if split is not None:
            try:
                params = inspect.signature(split[0].forward).parameters
            except (TypeError, ValueError):
                params = {}
            decoder_kw = next((k for k in ("cache", "past_key_values") if k in params), None)
        order = sorted(members, key=lambda i: (len(encoded[i]) - len(prefix_of[i]), i))
        rest: list[int] = []
        hidden_rows: list[int] = []
        hidden: list["torch.Tensor"] = []
        bs = self.batch_size
        for k in range(0, len(order), bs):
            idx = order[k:k + bs]
            plens = [len(prefix_of[i]) for i in idx]
            p_b = max(plens)
            suffixes = [encoded[i][n:] for i, n in zip(idx, plens)]
            width = max(len(s) for s in suffixes)
            if window is not None and p_b + width + 2 >= window:
                rest.extend(idx)  # the padding between prefix and suffix would change what a sliding window sees
                continue
            ids, smask = self._pad_left(suffixes)
            pmask = torch.tensor([[0] * (p_b - n) + [1] * n for n in plens], dtype=smask.dtype, device=smask.device)
            mask = torch.cat([pmask, smask], dim=1)
            pos = torch.tensor([[n] for n in plens], dtype=torch.long, device=self.device) \
                + (smask.cumsum(-1) - 1).clamp(min=0)
            with self._lock, torch.inference_mode():
                batch_cache = DynamicCache(config=config)
                for layer_idx in range(len(states[prefix_of[idx[0]]])):
                    rows = [(states[prefix_of[i]][layer_idx], p_b - n) for i, n in zip(idx, plens)]
                    batch_cache.update(torch.cat([F.pad(kv[0], (0, 0, pad, 0)) for kv, pad in rows]),
                                       torch.cat([F.pad(kv[1], (0, 0, pad, 0)) for kv, pad in rows]), layer_idx)
                if split is not None and decoder_kw is not None:
                    hidden.append(split[0](input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True,
                                           **{decoder_kw: batch_cache}).last_hidden_state[:, -1, :])
                    hidden_rows.extend(idx)
                else:
                    logits = self.model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True,
                                        logits_to_keep=1, **{kw: batch_cache}).logits[:, -1, :]
                    rest.extend(self._store_finite(logits, idx, cand_ids, out))
            faults.maybe_fault("critic")
        if hidden:
            with self._lock, torch.inference_mode():
                last = torch.cat(hidden, dim=0)
                step = max(64, bs)
                for k in range(0, len(hidden_rows), step):
                    logits = split[1](last[k:k + step])  # type: ignore[index]
                    rest.extend(self._store_finite(logits, hidden_rows[k:k + step], cand_ids, out))
        return rest

    def _store_finite(self, logits: "torch.Tensor", rows: list[int], cand_ids: dict[str, int],
                      out: list[dict[str, float]]) -> list[int]:
        """_store_logprobs for the rows whose logits are all finite; returns the other rows."""
        import torch

        ok = torch.isfinite(logits).all(dim=-1).tolist()
        good = [r for r, y in enumerate(ok) if y]
        if good:
            kept = logits[good] if len(good) < len(rows) else logits
            self._store_logprobs(kept, [rows[r] for r in good], cand_ids, out)
        return [rows[r] for r, y in enumerate(ok) if not y]
