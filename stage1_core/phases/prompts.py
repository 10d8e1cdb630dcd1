"""Prompt builders and parsers, one pair per model-calling phase. All pure.

- Instruction generation: `build_instruction_prompt` renders a header and a numbered list of k seed
  instructions ending in "k+1." so the base model continues the list; `parse_instruction_list`
  splits the continuation back into items and stops where the list ends.
- Response generation: `build_response_prompt` renders n worked examples (blank-line separated)
  then `Instruction: X\\nResponse:`; `clean_response` cuts at the first delimiter and strips.
- Critic: `build_critic_prompt` fills a rubric template (optionally with few-shot examples) that ends
  in `Answer:`; `build_pmi_prompt` renders the PMI scorer's context.

Golden tests in tests/core/test_prompts.py pin the exact strings.
"""

from __future__ import annotations

import re
from typing import Sequence

from stage1_core.infra.config import Rubric, WorkedExample

_ITEM = re.compile(r"^\s*(\d+)\s*[.)]\s*(.*)$")
RESPONSE_DELIMITERS: tuple[str, ...] = ("\n\n", "\nInstruction:", "\nResponse:")


def build_instruction_prompt(header: str, seed_lines: Sequence[str]) -> str:
    """Header, then `1. seed` … `k. seed`, then `k+1.` for the model to continue.

    Args:
        header: text before the list (ends with a blank line in the default config).
        seed_lines: one-line seed instructions (`Seed.list_text()`).
    Returns:
        The prompt, ending in "{k+1}." with no trailing space.
    """
    lines = [f"{i}. {text}" for i, text in enumerate(seed_lines, start=1)]
    return header + "\n".join(lines) + f"\n{len(seed_lines) + 1}."


def parse_instruction_list(completion: str, start_number: int, truncated: bool) -> list[str]:
    """Items of a numbered list continued by the model.

    The completion continues right after "{start_number}." Lines must go on numbering
    start_number+1, start_number+2, …; the first line that does not (a blank line, prose, a wrong
    number) ends the list. When the completion hit the token limit, its last line may be cut
    mid-sentence, so it is dropped unless a newline followed it.

    Args:
        completion: raw model continuation.
        start_number: the number the prompt ended with.
        truncated: the completion stopped at the token limit.
    Returns:
        The items' texts, stripped, in order (empty items skipped).
    """
    text = f"{start_number}." + completion
    lines = text.split("\n")
    if truncated and lines:
        lines = lines[:-1]  # no newline after it: possibly cut mid-sentence
    items: list[str] = []
    expected = start_number
    for line in lines:
        m = _ITEM.match(line)
        if not m or int(m.group(1)) != expected:
            break
        item = m.group(2).strip()
        if item:
            items.append(item)
        expected += 1
    return items


def build_response_prompt(instruction: str, examples: Sequence[WorkedExample]) -> str:
    """`n` worked examples separated by blank lines, then `Instruction: X\\nResponse:`."""
    blocks = [f"Instruction: {ex.instruction}\nResponse: {ex.response}" for ex in examples]
    blocks.append(f"Instruction: {instruction}\nResponse:")
    return "\n\n".join(blocks)


def clean_response(raw: str, stop_sequences: Sequence[str] = RESPONSE_DELIMITERS) -> str:
    """The response text: `raw` cut at the first delimiter (the stop sequences and the standard
    response delimiters), stripped. May be empty."""
    cut = len(raw)
    for seq in set(stop_sequences) | set(RESPONSE_DELIMITERS):
        i = raw.find(seq) if seq else -1
        if 0 <= i < cut:
            cut = i
    return raw[:cut].strip()


def build_critic_prompt(rubric: Rubric, *, swap: bool, instruction: str, response: str | None = None,
                        labels: tuple[str, str] = ("A", "B"), reverse: bool = False) -> str:
    """Fill a rubric template.

    Args:
        rubric: the rubric (template, options, optional few-shot examples).
        swap: False puts the good option first, so the first label means good; True swaps the meanings.
        instruction, response: the item judged (response only for pair rubrics).
        labels: the two answer words (first = `{label_a}`).
        reverse: render the few-shot examples in reverse order.
    Returns:
        The prompt, ending in "Answer:".
    """
    a, b = (rubric.bad_option, rubric.good_option) if swap else (rubric.good_option, rubric.bad_option)
    examples = list(reversed(rubric.examples)) if reverse else list(rubric.examples)
    shots = ""
    for ex in examples:
        answer = labels[0] if (ex.label == "good") != swap else labels[1]
        shot = {"label_a": labels[0], "label_b": labels[1], "instruction": ex.instruction, "answer": answer}
        if ex.response is not None:
            shot["response"] = ex.response
        shots += _fill(rubric.example_template, shot)
    fields = {"label_a": labels[0], "label_b": labels[1], "option_a": a, "option_b": b, "examples": shots,
              "instruction": instruction}
    if response is not None:
        fields["response"] = response
    return _fill(rubric.template, fields)


def build_pmi_prompt(template: str, instruction: str) -> str:
    """The PMI scorer's context: `template` with `{instruction}` filled (literal replacement)."""
    return _fill(template, {"instruction": instruction})


def _fill(template: str, fields: dict[str, str]) -> str:
    # str.format would choke on braces inside generated text; replace placeholders only.
    out = template
    for k, v in fields.items():
        out = out.replace("{" + k + "}", v)
    return out
