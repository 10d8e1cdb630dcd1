"""An upgrade between SFT and eval cannot silently swap the base weights (issue 19): the GGUF's sha256
can match while a newer transformers / gguf / torch dequantizes it into other float weights."""

from __future__ import annotations

import pytest

from stage1_core.infra.errors import InputError
from stage1_core.train.evaluation import check_dequantized

BUILT = {"transformers": "5.25.0", "gguf": "0.19.0", "torch": "2.13.0+cpu"}
TRAINED = {"weights_sha256": "g" * 64, "dequantized": {"weights_sha256": "a" * 64, "built_with": BUILT}}


def test_same_weights_pass() -> None:
    check_dequantized(TRAINED, {"weights_sha256": "a" * 64, "built_with": {**BUILT, "transformers": "5.26.0"}},
                      file="ad/training_summary.json")


def test_other_weights_are_refused_naming_the_versions() -> None:
    current = {"weights_sha256": "b" * 64, "built_with": {**BUILT, "transformers": "5.26.0"}}
    with pytest.raises(InputError) as e:
        check_dequantized(TRAINED, current, file="ad/training_summary.json")
    text = str(e.value)
    assert "ad/training_summary.json" in text and "dequantized.weights_sha256" in text and "5.26.0" in text


def test_not_built_yet_with_other_versions_is_refused_before_any_load() -> None:
    with pytest.raises(InputError) as e:
        check_dequantized(TRAINED, None, file="s.json", installed={**BUILT, "gguf": "0.20.0"})
    assert "gguf 0.19.0 → 0.20.0" in str(e.value)
    check_dequantized(TRAINED, None, file="s.json", installed=dict(BUILT))  # same versions: it will build the same


def test_summaries_without_the_record_pass() -> None:
    check_dequantized({"weights_sha256": "g" * 64}, None, file="s.json", installed={})
