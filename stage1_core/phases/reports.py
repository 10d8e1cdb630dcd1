"""Human-readable views of a QC result: the metrics table (Prefect table artifact, CLI), and the
markdown preview of kept and rejected samples."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from stage1_core.infra import jsonl


def _fmt(v: Any) -> str:
    if v is None:
        return "—"
    if isinstance(v, float):
        return f"{v:.3f}"
    return str(v)


def qc_table(summary: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per metric: metric, value, 95% CI, rule, pass."""
    rows = []
    for name, m in summary["metrics"].items():
        ci = m.get("ci95")
        rule = "reported" if m.get("op") == "report" else f"{m.get('op')} {_fmt(m.get('threshold'))}"
        passed = m.get("passed")
        rows.append({"metric": name, "value": _fmt(m.get("value")),
                     "ci95": f"[{ci[0]:.3f}, {ci[1]:.3f}]" if ci else "—",
                     "n": "—" if m.get("n") is None else m["n"], "rule": rule,
                     "pass": "—" if passed is None else ("yes" if passed else "NO")})
    return rows


def qc_text(summary: dict[str, Any]) -> str:
    """The QC table and gate decision as plain text (printed by the CLI)."""
    rows = qc_table(summary)
    cols = ["metric", "value", "ci95", "n", "rule", "pass"]
    width = {c: max(len(c), *(len(str(r[c])) for r in rows)) for c in cols}
    lines = ["  ".join(c.ljust(width[c]) for c in cols)]
    lines += ["  ".join(str(r[c]).ljust(width[c]) for c in cols) for r in rows]
    gate = summary["gate"]
    lines.append(f"gate: {gate['decision']}")
    lines += [f"  - {r}" for r in gate["reasons"]]
    return "\n".join(lines)


def qc_markdown(summary: dict[str, Any]) -> str:
    """The QC table and gate decision as markdown (the approval form shows it)."""
    gate = summary["gate"]
    lines = [f"**gate: {gate['decision']}**", *[f"- {_md_escape(r)}" for r in gate["reasons"]], ""]
    cols = ["metric", "value", "rule", "pass"]
    lines += ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(str(r[c]) for c in cols) + " |" for r in qc_table(summary)]
    return "\n".join(lines)


def _md_escape(text: str, limit: int = 300) -> str:
    text = text if len(text) <= limit else text[:limit] + "…"
    return text.replace("|", "\\|").replace("\n", "<br>")


def decision_markdown(result: dict[str, Any], summary: dict[str, Any]) -> str:
    """Markdown of a run's final decision: the decision and exit code, its reasons, the approval (if
    asked), the kept pairs and the output folder."""
    gate = summary["gate"]
    lines = [f"# Stage 1 — final decision: {gate['decision']}", "",
             f"exit code {result['exit_code']}; {result['kept']} kept pairs", "", "## Reasons", ""]
    lines += [f"- {_md_escape(r)}" for r in gate["reasons"]] or ["- (none)"]
    approval = result.get("approval")
    if approval:
        lines += ["", f"Approval: {approval['decision']}" + (f" ({_md_escape(approval['note'])})" if approval.get("note") else "")]
    lines += ["", f"Output folder: `{result['output']}`"]
    return "\n".join(lines)


def preview_markdown(summary: dict[str, Any], data_path: str | Path, rejected_path: str | Path, n_kept: int = 10,
                     n_rejected: int = 5) -> str:
    """Markdown: gate decision (of `summary`, a qc_summary.json), the first 10 kept pairs of
    `data_path`, 5 rejected items of `rejected_path` with their reasons."""
    kept = jsonl.read_rows(data_path)[:n_kept]
    rejected = jsonl.read_rows(rejected_path)
    # Show a spread of reasons, not five of the most common one.
    by_reason: dict[str, list[dict[str, Any]]] = {}
    for r in rejected:
        by_reason.setdefault(f"{r['phase']}:{r['reason']}", []).append(r)
    sample: list[dict[str, Any]] = []
    while len(sample) < n_rejected and any(by_reason.values()):
        for reason in sorted(by_reason):
            if by_reason[reason] and len(sample) < n_rejected:
                sample.append(by_reason[reason].pop(0))
    gate = summary["gate"]
    lines = [f"# Stage 1 pilot — iteration {summary.get('iteration')}", "",
             f"**Gate: {gate['decision']}**", ""] + [f"- {r}" for r in gate["reasons"]] + [
        "", f"## Kept pairs ({summary['counts']['pairs_kept']} kept; first {len(kept)})", "",
        "| # | instruction | response | pair margin |", "|---|---|---|---|"]
    for i, r in enumerate(kept, 1):
        margin = (r.get("pair_critique") or {}).get("margin")
        lines.append(f"| {i} | {_md_escape(r['instruction'])} | {_md_escape(r['response'])} | {_fmt(margin)} |")
    lines += ["", f"## Rejected ({summary['counts']['rejected']} in all; {len(sample)} shown)", "",
              "| phase | reason | item |", "|---|---|---|"]
    for r in sample:
        item = r.get("instruction", "") + (f" → {r['response']}" if r.get("response") else "")
        lines.append(f"| {r['phase']} | {r['reason']} | {_md_escape(item)} |")
    return "\n".join(lines) + "\n"


def sft_text(summary: dict[str, Any]) -> str:
    """A few lines on a finished SFT run (the CLI prints them)."""
    d = summary["dataset"]
    gate = d["gate"]
    lines = [f"SFT of {summary['base_model']['id']} on {d['train_pairs']} pairs ({d['eval_pairs']} held out) from "
             f"{d['run_dir']} (gate: {gate['decision']}{', forced' if gate['forced'] else ''})",
             f"  {summary['steps']} steps over {summary['epochs']:.2f} epochs; train loss {_fmt(summary['train_loss'])}, "
             f"eval loss {_fmt(summary['eval_loss'])} (per epoch: "
             + ", ".join(_fmt(e["eval_loss"]) for e in summary["eval_loss_per_epoch"]) + ")",
             f"  {_fmt(summary['tokens_per_s'])} tokens/s on {summary['device']}; "
             + (f"resumed from step {summary['resumed_from_step']}; " if summary.get("resumed_from_step") else "")
             + f"adapter in {summary['adapter']}"]
    if d["left_out_too_long"]:
        lines.append(f"  {len(d['left_out_too_long'])} pairs left out: longer than max_seq_len")
    return "\n".join(lines)


def sft_markdown(summary: dict[str, Any]) -> str:
    """The SFT summary as a Prefect markdown artifact."""
    d, h = summary["dataset"], summary["hyperparameters"]
    evals = " | ".join(f"{_fmt(e['eval_loss'])}" for e in summary["eval_loss_per_epoch"])
    return "\n".join([
        f"# SFT: {summary['base_model']['id']} + LoRA", "",
        f"- data: `{d['path']}` (sha256 `{d['sha256'][:16]}…`), {d['train_pairs']} train / {d['eval_pairs']} eval pairs; "
        f"gate **{d['gate']['decision']}**" + (" (forced)" if d["gate"]["forced"] else ""),
        f"- LoRA r={h['lora']['r']}, alpha={h['lora']['alpha']}, dropout={h['lora']['dropout']}, "
        f"modules {h['lora']['target_modules']}; lr {h['learning_rate']} ({h['lr_scheduler']}), "
        f"batch {h['batch_size']}x{h['gradient_accumulation_steps']}, {h['epochs']} epochs",
        f"- steps: {summary['steps']}; final train loss {_fmt(summary['train_loss'])}; eval loss per epoch: {evals}",
        f"- {_fmt(summary['tokens_per_s'])} tokens/s on {summary['device']}, "
        f"peak memory {summary['peak_memory_bytes'] / 2**30:.2f} GiB ({summary['peak_memory_kind']})",
        f"- adapter: `{summary['adapter']}`; git `{(summary.get('git_sha') or 'n/a')[:12]}`",
    ])
