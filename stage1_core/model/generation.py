"""Stop handling shared by every backend: find the earliest stop sequence, name the stop reason.

Stop reasons (SPEC): `blank_line` (a stop sequence made only of whitespace, e.g. "\\n\\n"),
`next_block` (any other stop sequence: the model began a new Instruction/Response block or another
delimiter the run stops on), `eos` (the model emitted its end-of-sequence token), `token_limit`
(max_new_tokens reached with no stop).
"""

from __future__ import annotations

from stage1_core.infra.schemas import StopReason


def find_stop(text: str, stop_sequences: list[str]) -> tuple[int, str] | None:
    """Earliest occurrence of any stop sequence in `text`.

    Returns:
        (index, sequence) of the earliest match (the longest sequence wins a tie), or None.
    """
    best: tuple[int, str] | None = None
    for seq in stop_sequences:
        if not seq:
            continue
        i = text.find(seq)
        if i < 0:
            continue
        if best is None or i < best[0] or (i == best[0] and len(seq) > len(best[1])):
            best = (i, seq)
    return best


def reason_for_sequence(seq: str) -> StopReason:
    """`blank_line` for whitespace-only sequences, `next_block` for every other delimiter."""
    return "blank_line" if seq.strip() == "" else "next_block"


def classify_stop(text: str, stop_sequences: list[str], hit_eos: bool) -> StopReason:
    """Stop reason of a finished completion.

    Args:
        text: decoded continuation (EOS token excluded).
        stop_sequences: the call's stop sequences.
        hit_eos: the last generated token was EOS.
    Returns:
        A stop sequence in the text wins (it came before EOS or the limit); then eos; else token_limit.
    """
    found = find_stop(text, stop_sequences)
    if found is not None:
        return reason_for_sequence(found[1])
    return "eos" if hit_eos else "token_limit"


def cut_at_stop(text: str, stop_sequences: list[str]) -> str:
    """`text` up to (excluding) the earliest stop sequence."""
    found = find_stop(text, stop_sequences)
    return text if found is None else text[: found[0]]
