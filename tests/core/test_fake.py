"""The fake backend follows the Backend contract on sampling: randomness per stable item id, never
per batch position (stage1_core.model.backend)."""

from __future__ import annotations

import random

import pytest

from stage1_core.model.backend import item_ids
from stage1_core.model.fake import FakeBackend
from stage1_core.phases.prompts import build_response_prompt
from stage1_core.infra.schemas import GenerationParams

PARAMS = GenerationParams(max_new_tokens=48, temperature=0.9, top_p=0.95, stop_sequences=["\n\n"])


def _items() -> tuple[list[str], list[str]]:
    """Ten list prompts and ten response prompts, with ids as the pipeline names them."""
    prompts = [f"Come up with tasks.\n1. Write a haiku about rain number {i}.\n2." for i in range(10)]
    prompts += [build_response_prompt(f"Explain topic {i} in two sentences.", []) for i in range(10)]
    ids = [f"r01-p{i:03d}" for i in range(10)] + [f"r01-p{i:03d}-i00" for i in range(10)]
    return prompts, ids


def _texts(backend: FakeBackend, prompts: list[str], ids: list[str], seed: int) -> dict[str, str]:
    return {i: c.text for i, c in zip(ids, backend.generate(prompts, PARAMS, seed, ids=ids))}


def test_same_ids_same_texts_at_any_batch_size_and_order() -> None:
    b = FakeBackend("fake:4,runaway=0.3,limit=0.2")
    prompts, ids = _items()
    together = _texts(b, prompts, ids, seed=11)
    one_by_one: dict[str, str] = {}
    for p, i in zip(prompts, ids):
        one_by_one.update(_texts(b, [p], [i], seed=11))
    in_threes: dict[str, str] = {}
    for k in range(0, len(prompts), 3):
        in_threes.update(_texts(b, prompts[k:k + 3], ids[k:k + 3], seed=11))
    order = list(range(len(prompts)))
    random.Random(0).shuffle(order)
    shuffled = _texts(b, [prompts[k] for k in order], [ids[k] for k in order], seed=11)
    assert together == one_by_one == in_threes == shuffled
    assert len(set(together.values())) > 10  # the items really differ from each other
    # The run seed still matters: another seed, other texts (for most items).
    other = _texts(b, prompts, ids, seed=12)
    assert sum(other[i] != together[i] for i in ids) >= 10


def test_the_id_not_the_position_picks_the_random_stream() -> None:
    b = FakeBackend("fake:4")
    prompt = "Come up with tasks.\n1. Write a haiku about rain.\n2."
    a = b.generate([prompt, prompt], PARAMS, 3, ids=["x", "y"])
    swapped = b.generate([prompt, prompt], PARAMS, 3, ids=["y", "x"])
    assert a[0].text != a[1].text  # same prompt, different ids: different samples
    assert (swapped[0], swapped[1]) == (a[1], a[0])


def test_default_ids_are_the_indices() -> None:
    b = FakeBackend("fake:2")
    prompts, _ = _items()
    assert b.generate(prompts, PARAMS, 5) == b.generate(prompts, PARAMS, 5, ids=[str(i) for i in range(len(prompts))])
    assert item_ids(["a", "b"], None) == ["0", "1"]


def test_bad_ids_are_refused() -> None:
    b = FakeBackend("fake:2")
    with pytest.raises(ValueError, match="duplicate ids \\['a'\\]"):
        b.generate(["x.\n1.", "y.\n1.", "z.\n1."], PARAMS, 0, ids=["a", "b", "a"])
    with pytest.raises(ValueError, match="3 prompts but 2 ids"):
        b.generate(["x.\n1.", "y.\n1.", "z.\n1."], PARAMS, 0, ids=["a", "b"])
