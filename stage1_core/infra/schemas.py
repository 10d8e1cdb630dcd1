"""Typed records that cross module boundaries: generation parameters, completions, critiques.

Rows written to JSONL files are plain dicts built from these (`model_dump()`), so every file
stays readable without this package.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

StopReason = Literal["eos", "blank_line", "next_block", "token_limit"]
STOP_REASONS: tuple[StopReason, ...] = ("eos", "blank_line", "next_block", "token_limit")


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=False)


class GenerationParams(Strict):
    """Sampling settings of one generate() call. temperature == 0 means greedy."""

    max_new_tokens: int = Field(gt=0)
    temperature: float = Field(ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    top_k: int = Field(default=0, ge=0)
    stop_sequences: list[str] = Field(default_factory=list)


class Completion(Strict):
    """One generated continuation.

    text: the raw decoded continuation, including any stop sequence that ended it (and never the
    prompt). stop_reason: see SPEC (eos | blank_line | next_block | token_limit). n_tokens: new
    tokens generated (the EOS token included when it ended the completion).
    """

    text: str
    stop_reason: StopReason
    n_tokens: int = Field(ge=0)


class Critique(Strict):
    """Verdict of the critic on one item (rubric margin, plus the PMI when the pair scorer uses it)."""

    predicted_label: Literal["A", "B"]
    logp_a: float
    logp_b: float
    margin: float
    is_good: bool
    confident: bool
    ab_mass: float = Field(ge=0.0, le=1.0)
    calibration_offset: float = 0.0
    pmi: float | None = None
