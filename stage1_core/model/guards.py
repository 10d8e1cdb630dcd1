"""Contamination guards of completion mode: chat-control tokens, BOS policy, next-token sentinels.

A base model must never see a chat format. `find_control_token_ids` lists the chat-control ids a
tokenizer has and `check_control_tokens` fails if any appears in an encoded prompt;
`resolve_bos_policy` decides per family whether BOS is prepended; `run_sentinels` checks, at load,
that prompts with a known base-model continuation rank it near the top (`SENTINELS`).
`stage1_core.model.hf_backend.HFBackend` runs all of them at load; nothing else may skip them.

Run it: used by the loader (`PYTHONPATH=. python -m stage1_core.cli.model` loads a model and prints the
sentinel results in its fingerprint); tests: `python -m pytest -q tests/core/test_model.py`.
"""

from __future__ import annotations

import contextlib
from typing import Any, ContextManager, Literal, Mapping, NamedTuple, Sequence

from stage1_core.infra.errors import InputError, ModelGuardError

CHAT_CONTROL_TOKENS: tuple[str, ...] = (
    "<start_of_turn>", "<end_of_turn>", "<|im_start|>", "<|im_end|>", "<|start_header_id|>",
    "<|end_header_id|>", "<|eot_id|>", "[INST]", "[/INST]", "<|user|>", "<|assistant|>", "<|system|>",
)
"""Token strings that belong to chat formats; their ids must never appear in an encoded prompt."""

BOS_POLICY_BY_FAMILY: dict[str, str] = {
    "gemma": "always", "gemma2": "always", "gemma3": "always", "gemma3_text": "always",
    "llama": "always_unless_control", "mistral": "always_unless_control",
    "qwen2": "never", "qwen3": "never",
}
"""BOS policy by model family (config.json `model_type` or GGUF `general.architecture`).
`always_unless_control`: always, unless the tokenizer's BOS token is a chat-control token."""


class Sentinel(NamedTuple):
    """A next-token check: every token of `expected` must rank within `top_k` after `prompt`."""

    prompt: str
    expected: str
    top_k: int


SENTINELS: list[Sentinel] = [
    Sentinel("1, 2, 3, 4,", " 5", 1),
    Sentinel("The capital of France is", " Paris", 5),
    Sentinel("Paris is the capital of", " France", 3),
    Sentinel("The sun rises in the", " east", 3),
]
"""Sentinels run at every load (read at load time, so tests may replace this list). The last two
fail on gemma-3-270m without `<bos>` (ranks ~120 and ~146), the first two do not."""


def resolve_bos_policy(family: str, requested: str, bos_token: str | None = None) -> Literal["always", "never"]:
    """BOS policy for a family: `requested` if always/never, else the family table.

    Args:
        family: model family (e.g. "gemma3", "llama").
        requested: "auto", "always" or "never" (ModelConfig.bos_policy).
        bos_token: the tokenizer's BOS token string, if known (matters for llama/mistral).
    Returns:
        "always" or "never".
    Raises:
        InputError: "auto" and the family is not in BOS_POLICY_BY_FAMILY.
    """
    if requested in ("always", "never"):
        return requested  # type: ignore[return-value]
    rule = BOS_POLICY_BY_FAMILY.get(family)
    if rule is None:
        raise InputError(f"family {family} has no BOS policy; pass --bos-policy always|never",
                         field="model.bos_policy", expected="always or never",
                         fix=f"set model.bos_policy (--bos-policy) to 'always' if {family} models were trained "
                             "with a BOS token, else 'never'")
    if rule == "always_unless_control":
        return "never" if bos_token in CHAT_CONTROL_TOKENS else "always"
    return rule  # type: ignore[return-value]


def find_control_token_ids(tokenizer: Any) -> dict[int, str]:
    """Ids of the chat-control tokens that exist in a tokenizer's vocabulary (added tokens included).

    Args:
        tokenizer: a transformers tokenizer.
    Returns:
        id -> token string for every CHAT_CONTROL_TOKENS entry the vocabulary has.
    """
    vocab = tokenizer.get_vocab()
    return {int(vocab[t]): t for t in CHAT_CONTROL_TOKENS if t in vocab}


def check_control_tokens(encoded: Sequence[Sequence[int]], control_ids: Mapping[int, str], what: str = "prompt") -> None:
    """Fail if any chat-control token id appears in any encoded sequence.

    Args:
        encoded: token id lists.
        control_ids: id -> token string (from find_control_token_ids).
        what: what the sequences are, for the message.
    Raises:
        ModelGuardError: naming the sequence index and the token.
    """
    if not control_ids:
        return
    for i, ids in enumerate(encoded):
        hits = [control_ids[t] for t in ids if t in control_ids]
        if hits:
            raise ModelGuardError(f"{what} {i} encodes to chat-control token(s) {sorted(set(hits))}; a base model "
                                  "must never see a chat format")


def run_sentinels(model: Any, tokenizer: Any, bos_id: int | None, control_ids: Mapping[int, str],
                  sentinels: Sequence[Sentinel], lock: ContextManager[Any] | None = None, *,
                  device: str = "cpu", model_id: str = "model", bos_policy: str = "") -> list[dict[str, Any]]:
    """Run next-token sentinels on a loaded causal LM (one forward per sentinel, no sampling).

    Args:
        model: the transformers causal LM (eval mode, on `device`).
        tokenizer: its tokenizer (prompts are encoded without special tokens, control text split).
        bos_id: BOS id to prepend, or None (the resolved BOS policy).
        control_ids: chat-control ids (find_control_token_ids); a sentinel holding one fails.
        sentinels: the checks to run.
        lock: held around each forward (the backend's lock), if given.
        device: where the input ids go.
        model_id: the model's id, for the error message.
        bos_policy: the resolved BOS policy, for the error message.
    Returns:
        Per sentinel {prompt, expected, top_k, passed, steps: [{token, rank, top}]}.
    Raises:
        ModelGuardError: a sentinel failed, or a sentinel encodes to a chat-control token.
    """
    import torch

    guard = lock if lock is not None else contextlib.nullcontext()
    results, failures = [], []
    for s in sentinels:
        p_ids, f_ids = [list(x) for x in tokenizer([s.prompt, s.prompt + s.expected], add_special_tokens=False,
                                                   split_special_tokens=True)["input_ids"]]
        k = 0
        while k < min(len(p_ids), len(f_ids)) and p_ids[k] == f_ids[k]:
            k += 1
        ids = ([bos_id] if bos_id is not None else []) + f_ids
        off = len(ids) - len(f_ids)
        check_control_tokens([ids], control_ids, "sentinel")
        keep = len(f_ids) - k + 1  # logits of the positions that predict the expected tokens (+1 spare)
        with guard, torch.inference_mode():
            logits = model(input_ids=torch.tensor([ids], device=device), logits_to_keep=keep).logits[0].float()
        base = len(ids) - logits.shape[0]  # absolute position of logits row 0
        steps, ok = [], k < len(f_ids)
        for j in range(max(k, 1 - off), len(f_ids)):
            row = logits[off + j - 1 - base]
            rank = int((row > row[f_ids[j]]).sum()) + 1
            top = [tokenizer.decode([t]) for t in torch.topk(row, max(s.top_k, 3)).indices.tolist()]
            steps.append({"token": tokenizer.decode([f_ids[j]]), "rank": rank, "top": top})
            ok = ok and rank <= s.top_k
        results.append({"prompt": s.prompt, "expected": s.expected, "top_k": s.top_k, "passed": ok, "steps": steps})
        if not ok:
            failures.append(f"{s.prompt!r} -> {s.expected!r} (top {s.top_k}): got " + "; ".join(
                f"{st['token']!r} rank {st['rank']}, top {st['top']}" for st in steps))
    if failures:
        raise ModelGuardError(f"sentinel(s) failed for {model_id} (bos_policy={bos_policy}): "
                              + " | ".join(failures) + ". The model, tokenizer or BOS policy is wrong for completion mode.")
    return results
