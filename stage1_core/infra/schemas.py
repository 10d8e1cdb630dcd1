"""Typed records that cross module boundaries: generation parameters, completions, critiques.

Rows written to JSONL files are plain dicts built from these (`model_dump()`), so every file
stays readable without this package.
"""

from __future__ import annotations

from typing import Annotated, Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field

StopReason = Literal["eos", "blank_line", "next_block", "token_limit"]
STOP_REASONS: tuple[StopReason, ...] = ("eos", "blank_line", "next_block", "token_limit")


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=False)


# The sampling settings, each declared once: its type and bounds. The config's generation sections
# (with their own defaults) and GenerationParams use these, so a bound cannot drift between them.
MaxNewTokens = Annotated[int, Field(gt=0, description="new tokens at most per completion")]
Temperature = Annotated[float, Field(ge=0.0, le=2.0, description="sampling temperature; 0 = greedy")]
TopP = Annotated[float, Field(gt=0.0, le=1.0, description="nucleus: keep the smallest set of tokens of this mass")]
TopK = Annotated[int, Field(ge=0, description="keep the k most likely tokens; 0 = no top-k")]
StopSequences = Annotated[list[str], Field(description="the completion ends at the first of these")]


class GenerationParams(Strict):
    """Sampling settings of one generate() call, from config to engine as this one type
    (`SamplingSection.sampling()`). temperature == 0 means greedy."""

    FIELDS: ClassVar[tuple[str, ...]] = ("max_new_tokens", "temperature", "top_p", "top_k", "stop_sequences")

    max_new_tokens: MaxNewTokens
    temperature: Temperature
    top_p: TopP = 1.0
    top_k: TopK = 0
    stop_sequences: StopSequences = Field(default_factory=list)

    @classmethod
    def of(cls, section: Any) -> "GenerationParams":
        """The sampling settings of a config section (a validated model, or its JSON dump)."""
        get = section.get if isinstance(section, dict) else lambda k: getattr(section, k)
        return cls.model_validate({k: get(k) for k in cls.FIELDS})


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
