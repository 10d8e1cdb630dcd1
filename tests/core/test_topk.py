"""The sampler's top candidates (topk.py) and how the sampler chooses between the kernel and torch.topk.

The Triton kernel itself runs on CUDA; the CPU suite has no triton, so here: the reference's contract (the
order the kernel must give), the sampler's wiring with the kernel's entry point stood in for by the reference
(compiled and eager, the switch, the fallback when the kernel fails), and the kernel's own checks of its
input. With triton installed, `TRITON_INTERPRET=1 python -m pytest -q tests/core/test_topk.py` also runs the
kernel in Triton's interpreter against the reference (`test_kernel_in_the_interpreter_equals_the_reference`);
on the GPU, `python bench/gpu_topk.py` checks it at full size (`exact`, `exact_ties`).
"""

from __future__ import annotations

import importlib.util
import os
from typing import Any

import pytest
import torch

from stage1_core.model import sampling as S
from stage1_core.model import topk as TK
from tests.core.test_engine import _distinct_logits, _sampling


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_reference_equals_torch_topk_on_distinct_values(dtype: torch.dtype) -> None:
    x = _distinct_logits(8, 2000, seed=4).to(dtype)
    v, i = TK.reference_top(x, 300)
    tv, ti = x.topk(300, dim=-1)
    assert v.dtype == dtype and torch.equal(v, tv) and torch.equal(i, ti)


def test_reference_orders_equal_values_by_id_and_takes_the_lowest_ids_at_the_boundary() -> None:
    x = torch.tensor([[1.0, 3.0, 2.0, 3.0, 2.0, 2.0, float("-inf"), 2.0],
                      [-1.0, -0.5, -0.5, -2.0, -0.5, -3.0, -0.5, -0.25]])
    v, i = TK.reference_top(x, 4)
    assert i.tolist() == [[1, 3, 2, 4], [7, 1, 2, 4]]
    assert v.tolist() == [[3.0, 3.0, 2.0, 2.0], [-0.25, -0.5, -0.5, -0.5]]
    assert TK.reference_top(torch.zeros(1, 6), 3)[1].tolist() == [[0, 1, 2]]  # all equal: the first ids
    assert TK.reference_top(x, 8)[1][0, -1].item() == 6  # -inf last


def test_kernel_refuses_input_it_does_not_take_before_launching() -> None:
    with pytest.raises(ValueError, match="bf16/fp16/float32"):
        TK.top_candidates(torch.zeros(2, 10, dtype=torch.int32), 3)
    with pytest.raises(ValueError, match="1 <= k <= vocab"):
        TK.top_candidates(torch.zeros(2, 10), 11)
    with pytest.raises(ValueError, match="contiguous last dimension"):
        TK.top_candidates(torch.zeros(10, 2).t(), 1)
    with pytest.raises(ValueError, match="power of two"):
        TK.top_candidates(torch.zeros(2, 10), 3, splits=3)


def test_kernel_is_not_used_without_cuda_and_the_switch_reads_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    assert not TK.usable(torch.zeros(2, 4))  # CPU logits: torch.topk
    monkeypatch.delenv(TK.TOPK_ENV, raising=False)
    assert TK.enabled() == TK.DEFAULT == S.Sampler().kernel
    monkeypatch.setattr(TK, "DEFAULT", not TK.DEFAULT)
    assert TK.enabled() == TK.DEFAULT
    monkeypatch.setenv(TK.TOPK_ENV, "0")
    assert not TK.enabled() and not S.Sampler().kernel
    monkeypatch.setenv(TK.TOPK_ENV, "1")
    assert TK.enabled() and S.Sampler().kernel
    logits = _distinct_logits(4, 500)
    sampler = S.Sampler(kernel=True)
    seeds = torch.tensor([S.row_seed(3, f"u{i}") for i in range(4)])
    sampler(logits, _sampling(0.7, 0.9, 0), seeds, seeds)
    assert not sampler.kernel_used


def _stand_in(monkeypatch: pytest.MonkeyPatch, fn: Any) -> list[int]:
    """Make the sampler believe the kernel is usable on CPU logits, with `fn` as its entry point."""
    calls: list[int] = []

    def top(logits: torch.Tensor, k: int) -> Any:
        if not torch.compiler.is_compiling():  # counts eager calls (a traced list append would re-trace)
            calls.append(logits.shape[0])
        return fn(logits, k)

    monkeypatch.setattr(TK, "usable", lambda logits: True)
    monkeypatch.setattr(TK, "top_candidates", top)
    return calls


@pytest.mark.parametrize("t,top_p,top_k", [(0.7, 0.9, 0), (0.8, 0.95, 40), (1.3, 1.0, 7)])
def test_the_draw_through_the_kernels_entry_point_draws_the_same_tokens(monkeypatch: pytest.MonkeyPatch, t: float,
                                                                       top_p: float, top_k: int) -> None:
    """Compiled (traced once, no graph break) and eager, the draw that takes the kernel's candidates draws
    what the torch.topk draw draws (distinct logits: one right order)."""
    from torch._dynamo.testing import CompileCounter

    calls = _stand_in(monkeypatch, TK.reference_top)
    torch._dynamo.reset()
    counter = CompileCounter()
    sampler = S.Sampler(compile=counter, kernel=True)
    logits = _distinct_logits(16, 1500, seed=6).to(torch.bfloat16)
    seeds = torch.tensor([S.row_seed(8, f"k{i}") for i in range(16)])
    smp = _sampling(t, top_p, top_k)
    for step in range(3):
        steps = torch.full((16,), step, dtype=torch.long)
        want = S.sample(logits, smp, seeds, steps)
        assert torch.equal(sampler(logits, smp, seeds, steps), want)
        assert sampler.kernel_used and sampler.use_compiled
        assert torch.equal(sampler(logits, smp, seeds, steps, compiled=False), want)
    assert counter.frame_count == 1 and sampler.compile_failed is None
    assert len(calls) == 3  # each eager draw called it
    sampler.kernel = False
    n = len(calls)
    assert torch.equal(sampler(logits, smp, seeds, steps), want) and not sampler.kernel_used and len(calls) == n


def test_a_failing_kernel_falls_back_to_torch_topk_and_out_of_memory_is_raised(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(logits: torch.Tensor, k: int) -> Any:
        raise RuntimeError("triton: PTX does not build here")

    _stand_in(monkeypatch, broken)
    sampler = S.Sampler(kernel=True)
    logits = _distinct_logits(4, 800, seed=7)
    seeds = torch.tensor([S.row_seed(2, f"b{i}") for i in range(4)])
    smp = _sampling(0.9, 0.9, 0)
    assert torch.equal(sampler(logits, smp, seeds, seeds), S.sample(logits, smp, seeds, seeds))
    assert not sampler.kernel and not sampler.kernel_used and "PTX does not build" in (sampler.kernel_failed or "")

    def oom(logits: torch.Tensor, k: int) -> Any:
        raise torch.OutOfMemoryError("CUDA out of memory. fake")

    _stand_in(monkeypatch, oom)
    sampler = S.Sampler(kernel=True)
    with pytest.raises(torch.OutOfMemoryError):  # the engine backs off; the kernel stays on
        sampler(logits, smp, seeds, seeds)
    assert sampler.kernel and sampler.kernel_failed is None


@pytest.mark.skipif(importlib.util.find_spec("triton") is None or os.environ.get("TRITON_INTERPRET") != "1",
                    reason="needs triton and TRITON_INTERPRET=1 (the kernel on CPU tensors)")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_kernel_in_the_interpreter_equals_the_reference(monkeypatch: pytest.MonkeyPatch, dtype: torch.dtype) -> None:
    monkeypatch.setattr(TK, "_RADIX", None)  # defined under the interpreter
    g = torch.Generator().manual_seed(0)
    cases = [torch.randn(3, 1000, generator=g), (torch.randn(3, 1000, generator=g) * 2).round(),
             torch.zeros(2, 700), -torch.rand(2, 513, generator=g)]
    cases[0][:, ::3] = float("-inf")
    for x in cases:
        x = x.to(dtype)
        for k, splits in ((1, 16), (17, 4), (300, 1), (x.shape[1], 2)):  # 16 splits of a short row: empty ones
            got = TK.top_candidates(x, k, block=128, splits=splits)
            want = TK.reference_top(x, k)
            assert torch.equal(got[1], want[1]) and torch.equal(got[0], want[0]), (dtype, k, splits)


def test_engine_stats_say_whether_the_draw_took_the_kernels_candidates(monkeypatch: pytest.MonkeyPatch) -> None:
    """`EngineStats.topk_kernel` (what the benchmark's `engine_topk_kernel` reports): the sampled call's
    draws took the kernel's candidates, with the same tokens as torch.topk's; greedy never does."""
    from stage1_core.model import engine as E
    from tests.core.test_engine import STOPS, _prompts, _tiny, _TinyTokenizer

    model = _tiny("gemma3", std=0.1)
    prompts, ids = _prompts(5, 96, seed=3), [f"t{i}" for i in range(5)]
    eng = E.Engine(model, _TinyTokenizer(96), eos_ids=[2], slots=3, compile=False)
    eng.sampler.kernel = False
    want = eng.generate(prompts, ids, 10, 0.8, 0.9, 0, STOPS, seed=2)
    assert not eng.stats.topk_kernel
    calls = _stand_in(monkeypatch, TK.reference_top)
    eng.sampler.kernel = True
    assert eng.generate(prompts, ids, 10, 0.8, 0.9, 0, STOPS, seed=2) == want
    assert eng.stats.topk_kernel and calls
    eng.generate(prompts, ids, 10, 0.0, 1.0, 0, STOPS, seed=2)
    assert not eng.stats.topk_kernel
