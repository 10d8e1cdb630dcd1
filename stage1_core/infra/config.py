"""The validated config of a pilot run: one pydantic object, `extra="forbid"`, with bounds.

Defaults live in `configs/pilot.yaml` (prompts and rubrics included); a user's `--config FILE` is
deep-merged over them, CLI flags over that. `load_pilot_config` reads them through the one settings
loader (`stage1_core.infra.settings`), whose errors name file, line and field.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from stage1_core.infra import settings
from stage1_core.infra.schemas import GenerationParams, MaxNewTokens, StopSequences, Temperature, TopK, TopP

CONFIGS_DIR = Path(__file__).resolve().parents[2] / "configs"
DEFAULT_PILOT_CONFIG = CONFIGS_DIR / "pilot.yaml"
EMBEDDED_MODEL = "embedded:gemma-3-270m"

def _check_batch_size(v: int | str) -> int | str:
    if isinstance(v, int) and not 0 < v <= 4096:
        raise ValueError("batch_size must be 'auto' or an integer in 1..4096")
    return v


BatchSize = Annotated[int | Literal["auto"], AfterValidator(_check_batch_size)]
"""A batch size: an integer in 1..4096, or "auto" (resolved per device where it is used)."""


class StrictModel(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelConfig(StrictModel):
    id: str = Field(default=EMBEDDED_MODEL, min_length=1, description="embedded:gemma-3-270m, a local HF folder, a .gguf file, a model id already in the local HF cache, fake:<seed>, or random:gemma3-4b|12b|27b|tiny (random weights, benchmarks only)")
    revision: str | None = None
    bos_policy: Literal["auto", "always", "never"] = "auto"
    dtype: Literal["auto", "bfloat16", "float32"] = "auto"
    device: str = "auto"
    allow_pickle: bool = False
    batch_size: BatchSize = Field(default="auto", description="rows decoded together (engine slots) and "
                                              "prompts per forward batch; auto: 16 on the CPU, chosen from free memory on a GPU")
    engine: Literal["stage1", "reference"] = Field(default="stage1", description="stage1: the continuous-batching "
                                                   "engine (static KV cache, on-device stops); reference: transformers generate")
    quantize: Literal["none", "8bit", "4bit"] = Field(default="none", description="bitsandbytes weight quantization (CUDA only)")


class InstructionGenerationConfig(StrictModel):
    header: str = Field(min_length=1)
    few_shot_k: int = Field(default=8, gt=0, le=64)
    machine_examples: int = Field(default=0, ge=0, le=64, description="of the few_shot_k examples of a prompt, how "
                                  "many are drawn from the instructions kept in earlier rounds (Self-Instruct: 2 of 8); "
                                  "round 1 and a smaller pool use seeds for the rest")
    prompts_per_round: int = Field(default=16, gt=0)
    max_instruction_rounds: int = Field(default=12, gt=0)
    max_new_tokens: MaxNewTokens = 160
    temperature: Temperature = 1.0
    temperature_cap: float = Field(default=1.0, gt=0.0, le=2.0, description="the iterate step never raises "
                                   "temperature above this (a higher temperature set by hand is left alone)")
    top_p: TopP = 0.9
    top_k: TopK = 0
    stop_sequences: StopSequences = Field(default_factory=lambda: ["\n\n"])

    def sampling(self) -> GenerationParams:
        return GenerationParams.of(self)

    @model_validator(mode="after")
    def _machine(self) -> "InstructionGenerationConfig":
        if self.machine_examples > self.few_shot_k:
            raise ValueError(f"machine_examples ({self.machine_examples}) exceeds few_shot_k ({self.few_shot_k})")
        return self


class InstructionFilterConfig(StrictModel):
    min_words: int = Field(default=3, gt=0)
    max_words: int = Field(default=150, gt=0)
    max_chars: int = Field(default=2000, gt=0)
    blacklist: list[str] = Field(default_factory=list)
    rouge_threshold: float = Field(default=0.7, gt=0.0, le=1.0)

    @model_validator(mode="after")
    def _bounds(self) -> "InstructionFilterConfig":
        if self.min_words > self.max_words:
            raise ValueError(f"min_words ({self.min_words}) must be <= max_words ({self.max_words})")
        return self


class WorkedExample(StrictModel):
    instruction: str = Field(min_length=1)
    response: str = Field(min_length=1)


class ResponseGenerationConfig(StrictModel):
    n_examples: int = Field(default=2, ge=0)
    worked_examples: list[WorkedExample]
    max_new_tokens: MaxNewTokens = 96
    max_new_tokens_cap: int = Field(default=384, gt=0)
    min_new_tokens_floor: int = Field(default=32, gt=0)
    temperature: Temperature = 0.7
    top_p: TopP = 0.9
    top_k: TopK = 0
    stop_sequences: StopSequences = Field(default_factory=lambda: ["\n\n", "\nInstruction:", "\nResponse:"])

    def sampling(self) -> GenerationParams:
        return GenerationParams.of(self)

    @model_validator(mode="after")
    def _examples(self) -> "ResponseGenerationConfig":
        if self.n_examples > len(self.worked_examples):
            raise ValueError(f"n_examples ({self.n_examples}) exceeds the {len(self.worked_examples)} worked_examples given")
        if self.max_new_tokens > self.max_new_tokens_cap:
            raise ValueError(f"max_new_tokens ({self.max_new_tokens}) exceeds max_new_tokens_cap ({self.max_new_tokens_cap})")
        return self


class CriticExample(StrictModel):
    """A labelled example shown in a few-shot rubric (its answer is rendered in the prompt's letters)."""

    instruction: str = Field(min_length=1)
    response: str | None = None
    label: Literal["good", "bad"]


class Rubric(StrictModel):
    """A critic rubric: a template ending in "Answer:", the two option texts, optional few-shot examples.

    `{option_a}` is the option whose answer is the first label (`good_option` unless swapped);
    `{option_b}` the other (a Yes/No rubric may phrase the question in `{option_a}` alone).
    `{examples}` is replaced by the examples, each rendered with `example_template`
    (`{instruction}`, `{response}`, `{answer}`).
    """

    template: str = Field(min_length=1)
    good_option: str = Field(min_length=1)
    bad_option: str = Field(min_length=1)
    examples: list[CriticExample] = Field(default_factory=list, max_length=32)
    example_template: str = ""
    labels: tuple[str, str] | None = Field(default=None, description="this rubric's answer words; null = critic.labels")
    label_swap: bool | None = Field(default=None, description="null = critic.label_swap")
    order_swap: bool | None = Field(default=None, description="null = critic.order_swap")

    _placeholders: ClassVar[tuple[str, ...]] = ("{instruction}", "{option_a}")
    _example_placeholders: ClassVar[tuple[str, ...]] = ("{instruction}", "{answer}")

    @field_validator("template")
    @classmethod
    def _template(cls, template: str) -> str:
        missing = [k for k in cls._placeholders if k not in template]
        if missing:
            raise ValueError(f"template lacks placeholder(s) {', '.join(missing)}")
        if not template.rstrip().endswith("Answer:"):
            raise ValueError("template must end with 'Answer:' (the critic reads the next token)")
        return template

    @field_validator("labels")
    @classmethod
    def _labels(cls, labels: tuple[str, str] | None) -> tuple[str, str] | None:
        return labels if labels is None else _check_labels(labels)

    @model_validator(mode="after")
    def _examples(self) -> "Rubric":
        if self.examples:
            if "{examples}" not in self.template:
                raise ValueError("examples are given but the template lacks the {examples} placeholder")
            missing = [k for k in self._example_placeholders if k not in self.example_template]
            if missing:
                raise ValueError(f"example_template lacks placeholder(s) {', '.join(missing)}")
        return self


class PairRubric(Rubric):
    _placeholders: ClassVar[tuple[str, ...]] = ("{instruction}", "{response}", "{option_a}")
    _example_placeholders: ClassVar[tuple[str, ...]] = ("{instruction}", "{response}", "{answer}")

    @model_validator(mode="after")
    def _example_responses(self) -> "PairRubric":
        bad = [i for i, ex in enumerate(self.examples) if not ex.response]
        if bad:
            raise ValueError(f"pair rubric examples need a response (example {bad[0]} has none)")
        return self


class PMIConfig(StrictModel):
    """The PMI pair scorer: log p(response | instruction) - log p(response | content-free instruction)."""

    template: str = Field(default="Instruction: {instruction}\nResponse:", min_length=1)
    end: str = Field(default="\n\n", description="appended to the response: scores that the response ends there")
    per_token: bool = Field(default=False, description="divide the PMI by the response's token count")
    weight: float = Field(default=0.01, ge=0.0, le=100.0, description="weight of the PMI in pair_scorer rubric+pmi")

    @field_validator("template")
    @classmethod
    def _template(cls, template: str) -> str:
        if "{instruction}" not in template:
            raise ValueError("template lacks placeholder {instruction}")
        return template


class CriticConfig(StrictModel):
    instruction_rubric: Rubric
    pair_rubric: PairRubric
    labels: tuple[str, str] = ("A", "B")
    threshold: float = Field(default=0.0, ge=-100.0, le=100.0)
    instruction_threshold: float | None = Field(default=0.4, ge=-100.0, le=100.0, description="overrides threshold "
                                                "for instructions (null: threshold)")
    pair_threshold: float | None = Field(default=0.0, ge=-100.0, le=100.0, description="overrides threshold for pairs "
                                         "(null: threshold)")
    confidence_threshold: float = Field(default=1.0, ge=0.0)
    calibrate: bool = True
    label_swap: bool = True
    order_swap: bool = True
    pair_scorer: Literal["rubric", "pmi", "rubric+pmi"] = "rubric"
    pmi: PMIConfig = Field(default_factory=PMIConfig)
    pair_heuristics: bool = True
    instruction_heuristics: bool = True
    content_free_input: str = "N/A"
    batch_size: BatchSize = Field(default="auto", description="prompts per critic forward pass; "
                                              "auto: 256 on a GPU, 16 on the CPU")

    @field_validator("labels")
    @classmethod
    def _labels(cls, labels: tuple[str, str]) -> tuple[str, str]:
        return _check_labels(labels)


def _check_labels(labels: tuple[str, str]) -> tuple[str, str]:
    if labels[0].strip() == labels[1].strip() or not all(label.strip() for label in labels) \
            or any(label != label.strip() for label in labels):
        raise ValueError("labels must be two different non-empty words without spaces, e.g. [A, B] or [Yes, No]")
    return labels


class QCThresholds(StrictModel):
    """Operators are binding: *_max are strict (<), *_min inclusive (>=); leakage_max is <=.
    The critics' acceptance (*_critic_acceptance_min) is the quality bar and halts; yield
    (instruction_acceptance_min, pair_acceptance_min) and near_duplicate_share_max iterate."""

    runaway_rate_max: float = Field(default=0.05, gt=0.0, le=1.0)
    token_limit_rate_max: float = Field(default=0.10, gt=0.0, le=1.0)
    leakage_max: int = Field(default=0, ge=0)
    median_response_tokens_max: float = Field(default=40, gt=0)
    instruction_critic_acceptance_min: float = Field(default=0.5, ge=0.0, le=1.0)
    pair_critic_acceptance_min: float = Field(default=0.5, ge=0.0, le=1.0)
    instruction_acceptance_min: float = Field(default=0.25, ge=0.0, le=1.0)
    pair_acceptance_min: float = Field(default=0.4, ge=0.0, le=1.0)
    near_duplicate_share_max: float = Field(default=0.3, gt=0.0, le=1.0)
    critic_min_accuracy: float | None = Field(default=None, ge=0.0, le=1.0)
    critic_min_auc: float | None = Field(default=None, ge=0.0, le=1.0)
    min_n: int = Field(default=20, gt=0)


class PilotConfig(StrictModel):
    count: int = Field(default=100, gt=0, le=1_000_000)
    seed: int = Field(default=42, ge=0)
    seeds_path: str | None = None
    max_iterations: int = Field(default=2, ge=0, le=20)
    gpu_hour_usd: float | None = Field(default=None, ge=0.0, description="price of one GPU-hour, for the cost estimate")
    model: ModelConfig = Field(default_factory=ModelConfig)
    instruction_generation: InstructionGenerationConfig
    instruction_filter: InstructionFilterConfig = Field(default_factory=InstructionFilterConfig)
    response_generation: ResponseGenerationConfig
    critic: CriticConfig
    qc: QCThresholds = Field(default_factory=QCThresholds)


def model_with(base: dict[str, Any], over: dict[str, Any], source: str) -> ModelConfig:
    """A ModelConfig from `base` (a run's model section) with `over` (a flow config's `model:` keys) on top.

    Raises:
        InputError: naming `model.<key>` and `source`.
    """
    try:
        return ModelConfig.model_validate({**base, **over})
    except ValidationError as e:
        raise settings.input_error(e, source=None, prefix="model.", docs="the pilot's model section (docs/config.md)",
                                   fix=f"correct {source}") from None


PILOT_DOCS = "docs/config.md, configs/pilot.yaml"


def validate_pilot_config(data: dict[str, Any], source: str, node: Any = None) -> PilotConfig:
    """Validate merged config data (`settings.validate`): the first error names file, line and field."""
    return settings.validate(PilotConfig, data, source=source, node=node, docs=PILOT_DOCS)


def load_pilot_config(user_config: str | Path | None = None, overrides: dict[str, Any] | None = None, *,
                      flags: dict[str, str] | None = None) -> PilotConfig:
    """Defaults (configs/pilot.yaml) <- user YAML <- CLI overrides, validated (`settings.load_settings`).

    Raises:
        InputError: unreadable/invalid YAML, unknown keys, out-of-bound values; an override's error
            names the command line and its flag (`flags`: config key -> flag, the pilot's
            `options.CONFIG_FLAGS`).
    """
    return settings.load_settings(PilotConfig, DEFAULT_PILOT_CONFIG, user_config, overrides,
                                  docs=PILOT_DOCS, flags=flags)


def config_slice(cfg: PilotConfig, *sections: str) -> dict[str, Any]:
    """The JSON-able part of the config a phase depends on (for cache keys)."""
    dumped = cfg.model_dump(mode="json")
    return {s: dumped[s] for s in sections}
