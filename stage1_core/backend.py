"""The model backend contract shared by the real HF backend (`model.py`) and the fake (`fake.py`).

Core phases talk to a `Backend` only; they never touch torch or transformers themselves.
"""

from __future__ import annotations

from typing import Any, Callable, Protocol

from stage1_core.schemas import Completion, GenerationParams

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
    ) -> list[Completion]:
        """Complete each prompt in completion mode (no chat template).

        Prompts are plain text without BOS; the backend adds BOS by its family policy. Generation of
        a prompt stops at EOS, at the earliest of `params.stop_sequences`, or at max_new_tokens; the
        stop reason follows `generation.classify_stop`. Same prompts + params + seed give the same
        completions on the same hardware and software.
        """
        ...

    def next_token_logprobs(self, prompts: list[str], candidates: list[str]) -> list[dict[str, float]]:
        """One forward pass per prompt: log-probability that the next token is each candidate.

        Each candidate string must encode to exactly one token (e.g. "A", " A"); otherwise
        ValueError. Returns one dict candidate -> logprob per prompt (natural log, full softmax).
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
