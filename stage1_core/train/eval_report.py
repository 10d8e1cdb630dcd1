"""The eval report as people read it: the metric table (Prefect table artifact), the win-rate line
(marked UNINFORMATIVE below the judge's consistency floor), eval_report.md and the CLI's summary.
"""

from __future__ import annotations

from typing import Any

from stage1_core.train.eval_metrics import MODEL_METRICS


def fmt(v: Any, digits: int = 3) -> str:
    """A number as the report shows it (3 decimals; a dash for None)."""
    return "—" if v is None else f"{v:.{digits}f}" if isinstance(v, float) else str(v)


def _ci(v: Any) -> str:
    return "" if not v else f" [{v[0]:.3f}, {v[1]:.3f}]"


def report_table(report: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per metric: base, tuned, each with its interval (the Prefect table artifact)."""
    return [{"metric": m, "base": fmt(report["base"][m]) + _ci(report["base"].get(f"{m}_ci")),
             "tuned": fmt(report["tuned"][m]) + _ci(report["tuned"].get(f"{m}_ci"))} for m in MODEL_METRICS]


def win_rate_line(report: dict[str, Any]) -> str:
    """The win rate as the report states it: marked uninformative below the consistency floor."""
    w, j = report["win_rate"], report["judge"]
    value = f"{fmt(w['tuned_over_base'])}{_ci(w['tuned_over_base_ci'])}"
    lc = f"{fmt(w['length_controlled'])}{_ci(w['length_controlled_ci'])}"
    if j["status"] == "uninformative":
        return (f"UNINFORMATIVE (judge position consistency {fmt(w['position_consistency'])} < floor "
                f"{j['consistency_floor']}); raw {value}, length-controlled {lc}")
    return f"{value}, length-controlled {lc}"


def report_markdown(report: dict[str, Any]) -> str:
    """eval_report.md: the metric table, the win rate with its judge, verifiable accuracy per type, settings."""
    w, s, j = report["win_rate"], report["settings"], report["judge"]
    v = s["verifiable"]
    lines = [f"# Eval: {report['base_model']['id']} vs + adapter", "",
             f"{report['prompts']['n']} held-out prompts, {report['prompts']['with_instructions']} with "
             f"{report['prompts']['instructions']} IFEval instructions; zero-shot `{s['prompt']!r}`, greedy. Prompts "
             f"without instructions: up to {s['max_new_tokens']} tokens, stops {s['stop_sequences']!r}. With "
             f"instructions: up to {v['max_new_tokens']} tokens; the {v['multiline_prompts']} that need blank lines stop "
             f"only at {v['multiline_stop_sequences']!r}. Perplexity on {report['reference']['n']} reference "
             f"responses. Intervals: {s['intervals']}.", "",
             "| metric | base | tuned |", "|---|---|---|"]
    lines += [f"| {r['metric']} | {r['base']} | {r['tuned']} |" for r in report_table(report)]
    lines += ["", f"## Win rate, tuned over base: {win_rate_line(report)}", "",
              f"Judge: {j['model']}{' (the base model)' if j['is_base_model'] else ''}, weights sha256 "
              f"{(j['weights_sha256'] or '—')[:16]}. Each pair shown in both orders; a pair whose orders disagree is a tie.",
              "", "| | value |", "|---|---|"]
    for key, label in (("tuned_over_base", "win rate (ties 1/2)"), ("length_controlled", "length-controlled win rate"),
                       ("position_consistency", "position consistency"),
                       ("first_position_share", "verdicts for the first-shown response"),
                       ("judge_mean_p_first", "mean P(first shown)"), ("length_diff_chars", "length gap, tuned - base (chars)"),
                       ("length_slope", "judge's log-odds per unit of tanh(length gap / sd)")):
        lines.append(f"| {label} | {fmt(w[key])}{_ci(w.get(f'{key}_ci'))} |")
    lines.append(f"| wins / losses / ties / equal responses | {w['wins']} / {w['losses']} / {w['ties']} / "
                 f"{w['equal_responses']} |")
    lines += ["", f"Status: **{j['status']}** — {j['reason']}.", "",
              "## Verifiable instructions by type (IFEval rules)", "",
              "| instruction | n | base strict | tuned strict | base loose | tuned loose |", "|---|---|---|---|---|---|"]
    for iid, e in report["verifiable_by_type"].items():
        lines.append(f"| {iid} | {e['n']} | " + " | ".join(
            f"{fmt(e[k])}{_ci(e[k + '_ci'])}" for k in ("base_strict", "tuned_strict", "base_loose", "tuned_loose")) + " |")
    return "\n".join(lines) + "\n"


def report_text(report: dict[str, Any]) -> str:
    """The CLI's summary lines."""
    b, t = report["base"], report["tuned"]
    return "\n".join([f"{'metric':<30} {'base':>8} {'tuned':>8}"] +
                     [f"{m:<30} {fmt(b[m]):>8} {fmt(t[m]):>8}" for m in MODEL_METRICS] +
                     [f"win rate (tuned over base): {win_rate_line(report)}",
                      f"judge {report['judge']['model']}: {report['judge']['status']} ({report['judge']['reason']})"])
