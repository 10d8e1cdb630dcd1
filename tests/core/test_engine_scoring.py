"""The critic's plain path through the engine's prefill (`Decoder.next_token_logprobs`): the same
log-probabilities as the model's own forward, on tiny random models (fast) and the embedded model."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from stage1_core.model import decoder as D
from stage1_core.model import engine as E
from tests.core.test_engine import _prompts, _tiny, _TinyTokenizer


def _forward_logprobs(model: Any, prompts: list[list[int]]) -> torch.Tensor:
    """Each prompt alone through the model's forward (no padding): log-softmax at its last position."""
    with torch.inference_mode():
        return torch.stack([torch.log_softmax(model(input_ids=torch.tensor([p])).logits[0, -1].float(), dim=-1)
                            for p in prompts])


@pytest.mark.parametrize("kind", ["gemma3", "llama", "qwen2"])
def test_prefill_scores_equal_the_models_own_forward(kind: str) -> None:
    model = _tiny(kind)
    prompts = _prompts(9, 96, seed=5) + [[1, 7]]  # 3 to 18 tokens: past gemma3's sliding window of 6
    ref = _forward_logprobs(model, prompts)
    assert (ref.argmax(-1) != ref[0].argmax()).any()  # distinct rows: input order is checked too
    dec = E.Engine(model, _TinyTokenizer(96), eos_ids=[]).dec
    cands = [5, 17, 3, 95]
    for max_tokens in (32768, 40, 1):  # one forward; several (longest first, 1-row ones included)
        with torch.inference_mode():
            got = dec.next_token_logprobs(prompts, cands, max_tokens=max_tokens)
        assert got.dtype == torch.float32 and got.shape == (len(prompts), len(cands))
        torch.testing.assert_close(got, ref[:, cands], atol=2e-5, rtol=0)
    with torch.inference_mode():
        assert dec.next_token_logprobs([], cands).shape == (0, len(cands))


def test_compiled_prefill_scores_like_the_eager_one() -> None:
    from torch._dynamo.testing import CompileCounter

    torch._dynamo.reset()
    model = _tiny("gemma3")
    prompts = _prompts(6, 96, seed=2)
    counter = CompileCounter()
    dec = E.Engine(model, _TinyTokenizer(96), eos_ids=[], compile=counter).dec
    with torch.inference_mode():
        compiled = dec.next_token_logprobs(prompts, list(range(96)))
        assert counter.frame_count > 0 and dec.use_compiled, dec.compile_failed
        dec.use_compiled = False
        eager = dec.next_token_logprobs(prompts, list(range(96)))
    torch.testing.assert_close(compiled, eager, atol=1e-6, rtol=0)


_ODD = ["The capital of France is", "1, 2, 3, 4,", "Is a whale a fish? Answer:", "Name a primary color.\nAnswer:",
        "Q: What is 7 times 8?\nA:"]


@pytest.mark.real_model
def test_real_critic_plain_path_through_the_engine_equals_the_forward(real_backend: Any,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """Prompts without a shared prefix take the plain path; with the engine's scoring switched on (the CUDA
    default) they run through its prefill and score as the model's own forward does (float32, the CPU)."""
    ab = ["A", "B", " A", " B"]
    assert real_backend.engine() is not None
    reference = real_backend._next_token_logprobs_plain(_ODD, ab)
    calls: list[int] = []
    scores = real_backend.engine().dec.next_token_logprobs
    monkeypatch.setattr(real_backend.engine().dec, "next_token_logprobs",
                        lambda p, c, **kw: calls.append(len(p)) or scores(p, c, **kw))
    monkeypatch.setenv(D.SCORE_ENV, "1")
    finished: list[int] = []
    got = real_backend.next_token_logprobs(_ODD, ab, batch_size=2, progress=finished.append)
    assert calls == [2, 2, 1] and sum(finished) == len(_ODD)
    assert max(abs(g[c] - r[c]) for g, r in zip(got, reference) for c in ab) < 1e-4
    assert len({round(r["A"], 3) for r in reference}) == len(_ODD)  # distinct rows: input order is checked
    monkeypatch.setenv(D.SCORE_ENV, "0")  # switched off: the forward again, the engine untouched
    off = real_backend.next_token_logprobs(_ODD, ab)
    assert max(abs(g[c] - r[c]) for g, r in zip(off, reference) for c in ab) < 1e-5 and calls == [2, 2, 1]
