"""The generation engine (stage1_core/model/engine.py and its parts: stops.py, sampling.py, decoder.py,
fusion.py): stop automaton, counter-based sampling, fused projections, and exact agreement with
transformers' `generate` — on tiny random models (fast) and the embedded model."""

from __future__ import annotations

import random
from typing import Any

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from stage1_core.model import decoder as D  # noqa: E402
from stage1_core.model import engine as E  # noqa: E402
from stage1_core.model import fusion as F  # noqa: E402
from stage1_core.model import rows as R  # noqa: E402
from stage1_core.model import sampling as S  # noqa: E402
from stage1_core.model import stops as T  # noqa: E402
from stage1_core.model.generation import find_stop  # noqa: E402
from stage1_core.infra.schemas import GenerationParams  # noqa: E402

STOPS = ["\n\n", "\nInstruction:", "\nResponse:"]


# --------------------------------------------------------------------------- stop automaton

PIECES = ["<pad>", "\n", "\n\n", "\n\n\n", " ", "a", "b", "Instruction", ":", "\nIns", "truction:", "Res", "ponse",
          ":\n", "\nResponse", "x\n", "\nR", "esponse:", "tion", "Instruc", "e", " a", "\n\nb", "ab"]


def _brute(tokens: list[int], stops: list[str]) -> int | None:
    """Index of the first token after which the concatenated text holds a stop (None if never)."""
    text = ""
    for j, t in enumerate(tokens):
        text += PIECES[t]
        if find_stop(text, stops):
            return j
    return None


def _automaton(tokens: list[int], nxt: Any, fires: Any) -> int | None:
    state = 0
    for j, t in enumerate(tokens):
        if fires[state, t]:
            return j
        state = nxt[state, t]
    return None


def test_stop_tables_agree_with_find_stop_on_random_sequences() -> None:
    nxt, fires = T.build_stop_tables(PIECES, STOPS)
    rng = random.Random(0)
    hits = 0
    for _ in range(3000):
        toks = [rng.randrange(len(PIECES)) for _ in range(rng.randint(1, 12))]
        want = _brute(toks, STOPS)
        hits += want is not None
        assert _automaton(toks, nxt, fires) == want, [PIECES[t] for t in toks]
    assert 300 < hits < 2900  # both outcomes are exercised


def test_stop_split_across_tokens_and_inside_one_token() -> None:
    nxt, fires = T.build_stop_tables(PIECES, STOPS)
    ids = {p: i for i, p in enumerate(PIECES)}
    assert _automaton([ids["a"], ids["\nIns"], ids["truction:"]], nxt, fires) == 2
    assert _automaton([ids["a"], ids["\nR"], ids["esponse:"]], nxt, fires) == 2
    assert _automaton([ids["x\n"], ids["\nR"]], nxt, fires) == 1  # "x\n" + "\nR" already holds "\n\n"
    assert _automaton([ids["a"], ids["\n\nb"]], nxt, fires) == 1  # the stop sits inside one token
    assert _automaton([ids["\n"], ids["a"], ids["\n"], ids["b"]], nxt, fires) is None
    assert _automaton([ids["\n"], ids["\n"]], nxt, fires) == 1


class _ListingTokenizer:
    """A tokenizer stub that can list its vocabulary (so the engine caches its tables on disk)."""

    def __init__(self) -> None:
        self.calls = 0

    def __len__(self) -> int:
        return len(PIECES)

    def convert_ids_to_tokens(self, ids: list[int]) -> list[str]:
        return [PIECES[i] for i in ids]

    def batch_decode(self, seqs: list[list[int]], **_: Any) -> list[str]:
        self.calls += 1
        return ["".join(PIECES[t] for t in s) for s in seqs]


def test_token_texts_and_stop_tables_are_cached_on_disk(tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STAGE1_CACHE_DIR", str(tmp_path))
    tok = _ListingTokenizer()
    key = T.vocab_key(tok)
    assert T.cached_token_strings(tok, key) == PIECES and tok.calls == 1
    assert T.cached_token_strings(tok, key) == PIECES and tok.calls == 1  # read back, not decoded again
    first = T.cached_stop_tables(PIECES, STOPS, key)
    files = sorted(p.name for p in (tmp_path / "engine").iterdir())
    assert len(files) == 2 and not any(".tmp" in f for f in files)
    again = T.cached_stop_tables(PIECES, list(reversed(STOPS)), key)  # same set of stops: same file
    assert (again[0] == first[0]).all() and (again[1] == first[1]).all()
    for f in (tmp_path / "engine").iterdir():  # a corrupt cache is rebuilt, never trusted
        f.write_bytes(b"garbage")
    assert T.cached_token_strings(tok, key) == PIECES and tok.calls == 2
    rebuilt = T.cached_stop_tables(PIECES, STOPS, key)
    assert (rebuilt[0] == first[0]).all() and (rebuilt[1] == first[1]).all()


# --------------------------------------------------------------------------- sampling

def test_mul32_and_uniform_are_exact_32_bit_arithmetic() -> None:
    rng = random.Random(1)
    xs = [rng.randrange(1 << 32) for _ in range(500)] + [0, (1 << 32) - 1]
    got = S._mul32(torch.tensor(xs, dtype=torch.long), 0x846CA68B).tolist()
    assert got == [(x * 0x846CA68B) % (1 << 32) for x in xs]
    seeds = torch.tensor([S.row_seed(7, f"id{i}") for i in range(4000)])
    u = S.uniform(seeds, torch.zeros_like(seeds))
    assert float(u.min()) >= 0.0 and float(u.max()) < 1.0
    assert abs(float(u.mean()) - 0.5) < 0.02
    assert torch.equal(u, S.uniform(seeds, torch.zeros_like(seeds)))  # counter-based: no hidden state
    assert not torch.equal(u, S.uniform(seeds, torch.ones_like(seeds)))  # the step matters
    assert S.row_seed(7, "a") != S.row_seed(8, "a") and S.row_seed(7, "a") != S.row_seed(7, "b")


def _sampling(t: float, p: float, k: int) -> S.Sampling:
    return S.Sampling(S.sampling_mode(t, p, k), torch.tensor(t), torch.tensor(p), torch.tensor(k))


@pytest.mark.parametrize("top_p,top_k", [(1.0, 0), (0.9, 0), (1.0, 3)])
def test_sampling_follows_the_distribution(top_p: float, top_k: int) -> None:
    logits = torch.tensor([[2.0, 1.5, 1.0, 0.0, -1.0, -3.0]]).repeat(20000, 1)
    seeds = torch.tensor([S.row_seed(3, f"r{i}") for i in range(20000)])
    draws = S.sample(logits, _sampling(0.7, top_p, top_k), seeds, torch.zeros(20000, dtype=torch.long))
    probs = torch.softmax(logits[0] / 0.7, -1)
    if top_k:
        probs[top_k:] = 0
    if top_p < 1:
        cum = probs.cumsum(-1)
        probs[(cum - probs) >= top_p] = 0
    probs = probs / probs.sum()
    freq = torch.bincount(draws, minlength=6).float() / 20000
    assert torch.allclose(freq, probs, atol=0.015), (freq, probs)
    assert S.sample(logits[:2], _sampling(0.0, 1.0, 0), seeds[:2], seeds[:2]).tolist() == [0, 0]


def _legacy_sample(logits: Any, s: S.Sampling, seeds: Any, steps: Any) -> Any:
    """The top-k/top-p draw as it was before it read the LM head's dtype and could be compiled (08ca440):
    top-k on logits / temperature, torch.logsumexp over them."""
    scaled = logits / s.temperature
    u = S.uniform(seeds, steps)
    k = min(S.TOP_CANDIDATES, logits.shape[-1])
    vals, idx = scaled.topk(k, dim=-1)
    probs = torch.exp(vals - torch.logsumexp(scaled, dim=-1, keepdim=True))
    limit = torch.where(s.top_k > 0, s.top_k, torch.full_like(s.top_k, k))
    probs = probs * (torch.arange(k) < limit).to(probs.dtype)
    probs = probs / probs.sum(dim=-1, keepdim=True)
    cum = probs.cumsum(dim=-1)
    kept = probs * ((cum - probs) < s.top_p).to(probs.dtype)
    kcum = kept.cumsum(dim=-1)
    j = (kcum <= (u * kcum[:, -1]).unsqueeze(-1)).sum(dim=-1).clamp(max=k - 1)
    return idx.gather(-1, j.unsqueeze(-1)).squeeze(-1)


def _distinct_logits(n: int, vocab: int, seed: int = 0) -> Any:
    """(n, vocab) float32 logits with no ties, exact in bf16 (a permutation of distinct bf16 values per row)."""
    g = torch.Generator().manual_seed(seed)
    pos = torch.arange(0x3800, 0x4100, dtype=torch.int16).view(torch.bfloat16).float()  # every bf16 in [2**-15, 8)
    grid = torch.cat([pos, -pos])
    assert grid.numel() >= vocab
    return torch.stack([grid[torch.randperm(grid.numel(), generator=g)[:vocab]] for _ in range(n)])


@pytest.mark.parametrize("t,top_p,top_k", [(0.7, 0.9, 0), (1.0, 0.5, 0), (0.8, 0.95, 40), (1.3, 1.0, 7)])
def test_draw_equals_the_previous_one_in_float32_and_in_bf16(t: float, top_p: float, top_k: int) -> None:
    """The top-k is taken on the logits (not logits / temperature) in whatever dtype they come; the tokens
    are those of the previous draw on the float32 logits, and the same on their bf16 form."""
    logits = _distinct_logits(64, 1500)
    seeds = torch.tensor([S.row_seed(5, f"r{i}") for i in range(64)])
    smp = _sampling(t, top_p, top_k)
    for step in range(4):
        steps = torch.full((64,), step, dtype=torch.long)
        ref = _legacy_sample(logits, smp, seeds, steps)
        assert torch.equal(S.sample(logits, smp, seeds, steps), ref)
        assert torch.equal(S.sample(logits.to(torch.bfloat16), smp, seeds, steps), ref)
    assert torch.equal(S.sample(logits.to(torch.bfloat16), _sampling(0.0, 1.0, 0), seeds, seeds),
                       logits.argmax(-1))  # greedy on the LM head's dtype: the float32 argmax


def test_compiled_sampler_draws_like_the_eager_one_and_traces_once() -> None:
    from torch._dynamo.testing import CompileCounter

    torch._dynamo.reset()
    counter = CompileCounter()  # traces like torch.compile (fullgraph), runs the captured graph eagerly
    sampler = S.Sampler(compile=counter)
    assert sampler.use_compiled
    logits = _distinct_logits(16, 1200, seed=1)
    seeds = torch.tensor([S.row_seed(9, f"c{i}") for i in range(16)])
    smp = _sampling(0.7, 0.9, 0)
    for step in range(3):
        steps = torch.full((16,), step, dtype=torch.long)
        assert torch.equal(sampler(logits, smp, seeds, steps), S.sample(logits, smp, seeds, steps))
    assert counter.frame_count == 1 and sampler.compile_failed is None  # one trace, no graph break
    assert torch.equal(sampler(logits, _sampling(0.0, 1.0, 0), seeds, seeds), logits.argmax(-1))  # greedy: eager
    assert counter.frame_count == 1


def test_engine_sampled_tokens_same_with_the_sampler_compiled_or_not() -> None:
    from torch._dynamo.testing import CompileCounter

    torch._dynamo.reset()
    model = _tiny("gemma3", std=0.1)
    prompts = _prompts(7, 96, seed=5)
    ids = [f"s{i}" for i in range(7)]
    counter = CompileCounter()
    eng = E.Engine(model, _TinyTokenizer(96), eos_ids=[2], slots=3, compile=counter)
    eng.dec.use_compiled = False  # the sampler alone
    got = {}
    for c in (True, False):
        eng.sampler.use_compiled = c
        got[c] = eng.generate(prompts, ids, 12, 0.8, 0.9, 0, STOPS, seed=4)
        assert eng.stats.sampler_compiled == c
    assert got[True] == got[False]
    assert counter.frame_count >= 1 and eng.sampler.compile_failed is None
    assert len({t for row in got[True] for t in row}) > 15  # really sampled
    plain = E.Engine(model, _TinyTokenizer(96), eos_ids=[2], slots=5, compile=False)  # another batch, eager
    assert not plain.sampler.use_compiled
    assert plain.generate(prompts, ids, 12, 0.8, 0.9, 0, STOPS, seed=4) == got[True]


def test_a_failing_sampler_compile_falls_back_to_the_eager_draw() -> None:
    def broken(gm: Any, example_inputs: Any) -> Any:
        raise RuntimeError("no compiler here")

    torch._dynamo.reset()
    sampler = S.Sampler(compile=broken)
    logits = _distinct_logits(4, 300, seed=2)
    seeds = torch.tensor([S.row_seed(1, f"f{i}") for i in range(4)])
    steps = torch.zeros(4, dtype=torch.long)
    smp = _sampling(0.9, 0.9, 0)
    assert torch.equal(sampler(logits, smp, seeds, steps), S.sample(logits, smp, seeds, steps))
    assert not sampler.use_compiled and "no compiler here" in (sampler.compile_failed or "")

    def oom_at_run(gm: Any, example_inputs: Any) -> Any:
        def run(*args: Any) -> Any:
            raise torch.OutOfMemoryError("fake: no room to run")
        return run

    torch._dynamo.reset()
    sampler = S.Sampler(compile=oom_at_run)
    with pytest.raises(torch.OutOfMemoryError):  # no compile failure: the engine backs off
        sampler(logits, smp, seeds, steps)
    assert sampler.use_compiled and sampler.compile_failed is None


@pytest.mark.not_fast
def test_inductor_compiled_sampler_draws_like_the_eager_one_on_the_cpu() -> None:
    """The real compiler (inductor, C++ on the CPU): the same tokens as the eager draw, float32 and bf16 logits."""
    torch._dynamo.reset()
    sampler = S.Sampler(compile=True)
    logits = _distinct_logits(32, 4000, seed=3)
    seeds = torch.tensor([S.row_seed(2, f"i{i}") for i in range(32)])
    smp = _sampling(0.7, 0.9, 0)
    for x in (logits, logits.to(torch.bfloat16)):
        for step in range(3):
            steps = torch.full((32,), step, dtype=torch.long)
            assert torch.equal(sampler(x, smp, seeds, steps), S.sample(x, smp, seeds, steps))
    assert sampler.use_compiled, sampler.compile_failed


def test_the_compiled_draw_is_traced_once_and_draws_what_the_eager_one_draws() -> None:
    from torch._dynamo.testing import CompileCounter

    torch._dynamo.reset()
    counter = CompileCounter()
    sampler = S.Sampler(compile=counter)
    logits = _distinct_logits(8, 4096, seed=4)
    seeds = torch.tensor([S.row_seed(5, f"k{i}") for i in range(8)])
    smp = _sampling(0.9, 0.95, 0)
    drawn = []
    for t in range(3):
        steps = torch.full((8,), t, dtype=torch.long)
        drawn.append(sampler(logits, smp, seeds, steps))
        assert torch.equal(drawn[-1], S.Sampler()(logits, smp, seeds, steps))
    assert counter.frame_count == 1 and sampler.compile_failed is None  # one trace, reused at every step
    assert sampler.draw(True) is sampler.draw(True)  # one compiled function, not a new wrapper per step
    assert len({t for w in drawn for t in w.tolist()}) > 3  # really sampled


# --------------------------------------------------------------------------- tiny random models

class _TinyTokenizer:
    """Just what the engine asks of a tokenizer: its length and each id's text."""

    def __init__(self, vocab: int) -> None:
        words = PIECES + [f"w{i}" if i % 7 else f" w{i}" for i in range(vocab - len(PIECES))]
        self.pieces = words[:vocab]

    def __len__(self) -> int:
        return len(self.pieces)

    def batch_decode(self, seqs: list[list[int]], **_: Any) -> list[str]:
        return ["".join(self.pieces[t] for t in s) for s in seqs]


def _tiny(kind: str, vocab: int = 96, std: float = 0.35) -> Any:
    torch.manual_seed(0)
    if kind == "gemma3":
        cfg = transformers.Gemma3TextConfig(
            vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, sliding_window=6, query_pre_attn_scalar=16,
            layer_types=["sliding_attention", "sliding_attention", "full_attention"], max_position_embeddings=256,
            pad_token_id=0, bos_token_id=1, eos_token_id=2)
        model = transformers.Gemma3ForCausalLM(cfg)
    elif kind == "qwen2":  # biases on q/k/v: the fused projection carries a fused bias
        cfg = transformers.Qwen2Config(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                       pad_token_id=0, bos_token_id=1, eos_token_id=2)
        model = transformers.Qwen2ForCausalLM(cfg)
    else:
        cfg = transformers.LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                       pad_token_id=0, bos_token_id=1, eos_token_id=2)
        model = transformers.LlamaForCausalLM(cfg)
    with torch.no_grad():
        for p in model.parameters():  # spread the logits: no near-ties for greedy to flip on
            p.normal_(0.0, std)
    return model.float().eval()


def _prompts(n: int, vocab: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[1] + [rng.randrange(3, vocab) for _ in range(rng.randint(2, 17))] for _ in range(n)]


def _reference(model: Any, prompts: list[list[int]], max_new: int) -> list[list[int]]:
    out = []
    for p in prompts:
        seq = model.generate(input_ids=torch.tensor([p]), max_new_tokens=max_new, do_sample=False,
                             eos_token_id=[], pad_token_id=0, min_new_tokens=max_new)
        out.append(seq[0, len(p):].tolist())
    return out


@pytest.mark.parametrize("kind,matmul_decode,fuse", [
    ("gemma3", False, True), ("llama", False, True), ("gemma3", True, True), ("llama", True, True),
    ("qwen2", True, True), ("gemma3", True, False), ("qwen2", False, False)])
def test_tiny_greedy_equals_transformers_generate(kind: str, matmul_decode: bool, fuse: bool) -> None:
    model = _tiny(kind)
    prompts = _prompts(7, 96)
    ref = _reference(model, prompts, 12)
    eng = E.Engine(model, _TinyTokenizer(96), eos_ids=[], slots=3, fuse=fuse)
    assert eng.dec.use_fused == fuse
    eng.dec.matmul_decode = matmul_decode  # the CUDA decode attention, checked here on the CPU
    got = eng.generate(prompts, [f"p{i}" for i in range(7)], 12, 0.0, 1.0, 0, [], seed=0)
    assert got == ref
    assert eng.stats.prefills >= 3  # 7 prompts through 3 slots: rows were refilled
    if fuse:  # the model's own modules still compute what they computed before (plain generate after fusion)
        assert _reference(model, prompts[:2], 12) == ref[:2]


def test_occupancy_counts_the_slot_steps_that_drew_a_token() -> None:
    # 4 prompts, 2 slots, a harvest every 4 steps, 6 new tokens with nothing to stop a row early: each row's
    # first token comes from its prefill and its other 5 from the decode steps 1-5 of its wave; steps 6-8 it
    # has ended and waits for the harvest. The first wave runs while 2 prompts wait, the second once none do.
    eng = E.Engine(_tiny("llama"), _TinyTokenizer(96), eos_ids=[], slots=2, sync_every=4)
    got = eng.generate(_prompts(4, 96), [f"p{i}" for i in range(4)], 6, 0.0, 1.0, 0, [], seed=0)
    assert [len(g) for g in got] == [6] * 4
    st = eng.stats
    assert (st.steps, st.row_steps, st.queued_steps, st.queued_row_steps) == (16, 20, 8, 10)
    assert st.occupancy == st.queued_occupancy == 0.625
    eng.sync_every = 1  # harvested every step: a slot is refilled the step after its row ends
    eng.generate(_prompts(4, 96), [f"p{i}" for i in range(4)], 6, 0.0, 1.0, 0, [], seed=0)
    assert (eng.stats.steps, eng.stats.row_steps, eng.stats.queued_occupancy) == (10, 20, 1.0)


@pytest.mark.parametrize("kv_fp8", [False, True])
def test_the_compacted_tail_draws_the_texts_every_slot_would(monkeypatch: pytest.MonkeyPatch, kv_fp8: bool) -> None:
    # sampled rows that end at EOS or a stop at different steps: once no prompt waits, the rows left move into
    # the first slots (state and K/V) and the step decodes only those; each row's text must not change
    monkeypatch.setenv("STAGE1_ENGINE_KV_FP8", "1" if kv_fp8 else "0")
    model = _tiny("gemma3", std=0.1)
    prompts, ids = _prompts(13, 96, seed=7), [f"c{i}" for i in range(13)]
    eng = E.Engine(model, _TinyTokenizer(96), eos_ids=[2], slots=8)
    assert eng.dec.use_kv_fp8 == kv_fp8
    got = {}
    for compact in (True, False):
        eng.compact_tail = compact
        got[compact] = eng.generate(prompts, ids, 16, 0.9, 0.95, 0, STOPS, seed=3)
        got[compact, "stats"] = (eng.stats.compactions, eng.stats.slot_steps, eng.stats.steps * 8)
        got[compact, "drawn"] = (eng.stats.row_steps, eng.stats.tokens)
    assert got[True] == got[False]
    assert got[True, "drawn"] == got[False, "drawn"]  # the tokens counted: the emptied slots count none
    assert len({len(o) for o in got[True]}) > 3  # rows really ended at different steps
    compactions, slot_steps, full = got[True, "stats"]
    assert compactions >= 2 and slot_steps < full
    assert got[False, "stats"][:2] == (0, got[False, "stats"][2])
    one = E.Engine(model, _TinyTokenizer(96), eos_ids=[2], slots=1)  # one row at a time: nothing to compact
    assert one.generate(prompts, ids, 16, 0.9, 0.95, 0, STOPS, seed=3) == got[True]
    assert one.stats.compactions == 0


# --------------------------------------------------------------------------- fused projections

def _param_storage_bytes(model: Any) -> int:
    """Bytes of the distinct storages behind the model's parameters (views counted once)."""
    seen = {p.untyped_storage().data_ptr(): p.untyped_storage().nbytes() for p in model.parameters()}
    return sum(seen.values())


def test_fused_weights_are_the_models_own_memory_and_decode_like_the_unfused_path() -> None:
    model = _tiny("gemma3", std=0.1)
    before = _param_storage_bytes(model)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    eng = E.Engine(model, _TinyTokenizer(96), eos_ids=[2], slots=4)
    assert eng.dec.use_fused and all(f.qkv is not None and f.gate_up is not None for f in eng.dec.fused)
    attn, mlp, f0 = model.model.layers[0].self_attn, model.model.layers[0].mlp, eng.dec.fused[0]
    assert f0.qkv.sizes == (64, 32, 32) and f0.gate_up.sizes == (128, 128)
    assert attn.q_proj.weight.data_ptr() == f0.qkv.weight.data_ptr()  # views into the fused tensor
    assert mlp.up_proj.weight.data_ptr() == f0.gate_up.weight[128].data_ptr()
    assert _param_storage_bytes(model) == before  # no second copy of the weights
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())  # same values, same names
    again = E.Engine(model, _TinyTokenizer(96), eos_ids=[2], slots=4)  # a second engine reuses the fusion
    assert again.dec.fused[0].qkv is f0.qkv and _param_storage_bytes(model) == before

    prompts, ids = _prompts(9, 96, seed=5), [f"f{i}" for i in range(9)]
    runs = {}
    for fused in (True, False):
        eng.dec.use_fused = fused
        runs[fused] = (eng.generate(prompts, ids, 10, 0.0, 1.0, 0, STOPS, seed=1),
                       eng.generate(prompts, ids, 10, 0.8, 0.9, 0, STOPS, seed=1))
    assert runs[True] == runs[False]


def test_projections_that_are_not_plain_linear_are_left_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    class Wrapped(torch.nn.Linear):  # stands for a quantized or adapter-wrapped projection
        pass

    model = _tiny("llama")
    layer = model.model.layers[1]
    wrapped = Wrapped(64, 128, bias=False)
    wrapped.load_state_dict(layer.mlp.gate_proj.state_dict())
    layer.mlp.gate_proj = wrapped
    prompts = _prompts(5, 96, seed=6)
    ref = _reference(model, prompts, 10)
    eng = E.Engine(model, _TinyTokenizer(96), eos_ids=[], slots=2)
    assert eng.dec.fused[1].gate_up is None and eng.dec.fused[1].qkv is not None
    assert eng.dec.fused[0].gate_up is not None
    assert eng.generate(prompts, [str(i) for i in range(5)], 10, 0.0, 1.0, 0, [], seed=0) == ref
    monkeypatch.setenv(F.ENV, "0")  # the benchmark's unfused baseline
    assert not E.Engine(_tiny("llama"), _TinyTokenizer(96), eos_ids=[]).dec.use_fused


# --------------------------------------------------------------------------- compiled layers

@pytest.mark.parametrize("kind", ["gemma3", "llama", "qwen2"])
def test_compiled_stretches_trace_once_for_all_layers_and_decode_exactly(kind: str) -> None:
    from torch._dynamo.testing import CompileCounter

    torch._dynamo.reset()
    model = _tiny(kind)
    prompts = _prompts(7, 96)
    ref = _reference(model, prompts, 12)
    counter = CompileCounter()  # traces like torch.compile, runs the captured graphs eagerly (fast on a CPU)
    eng = E.Engine(model, _TinyTokenizer(96), eos_ids=[], slots=3, compile=counter)
    assert eng.dec.use_compiled and eng.stats.compiled is False
    eng.dec.matmul_decode = True
    got = eng.generate(prompts, [f"p{i}" for i in range(7)], 12, 0.0, 1.0, 0, [], seed=0)
    assert got == ref and eng.stats.compiled and eng.dec.compile_failed is None
    # one graph per stretch for every layer (the layer's modules are arguments, not constants): decode's
    # two, prefill's two, and prefill's again for a one-row chunk (torch's 0/1 specialisation) at most
    assert counter.frame_count <= 6
    frames = counter.frame_count
    for n in (3, 5, 7):  # other slot counts and prompt widths: no trace per call
        eng.generate(prompts[:n], [f"p{i}" for i in range(n)], 12, 0.0, 1.0, 0, [], seed=0)
    assert counter.frame_count <= frames + 2  # decode's slot count turns dynamic once
    sampled = {c: eng.generate(prompts, [f"p{i}" for i in range(7)], 10, 0.8, 0.9, 0, STOPS, seed=1)
               for c in (True, False) if not setattr(eng.dec, "use_compiled", c)}
    assert sampled[True] == sampled[False]


def test_a_failing_compile_falls_back_to_the_eager_layers() -> None:
    def broken(gm: Any, example_inputs: Any) -> Any:
        raise RuntimeError("no compiler here")

    torch._dynamo.reset()
    model = _tiny("llama")
    prompts = _prompts(4, 96, seed=3)
    ref = _reference(model, prompts, 8)
    eng = E.Engine(model, _TinyTokenizer(96), eos_ids=[], slots=2, compile=broken)
    assert eng.generate(prompts, [str(i) for i in range(4)], 8, 0.0, 1.0, 0, [], seed=0) == ref
    assert not eng.dec.use_compiled and "no compiler here" in (eng.dec.compile_failed or "")
    assert not eng.stats.compiled

    def oom_at_compile(gm: Any, example_inputs: Any) -> Any:
        raise torch.OutOfMemoryError("fake: no room to compile")

    def oom_at_run(gm: Any, example_inputs: Any) -> Any:
        def run(*args: Any) -> Any:
            raise torch.OutOfMemoryError("fake: no room to run")
        return run

    for backend in (oom_at_compile, oom_at_run):  # out of memory is no compile failure: the engine backs off
        torch._dynamo.reset()
        eng = E.Engine(model, _TinyTokenizer(96), eos_ids=[], slots=2, compile=backend)
        with pytest.raises(E.EngineOOM):
            eng.generate(prompts, [str(i) for i in range(4)], 8, 0.0, 1.0, 0, [], seed=0)
        assert eng.dec.use_compiled and eng.dec.compile_failed is None


@pytest.mark.parametrize("env,enabled,off", [(D.COMPILE_ENV, D.compile_enabled, "0"),
                                             (D.SCORE_ENV, D.score_enabled, "off")])
def test_switch_default_is_cuda_only_and_the_variable_overrides_it(monkeypatch: pytest.MonkeyPatch, env: str,
                                                                   enabled: Any, off: str) -> None:
    """Compiling the layers, and scoring the critic's plain path through the engine's prefill."""
    monkeypatch.delenv(env, raising=False)
    assert enabled("cuda") and not enabled("cpu")
    monkeypatch.setenv(env, off)
    assert not enabled("cuda")
    monkeypatch.setenv(env, "1")
    assert enabled("cpu")


def test_the_cpu_engine_compiles_nothing_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(D.COMPILE_ENV, raising=False)
    eng = E.Engine(_tiny("llama"), _TinyTokenizer(96), eos_ids=[])
    assert not eng.dec.use_compiled and not eng.sampler.use_compiled


def test_autotune_is_opt_in_and_a_failing_one_falls_back_to_the_default_compile(
        monkeypatch: pytest.MonkeyPatch) -> None:
    from torch._dynamo.testing import CompileCounter

    monkeypatch.delenv(D.AUTOTUNE_ENV, raising=False)
    model = _tiny("llama")
    assert not D.Decoder(model, fuse=False, compile=True).autotuned  # off by default
    monkeypatch.setenv(D.AUTOTUNE_ENV, "1")
    dec = D.Decoder(model, fuse=False, compile=True)
    assert sorted(dec.autotuned) == ["post_attn_decode", "pre_attn_decode"] and dec.use_autotuned
    assert not D.Decoder(model, fuse=False, compile=False).autotuned  # nothing compiled: nothing to tune
    assert not D.Decoder(model, fuse=False, compile=CompileCounter()).autotuned  # inductor's mode only

    def broken(*args: Any) -> Any:
        raise RuntimeError("no autotuning here")

    torch._dynamo.reset()
    prompts = _prompts(4, 96, seed=4)
    ref = _reference(model, prompts, 8)
    eng = E.Engine(model, _TinyTokenizer(96), eos_ids=[], slots=2, compile=CompileCounter())
    eng.dec.autotuned = {"pre_attn_decode": broken, "post_attn_decode": broken}
    eng.dec.use_autotuned = True
    assert eng.generate(prompts, [str(i) for i in range(4)], 8, 0.0, 1.0, 0, [], seed=0) == ref
    assert not eng.dec.use_autotuned and "no autotuning here" in (eng.dec.autotune_failed or "")
    assert eng.dec.use_compiled and eng.dec.compile_failed is None  # the default compile still runs


@pytest.mark.not_fast
def test_inductor_compiled_layers_decode_exactly_on_the_cpu() -> None:
    """The real compiler (inductor, C++ on the CPU; ~40 s on 2 cores): the same greedy tokens as generate."""
    torch._dynamo.reset()
    model = _tiny("gemma3")
    prompts = _prompts(5, 96)
    ref = _reference(model, prompts, 10)
    eng = E.Engine(model, _TinyTokenizer(96), eos_ids=[], slots=3, compile=True)
    eng.dec.matmul_decode = True
    assert eng.generate(prompts, [f"p{i}" for i in range(5)], 10, 0.0, 1.0, 0, [], seed=0) == ref
    assert eng.dec.use_compiled, eng.dec.compile_failed


def test_tiny_sampling_independent_of_batch_and_order() -> None:
    model = _tiny("gemma3", std=0.1)
    prompts = _prompts(9, 96, seed=1)
    ids = [f"item-{i}" for i in range(9)]
    runs = []
    for slots in (1, 4, 9):
        eng = E.Engine(model, _TinyTokenizer(96), eos_ids=[2], slots=slots)
        runs.append(eng.generate(prompts, ids, 10, 0.9, 0.9, 0, STOPS, seed=11))
    assert runs[0] == runs[1] == runs[2]
    assert len({t for row in runs[0] for t in row}) > 20  # really sampled, not one repeated token
    order = [8, 3, 0, 5, 1, 7, 2, 6, 4]
    eng = E.Engine(model, _TinyTokenizer(96), eos_ids=[2], slots=4)
    shuffled = eng.generate([prompts[i] for i in order], [ids[i] for i in order], 10, 0.9, 0.9, 0, STOPS, seed=11)
    assert [shuffled[order.index(i)] for i in range(9)] == runs[0]
    other_seed = eng.generate(prompts, ids, 10, 0.9, 0.9, 0, STOPS, seed=12)
    assert other_seed != runs[0]


def test_tiny_rows_stop_at_eos_and_stop_strings() -> None:
    model = _tiny("llama")
    tok = _TinyTokenizer(96)
    prompts = _prompts(6, 96, seed=2)
    eng = E.Engine(model, tok, eos_ids=[], slots=2)
    free = eng.generate(prompts, [str(i) for i in range(6)], 24, 1.0, 1.0, 0, [], seed=3)
    stopped = eng.generate(prompts, [str(i) for i in range(6)], 24, 1.0, 1.0, 0, ["\n"], seed=3)
    cut_somewhere = 0
    for a, b in zip(free, stopped):
        j = _first_stop(tok, a, ["\n"])
        if j is None:
            assert b == a
        else:  # identical up to and including the token that completed the stop, then nothing
            assert b == a[: j + 1]
            cut_somewhere += 1
    assert cut_somewhere >= 2


def _first_stop(tok: _TinyTokenizer, ids: list[int], stops: list[str]) -> int | None:
    text = ""
    for j, t in enumerate(ids):
        text += tok.pieces[t]
        if find_stop(text, stops):
            return j
    return None


def test_oom_backoff_keeps_every_prompt_in_order_and_fails_clearly_at_one_slot() -> None:
    model = _tiny("gemma3")
    prompts = _prompts(8, 96, seed=4)
    ids = [f"q{i}" for i in range(8)]
    plain = E.Engine(model, _TinyTokenizer(96), eos_ids=[2], slots=2).generate(prompts, ids, 8, 0.8, 0.95, 0, STOPS, 5)
    eng = E.Engine(model, _TinyTokenizer(96), eos_ids=[2], slots=8)

    def limited(slots: int, context: int) -> None:
        if slots > 2:
            raise torch.OutOfMemoryError(f"fake: {slots} slots do not fit")

    eng.on_alloc = limited
    assert eng.generate(prompts, ids, 8, 0.8, 0.95, 0, STOPS, 5) == plain
    assert eng.stats.oom_backoffs == [4, 2]

    def never(slots: int, context: int) -> None:
        raise torch.OutOfMemoryError("fake: nothing fits")

    eng.release()
    eng.on_alloc = never
    with pytest.raises(E.EngineOOM, match="single slot"):
        eng.generate(prompts, ids, 8, 0.8, 0.95, 0, STOPS, 5)


def test_slots_count_the_allocators_unused_blocks_as_free(monkeypatch: pytest.MonkeyPatch) -> None:
    """On CUDA the engine sizes its slots from free memory. Blocks torch's caching allocator reserved and
    no longer uses count as free: they are reused. They are what an earlier forward (plain generate, the
    critic) left behind, and the driver reports them as used (12B on the H100 got 228 slots of 256, not 256)."""
    from stage1_core.model import sizing

    eng = E.Engine(_tiny("gemma3"), _TinyTokenizer(96), eos_ids=[2])
    per_row = eng.kv_bytes_per_token() * 64 + eng.vocab * 4 * 6
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (10 * per_row, 1000 * per_row))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: 50 * per_row)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: 30 * per_row)
    assert sizing.cuda_free_bytes("cuda:0") == 30 * per_row
    assert sizing.available_memory("cuda:0") == 30 * per_row
    eng.cuda = True
    assert eng.choose_slots(1000, 64) == 21  # 0.7 of 30 rows' worth; 7 from the driver's figure alone
    assert eng.choose_slots(5, 64) == 5
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: 60 * per_row)  # never below the driver's
    assert eng.choose_slots(1000, 64) == 7


def test_the_decode_step_is_kept_across_calls_only_while_what_it_reads_is_the_same() -> None:
    """A call like the last one reuses its state, sampling tensors and step (on CUDA: its graphs), refilled
    in place, and generates what a fresh engine generates; anything the step reads that changed makes a
    new one."""
    model = _tiny("gemma3", std=0.1)
    prompts, ids = _prompts(5, 96, seed=6), [f"k{i}" for i in range(5)]
    fresh = lambda: E.Engine(model, _TinyTokenizer(96), eos_ids=[2], slots=3)  # noqa: E731
    eng = fresh()

    def run(t: float = 0.9, p: float = 0.9, stops: list[str] = STOPS, seed: int = 7) -> tuple[Any, bool]:
        out = eng.generate(prompts, ids, 10, t, p, 0, stops, seed)
        return out, eng.stats.kept_step

    first, kept = run()
    assert not kept
    step = eng._kept
    again, kept = run()
    assert kept and again == first and eng._kept is step
    hotter, kept = run(t=1.3, p=0.8, seed=8)  # same mode: the sampling tensors are refilled
    assert kept and hotter == fresh().generate(prompts, ids, 10, 1.3, 0.8, 0, STOPS, 8) and hotter != first
    for change, why in ((lambda: None, "stops"), (lambda: setattr(eng.dec, "use_fused", False), "fused"),
                        (lambda: setattr(eng, "sampler", S.Sampler()), "sampler"), (eng.release, "cache freed"),
                        (lambda: eng._ensure_cache(3, 4096), "cache reallocated")):
        run()
        assert run()[1], why  # the same call again: kept
        change()
        out, kept = run(stops=["\n"]) if why == "stops" else run()
        assert not kept, why
        assert out == fresh().generate(prompts, ids, 10, 0.9, 0.9, 0, ["\n"] if why == "stops" else STOPS, 7), why
        eng.dec.use_fused = bool(eng.dec.fused)
    greedy = eng.generate(prompts, ids, 10, 0.0, 1.0, 0, STOPS, 7)  # another mode: another step
    assert not eng.stats.kept_step and greedy == fresh().generate(prompts, ids, 10, 0.0, 1.0, 0, STOPS, 7)


def test_bad_ids_are_refused() -> None:
    eng = E.Engine(_tiny("llama"), _TinyTokenizer(96), eos_ids=[2], slots=2)
    with pytest.raises(ValueError, match="duplicate ids"):
        eng.generate([[1, 5], [1, 6]], ["a", "a"], 4, 0.0, 1.0, 0, [], 0)
    with pytest.raises(ValueError, match="2 prompts but 1 ids"):
        eng.generate([[1, 5], [1, 6]], ["a"], 4, 0.0, 1.0, 0, [], 0)


def test_unsupported_model_is_named() -> None:
    class Other(torch.nn.Module):
        pass

    assert "Other is not one of" in (E.supports(Other()) or "")


# --------------------------------------------------------------------------- the embedded model

REAL_PROMPTS = [
    "The capital of France is",
    "1, 2, 3, 4,",
    "Below is a list of diverse tasks.\n\n1. Write a haiku about autumn.\n2. Explain how a bicycle works.\n3.",
    "Instruction: Name three fruits.\nResponse: Apple, banana, cherry.\n\nInstruction: Give a synonym of happy.\nResponse:",
    "Instruction: What is 2 + 2?\nResponse:",
    "Once upon a time, in a small village by the sea, there lived an old fisherman who",
]


def _diagnose(backend: Any, a: str, b: str) -> str:
    ia, ib = backend.tokenizer(a, add_special_tokens=False)["input_ids"], backend.tokenizer(b, add_special_tokens=False)["input_ids"]
    k = next((j for j, (x, y) in enumerate(zip(ia, ib)) if x != y), min(len(ia), len(ib)))
    return f"first differing token at {k}: {ia[k:k + 3]} vs {ib[k:k + 3]}\n  a={a!r}\n  b={b!r}"


@pytest.mark.real_model
def test_real_engine_greedy_equals_plain_generate(real_backend: Any) -> None:
    params = GenerationParams(max_new_tokens=20, temperature=0.0, stop_sequences=[])
    enc = real_backend.encode(REAL_PROMPTS)
    ref = real_backend._generate_reference(enc, params, 0, None)
    got = real_backend.generate(REAL_PROMPTS, params, seed=0)
    for r, g in zip(ref, got):
        assert g == r, _diagnose(real_backend, r.text, g.text)


@pytest.mark.real_model
def test_real_stop_sequences_cut_where_the_reference_cuts(real_backend: Any) -> None:
    params = GenerationParams(max_new_tokens=32, temperature=0.0, stop_sequences=STOPS)
    ref = real_backend._generate_reference(real_backend.encode(REAL_PROMPTS), params, 0, None)
    got = real_backend.generate(REAL_PROMPTS, params, seed=0)
    assert got == ref
    assert {c.stop_reason for c in got} - {"token_limit"}  # some prompt really stopped early


@pytest.mark.real_model
def test_real_sampled_texts_same_at_batch_1_3_16(real_backend: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    params = GenerationParams(max_new_tokens=10, temperature=0.7, top_p=0.9, stop_sequences=STOPS)
    ids = [f"x{i}" for i in range(len(REAL_PROMPTS))]
    eng = real_backend.engine()
    texts = {}
    for slots in (1, 3, 16):
        monkeypatch.setattr(eng, "slots_cfg", slots)
        texts[slots] = [c.text for c in real_backend.generate(REAL_PROMPTS, params, seed=42, ids=ids)]
    for slots in (3, 16):
        for a, b in zip(texts[1], texts[slots]):
            assert a == b, f"batch 1 vs {slots}: " + _diagnose(real_backend, a, b)
    assert texts[1] != [c.text for c in real_backend.generate(REAL_PROMPTS, params, seed=43, ids=ids)]


def test_consecutive_slots_are_written_by_a_slice_and_the_cache_is_the_same() -> None:
    assert R.slot_slice([3, 4, 5]) == slice(3, 6) and R.slot_slice([0]) == slice(0, 1)
    assert R.slot_slice([1, 3]) is None and R.slot_slice([2, 1]) is None and R.slot_slice([]) is None
    model = _tiny("gemma3")
    prompts = _prompts(3, 96, seed=2)
    caches = []
    for slots in (torch.tensor([1, 2, 3]), slice(1, 4)):
        eng = E.Engine(model, _TinyTokenizer(96), eos_ids=[], slots=5)
        eng._ensure_cache(5, 32)
        eng.dec.rope_tables(32)
        toks, lengths = R.pad_right(prompts, sorted(range(3), key=lambda i: -len(prompts[i])), torch.device("cpu"))
        h = eng.dec.prefill(toks, lengths, slots, eng._cache)
        caches.append((h, [(k.clone(), v.clone()) for k, v in eng._cache]))
    (h0, c0), (h1, c1) = caches
    assert torch.equal(h0, h1)
    assert all(torch.equal(a, b) and torch.equal(x, y) for (a, x), (b, y) in zip(c0, c1))
    assert c0[0][0][1:4].abs().sum() > 0 and c0[0][0][0].abs().sum() == 0  # slots 1..3 written, slot 0 not
