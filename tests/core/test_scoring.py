"""Prefix-broadcast critic scoring (stage1_core.model.scoring) against the plain full-prompt forward.

Tiny random models of every supported family (no weights needed) and the real embedded gemma-3-270m:
the prefix path must equal the plain left-padded forward, inside and past sliding windows, at batch
sizes 1, 3 and 256, and must never materialise the prefix K/V once per row.
"""

from __future__ import annotations

import pytest

from stage1_core.model import scoring

_AB = ["A", " A", "B", " B"]
_ITEMS = [
    ("Hi", "Ok"),
    ("Name a fruit.", "Apple."),
    ("Explain why the sky is blue.", "Sunlight is scattered by air molecules, and blue light scatters the most."),
    ("Say hi.", "Hello!"),
    ("Write a simple recipe for a lemon cake.", "Whisk two eggs with a cup of sugar, fold in a cup of flour and the "
     "zest of one lemon, pour it into a greased tin and bake at 180 degrees for forty minutes."),
]


def test_prefix_groups_partition() -> None:
    head_a, head_b = list(range(100, 150)), list(range(100, 120)) + list(range(300, 330))
    enc = [head_a + [1, 2], [7, 8, 9], head_b + [5], head_a + [3], head_b + [6, 6], head_a[:30], head_a + [1, 2]]
    groups, rest = scoring.prefix_groups(enc)
    # both families get their own 50-token prefix; the short prompt that is a prefix of family A joins
    # neither (it would cut A's prefix to 29 tokens); exact duplicates keep a 1-token suffix
    assert {tuple(sorted(m)): p for p, m in groups} == {(0, 3, 6): 50, (2, 4): 50} and sorted(rest) == [1, 5]
    assert scoring.prefix_groups([head_a, head_a]) == ([(49, [0, 1])], [])
    assert scoring.prefix_groups([[1] + head_a[:14] + [2], [1] + head_a[:14] + [3]])[0] == []  # 15 tokens: too short
    assert scoring.prefix_groups([[1] + head_a[:15] + [2], [1] + head_a[:15] + [3]])[0] == [(16, [0, 1])]
    assert scoring.prefix_groups([]) == ([], [])


# --------------------------------------------------------------------------- tiny random models


def _plain(model, encoded, cands, pad_id=0):
    """Reference: one left-padded full-prompt forward, log-softmax of the last position."""
    import torch

    width = max(len(e) for e in encoded)
    ids = torch.full((len(encoded), width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for r, e in enumerate(encoded):
        ids[r, width - len(e):] = torch.tensor(e)
        mask[r, width - len(e):] = 1
    with torch.inference_mode():
        logits = model(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0),
                       use_cache=False, logits_to_keep=1).logits[:, -1]
    return torch.log_softmax(logits.float(), -1)[:, cands].tolist()


def _tiny(family: str):
    import torch
    import transformers as T

    common = dict(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=16, max_position_embeddings=256)
    cfg = {
        "llama": lambda: T.LlamaConfig(**common),
        "mistral": lambda: T.MistralConfig(**common, sliding_window=12),
        "qwen2": lambda: T.Qwen2Config(**common, use_sliding_window=True, sliding_window=12, max_window_layers=1),
        "qwen3": lambda: T.Qwen3Config(**common, use_sliding_window=True, sliding_window=12, max_window_layers=1),
        "gemma2": lambda: T.Gemma2Config(**common, sliding_window=12, query_pre_attn_scalar=16,
                                         attn_logit_softcapping=20.0, final_logit_softcapping=10.0),
        "gemma3": lambda: T.Gemma3TextConfig(**common, sliding_window=12, query_pre_attn_scalar=16,
                                             layer_types=["sliding_attention", "full_attention", "sliding_attention"],
                                             final_logit_softcapping=10.0),
    }[family]()
    torch.manual_seed(0)
    model = T.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    assert type(model).__name__ in scoring.SUPPORTED
    return model


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3"])
def test_tiny_models_match_plain_forward(family: str) -> None:
    import random

    model = _tiny(family)
    rng = random.Random(1)
    prefix = [rng.randrange(1, 97) for _ in range(20)]  # longer than the sliding window (12)
    other = prefix[:3] + [rng.randrange(1, 97) for _ in range(24)]
    encoded = [prefix + [rng.randrange(1, 97) for _ in range(n)] for n in (1, 3, 7, 2, 9)]
    encoded += [other + [rng.randrange(1, 97) for _ in range(n)] for n in (4, 1)]
    encoded.append([5, 6, 7])  # no shared prefix: left to the plain path
    cands = [3, 11, 42]
    ref = _plain(model, encoded, cands)
    scorer = scoring.PrefixScorer(model, pad_id=0, device="cpu")
    assert scorer.supported()
    for bs in (1, 3, 256):
        out, rest = scorer.score(encoded, cands, bs)
        assert rest == [7] and sorted(out) == list(range(7))
        assert max(abs(a - b) for i in out for a, b in zip(out[i], ref[i])) < 1e-4
    # the model is left as it was: its own attention implementation, usable without a context
    assert model.config._attn_implementation != scoring.ATTN_NAME
    assert max(abs(a - b) for x, y in zip(_plain(model, encoded, cands), ref) for a, b in zip(x, y)) == 0.0


def test_unsupported_model_is_left_to_the_plain_path() -> None:
    import transformers as T

    model = T.GPT2LMHeadModel(T.GPT2Config(vocab_size=50, n_embd=32, n_layer=1, n_head=2, n_positions=64)).eval()
    scorer = scoring.PrefixScorer(model, pad_id=0, device="cpu")
    enc = [list(range(1, 30)) + [40], list(range(1, 30)) + [41]]
    assert not scorer.supported() and scorer.score(enc, [1, 2], 8) == ({}, [0, 1])


def test_attention_outside_a_scoring_pass_fails_loudly() -> None:
    import torch

    class Module:
        layer_idx = 0

    q = torch.zeros(1, 2, 3, 4)
    with pytest.raises(RuntimeError, match="only inside PrefixScorer.score"):
        scoring.prefix_attention(Module(), q, q[:, :1], q[:, :1], None)


# --------------------------------------------------------------------------- the embedded model


def _critic_prompts(kind: str = "pair", n_items: int = 4) -> list[str]:
    from stage1_core.infra.config import load_pilot_config
    from stage1_core.phases.prompts import build_critic_prompt

    critic = load_pilot_config().critic
    rubric = critic.pair_rubric if kind == "pair" else critic.instruction_rubric
    return [build_critic_prompt(rubric, swap=swap, instruction=ins, response=resp if kind == "pair" else None,
                                labels=tuple(critic.labels)) for ins, resp in _ITEMS[:n_items] for swap in (False, True)]


def _scorer(backend):
    return scoring.PrefixScorer(backend.model, backend.pad_id, backend.device, backend._lock)


def _diff(out: dict[int, list[float]], ref: list[dict[str, float]]) -> float:
    return max(abs(v - ref[i][c]) for i, row in out.items() for v, c in zip(row, _AB))


@pytest.mark.real_model
def test_real_prefix_scoring_matches_plain(real_backend) -> None:
    prompts = _critic_prompts(n_items=3)
    encoded = real_backend.encode(prompts, "critic prompt")
    groups, rest = scoring.prefix_groups(encoded)
    assert len(groups) == 2 and not rest and all(p >= 150 for p, _ in groups)  # one long prefix per swap order
    assert len({len(encoded[i]) - p for p, m in groups for i in m}) >= 3  # mixed suffix lengths
    plain = real_backend._next_token_logprobs_plain(prompts, _AB)
    assert len({round(r["A"], 3) for r in plain}) == len(prompts)  # distinct rows: input order is checked too
    cands = list(real_backend._candidate_ids(_AB).values())
    scorer = _scorer(real_backend)
    for bs in (1, 3, 256):
        out, rest = scorer.score(encoded, cands, bs)
        assert rest == [] and sorted(out) == list(range(len(prompts)))
        assert _diff(out, plain) < 1e-4
    finished: list[int] = []
    assert _max_diff(real_backend.next_token_logprobs(prompts, _AB, batch_size=3, progress=finished.append), plain) < 1e-4
    assert sum(finished) == len(prompts) and max(finished) <= 3


def _max_diff(a: list[dict[str, float]], b: list[dict[str, float]]) -> float:
    assert len(a) == len(b) and all(set(x) == set(y) for x, y in zip(a, b))
    return max(abs(x[c] - y[c]) for x, y in zip(a, b) for c in x)


@pytest.mark.real_model
@pytest.mark.parametrize("window", ["past_prefix", "inside_prefix"])
def test_real_sliding_window_matches_plain(real_backend, monkeypatch: pytest.MonkeyPatch, window: str) -> None:
    prompts = _critic_prompts(n_items=2)
    encoded = real_backend.encode(prompts, "critic prompt")
    plen = min(p for p, _ in scoring.prefix_groups(encoded)[0])
    # past_prefix: prefix < window < prefix + suffix; inside_prefix: the window (and the sliding layers'
    # cache) keeps only the prefix's tail
    w = plen + 4 if window == "past_prefix" else 40
    assert max(len(e) for e in encoded) > w
    monkeypatch.setattr(real_backend.model.config, "sliding_window", w)
    for m in real_backend.model.modules():
        if getattr(m, "sliding_window", None) is not None and hasattr(m, "q_proj"):
            monkeypatch.setattr(m, "sliding_window", w)
    plain = real_backend._next_token_logprobs_plain(prompts, _AB)
    out, rest = _scorer(real_backend).score(encoded, list(real_backend._candidate_ids(_AB).values()), 4)
    assert rest == [] and _diff(out, plain) < 1e-4


@pytest.mark.real_model
def test_real_no_per_row_prefix_copy(real_backend) -> None:
    """While suffixes are scored (prefixes already memoized), the only tensors of key-length rows of
    head_dim (a K/V layout) that any op reads or writes are the batch-1 prefix K/V themselves: the
    prefix is read in place, never padded, stacked or expanded per row (the DynamicCache-per-batch
    implementation this replaced built (B, kv_heads, P, head_dim) per layer per batch)."""
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_leaves

    config = real_backend.model.config
    head_dim, kv_heads = config.head_dim, config.num_key_value_heads
    prompts = _critic_prompts("instruction", n_items=3)
    groups, _ = scoring.prefix_groups(real_backend.encode(prompts, "critic prompt"))
    shortest, longest = min(p for p, _ in groups), max(p for p, _ in groups)
    assert min(len(m) for _, m in groups) >= 2 and 2 * shortest > longest  # a per-row copy would be caught
    seen: list[tuple[int, ...]] = []

    class KVShapes(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            result = func(*args, **(kwargs or {}))
            for t in tree_leaves((args, kwargs, result)):
                if isinstance(t, torch.Tensor) and t.dim() >= 2 and t.shape[-1] == head_dim \
                        and t.shape[-2] >= shortest:
                    seen.append(tuple(t.shape))
            return result

    real_backend.next_token_logprobs(prompts, _AB)  # the prefixes are memoized now
    with KVShapes():
        real_backend.next_token_logprobs(prompts, _AB)
    biggest = max((torch.Size(s).numel() for s in seen), default=0)
    assert seen and biggest <= kv_heads * longest * head_dim, sorted(set(seen))[-3:]


@pytest.mark.real_model
def test_real_mixed_with_prompts_of_no_shared_prefix(real_backend) -> None:
    odd = ["The capital of France is", "1, 2, 3, 4,"]
    pairs = _critic_prompts(n_items=2)
    mixed = pairs[:2] + odd[:1] + pairs[2:] + odd[1:]
    groups, rest = scoring.prefix_groups(real_backend.encode(mixed, "critic prompt"))
    assert sorted(sorted(m) for _, m in groups) == [[0, 3], [1, 4]] and sorted(rest) == [2, 5]
    plain = real_backend._next_token_logprobs_plain(mixed, _AB)
    assert _max_diff(real_backend.next_token_logprobs(mixed, _AB, batch_size=3), plain) < 1e-4


@pytest.mark.real_model
def test_real_prefix_memo_reused_then_invalidated(real_backend, monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    prompts = _critic_prompts(n_items=2)
    first = real_backend.next_token_logprobs(prompts, _AB)
    prefix_passes: list[int] = []
    forward = real_backend.model.forward
    monkeypatch.setattr(real_backend.model, "forward",
                        lambda *a, **k: (prefix_passes.append(1) if k.get("use_cache") else None, forward(*a, **k))[1])
    assert real_backend.next_token_logprobs(prompts, _AB) == first and prefix_passes == []  # prefixes from the memo
    with torch.no_grad():
        real_backend.model.lm_head.weight.mul_(1.0)  # an in-place update (same values): the memo must not be trusted
    assert _max_diff(real_backend.next_token_logprobs(prompts, _AB), first) < 1e-6 and len(prefix_passes) == 2


# --------------------------------------------------------------------------- critic.batch_size


class _Recording:
    """A backend that takes batch_size/progress (as HFBackend does) and records its calls."""

    fingerprint = {"id": "recording", "weights_sha256": "0"}

    def __init__(self) -> None:
        self.calls: list[tuple[int, int | None]] = []

    def next_token_logprobs(self, prompts, candidates, batch_size=None, progress=None):
        self.calls.append((len(prompts), batch_size))
        for k in range(0, len(prompts), batch_size or 16):
            if progress is not None:
                progress(len(prompts[k:k + (batch_size or 16)]))
        return [{c: -1.0 - 0.5 * j for j, c in enumerate(candidates)} for _ in prompts]


@pytest.mark.parametrize("size", ["auto", 3])
def test_critic_hands_the_backend_whole_lists(size) -> None:
    from stage1_core.infra.config import load_pilot_config
    from stage1_core.phases.critic import ABCritic

    cfg = load_pilot_config().critic.model_copy(update={"batch_size": size, "label_swap": True, "calibrate": False})
    backend, ticks = _Recording(), []
    critic = ABCritic(backend, cfg)
    items = [(f"Instruction {k}.", None) for k in range(7)]
    assert len(critic.score("instruction", items, progress=ticks.append)) == 7
    per_item = len(critic.variants("instruction"))
    assert backend.calls == [(7 * per_item, None if size == "auto" else 3)] and sum(ticks) == 7


def test_critic_batch_size_config() -> None:
    from pydantic import ValidationError

    from stage1_core.infra.config import load_pilot_config

    critic = load_pilot_config().critic
    assert critic.batch_size == "auto" and critic.model_copy(update={"batch_size": 256}).batch_size == 256
    for bad in (0, 5000, "big"):
        with pytest.raises(ValidationError):
            type(critic).model_validate({**critic.model_dump(), "batch_size": bad})


@pytest.mark.real_model
def test_real_out_of_memory_halves_the_critic_batch_then_fails_clearly(real_backend, monkeypatch) -> None:
    import torch

    from stage1_core.infra.errors import DeviceOOM

    prompts = _critic_prompts(n_items=5) + ["Is this a question? Answer:"]  # two groups of 5, one plain prompt
    reference = real_backend.next_token_logprobs(prompts, _AB, batch_size=2)
    forward, rows = real_backend.model.forward, []

    def limited(*args, **kwargs):
        n = (kwargs.get("input_ids") if kwargs.get("input_ids") is not None else args[0]).shape[0]
        rows.append(n)
        if n > limit:
            raise torch.OutOfMemoryError(f"fake: {n} rows do not fit")
        return forward(*args, **kwargs)

    monkeypatch.setattr(real_backend.model, "forward", limited)
    limit = 2
    got = real_backend.next_token_logprobs(prompts, _AB, batch_size=8)
    assert _max_diff(got, reference) < 1e-5  # every prompt scored, in input order
    assert 5 in rows and 4 in rows and max(rows[rows.index(4) + 1:]) <= 2  # batch 8 (5 rows) -> 4 -> 2
    # An OOM after some rows were reported (the second group's batch): the rerun at half the batch does
    # not report those rows again.
    limit, multi = 8, []

    def second_batch_fails(*args, **kwargs):
        n = (kwargs.get("input_ids") if kwargs.get("input_ids") is not None else args[0]).shape[0]
        multi.extend([n] if n > 1 else [])
        if len(multi) == 2:
            raise torch.OutOfMemoryError("fake: the second batch does not fit")
        return forward(*args, **kwargs)

    monkeypatch.setattr(real_backend.model, "forward", second_batch_fails)
    finished: list[int] = []
    got = real_backend.next_token_logprobs(prompts, _AB, batch_size=8, progress=finished.append)
    assert _max_diff(got, reference) < 1e-4 and multi[:2] == [5, 5]  # mixed batch sizes: float rounding
    assert sum(finished) == len(prompts), finished
    monkeypatch.setattr(real_backend.model, "forward", limited)
    limit = 0
    with pytest.raises(DeviceOOM, match="one at a time"):
        real_backend.next_token_logprobs(prompts, _AB, batch_size=4)
