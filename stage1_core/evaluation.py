"""Base vs base + adapter on held-out prompts (`python -m flows.eval`).

Both models answer every prompt zero-shot in completion mode (`Instruction: X\\nResponse:`, no worked
examples), greedy, with the response phase's stop rules and the same token cap; then per model:

- `stop_rate`: non-empty responses that end by EOS or a blank line before the cap, over all prompts;
- `empty_rate`, `runaway_rate` (qc.is_runaway: began a new block or repeats a line),
  `token_limit_rate`, `mean_tokens` (new tokens per response);
- `verifiable_accuracy`: the share of prompts carrying a checker (stage1_core.checkers) whose
  response passes it; null when no prompt has one;
- `perplexity` of the reference set's good responses, teacher-forced after the zero-shot prompt:
  exp(total negative log-likelihood / total response tokens);

and `win_rate.tuned_over_base`: the base model judges each pair of responses with a two-option
prompt (configs/eval.yaml `judge`), once with the tuned response as A and once as B; the two
probabilities that the tuned one is better are averaged; an item scores 1 when the average is above
1/2, 0 below, 1/2 for equal responses or an exact tie. Rates carry Wilson intervals, the rest
percentile-bootstrap intervals over items, as `<metric>_ci: [lo, hi]`.

The tuned model is the base model loaded again with the adapter merged into its weights (peft
`merge_and_unload`), so both run through the same engine and guards.
"""

from __future__ import annotations

import math
import statistics
import time
from pathlib import Path
from typing import Any, Callable, Sequence

from pydantic import Field, field_validator

from stage1_core import checkers, eval_data, provenance, qc, sft, stats, storage
from stage1_core.config import CONFIGS_DIR, ModelConfig, StrictModel, load_settings, model_with
from stage1_core.errors import InputError
from stage1_core.generation import cut_at_stop
from stage1_core.schemas import Completion, GenerationParams

DEFAULT_EVAL_CONFIG = CONFIGS_DIR / "eval.yaml"
REPORT = "eval_report.json"
REPORT_MD = "eval_report.md"
RESPONSES = "responses.jsonl"
STOPPED = ("eos", "blank_line")
MODEL_METRICS = ("stop_rate", "empty_rate", "runaway_rate", "token_limit_rate", "mean_tokens", "verifiable_accuracy",
                 "perplexity")


class JudgeSettings(StrictModel):
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


class EvalSettings(StrictModel):
    model: dict[str, Any] = Field(default_factory=dict)
    max_new_tokens: int = Field(default=128, gt=0, le=8192)
    stop_sequences: list[str] = Field(default_factory=lambda: ["\n\n", "\nInstruction:", "\nResponse:"])
    seed: int = Field(default=0, ge=0)
    prompts: str | None = None
    reference: str | None = None
    bootstrap_samples: int = Field(default=2000, ge=100, le=100_000)
    judge: JudgeSettings


def load_eval_config(config: str | Path | None = None) -> EvalSettings:
    """configs/eval.yaml <- the user's YAML, validated (InputError naming file, line and field)."""
    return load_settings(EvalSettings, DEFAULT_EVAL_CONFIG, config, docs="docs/eval.md")


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
    from stage1_core.loader import builder_versions

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
                 overwrite: bool = False) -> dict[str, Any]:
    """Validate the adapter folder, prompts, reference set, config, model and output folder. Writes
    nothing, loads no model.

    The base model comes from training_summary.json (`base_model.model_config`, through the
    project's loader), never from peft's `base_model_name_or_path`; its weights must still hash to
    the fingerprint recorded at training.

    Raises:
        InputError: any bad input (exit 2).
    """
    from stage1_core.loader import cached_dequantized, check_quantize, model_fingerprint, resolve_model
    from stage1_core.run import check_output_dir

    summary = sft.read_summary(adapter)
    settings = load_eval_config(config)
    cfg = model_with(summary["base_model"]["model_config"], settings.model, "the eval config")
    r = resolve_model(cfg)
    check_quantize(cfg, r)
    fingerprint = model_fingerprint(cfg)
    trained = (summary["base_model"].get("fingerprint") or {}).get("weights_sha256")
    if trained and fingerprint["weights_sha256"] != trained:
        raise InputError("the base model's weights differ from those the adapter was trained on",
                         file=str(Path(adapter) / sft.SUMMARY), field="base_model.fingerprint.weights_sha256",
                         expected=f"weights with sha256 {trained[:16]}…, found {fingerprint['weights_sha256'][:16]}…",
                         fix="evaluate with the base model the adapter was trained on")
    check_dequantized(summary["base_model"].get("fingerprint") or {}, cached_dequantized(cfg),
                      file=str(Path(adapter) / sft.SUMMARY))
    prompts = prompts or settings.prompts
    items = eval_data.load_eval_prompts(prompts)
    reference = eval_data.load_reference(settings.reference)
    adapter_sha = storage.sha256_file(Path(adapter) / "adapter_model.safetensors")
    prompts_path = Path(prompts) if prompts else eval_data.SHIPPED_PROMPTS
    reference_path = Path(settings.reference) if settings.reference else eval_data.SHIPPED_REFERENCE
    dumped = settings.model_dump(mode="json")
    identity = {"adapter_sha256": adapter_sha, "prompts_sha256": storage.sha256_file(prompts_path),
                "reference_sha256": storage.sha256_file(reference_path),
                "eval_config_sha256": storage.sha256_text(storage.canonical_json(dumped)),
                "model_weights_sha256": fingerprint["weights_sha256"]}
    folder = check_output_dir(output, identity, overwrite)
    return {"adapter": str(Path(adapter).resolve()), "training": {k: summary.get(k) for k in
                                                                 ("steps", "train_loss", "eval_loss", "git_sha", "seed")},
            "settings": dumped, "model_config": cfg.model_dump(mode="json"), "model": fingerprint,
            "prompts": str(prompts_path.resolve()), "n_prompts": len(items),
            "n_checked": sum(1 for p in items if p.check is not None), "reference": str(reference_path.resolve()),
            "n_reference": len(reference), "identity": identity, "output": folder["path"],
            "folder_state": folder["state"]}


def dry_run_text(plan: dict[str, Any]) -> str:
    s = plan["settings"]
    return "\n".join([
        f"Eval plan: base {plan['model_config']['id']} vs base + adapter {plan['adapter']}",
        f"  {plan['n_prompts']} prompts from {plan['prompts']} ({plan['n_checked']} with a checker), zero-shot, greedy, "
        f"up to {s['max_new_tokens']} new tokens, stops {s['stop_sequences']!r}",
        f"  perplexity on {plan['n_reference']} reference pairs ({plan['reference']}); win rate judged by the base model, "
        "both orders",
        f"  output: {plan['output']}",
    ])


# --------------------------------------------------------------------------- models

def zero_shot_prompt(instruction: str) -> str:
    return sft.PROMPT_TEMPLATE.format(instruction=instruction)


def load_tuned(cfg: ModelConfig, adapter_dir: str | Path) -> Any:
    """A fresh HFBackend of the base model (guards and sentinels run on the base weights) with the
    adapter merged into it; the engine is built on first use, from the merged weights."""
    from peft import PeftModel

    from stage1_core.hf_backend import HFBackend
    from stage1_core.loader import resolve_model

    backend = HFBackend(cfg, resolve_model(cfg))
    merged = PeftModel.from_pretrained(backend.model, str(adapter_dir)).merge_and_unload()
    backend.model = merged.eval()
    backend.fingerprint = {**backend.fingerprint, "adapter": str(adapter_dir),
                           "adapter_sha256": storage.sha256_file(Path(adapter_dir) / "adapter_model.safetensors")}
    return backend


def load_models(plan: dict[str, Any]) -> tuple[Any, Any]:
    """(base, tuned): the base backend (model.load_backend, cached per process) and load_tuned.

    Raises:
        InputError: a model failed its guards or sentinels (bad input, exit 2), or the loader's checks.
    """
    from stage1_core.errors import ModelGuardError
    from stage1_core.model import load_backend
    from stage1_core.run import guard_error

    cfg = ModelConfig.model_validate(plan["model_config"])
    try:
        base = load_backend(cfg)
    except ModelGuardError as e:
        raise guard_error(e, (plan.get("model") or {}).get("path")) from None
    summary = sft.read_summary(plan["adapter"])  # the folder was just built: its weights are known now
    check_dequantized(summary["base_model"].get("fingerprint") or {}, base.fingerprint.get("dequantized"),
                      file=str(Path(plan["adapter"]) / sft.SUMMARY))
    try:
        return base, load_tuned(cfg, plan["adapter"])
    except ModelGuardError as e:
        raise guard_error(e, (plan.get("model") or {}).get("path")) from None


# --------------------------------------------------------------------------- metrics

def response_of(c: Completion, stop_sequences: Sequence[str]) -> str:
    """The response text of a completion: cut at the first stop sequence, stripped."""
    return cut_at_stop(c.text, list(stop_sequences)).strip()


def _rate(k: int, n: int) -> tuple[float | None, list[float] | None]:
    ci = stats.wilson_ci(k, n)
    return (k / n if n else None), (list(ci) if ci else None)


def model_metrics(items: Sequence[Any], completions: Sequence[Completion], stop_sequences: Sequence[str],
                  nll: Sequence[tuple[float, int]], n_boot: int, seed: int) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """One model's metrics and per-prompt rows.

    Args:
        items: the eval prompts (id, instruction, check).
        completions: the model's completion of each prompt's zero-shot prompt.
        stop_sequences: the stop rules the completions ran under.
        nll: (sum of log-probabilities, tokens) of each reference response.
    Returns:
        (metrics with `<metric>_ci` beside each, rows per prompt).
    """
    rows, n = [], len(items)
    for it, c in zip(items, completions):
        resp = response_of(c, stop_sequences)
        rows.append({"id": it.id, "response": resp, "raw": c.text, "stop_reason": c.stop_reason, "n_tokens": c.n_tokens,
                     "stopped": bool(resp) and c.stop_reason in STOPPED, "empty": not resp,
                     "runaway": qc.is_runaway(c.text, c.stop_reason), "token_limit": c.stop_reason == "token_limit",
                     "check": it.check, "passed": checkers.passes(it.check, resp) if it.check is not None else None})
    out: dict[str, Any] = {"n": n}
    for name, key in (("stop_rate", "stopped"), ("empty_rate", "empty"), ("runaway_rate", "runaway"),
                      ("token_limit_rate", "token_limit")):
        out[name], out[f"{name}_ci"] = _rate(sum(r[key] for r in rows), n)
    tokens = [float(r["n_tokens"]) for r in rows]
    out["mean_tokens"] = statistics.fmean(tokens) if tokens else None
    ci = stats.bootstrap_ci(tokens, n_boot=n_boot, seed=seed)
    out["mean_tokens_ci"] = list(ci) if ci else None
    checked = [r for r in rows if r["check"] is not None]
    out["verifiable_n"] = len(checked)
    out["verifiable_accuracy"], out["verifiable_accuracy_ci"] = _rate(sum(bool(r["passed"]) for r in checked), len(checked))
    neg = [-lp for lp, _ in nll]
    toks = [float(t) for _, t in nll]
    out["perplexity"] = math.exp(sum(neg) / sum(toks)) if nll and sum(toks) > 0 else None
    ci = stats.bootstrap_ci_ratio(neg, toks, transform=math.exp, n_boot=n_boot, seed=seed) if nll else None
    out["perplexity_ci"] = list(ci) if ci else None
    out["perplexity_tokens"] = int(sum(toks))
    return out, rows


def judge_prompts(template: str, instruction: str, first: str, second: str) -> str:
    return template.replace("{instruction}", instruction).replace("{response_a}", first or "(no response)") \
        .replace("{response_b}", second or "(no response)")


def win_scores(judge: Any, settings: JudgeSettings, items: Sequence[Any], base: Sequence[str], tuned: Sequence[str],
               progress: Callable[[int], None] | None = None) -> list[dict[str, Any]]:
    """Per prompt: P(tuned better) with the tuned response shown as A and as B, their mean, and the
    item's score (1 win, 0 loss, 1/2 tie or equal responses).

    Args:
        judge: a backend with next_token_logprobs (the base model).
        settings: the judge template and its two labels.
    """
    a, b = settings.labels
    cands = [a, " " + a, b, " " + b]
    todo = [i for i in range(len(items)) if base[i] != tuned[i]]
    flat = []
    for i in todo:
        flat.append(judge_prompts(settings.template, items[i].instruction, tuned[i], base[i]))  # tuned is A
        flat.append(judge_prompts(settings.template, items[i].instruction, base[i], tuned[i]))  # tuned is B
    scores = judge.next_token_logprobs(flat, cands) if flat else []
    if progress is not None:
        progress(len(items))
    out = [{"id": it.id, "p_tuned_as_a": None, "p_tuned_as_b": None, "p_tuned": 0.5, "score": 0.5, "equal": True}
           for it in items]
    for j, i in enumerate(todo):
        p = []
        for k, tuned_label in ((0, a), (1, b)):
            s = scores[2 * j + k]
            la, lb = max(s[a], s[" " + a]), max(s[b], s[" " + b])
            m = max(la, lb)
            pa = math.exp(la - m) / (math.exp(la - m) + math.exp(lb - m))
            p.append(pa if tuned_label == a else 1.0 - pa)
        mean = (p[0] + p[1]) / 2
        out[i] = {"id": items[i].id, "p_tuned_as_a": p[0], "p_tuned_as_b": p[1], "p_tuned": mean,
                  "score": 1.0 if mean > 0.5 else 0.0 if mean < 0.5 else 0.5, "equal": False}
    return out


def evaluate(plan: dict[str, Any], *, base: Any = None, tuned: Any = None,
             progress: Callable[[str, int, int], None] | None = None) -> dict[str, Any]:
    """Run the evaluation and write responses.jsonl, eval_report.json and eval_report.md.

    Args:
        plan: prepare_eval's plan.
        base: the base backend (default: model.load_backend of the plan's model, cached per process).
        tuned: the tuned backend (default: load_tuned).
        progress: called with (stage, done, total).
    Returns:
        The report.
    """
    from stage1_core.model import load_backend

    t0 = time.perf_counter()
    settings = EvalSettings.model_validate(plan["settings"])
    cfg = ModelConfig.model_validate(plan["model_config"])
    items = eval_data.load_eval_prompts(plan["prompts"])
    reference = eval_data.load_reference(plan["reference"])
    base = base if base is not None else load_backend(cfg)
    tuned = tuned if tuned is not None else load_tuned(cfg, plan["adapter"])
    params = GenerationParams(max_new_tokens=settings.max_new_tokens, temperature=0.0, top_p=1.0, top_k=0,
                              stop_sequences=list(settings.stop_sequences))
    prompts = [zero_shot_prompt(it.instruction) for it in items]
    ids = [it.id for it in items]
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
                progress(f"generate ({name})", done[0], len(prompts))

        comps = backend.generate(prompts, params, seed=settings.seed, progress=step, ids=ids)
        nll = backend.continuation_logprobs(ref_prompts, ref_conts)
        per_model[name], rows[name] = model_metrics(items, comps, settings.stop_sequences, nll,
                                                     settings.bootstrap_samples, settings.seed)
        seconds[name] = round(time.perf_counter() - t, 3)
    t = time.perf_counter()
    wins = win_scores(base, settings.judge, items, [r["response"] for r in rows["base"]],
                      [r["response"] for r in rows["tuned"]],
                      progress=(lambda k: progress("judge", k, len(items))) if progress else None)
    seconds["judge"] = round(time.perf_counter() - t, 3)
    scores = [w["score"] for w in wins]
    ci = stats.bootstrap_ci(scores, n_boot=settings.bootstrap_samples, seed=settings.seed)
    decided = [w for w in wins if not w["equal"]]
    win = {"tuned_over_base": statistics.fmean(scores) if scores else None,
           "tuned_over_base_ci": list(ci) if ci else None, "n": len(scores), "equal_responses": len(wins) - len(decided),
           "judge_order_agreement": (sum(1 for w in decided if (w["p_tuned_as_a"] > 0.5) == (w["p_tuned_as_b"] > 0.5))
                                     / len(decided)) if decided else None,
           "judge_mean_p_first": (statistics.fmean([(w["p_tuned_as_a"] + 1 - w["p_tuned_as_b"]) / 2 for w in decided])
                                  if decided else None)}
    report = {
        "base": {k: per_model["base"][k] for k in per_model["base"]},
        "tuned": {k: per_model["tuned"][k] for k in per_model["tuned"]},
        "win_rate": win,
        "settings": {"prompt": sft.PROMPT_TEMPLATE, "zero_shot": True, "temperature": 0.0, "top_p": 1.0, "top_k": 0,
                     "max_new_tokens": settings.max_new_tokens, "stop_sequences": list(settings.stop_sequences),
                     "seed": settings.seed, "bootstrap_samples": settings.bootstrap_samples,
                     "intervals": "Wilson 95% for rates; percentile bootstrap 95% over items otherwise",
                     "judge": "the base model, both orders averaged", "judge_template": settings.judge.template, "judge_labels": list(settings.judge.labels)},
        "prompts": {"path": plan["prompts"], "n": len(items), "with_checker": sum(1 for i in items if i.check is not None),
                    "sha256": plan["identity"]["prompts_sha256"]},
        "reference": {"path": plan["reference"], "n": len(reference), "sha256": plan["identity"]["reference_sha256"]},
        "adapter": {"path": plan["adapter"], "sha256": plan["identity"]["adapter_sha256"], "training": plan["training"]},
        "base_model": {"id": cfg.id, "fingerprint": getattr(base, "fingerprint", None)},
        "seconds": {**seconds, "total": round(time.perf_counter() - t0, 3)},
        "git_sha": provenance.git_info(Path(__file__).resolve().parent.parent)["sha"],
        "finished": provenance.utc_now(),
    }
    out = Path(plan["output"])
    storage.write_jsonl_atomic(out / RESPONSES, [
        {"id": it.id, "instruction": it.instruction, "check": it.check,
         "base": {k: v for k, v in b.items() if k not in ("id", "check")},
         "tuned": {k: v for k, v in tu.items() if k not in ("id", "check")},
         "judge": {k: v for k, v in w.items() if k != "id"}}
        for it, b, tu, w in zip(items, rows["base"], rows["tuned"], wins)])
    storage.write_text_atomic(out / REPORT_MD, report_markdown(report))
    storage.write_json_atomic(out / REPORT, report)  # last: its presence means the evaluation is complete
    return report


def _f(v: Any, digits: int = 3) -> str:
    return "—" if v is None else f"{v:.{digits}f}" if isinstance(v, float) else str(v)


def _ci(v: Any) -> str:
    return "" if not v else f" [{v[0]:.3f}, {v[1]:.3f}]"


def report_table(report: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per metric: base, tuned, each with its interval (the Prefect table artifact)."""
    return [{"metric": m, "base": _f(report["base"][m]) + _ci(report["base"].get(f"{m}_ci")),
             "tuned": _f(report["tuned"][m]) + _ci(report["tuned"].get(f"{m}_ci"))} for m in MODEL_METRICS]


def report_markdown(report: dict[str, Any]) -> str:
    """eval_report.md: the table, the win rate and the settings."""
    w, s = report["win_rate"], report["settings"]
    lines = [f"# Eval: {report['base_model']['id']} vs + adapter", "",
             f"{report['prompts']['n']} held-out prompts ({report['prompts']['with_checker']} with a checker), zero-shot "
             f"`{s['prompt']!r}`, greedy, up to {s['max_new_tokens']} tokens, stops {s['stop_sequences']!r}. "
             f"Perplexity on {report['reference']['n']} reference responses. Intervals: {s['intervals']}.", "",
             "| metric | base | tuned |", "|---|---|---|"]
    lines += [f"| {r['metric']} | {r['base']} | {r['tuned']} |" for r in report_table(report)]
    lines += ["", f"**Win rate, tuned over base:** {_f(w['tuned_over_base'])}{_ci(w['tuned_over_base_ci'])} "
                  f"over {w['n']} prompts ({w['equal_responses']} with equal responses count 1/2); judged by the base "
                  f"model with both orders averaged (the two orders agreed on {_f(w['judge_order_agreement'])} of the "
                  f"others; mean P(first shown) {_f(w['judge_mean_p_first'])})."]
    return "\n".join(lines) + "\n"


def report_text(report: dict[str, Any]) -> str:
    """The CLI's summary lines."""
    b, t, w = report["base"], report["tuned"], report["win_rate"]
    return "\n".join([f"{'metric':<20} {'base':>8} {'tuned':>8}"] +
                     [f"{m:<20} {_f(b[m]):>8} {_f(t[m]):>8}" for m in MODEL_METRICS] +
                     [f"win rate (tuned over base): {_f(w['tuned_over_base'])}{_ci(w['tuned_over_base_ci'])}"])
