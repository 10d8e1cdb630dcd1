"""Base vs base + adapter on held-out prompts (`python -m flows.eval`).

Both models answer every prompt zero-shot in completion mode (`Instruction: X\\nResponse:`, no worked
examples), greedy. A prompt without verifiable instructions runs under `max_new_tokens` and
`stop_sequences`; one with IFEval instructions under `verifiable.max_new_tokens`, and, when an
instruction needs blank lines (paragraphs, sections, a postscript...: checkers.needs_blank_lines),
under `verifiable.multiline_stop_sequences` (no blank-line stop). Then per model:

- `stop_rate`: non-empty responses that end by EOS or a blank line before the cap, over all prompts;
- `empty_rate`, `runaway_rate` (qc.is_runaway: began a new block or repeats a line),
  `token_limit_rate`, `mean_tokens` (new tokens per response);
- IFEval's four accuracies over the prompts with instructions (stage1_core.train.checkers):
  `verifiable_accuracy` (prompt-level strict: every instruction followed), `verifiable_prompt_loose`,
  `verifiable_instruction_strict`, `verifiable_instruction_loose` (share of all instructions);
  null when no prompt has instructions; and per instruction type, in `verifiable_by_type`;
- `perplexity` of the reference set's good responses, teacher-forced after the zero-shot prompt:
  exp(total negative log-likelihood / total response tokens);

and `win_rate` (stage1_core.train.judge): a judge model (`judge.model`, default the base model) reads each
pair in both orders; order-inconsistent verdicts are ties; position consistency, the length gap and
a length-controlled win rate beside it; below `judge.consistency_floor` the win rate is marked
uninformative (`judge.status`). Rates carry Wilson intervals, the rest percentile-bootstrap
intervals over items (prompts), as `<metric>_ci: [lo, hi]`.

The tuned model is the base model loaded again with the adapter merged into its weights (peft
`merge_and_unload`), so both run through the same engine and guards.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable, Sequence

from pydantic import ValidationError, Field, field_validator

from stage1_core.train import checkers, eval_data, eval_metrics, eval_report, judge as judging, sft
from stage1_core.infra import provenance, storage
from stage1_core.infra.config import CONFIGS_DIR, ModelConfig, StrictModel, model_with
from stage1_core.infra.settings import input_error, load_settings
from stage1_core.infra.errors import InputError
from stage1_core.infra.schemas import Completion, GenerationParams
from stage1_core.phases.plans import FolderState, ModelRecord, Record

DEFAULT_EVAL_CONFIG = CONFIGS_DIR / "eval.yaml"
REPORT = "eval_report.json"
REPORT_MD = "eval_report.md"
RESPONSES = "responses.jsonl"


class JudgeSettings(StrictModel):
    model: str | dict[str, Any] | None = Field(default=None, description="the judge: null = the base model; a model "
                                                "id or path (string), or ModelConfig keys such as {id: ..., device: cpu}")
    consistency_floor: float = Field(default=0.5, ge=0.0, le=1.0)
    template: str = Field(min_length=1)
    labels: tuple[str, str] = ("A", "B")

    @field_validator("template")
    @classmethod
    def _template(cls, t: str) -> str:
        missing = [k for k in ("{instruction}", "{response_a}", "{response_b}") if k not in t]
        if missing:
            raise ValueError(f"template lacks placeholder(s) {', '.join(missing)}")
        if not t.rstrip().endswith("Answer:"):
            raise ValueError("template must end with 'Answer:' (the judge reads the next token)")
        return t

    @field_validator("labels")
    @classmethod
    def _labels(cls, v: tuple[str, str]) -> tuple[str, str]:
        if not all(x.strip() for x in v) or v[0].strip() == v[1].strip():
            raise ValueError("labels must be two different non-blank strings, e.g. [\"A\", \"B\"]")
        return v


class VerifiableSettings(StrictModel):
    max_new_tokens: int = Field(default=256, gt=0, le=8192)
    multiline_stop_sequences: list[str] = Field(default_factory=lambda: ["\nInstruction:", "\nResponse:"])

    @field_validator("multiline_stop_sequences")
    @classmethod
    def _no_blank(cls, v: list[str]) -> list[str]:
        if any(not s.strip() for s in v):
            raise ValueError("a blank-line stop would cut paragraphs: keep only non-blank stop sequences here")
        return v


class EvalSettings(StrictModel):
    model: dict[str, Any] = Field(default_factory=dict)
    max_new_tokens: int = Field(default=128, gt=0, le=8192)
    stop_sequences: list[str] = Field(default_factory=lambda: ["\n\n", "\nInstruction:", "\nResponse:"])
    verifiable: VerifiableSettings = Field(default_factory=VerifiableSettings)
    seed: int = Field(default=0, ge=0)
    prompts: str | None = None
    reference: str | None = None
    bootstrap_samples: int = Field(default=2000, ge=100, le=100_000)
    judge: JudgeSettings


class EvalIdentity(Record):
    """What makes two eval runs the same run (a folder of another identity is not resumed)."""

    adapter_sha256: str
    prompts_sha256: str
    reference_sha256: str
    eval_config_sha256: str
    model_weights_sha256: str
    judge_weights_sha256: str


class TrainingRecord(Record):
    """The adapter's training, as its training_summary.json records it (None where it does not)."""

    steps: int | None = None
    train_loss: float | None = None
    eval_loss: float | None = None
    git_sha: str | None = None
    seed: int | None = None


class EvalPlan(Record):
    """A validated eval run (`prepare_eval`): nothing is written and no model is loaded to make one."""

    adapter: str
    training: TrainingRecord
    settings: EvalSettings
    base_model: ModelConfig
    model: ModelRecord
    judge_config: ModelConfig
    judge_model: ModelRecord
    judge_is_base: bool
    prompts: str
    n_prompts: int
    n_checked: int
    n_instructions: int
    reference: str
    n_reference: int
    identity: EvalIdentity
    output: str
    folder_state: FolderState


def load_eval_config(config: str | Path | None = None) -> EvalSettings:
    """configs/eval.yaml <- the user's YAML, validated (InputError naming file, line and field)."""
    return load_settings(EvalSettings, DEFAULT_EVAL_CONFIG, config, docs="docs/eval.md")


def judge_config(settings: EvalSettings, base: ModelConfig) -> ModelConfig:
    """The judge's ModelConfig: the base model's when `judge.model` is null; else a string is a model
    id or path, a mapping ModelConfig keys (device and dtype default to the base model's).

    Raises:
        InputError: naming `judge.model.<key>`.
    """
    j = settings.judge.model
    if j is None:
        return base
    over = {"id": j} if isinstance(j, str) else dict(j)
    try:
        return ModelConfig.model_validate({"device": base.device, "dtype": base.dtype, **over})
    except ValidationError as e:
        raise input_error(e, source=None, prefix="judge.model.", docs="ModelConfig keys, docs/config.md model section",
                          fix="correct judge.model in the eval config") from None


def check_dequantized(trained: dict[str, Any], current: dict[str, Any] | None, *, file: str,
                      installed: dict[str, str | None] | None = None) -> None:
    """A GGUF base must load as the same float weights the adapter was trained on.

    The GGUF's sha256 can match while an upgraded transformers / gguf / torch dequantizes it into
    other weights. When this install's cached folder exists, its weights' sha256 must equal the one
    recorded at training; when it is not built yet, the versions that would build it must equal
    those that built the trained-on weights.

    Args:
        trained: the training summary's base_model.fingerprint.
        current: cached_dequantized(cfg) of this install (None: no GGUF, or not built yet).
        file: the training summary's path, for the error.
        installed: versions of transformers / gguf / torch here (default: looked up).
    Raises:
        InputError: the weights (or the versions that make them) differ.
    """
    from stage1_core.model import builder_versions

    recorded = trained.get("dequantized") or None
    if not recorded or not recorded.get("weights_sha256"):
        return  # not a GGUF base, or a summary from before this check
    fix = ("evaluate in the environment the adapter was trained in (scripts/setup.sh installs "
           "requirements/lock.txt; the summary's environment names its lock_sha256), or retrain the adapter here")
    if current is not None:
        if current["weights_sha256"] != recorded["weights_sha256"]:
            raise InputError("the base model dequantizes to other weights than the adapter was trained on", file=file,
                             field="base_model.fingerprint.dequantized.weights_sha256",
                             expected=(f"{recorded['weights_sha256'][:16]}… (built with {recorded.get('built_with')}), "
                                       f"found {current['weights_sha256'][:16]}… (built with {current.get('built_with')})"),
                             fix=fix)
        return
    here = installed if installed is not None else builder_versions()
    built = recorded.get("built_with") or {}
    moved = {k: (built.get(k), here.get(k)) for k in ("transformers", "gguf", "torch") if built.get(k) != here.get(k)}
    if moved:
        what = ", ".join(f"{k} {a} → {b}" for k, (a, b) in sorted(moved.items()))
        raise InputError("the base model would be dequantized by other package versions than the adapter was trained on",
                         file=file, field="base_model.fingerprint.dequantized.built_with",
                         expected=f"the versions that built the trained-on weights; changed: {what}", fix=fix)


def prepare_eval(*, adapter: str, output: str, prompts: str | None = None, config: str | None = None,
                 overwrite: bool = False) -> EvalPlan:
    """Validate the adapter folder, prompts, reference set, config, base and judge models and output
    folder. Writes nothing, loads no model.

    The base model comes from training_summary.json (`base_model.model_config`, through the
    project's loader), never from peft's `base_model_name_or_path`; its weights must still hash to
    the fingerprint recorded at training. The judge (`judge.model`) resolves through the same loader.

    Raises:
        InputError: any bad input (exit 2).
    """
    from stage1_core.model import cached_dequantized, check_quantize, model_fingerprint, resolve_model
    from stage1_core.phases.run import check_output_dir

    summary = sft.read_summary(adapter)
    settings = load_eval_config(config)
    prompts = prompts or settings.prompts
    items = eval_data.load_eval_prompts(prompts)
    reference = eval_data.load_reference(settings.reference)
    cfg = model_with(summary["base_model"]["model_config"], settings.model, "the eval config")
    r = resolve_model(cfg)
    check_quantize(cfg, r)
    model = ModelRecord.model_validate(model_fingerprint(cfg))
    trained = (summary["base_model"].get("fingerprint") or {}).get("weights_sha256")
    if trained and model.weights_sha256 != trained:
        raise InputError("the base model's weights differ from those the adapter was trained on",
                         file=str(Path(adapter) / sft.SUMMARY), field="base_model.fingerprint.weights_sha256",
                         expected=f"weights with sha256 {trained[:16]}…, found {model.weights_sha256[:16]}…",
                         fix="evaluate with the base model the adapter was trained on")
    check_dequantized(summary["base_model"].get("fingerprint") or {}, cached_dequantized(cfg),
                      file=str(Path(adapter) / sft.SUMMARY))
    jcfg = judge_config(settings, cfg)
    if settings.judge.model is None:
        judge_model = model
    else:
        check_quantize(jcfg, resolve_model(jcfg))
        judge_model = ModelRecord.model_validate(model_fingerprint(jcfg))
    adapter_sha = storage.sha256_file(Path(adapter) / "adapter_model.safetensors")
    prompts_path = Path(prompts) if prompts else eval_data.SHIPPED_PROMPTS
    reference_path = Path(settings.reference) if settings.reference else eval_data.SHIPPED_REFERENCE
    identity = EvalIdentity(adapter_sha256=adapter_sha, prompts_sha256=storage.sha256_file(prompts_path),
                            reference_sha256=storage.sha256_file(reference_path),
                            eval_config_sha256=storage.sha256_text(storage.canonical_json(settings.model_dump(mode="json"))),
                            model_weights_sha256=model.weights_sha256, judge_weights_sha256=judge_model.weights_sha256)
    path, state = check_output_dir(output, identity, overwrite)
    return EvalPlan(adapter=str(Path(adapter).resolve()),
                    training=TrainingRecord.model_validate({k: summary.get(k) for k in TrainingRecord.model_fields}),
                    settings=settings, base_model=cfg, model=model, judge_config=jcfg, judge_model=judge_model,
                    judge_is_base=settings.judge.model is None, prompts=str(prompts_path.resolve()),
                    n_prompts=len(items), n_checked=sum(1 for p in items if p.checked),
                    n_instructions=sum(len(p.instruction_ids) for p in items), reference=str(reference_path.resolve()),
                    n_reference=len(reference), identity=identity, output=path, folder_state=state)


def dry_run_text(plan: EvalPlan) -> str:
    s = plan.settings
    judge = "the base model" if plan.judge_is_base else plan.judge_config.id
    return "\n".join([
        f"Eval plan: base {plan.base_model.id} vs base + adapter {plan.adapter}",
        f"  {plan.n_prompts} prompts from {plan.prompts}, zero-shot, greedy; "
        f"up to {s.max_new_tokens} new tokens, stops {s.stop_sequences!r}",
        f"  {plan.n_checked} with {plan.n_instructions} IFEval instructions: up to "
        f"{s.verifiable.max_new_tokens} new tokens; those needing blank lines stop only at "
        f"{s.verifiable.multiline_stop_sequences!r}",
        f"  perplexity on {plan.n_reference} reference pairs ({plan.reference})",
        f"  win rate judged by {judge}, both orders, inconsistent orders are ties; uninformative below "
        f"position consistency {s.judge.consistency_floor}",
        f"  output: {plan.output}",
    ])


# --------------------------------------------------------------------------- models

def zero_shot_prompt(instruction: str) -> str:
    return sft.PROMPT_TEMPLATE.format(instruction=instruction)


def load_tuned(cfg: ModelConfig, adapter_dir: str | Path) -> Any:
    """A fresh HFBackend of the base model (guards and sentinels run on the base weights) with the
    adapter merged into it; the engine is built on first use, from the merged weights."""
    from peft import PeftModel

    from stage1_core.model import HFBackend
    from stage1_core.model import resolve_model

    backend = HFBackend(cfg, resolve_model(cfg))
    merged = PeftModel.from_pretrained(backend.model, str(adapter_dir)).merge_and_unload()
    backend.model = merged.eval()
    backend.fingerprint = {**backend.fingerprint, "adapter": str(adapter_dir),
                           "adapter_sha256": storage.sha256_file(Path(adapter_dir) / "adapter_model.safetensors")}
    return backend


def load_models(plan: EvalPlan) -> tuple[Any, Any, Any]:
    """(base, tuned, judge): the base backend (model.load_backend, cached per process), load_tuned,
    and the judge (the base backend itself when judge.model is null, else load_backend of its config).

    Raises:
        InputError: a model failed its guards or sentinels (bad input, exit 2), or the loader's checks.
    """
    from stage1_core.infra.errors import ModelGuardError
    from stage1_core.model import load_backend
    from stage1_core.phases.run import guard_error

    cfg, path = plan.base_model, getattr(plan.model, "path", None)
    try:
        base = load_backend(cfg)
    except ModelGuardError as e:
        raise guard_error(e, path) from None
    summary = sft.read_summary(plan.adapter)  # the folder was just built: its weights are known now
    check_dequantized(summary["base_model"].get("fingerprint") or {}, base.fingerprint.get("dequantized"),
                      file=str(Path(plan.adapter) / sft.SUMMARY))
    try:
        tuned = load_tuned(cfg, plan.adapter)
    except ModelGuardError as e:
        raise guard_error(e, path) from None
    if plan.judge_is_base:
        return base, tuned, base
    try:
        judge = load_backend(plan.judge_config)
    except ModelGuardError as e:
        raise guard_error(e, getattr(plan.judge_model, "path", None)) from None
    return base, tuned, judge


# --------------------------------------------------------------------------- generation

def generation_settings(item: eval_data.EvalPrompt, settings: EvalSettings) -> tuple[int, tuple[str, ...]]:
    """(max_new_tokens, stop sequences) a prompt generates under: the general ones without IFEval
    instructions; the verifiable cap with them, and no blank-line stop when one needs blank lines."""
    if not item.checked:
        return settings.max_new_tokens, tuple(settings.stop_sequences)
    if checkers.needs_blank_lines(item.instruction_ids):
        return settings.verifiable.max_new_tokens, tuple(settings.verifiable.multiline_stop_sequences)
    return settings.verifiable.max_new_tokens, tuple(settings.stop_sequences)


def generate_all(backend: Any, items: Sequence[eval_data.EvalPrompt], settings: EvalSettings,
                 progress: Callable[[int], None] | None = None) -> tuple[list[Completion], list[tuple[str, ...]]]:
    """Every prompt's completion, generated in groups of equal settings (generation_settings), in
    prompt order; and per prompt the stop sequences it ran under."""
    plan = [generation_settings(it, settings) for it in items]
    out: list[Completion | None] = [None] * len(items)
    for key in sorted(set(plan)):
        idx = [i for i, k in enumerate(plan) if k == key]
        params = GenerationParams(max_new_tokens=key[0], temperature=0.0, top_p=1.0, top_k=0, stop_sequences=list(key[1]))
        comps = backend.generate([zero_shot_prompt(items[i].instruction) for i in idx], params, seed=settings.seed,
                                 progress=progress, ids=[items[i].id for i in idx])
        for i, c in zip(idx, comps):
            out[i] = c
    return [c for c in out if c is not None], [k[1] for k in plan]


def evaluate(plan: EvalPlan, *, base: Any = None, tuned: Any = None, judge: Any = None,
             progress: Callable[[str, int, int], None] | None = None) -> dict[str, Any]:
    """Run the evaluation and write responses.jsonl, eval_report.json and eval_report.md.

    Args:
        plan: prepare_eval's plan.
        base: the base backend (default: model.load_backend of the plan's model, cached per process).
        tuned: the tuned backend (default: load_tuned).
        judge: the judge backend (default: the base backend, or load_backend of judge_config).
        progress: called with (stage, done, total).
    Returns:
        The report.
    """
    from stage1_core.model import load_backend

    t0 = time.perf_counter()
    settings, cfg = plan.settings, plan.base_model
    items = eval_data.load_eval_prompts(plan.prompts)
    reference = eval_data.load_reference(plan.reference)
    base = base if base is not None else load_backend(cfg)
    tuned = tuned if tuned is not None else load_tuned(cfg, plan.adapter)
    if judge is None:
        judge = base if plan.judge_is_base else load_backend(plan.judge_config)
    ref_prompts = [zero_shot_prompt(r.instruction) for r in reference]
    ref_conts = [" " + r.response.strip() for r in reference]
    per_model: dict[str, Any] = {}
    rows: dict[str, list[dict[str, Any]]] = {}
    seconds: dict[str, float] = {}
    for name, backend in (("base", base), ("tuned", tuned)):
        t = time.perf_counter()
        done = [0]

        def step(k: int, name: str = name) -> None:
            done[0] += k
            if progress is not None:
                progress(f"generate ({name})", done[0], len(items))

        comps, stops = generate_all(backend, items, settings, progress=step)
        nll = backend.continuation_logprobs(ref_prompts, ref_conts)
        per_model[name], rows[name] = eval_metrics.model_metrics(items, comps, stops, nll, settings.bootstrap_samples, settings.seed)
        seconds[name] = round(time.perf_counter() - t, 3)
    t = time.perf_counter()
    base_texts, tuned_texts = [r["response"] for r in rows["base"]], [r["response"] for r in rows["tuned"]]
    verdicts = judging.verdicts(judge, settings.judge.template, settings.judge.labels, [it.instruction for it in items],
                                base_texts, tuned_texts,
                                progress=(lambda k: progress("judge", k, len(items))) if progress else None)
    seconds["judge"] = round(time.perf_counter() - t, 3)
    win = judging.summarize(verdicts, base_texts, tuned_texts, consistency_floor=settings.judge.consistency_floor,
                            n_boot=settings.bootstrap_samples, seed=settings.seed)
    informative = win.pop("informative")
    judge_fp = getattr(judge, "fingerprint", None) or {}
    report = {
        "base": per_model["base"],
        "tuned": per_model["tuned"],
        "win_rate": win,
        "judge": {"model": plan.judge_config.id, "is_base_model": plan.judge_is_base,
                  "weights_sha256": judge_fp.get("weights_sha256"), "fingerprint": judge_fp,
                  "status": "informative" if informative else "uninformative",
                  "reason": (f"position consistency {eval_report.fmt(win['position_consistency'])} >= floor "
                             f"{settings.judge.consistency_floor}" if informative else
                             f"position consistency {eval_report.fmt(win['position_consistency'])} < floor "
                             f"{settings.judge.consistency_floor}: the judge's verdicts follow the order the responses "
                             "are shown in more than the responses; do not read the win rate as a preference"),
                  "template": settings.judge.template, "labels": list(settings.judge.labels),
                  "consistency_floor": settings.judge.consistency_floor},
        "verifiable_by_type": eval_metrics.by_type(rows),
        "settings": {"prompt": sft.PROMPT_TEMPLATE, "zero_shot": True, "temperature": 0.0, "top_p": 1.0, "top_k": 0,
                     "max_new_tokens": settings.max_new_tokens, "stop_sequences": list(settings.stop_sequences),
                     "verifiable": {"max_new_tokens": settings.verifiable.max_new_tokens,
                                    "stop_sequences": list(settings.stop_sequences),
                                    "multiline_stop_sequences": list(settings.verifiable.multiline_stop_sequences),
                                    "multiline_prompts": sum(1 for it in items if it.checked
                                                             and checkers.needs_blank_lines(it.instruction_ids)),
                                    "rules": "IFEval (google-research instruction_following_eval), strict and loose"},
                     "seed": settings.seed, "bootstrap_samples": settings.bootstrap_samples,
                     "intervals": "Wilson 95% for rates; percentile bootstrap 95% over prompts otherwise",
                     "judge": ("both orders; an order-inconsistent pair is a tie (MT-Bench); length-controlled: "
                               "logistic fit of the item score on tanh(length difference / sd), win rate at equal length")},
        "prompts": {"path": plan.prompts, "n": len(items), "with_instructions": sum(1 for i in items if i.checked),
                    "instructions": sum(len(i.instruction_ids) for i in items),
                    "sha256": plan.identity.prompts_sha256},
        "reference": {"path": plan.reference, "n": len(reference), "sha256": plan.identity.reference_sha256},
        "adapter": {"path": plan.adapter, "sha256": plan.identity.adapter_sha256, "training": plan.training.model_dump()},
        "base_model": {"id": cfg.id, "fingerprint": getattr(base, "fingerprint", None)},
        "seconds": {**seconds, "total": round(time.perf_counter() - t0, 3)},
        "git_sha": provenance.git_info(Path(__file__).resolve().parents[2])["sha"],
        "finished": provenance.utc_now(),
    }
    out = Path(plan.output)
    storage.write_jsonl_atomic(out / RESPONSES, [
        {"id": it.id, "instruction": it.instruction, "instruction_id_list": list(it.instruction_ids),
         "kwargs": list(it.kwargs),
         "base": {k: v for k, v in b.items() if k not in ("id", "instruction_ids")},
         "tuned": {k: v for k, v in tu.items() if k not in ("id", "instruction_ids")},
         "judge": v}
        for it, b, tu, v in zip(items, rows["base"], rows["tuned"], verdicts)])
    storage.write_text_atomic(out / REPORT_MD, eval_report.report_markdown(report))
    storage.write_json_atomic(out / REPORT, report)  # last: its presence means the evaluation is complete
    return report
