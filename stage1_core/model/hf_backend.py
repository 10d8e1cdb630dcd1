"""The Hugging Face backend: a transformers causal LM in completion mode (implements `Backend`).

`HFBackend(cfg)` loads the model through `stage1_core.model.loader` and runs the contamination guards of
`stage1_core.model.guards` (chat template disabled, BOS by family policy, no chat-control ids, sentinels).
It encodes, generates (the reference path: transformers `generate` with `_NucleusTopP` and
`_StopOnSequences`), and scores next-token / continuation log-probabilities for the critic
(shared prefixes broadcast over suffix batches, `stage1_core.model.scoring`). Use `stage1_core.model.load_backend` for the per-process cache.

Run it: `PYTHONPATH=. python -m stage1_core.cli.model [--id MODEL] [--prompt TEXT]`; tests:
`python -m pytest -q tests/core/test_model.py`.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import TYPE_CHECKING, Any, Callable, Sequence

from stage1_core.infra import faults
from stage1_core.model import guards
from stage1_core.model.backend import ProgressFn, item_ids
from stage1_core.infra.config import ModelConfig
from stage1_core.infra.errors import DeviceOOM, InputError
from stage1_core.model.generation import classify_stop, find_stop
from stage1_core.model.guards import Sentinel, check_control_tokens, find_control_token_ids, run_sentinels
from stage1_core.model.dequantized import cached_dequantized
from stage1_core.model.fingerprint import _fingerprint_of
from stage1_core.model.loader import load_hf_model
from stage1_core.model.random_weights import RANDOM_SENTINELS_NOTE
from stage1_core.model.resolve import ResolvedModel, resolve_device, resolve_model
from stage1_core.model.sizing import resolve_batch_size
from stage1_core.infra.schemas import Completion, GenerationParams

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
            sentinels: sentinels to run; default: stage1_core.model.guards.SENTINELS, read at call time.
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
        if r.gguf_file:  # the float weights actually loaded, and which versions dequantized them
            self.fingerprint["dequantized"] = cached_dequantized(cfg.model_copy(update={"device": self.device}))

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

        `model.engine: stage1` (default) runs the continuous-batching engine (stage1_core.model.engine):
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
            from stage1_core.model.engine import Engine, supports

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

    def next_token_logprobs(self, prompts: list[str], candidates: list[str], batch_size: int | None = None,
                            progress: ProgressFn | None = None) -> list[dict[str, float]]:
        """Log-probability of each single-token candidate as the next token (no sampling, no generation).

        Prompts that share a long token prefix (critic prompts of one rubric and swap order) are scored
        by `stage1_core.model.scoring.PrefixScorer`: each prefix runs once (memoized across calls while the
        weights are unchanged), then the suffixes run in batches of `batch_size` rows whose attention
        reads the prefix K/V in place (broadcast, never copied per row). Prompts without a worthwhile
        shared prefix, and model classes outside `scoring.SUPPORTED`, take the plain path (`_score_plain`: whole
        prompts, through the engine's compiled prefill on CUDA, else the forward left padded: the reference,
        `_next_token_logprobs_plain`); the paths agree up to float rounding (~1e-5 in float32).

        Args:
            prompts: plain-text prompts without BOS.
            candidates: strings that each encode to exactly one token (e.g. "A", " A").
            batch_size: prompts per forward pass (critic.batch_size); default `critic_batch_size`
                (256 on a GPU, 16 on the CPU).
            progress: called with the number of prompts finished after each forward pass.
        Returns:
            One dict candidate -> natural-log probability (full float32 softmax) per prompt, input order.
        Raises:
            ValueError: a candidate does not encode to exactly one token, or a prompt is empty.
            ModelGuardError: a prompt encodes to a chat-control token.
            DeviceOOM: out of device memory even one prompt per pass (a larger batch that runs out of
                memory is halved and rerun: the scores do not depend on the batch).
        """
        from stage1_core.model.scoring import PrefixScorer

        import torch

        cand_ids = self._candidate_ids(candidates)
        encoded = self.encode(prompts, "critic prompt")
        bs = batch_size or self.critic_batch_size
        scorer = self.__dict__.get("_scorer")
        if scorer is None or scorer.model is not self.model:
            scorer = self._scorer = PrefixScorer(self.model, self.pad_id, self.device, self._lock)
        reported = 0  # prompts already reported to `progress`: a rerun after an OOM does not count them twice

        def once(n: int) -> None:
            nonlocal done, reported
            done += n
            if progress is not None and done > reported:
                progress(done - reported)
                reported = done

        while True:  # out of device memory: halve the batch (scores do not depend on it), never retry as is
            out: list[dict[str, float]] = [{} for _ in prompts]
            done = 0
            try:
                scored, rest = scorer.score(encoded, list(cand_ids.values()), bs, once)
                for i, row in scored.items():
                    out[i] = dict(zip(cand_ids, row))
                self._score_plain(encoded, rest, cand_ids, out, bs, once)
                return out
            except torch.OutOfMemoryError as e:
                if bs <= 1:
                    raise DeviceOOM(f"out of device memory scoring critic prompts one at a time ({e}); the model "
                                    "does not leave room for one critic prompt: free the device, set model.quantize "
                                    "(8bit/4bit), or use a smaller model") from None
                bs = max(1, bs // 2)
                log.warning("critic: out of device memory; retrying with %d prompts per forward pass", bs)
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()

    @property
    def critic_batch_size(self) -> int:
        """Prompts per critic forward pass when the caller gives none: 256 on a GPU, 16 on the CPU."""
        return 16 if self.device == "cpu" else 256

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
        self._score_plain(encoded, list(range(len(encoded))), cand_ids, out, engine=False)
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
                     out: list[dict[str, float]], batch_size: int | None = None,
                     progress: ProgressFn | None = None, engine: bool = True) -> None:
        """Score encoded[i] for i in subset: whole prompts batched by length (batch_size rows per forward,
        default model.batch_size). With `engine` and the engine's scoring on (`decoder.score_enabled`: CUDA
        by default) they run through its compiled prefill (`Decoder.next_token_logprobs`, right padded);
        else through the model's own forward, left padded (the reference)."""
        import torch

        from stage1_core.model.decoder import score_enabled

        # the engine is built (its projections fused) only where it will score
        eng = self.engine() if engine and score_enabled(torch.device(self.device).type) else None
        dec = eng.dec if eng is not None else None
        bs = batch_size or self.batch_size
        order = sorted(subset, key=lambda i: (len(encoded[i]), i))
        for k in range(0, len(order), bs):
            idx = order[k:k + bs]
            with self._lock, torch.inference_mode():
                if dec is not None:
                    lp = dec.next_token_logprobs([encoded[i] for i in idx], list(cand_ids.values())).cpu().tolist()
                    for r, i in enumerate(idx):
                        out[i] = {c: float(v) for c, v in zip(cand_ids, lp[r])}
                else:
                    input_ids, mask = self._pad_left([encoded[i] for i in idx])
                    pos = (mask.cumsum(-1) - 1).clamp(min=0)
                    logits = self.model(input_ids=input_ids, attention_mask=mask, position_ids=pos,
                                        use_cache=False, logits_to_keep=1).logits[:, -1, :]
                    self._store_logprobs(logits, idx, cand_ids, out)
            if progress is not None:
                progress(len(idx))
            faults.maybe_fault("critic")
