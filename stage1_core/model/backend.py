"""The model backend contract shared by the real HF backend (`model.py`) and the fake (`fake.py`).

Core phases talk to a `Backend` only; they never touch torch or transformers themselves.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Callable, Protocol

from stage1_core.infra.schemas import Completion, GenerationParams

ProgressFn = Callable[[int], None]
"""Called with the number of prompts just finished (an increment)."""


class Backend(Protocol):
    """What a phase needs from a model.

    Attributes:
        fingerprint: JSON-able provenance of the loaded model (id/path, revision, weights_sha256,
            dtype, device, load_seconds, family, bos_policy, ...). `fingerprint["weights_sha256"]`
            identifies the weights.
    """

    fingerprint: dict[str, Any]

    def generate(
        self,
        prompts: list[str],
        params: GenerationParams,
        seed: int,
        progress: ProgressFn | None = None,
        ids: Sequence[str] | None = None,
    ) -> list[Completion]:
        """Complete each prompt in completion mode (no chat template).

        Prompts are plain text without BOS; the backend adds BOS by its family policy. Generation of
        a prompt stops at EOS, at the earliest of `params.stop_sequences`, or at max_new_tokens; the
        stop reason follows `generation.classify_stop`.

        Sampling randomness is per item, never per batch position: the random stream of prompt i is
        derived from (`seed`, `ids[i]`) alone, so the same seed and id give the same completion at any
        batch size, in any order, whatever other prompts share its batch (on the same hardware and
        software; greedy decoding ignores it).

        Args:
            prompts: the prompts, in the order the completions are returned.
            params: sampling settings and stop sequences, shared by all prompts.
            seed: the run seed of this call.
            progress: called with the number of prompts just finished (an increment).
            ids: one stable id per prompt (e.g. "r01-p003", an instruction's id); None means
                `str(i)` for prompt i, which ties randomness to positions within this call only.
        Returns:
            One Completion per prompt, in the order of `prompts`.
        Raises:
            ValueError: `ids` is not one per prompt, or holds a duplicate (see `item_ids`).
        """
        ...

    def next_token_logprobs(self, prompts: list[str], candidates: list[str]) -> list[dict[str, float]]:
        """One forward pass per prompt: log-probability that the next token is each candidate.

        Each candidate string must encode to exactly one token (e.g. "A", " A"); otherwise
        ValueError. Returns one dict candidate -> logprob per prompt (natural log, full softmax).
        A backend may also take keywords `batch_size` (prompts per forward pass, None = its default)
        and `progress` (called with prompts finished); the critic then hands it the whole list at once
        (HFBackend does), else it calls in chunks of `critic.batch_size` prompts.
        """
        ...

    def continuation_logprobs(self, prompts: list[str], continuations: list[str]) -> list[tuple[float, int]]:
        """Teacher-forced score of each continuation after its prompt (the PMI scorer's primitive).

        Returns one (sum of natural-log probabilities of the continuation's tokens given the prompt and
        the continuation's earlier tokens, number of continuation tokens) per pair. The continuation is
        tokenized on its own, so its tokens do not depend on the prompt. No sampling.
        """
        ...

    def count_tokens(self, text: str) -> int:
        """Number of tokens `text` encodes to (no special tokens added)."""
        ...


def item_ids(prompts: Sequence[object], ids: Sequence[str] | None) -> list[str]:
    """The stable ids of a `generate` call, validated (every backend calls this).

    Args:
        prompts: the call's prompts.
        ids: the caller's ids, or None for the prompt indices as strings.
    Returns:
        One id per prompt.
    Raises:
        ValueError: `ids` does not have one entry per prompt, or an id appears twice (two items
            would share one random stream).
    """
    if ids is None:
        return [str(i) for i in range(len(prompts))]
    out = [str(i) for i in ids]
    if len(out) != len(prompts):
        raise ValueError(f"generate: {len(prompts)} prompts but {len(out)} ids; pass one stable id per prompt")
    seen: set[str] = set()
    dups = sorted({i for i in out if i in seen or seen.add(i)})
    if dups:
        raise ValueError(f"generate: duplicate ids {dups[:5]}; each prompt needs its own stable id "
                         "(its sampling randomness derives from the run seed and the id)")
    return out
