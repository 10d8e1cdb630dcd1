"""Benchmark: the stage1 generation engine against plain `model.generate` on one GPU (not a test).

    python bench/gpu_engine.py [--models 4b,12b,27b,270m] [--batches 64,256] [--out FILE] [--fuse on|off|both]
                               [--compile on|off|both] [--sampler new|legacy|both] [--attention on|off|both]
                               [--fp8 off|on|both] [--kv-fp8 off|on|both]
                               [--keep-graphs on|off|both]
                               [--autotune on|off|both]
    python bench/gpu_engine.py --smoke          # CPU, random:gemma3-tiny: checks the script itself

One JSON file holds every record, rewritten after each one (`bench/results/gpu_engine-<date>.json`
by default; an existing file's records for other (model, batch, dtype) keys are kept):
`{"records": [{"model", "batch", "dtype", "engine", "plain_warm_tok_s", "hf_cb_tok_s", "engine_tok_s",
"engine_sampled_tok_s", "ratio", "engine_ms_step", "limit_fraction", "token_match", "fused",
"critic_prompts_s", "critic_mfu", "peak_mem_gb", "lock_sha256", ...}]}`.
- plain: `model.generate`, sdpa attention, default cache, no logits processors, `max_new` tokens forced
  (min_new_tokens), synchronised timing, the same prompts, the same process. Every path (plain,
  engine greedy, engine sampled) gets one warm-up call at the full batch and length, then the best
  of three timed calls (`timing`); `lock_sha256` names the dependency lock it ran on.
- engine: `HFBackend.generate` at the default config (engine: stage1, stop sequences armed), greedy
  (`engine_tok_s`, `ratio` = engine / warmed plain) and sampled at temperature 0.7, top-p 0.9; one warm-up call.
  `--fuse both` measures the engine twice on the same loaded model, q/k/v and gate/up as separate GEMMs
  (the record's `unfused` block, `unfused_ratio`) and fused (the record's engine_* fields, `fused`: true),
  each warmed and best of three; `fused_over_unfused` = fused / unfused greedy tok/s. `--compile both`
  likewise measures the layers eager and compiled (decoder.py; the `uncompiled` block,
  `compiled_over_uncompiled`; on 270m also `token_match_uncompiled`). `--sampler both` likewise measures the
  engine with 08ca440's draw (`LegacySampler` below: float32 logits, top-k on logits / temperature,
  torch.logsumexp, eager; its greedy is the argmax of the float32 logits) and with today's (the LM head's
  dtype, compiled with the layers: sampling.py), greedy and sampled each: the `legacy_sampler` block,
  `sampled_over_greedy` of each, and `sampler_draw` (one draw alone on random logits of the record's
  shape, CUDA-graph replayed: ms per draw of each form, and whether their tokens agree). Each path records
  its warm-up call's seconds (`engine_warmup_s`: compilation and first captures) and the timed call's
  device-timeline spans of prefills and graph captures (`engine_prefill_ms`, `engine_capture_ms`;
  `engine_decode_ms_step` is the rest per step), greedy and sampled (`engine_sampled_*`: tokens, ms/step;
  `sampled_over_greedy_per_step` compares the steps, free of how many tokens the rows produced).
  `--attention both` likewise measures decode attention as two batched matmuls over the context bucket
  (the `matmul_attention` block, `live_over_matmul`) and as the live-KV Triton kernel (attention.py; the
  record's engine_* fields), and adds `attention_tokens_agree` (greedy tokens of the two paths on the
  record's prompts: common-prefix tokens / tokens) and `attention_kernel` (`attention_check`: the kernel
  against the matmul path and a float64 reference of the same inputs per dtype, at positions from 0 to
  past the sliding window, and one attention call alone at the record's shape, CUDA-graph replayed; also over
  an e4m3 cache, `e4m3_kv/...` and `kernel_e4m3_...`, each launch setting timed over both caches).
  `--autotune both` likewise measures decode's stretches as compiled by default (the `default_compile`
  block) and by inductor's max-autotune (decoder.py, `STAGE1_ENGINE_AUTOTUNE`; `autotuned_over_default`).
  `--keep-graphs both` times the record's main path with the decode step and its CUDA graphs kept from one
  call to the next like it (engine.py, `Engine.keep_step`; the timed calls replay the warm-up's graphs)
  and then again capturing them in every call as before (the `graphs_per_call` block, `kept_over_per_call`
  and `_sampled`). Every path records `engine_kept_step` and `engine_repeat_same` (the warm-up call's texts
  equal the timed call's, greedy and sampled).
  `--fp8 both` times the record's main path (bf16 projections) and then the same engine with FP8 projections
  (fp8.py, `STAGE1_ENGINE_FP8`; the `fp8` block: greedy and sampled tok/s, `limit_fraction` still on the
  bf16 bytes and `limit_fraction_fp8_bytes` on the bytes FP8 reads, the critic's prompts/s and MFU), with
  `fp8_over_bf16` (greedy, and `_sampled`), `fp8_tokens_agree` (greedy tokens against the bf16 path's,
  common prefix / tokens) and `fp8_critic_same_choice` / `fp8_critic_max_abs_diff` against the bf16 scores
  (not on 270m, whose prompts share prefixes and take PrefixScorer, which FP8 does not touch); on 270m
  `fp8_token_match` instead (FP8 engine greedy against plain `generate`, as `token_match`).
  `--fp8 on` runs the whole record with FP8 projections.
  `--kv-fp8 both` likewise times the record's main path (its cache in the model's dtype) and then the same
  engine with its KV cache in e4m3 (decoder.py, `STAGE1_ENGINE_KV_FP8`; the `kv_fp8` block: `limit_fraction`
  still on the model dtype's cache bytes, `limit_fraction_kv_fp8_bytes` on the bytes it reads), with
  `kv_fp8_over_bf16` (and `_sampled`) and `kv_fp8_tokens_agree`; with `--fp8 both` also both at once against
  the `fp8` block (`fp8_kv_fp8`, `fp8_kv_fp8_over_fp8`, `fp8_kv_fp8_over_bf16`). On 270m `kv_fp8_token_match`
  (e4m3 cache, engine greedy against plain `generate`). `--kv-fp8 on` runs the whole record with it.
  When the paths got different slot counts (`engine_slots`), `unequal_slots` names each one's: their tok/s
  ratios then compare a batch decoded in waves with one decoded at once. `engine_occupancy`: the share of
  the timed greedy call's slot-steps that drew a token (`EngineStats.occupancy`).
- hf_cb: transformers' continuous batching, `model.generate_batch` at its default settings (greedy, same
  prompts, same max_new), one timed call with its own CUDA-graph warm-up inside, run last (after the
  engine's cache is released, since it sizes its paged cache from free memory; `peak_mem_gb` is taken
  before it). `--no-hf-cb` skips it, `--no-plain` the plain baseline (its fields are then null).
  `--tokenizer-dir DIR` gives random models the embedded tokenizer from an HF folder (on a machine that
  lacks the embedded GGUF, which the loader reads only for that tokenizer).
- 4b/12b/27b: `random:gemma3-*` (random weights on the embedded tokenizer), 128-token prompts, 128 new
  tokens. 270m: the embedded weights in bf16 and float32 on 256 real phase-1 and phase-3 prompts;
  `token_match` = tokens in the common prefix of engine and plain greedy output / reference tokens,
  summed over the prompts.
- `critic_prompts_s`: distinct 128-token prompts scored through `next_token_logprobs` (A/B candidates,
  critic batch auto; no shared prefix, so the plain path: the engine's compiled prefill where the model has
  an engine, `critic_path`), warmed at full size, best of three; `critic_mfu` = 2 x parameters x prompt
  tokens x prompts/s / 989e12. With an engine the same prompts also run through the model's own forward
  (`critic_forward_prompts_s`, `critic_forward_mfu`, `critic_engine_over_forward`), and the record says how
  far the two paths' log-probabilities differ (`critic_max_abs_diff`) and how often they pick the same
  candidate (`critic_same_choice`).
- `limit_fraction` = (weight bytes + KV bytes the live rows need per step, at the mean context)
  / 4.3e12 B/s / measured engine step time.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import sys
import time
import traceback
from pathlib import Path
from typing import Any
from unittest import mock

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
for k, v in {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "USE_HUB_KERNELS": "0", "DO_NOT_TRACK": "1",
             "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}.items():
    os.environ.setdefault(k, v)

import torch  # noqa: E402

from stage1_core.infra.config import ModelConfig, load_pilot_config  # noqa: E402
from stage1_core.model import load_backend  # noqa: E402
from stage1_core.model import sampling as SM  # noqa: E402
from stage1_core.model.fp8 import to_e4m3  # noqa: E402
from stage1_core.infra.provenance import lock_sha256  # noqa: E402
from stage1_core.phases.prompts import build_instruction_prompt, build_response_prompt  # noqa: E402
from stage1_core.infra.schemas import GenerationParams  # noqa: E402
from stage1_core.phases.seeds import load_seeds  # noqa: E402

PEAK_BF16 = 989e12
HBM_BYTES_S = 4.3e12
STOPS = ["\n\n", "\nInstruction:", "\nResponse:"]
CANDS = ["A", " A", "B", " B"]


def use_tokenizer_dir(folder: str) -> None:
    """Random models take the embedded model's tokenizer from the HF folder `folder` instead of converting the
    embedded GGUF (which the loader reads only for that tokenizer): for a device machine without the GGUF."""
    from stage1_core.model import loader

    loader.embedded_gguf_path = lambda: None
    loader.resolve_gguf = lambda *_: None
    loader._gguf_as_hf_folder = lambda *_: Path(folder)


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(fn: Any) -> tuple[Any, float]:
    sync()
    t0 = time.perf_counter()
    out = fn()
    sync()
    return out, time.perf_counter() - t0


REPEATS = 3


def best_of(fn: Any, seconds_of: Any = None) -> tuple[Any, float]:
    """Run fn REPEATS times; (the result of the fastest call, its seconds). seconds_of(result) gives a
    call's own seconds when fn times itself (engine_run), else the call is timed here."""
    best: tuple[Any, float] | None = None
    for _ in range(REPEATS):
        out, secs = timed(fn)
        if seconds_of is not None:
            secs = seconds_of(out)
        if best is None or secs < best[1]:
            best = (out, secs)
    assert best is not None
    return best


def write(path: Path, records: list[dict[str, Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps({"records": records}, indent=1))
    os.replace(tmp, path)


def upsert(records: list[dict[str, Any]], rec: dict[str, Any]) -> None:
    key = (rec["model"], rec["batch"], rec["dtype"])
    records[:] = [r for r in records if (r["model"], r["batch"], r["dtype"]) != key] + [rec]


def bench_prompts(backend: Any, n: int, tokens: int) -> list[str]:
    """n distinct prompts of about `tokens` tokens each (BOS included), cut from the seed tasks' text."""
    text = " ".join(s.instruction for s in load_seeds(None).seeds)
    ids = backend.tokenizer(text, add_special_tokens=False)["input_ids"]
    out = []
    for i in range(n):
        start = (i * 37) % max(1, len(ids) - tokens)
        out.append(backend.tokenizer.decode(ids[start:start + tokens - 1]))
    return out


def real_prompts(n: int) -> list[str]:
    """n/2 phase-1 list prompts and n/2 phase-3 response prompts, as the pilot builds them."""
    import random

    cfg = load_pilot_config()
    seeds = load_seeds(cfg.seeds_path).usable_seeds()
    rng = random.Random(0)
    ig, rg = cfg.instruction_generation, cfg.response_generation
    p1 = [build_instruction_prompt(ig.header, [s.list_text() or "" for s in rng.sample(seeds, ig.few_shot_k)])
          for _ in range(n // 2)]
    p3 = [build_response_prompt(s.instruction, rg.worked_examples[: rg.n_examples]) for s in seeds]
    p3 = (p3 * (n // len(p3) + 1))[: n - len(p1)]
    return p1 + p3


def plain_generate(backend: Any, prompts: list[str], max_new: int, forced: bool) -> list[list[int]]:
    enc = backend.encode(prompts)
    ids, mask = backend._pad_left(enc)
    kw: dict[str, Any] = {"max_new_tokens": max_new, "do_sample": False, "pad_token_id": backend.pad_id,
                          "eos_token_id": backend.eos_ids}
    if forced:
        kw["min_new_tokens"] = max_new
    with torch.inference_mode():
        out = backend.model.generate(input_ids=ids, attention_mask=mask, **kw)
    return out[:, ids.shape[1]:].tolist()


def engine_run(backend: Any, prompts: list[str], params: GenerationParams) -> tuple[int, float, Any, list[str]]:
    """One generate call: (tokens, seconds, the engine's stats, the texts)."""
    comps, secs = timed(lambda: backend.generate(prompts, params, seed=1, ids=[f"b{i}" for i in range(len(prompts))]))
    eng = backend.engine()
    return sum(c.n_tokens for c in comps), secs, (eng.stats if eng is not None else None), [c.text for c in comps]


def critic_rate(backend: Any, prompts: list[str], engine: bool = True) -> tuple[float, float, list[dict[str, float]]]:
    """Critic prompts/s through `next_token_logprobs`, its scores' plain path through the engine's compiled
    prefill (`engine`) or through the model's own forward (STAGE1_ENGINE_SCORE switched for the call);
    warmed at full size, best of REPEATS. Returns (prompts/s, mean prompt tokens, the scores)."""
    with mock.patch.dict(os.environ, {"STAGE1_ENGINE_SCORE": "1" if engine else "0"}):
        backend.next_token_logprobs(prompts, CANDS)  # warm-up at full size (compilation of new shapes)
        scores, secs = best_of(lambda: backend.next_token_logprobs(prompts, CANDS))
    n_tok = sum(len(x) for x in backend.encode(prompts)) / len(prompts)
    return len(prompts) / secs, n_tok, scores


def param_bytes(model: Any) -> tuple[int, int]:
    n = sum(p.numel() for p in model.parameters())
    b = sum(p.numel() * p.element_size() for p in model.parameters())
    return n, b


def legacy_sample(logits: Any, s: Any, seeds: Any, steps: Any) -> Any:
    """08ca440's `sampling.sample` (float32 logits), kept here for before/after timings in one process."""
    if s.mode == "greedy":
        return logits.argmax(dim=-1)
    scaled = logits / s.temperature
    u = SM.uniform(seeds, steps)
    if s.mode == "full":
        cdf = torch.softmax(scaled, dim=-1).cumsum(dim=-1)
        pick = torch.searchsorted(cdf, (u * cdf[:, -1]).unsqueeze(-1).contiguous(), right=True).squeeze(-1)
        return pick.clamp(max=logits.shape[-1] - 1)
    k = min(SM.TOP_CANDIDATES, logits.shape[-1])
    vals, idx = scaled.topk(k, dim=-1)
    probs = torch.exp(vals - torch.logsumexp(scaled, dim=-1, keepdim=True))
    ranks = torch.arange(k, device=logits.device)
    limit = torch.where(s.top_k > 0, s.top_k, torch.full_like(s.top_k, k))
    probs = probs * (ranks < limit).to(probs.dtype)
    probs = probs / probs.sum(dim=-1, keepdim=True)
    cum = probs.cumsum(dim=-1)
    keep = (cum - probs) < s.top_p
    kept = probs * keep.to(probs.dtype)
    kcum = kept.cumsum(dim=-1)
    j = (kcum <= (u * kcum[:, -1]).unsqueeze(-1)).sum(dim=-1).clamp(max=k - 1)
    return idx.gather(-1, j.unsqueeze(-1)).squeeze(-1)


class LegacySampler:
    """The engine's draw as of 08ca440: the float32 logits (as `Decoder.logits` returned them), eager."""

    use_compiled = False
    compile_failed = None

    def __call__(self, logits: Any, s: Any, seeds: Any, steps: Any, compiled: bool = True) -> Any:
        return legacy_sample(logits.float(), s, seeds, steps)


def graph_ms(fn: Any, reps: int = 20, tries: int = 1) -> float:
    """ms per call of fn, captured once in a CUDA graph and replayed `reps` times (after 3 eager warm-ups and
    one replay); with `tries` > 1 the best of that many such timings."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    g.replay()
    sync()
    best = float("inf")
    for _ in range(tries):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        for _ in range(reps):
            g.replay()
        b.record()
        sync()
        best = min(best, a.elapsed_time(b) / reps)
    return round(best, 3 if tries == 1 else 4)


LAUNCHES = ((32, 4, 2), (64, 4, 2), (64, 4, 3), (32, 8, 2), (64, 8, 2), (64, 8, 3), (128, 8, 2), (16, 4, 2))
"""(BLOCK_N, num_warps, num_stages) of the live-KV kernel that `launch_sweep` times, each at splits 1, 2 and 4."""


def launch_sweep(q: Any, k: Any, v: Any, pos: Any, scale: float, tries: int = 1,
                 ref: Any = None) -> dict[str, dict[str, Any]]:
    """attention.py's `decode_attention` (full layers) at every launch in LAUNCHES and split 1, 2, 4, by
    `n{BLOCK_N}_w{warps}_s{stages}_splits{s}`: `{"ms": ...}` (`graph_ms`, 50 replays, best of `tries`), with
    `max_abs_err` against `ref` when given; `{"error": ...}` for a launch that does not compile."""
    from stage1_core.model import attention as A

    cells: dict[str, dict[str, Any]] = {}
    for bn, nw, ns in LAUNCHES:
        for sp in (1, 2, 4):
            def call(bn: int = bn, nw: int = nw, ns: int = ns, sp: int = sp) -> Any:
                return A.decode_attention(q, k, v, pos, scale, None, splits=sp, block_n=bn, num_warps=nw,
                                          num_stages=ns)
            try:
                cell = {} if ref is None else {"max_abs_err": round(float((call().float() - ref).abs().max()), 6)}
                cells[f"n{bn}_w{nw}_s{ns}_splits{sp}"] = {"ms": graph_ms(call, reps=50, tries=tries), **cell}
            except Exception as ex:  # noqa: BLE001 - a launch setting that does not compile is recorded
                cells[f"n{bn}_w{nw}_s{ns}_splits{sp}"] = {"error": f"{type(ex).__name__}: {ex}"[:200]}
    return cells


def sampler_draw(eng: Any, batch: int) -> dict[str, Any]:
    """One draw alone on random logits (batch, vocab) in the model's dtype, scaled like a random model's
    (std 1.25): ms per draw of greedy and top-p 0.9 / temperature 0.7, the legacy form against today's
    eager and compiled forms (CUDA-graph replayed), and the fraction of rows whose tokens agree."""
    dev = eng.device
    g = torch.Generator(device=dev).manual_seed(0)
    logits = (torch.randn(batch, eng.vocab, device=dev, generator=g) * 1.25).to(eng.dec.dtype)
    seeds = torch.tensor([SM.row_seed(1, f"d{i}") for i in range(batch)], dtype=torch.long, device=dev)
    steps = torch.full((batch,), 3, dtype=torch.long, device=dev)
    smp = SM.Sampling("nucleus", torch.tensor(0.7, device=dev), torch.tensor(0.9, device=dev),
                      torch.tensor(0, dtype=torch.long, device=dev))
    grd = SM.Sampling("greedy", smp.temperature, smp.top_p, smp.top_k)
    out: dict[str, Any] = {"shape": [batch, eng.vocab], "dtype": str(eng.dec.dtype).replace("torch.", "")}
    with torch.inference_mode():
        legacy = lambda: legacy_sample(logits.float(), smp, seeds, steps)  # noqa: E731
        eager = lambda: SM.sample(logits, smp, seeds, steps)  # noqa: E731
        comp = SM.Sampler(compile=True)
        compiled = lambda: comp(logits, smp, seeds, steps)  # noqa: E731
        toks = {"legacy": legacy(), "eager": eager(), "compiled": compiled()}
        out["compiled_ok"] = comp.use_compiled
        out["compile_failed"] = comp.compile_failed
        out["eager_equals_legacy"] = round(float((toks["eager"] == toks["legacy"]).float().mean()), 4)
        out["compiled_equals_eager"] = round(float((toks["compiled"] == toks["eager"]).float().mean()), 4)
        out["ms"] = {"greedy_legacy": graph_ms(lambda: logits.float().argmax(-1)),
                     "greedy": graph_ms(lambda: SM.sample(logits, grd, seeds, steps)),
                     "legacy": graph_ms(legacy), "eager": graph_ms(eager), "compiled": graph_ms(compiled),
                     "topk_fp32": graph_ms(lambda: logits.float().topk(SM.TOP_CANDIDATES, dim=-1)),
                     "topk_own_dtype": graph_ms(lambda: logits.topk(SM.TOP_CANDIDATES, dim=-1))}
    return out


def attention_check(eng: Any, batch: int) -> dict[str, Any]:
    """The live-KV kernel (attention.py) against the matmul path (`Decoder._attend_one`) on the same random
    inputs, both against `reference_attention` in float64: max abs error per dtype and case (full layers,
    sliding layers with positions past the window, rows at position 0, key splits); then ms per call of
    each at the record's shape (rows = batch, positions spread around 192 as in the benchmark, the bucket
    the matmuls would read), CUDA-graph replayed, for several launch settings and key splits."""
    from stage1_core.model import attention as A

    dec = eng.dec
    dev = eng.device
    layer = dec.layers[0].self_attn
    scale = float(layer.scaling)
    heads, kv, d = dec.n_heads, dec.n_kv, dec.head_dim
    win = next((w for w in dec.windows if w), None)
    out: dict[str, Any] = {"heads": heads, "kv_heads": kv, "head_dim": d, "scale": scale, "window": win,
                           "block_n": A.BLOCK_N, "num_warps": A.NUM_WARPS, "num_stages": A.NUM_STAGES}
    g = torch.Generator(device=dev).manual_seed(0)
    errs: dict[str, Any] = {}
    with torch.inference_mode():
        for dtype in (torch.bfloat16, torch.float16, torch.float32):
            name = str(dtype).replace("torch.", "")
            cases = (("full", None, 320), ("sliding", 64, 320), ("sliding_model", win, (win or 0) + 192))
            for case, window, ctx in cases:
                if window is None and case == "sliding_model":
                    continue
                rows = 24
                k = torch.randn(rows, kv, ctx, d, device=dev, generator=g).to(dtype)
                v = torch.randn(rows, kv, ctx, d, device=dev, generator=g).to(dtype)
                q = (torch.randn(rows, heads, 1, d, device=dev, generator=g) * 2).to(dtype)
                pos = torch.randint(0, ctx, (rows,), device=dev, generator=g)
                pos[:3] = torch.tensor([0, 1, ctx - 1], device=dev)  # rows at position 0 and at the end
                keys = torch.arange(ctx, device=dev)
                m = keys[None, :] <= pos[:, None]
                if window:
                    m = m & (keys[None, :] > pos[:, None] - window)
                ref = A.reference_attention(q.double(), k.double(), v.double(), pos, scale, window).float()
                mat = dec._attend_one(q, k, v, m[:, None, None, :], scale).float()
                e: dict[str, Any] = {"matmul_vs_ref": float((mat - ref).abs().max())}
                for sp in (1, 4):
                    ker = A.decode_attention(q, k, v, pos, scale, window, splits=sp).float()
                    e[f"kernel_vs_ref{'' if sp == 1 else f'_splits{sp}'}"] = float((ker - ref).abs().max())
                    if sp == 1:
                        e["kernel_vs_matmul"] = float((ker - mat).abs().max())
                        e["kernel_rel_l2"] = float((ker - ref).norm() / ref.norm())
                errs[f"{name}/{case}"] = {kk: round(vv, 6) for kk, vv in e.items()}
                if dtype == torch.bfloat16:  # an e4m3 cache (unit scale) under bf16 queries, against float64 of it
                    k8, v8 = to_e4m3(k), to_e4m3(v)
                    ref8 = A.reference_attention(q.double(), k8.double(), v8.double(), pos, scale, window).float()
                    ker8 = A.decode_attention(q, k8, v8, pos, scale, window).float()
                    errs[f"e4m3_kv/{case}"] = {"kernel_vs_ref": round(float((ker8 - ref8).abs().max()), 6),
                                               "kernel_vs_bf16_ref": round(float((ker8 - ref).abs().max()), 6)}
        out["max_abs_err"] = errs
        # timing at the record's shape, the model's dtype
        ctx = 256
        k = torch.randn(batch, kv, ctx, d, device=dev, generator=g).to(dec.dtype)
        v = torch.randn(batch, kv, ctx, d, device=dev, generator=g).to(dec.dtype)
        q = torch.randn(batch, heads, 1, d, device=dev, generator=g).to(dec.dtype)
        pos = torch.randint(128, 256, (batch,), device=dev, generator=g)  # mean 192: the benchmark's mean context
        m = (torch.arange(ctx, device=dev)[None, :] <= pos[:, None])[:, None, None, :]
        ms: dict[str, Any] = {"matmul_bucket256": graph_ms(lambda: dec._attend_one(q, k, v, m, scale), reps=50)}
        k8, v8 = to_e4m3(k), to_e4m3(v)  # an e4m3 cache: half the bytes, swept as the model dtype's
        for tag, kk, vv in (("", k, v), ("e4m3_", k8, v8)):
            for key, cell in launch_sweep(q, kk, vv, pos, scale).items():
                ms[f"kernel_{tag}{key}"] = cell.get("ms", cell.get("error"))
        live = float((pos + 1).sum()) * kv * d * 2 * k.element_size()
        out["timing_shape"] = {"rows": batch, "context": ctx, "mean_live_keys": round(float(pos.float().mean()) + 1, 1),
                               "live_kv_mb": round(live / 1e6, 2),
                               "bucket_kv_mb": round(batch * ctx * kv * d * 2 * k.element_size() / 1e6, 2)}
        out["ms"] = ms
    return out


def tokens_agree(a: list[list[int]], b: list[list[int]]) -> float:
    """Tokens in the common prefix of each pair of rows / tokens of `a`, summed over the rows."""
    common = total = 0
    for r, g in zip(a, b):
        k = 0
        while k < min(len(r), len(g)) and r[k] == g[k]:
            k += 1
        common += k
        total += len(r)
    return round(common / max(1, total), 4)


def versions() -> dict[str, str | None]:
    """The torch and triton a record ran on (the lock pins neither on a device machine: its image brings them)."""
    try:
        import triton
        tv: str | None = triton.__version__
    except ImportError:
        tv = None
    return {"torch": torch.__version__, "triton": tv, "cuda": torch.version.cuda}


def record_for(backend: Any, model_name: str, batch: int, dtype: str, prompts: list[str], max_new: int,
               forced_plain: bool, token_match: float | None, fuse: str = "on", hf_cb: bool = True,
               compile: str = "on", sampler: str = "new", partial: Any = None, plain: bool = True,
               attention: str = "on", autotune: str = "off", fp8: str = "off",
               keep_graphs: str = "on", kv_fp8: str = "off") -> dict[str, Any]:
    rec: dict[str, Any] = {"model": model_name, "batch": batch, "dtype": dtype, "engine": "stage1",
                           "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"}
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    # Every path is timed the same way: one warm-up call at the full batch and length, then the best
    # of REPEATS timed calls, in this one process. (A plain baseline timed on its first full-size call
    # ran 1,330 tok/s where a warmed one ran 2,012 at 12B: the old records' ratios were inflated.)
    rec["plain_warm_tok_s"] = rec["plain_ms_step"] = None  # --no-plain: not measured
    if plain:
        plain_generate(backend, prompts, max_new, forced_plain)  # warm-up, full size
        outs, secs = best_of(lambda: plain_generate(backend, prompts, max_new, forced_plain))
        plain_tokens = sum(len(o) for o in outs) if not forced_plain else len(prompts) * max_new
        rec["plain_warm_tok_s"] = round(plain_tokens / secs, 1)
        rec["plain_ms_step"] = round(1000 * secs / max_new, 2)
    over_plain = lambda tok_s: round(tok_s / rec["plain_warm_tok_s"], 2) if plain else None  # noqa: E731
    greedy = GenerationParams(max_new_tokens=max_new, temperature=0.0, stop_sequences=STOPS)
    sampled = GenerationParams(max_new_tokens=max_new, temperature=0.7, top_p=0.9, stop_sequences=STOPS)
    rec["timing"] = f"warm-up at full size, then best of {REPEATS}"
    rec["lock_sha256"] = lock_sha256()
    rec.update(versions())
    n_params, w_bytes = param_bytes(backend.model)
    eng = backend.engine()
    if eng is not None:
        eng.keep_step = keep_graphs != "off"
    if eng is not None and eng.dec.fp8:  # --fp8 both: the main path in bf16, the `fp8` block after it
        eng.dec.use_fp8 = fp8 == "on"
    rec["fp8_projections"] = bool(eng is not None and eng.dec.use_fp8)
    if eng is not None and eng.dec.kv_fp8:  # --kv-fp8 both: the main path's cache in the model dtype
        eng.dec.use_kv_fp8 = kv_fp8 == "on"
    rec["kv_fp8_cache"] = bool(eng is not None and eng.dec.use_kv_fp8)
    if eng is not None and eng.dec.kv_fp8_unavailable:
        rec["kv_fp8_unavailable"] = eng.dec.kv_fp8_unavailable
    if eng is not None and eng.dec.fp8_unavailable:
        rec["fp8_unavailable"] = eng.dec.fp8_unavailable
    can_fuse = eng is not None and bool(eng.dec.fused)
    can_compile = eng is not None and bool(eng.dec.compiled)
    can_attend = eng is not None and eng.dec.attention_kernel
    fuse_v = {"both": [False, True], "on": [True], "off": [False]}[fuse] if can_fuse else [False]
    comp_v = {"both": [False, True], "on": [True], "off": [False]}[compile] if can_compile else [False]
    att_v = {"both": [False, True], "on": [True], "off": [False]}[attention] if can_attend else [False]
    can_tune = eng is not None and bool(eng.dec.autotuned)
    tune_v = {"both": [False, True], "on": [True], "off": [False]}[autotune] if can_tune else [False]
    # (fused, compiled, live-KV attention, autotuned decode); the last is the record's main path
    variants = [(f, c, at, tu) for f in fuse_v for c in comp_v for at in att_v for tu in tune_v]
    if can_attend and attention != "off" and torch.cuda.is_available():
        rec["attention_kernel"] = attention_check(eng, batch)
    samplers = {"both": ["legacy", "new"], "new": ["new"], "legacy": ["legacy"]}[sampler] if eng else ["new"]
    paths = {}
    if eng is not None and sampler == "both" and torch.cuda.is_available():
        rec["sampler_draw"] = sampler_draw(eng, batch)
    greedy_rows: dict[bool, list[list[int]]] = {}
    for fused, compiled, live, tuned in variants:  # the same loaded model and engine, switched per call
        if eng is not None:
            eng.dec.use_autotuned = tuned
        if eng is not None and len(att_v) == 2:  # greedy tokens of each attention path, for their agreement
            eng.dec.use_fused, eng.dec.use_compiled, eng.dec.use_attention_kernel = fused, compiled, live
            with torch.inference_mode():
                greedy_rows[live] = eng.generate(backend.encode(prompts), [f"b{i}" for i in range(len(prompts))],
                                                 max_new, 0.0, 1.0, 0, [], 1)
        for smp_kind in samplers:
            if eng is not None:
                eng.dec.use_fused, eng.dec.use_compiled, eng.dec.use_attention_kernel = fused, compiled, live
                own = eng.sampler
                if smp_kind == "legacy":
                    eng.sampler = LegacySampler()
            try:
                key = (fused, compiled, live, tuned, smp_kind)
                paths[key] = engine_paths(backend, prompts, greedy, sampled, batch, max_new, w_bytes)
            finally:
                if eng is not None:
                    eng.sampler = own
            if eng is not None and compiled and not eng.dec.use_compiled:  # compilation failed: say so
                rec["compile_failed"] = eng.dec.compile_failed
            if eng is not None and smp_kind == "new" and eng.sampler.compile_failed:
                rec["sampler_compile_failed"] = eng.sampler.compile_failed
            if eng is not None and live and eng.dec.attention_failed:  # the kernel failed: the matmuls ran
                rec["attention_failed"] = eng.dec.attention_failed
    main = paths[variants[-1] + (samplers[-1],)]
    rec["sampler"] = samplers[-1]
    if len(samplers) == 2:
        base = paths[variants[-1] + ("legacy",)]
        rec["legacy_sampler"] = base
        rec["new_sampler_over_legacy"] = round(main["engine_tok_s"] / base["engine_tok_s"], 3)
        rec["new_sampler_over_legacy_sampled"] = round(main["engine_sampled_tok_s"] / base["engine_sampled_tok_s"], 3)
        rec["legacy_sampler_ratio"] = over_plain(base["engine_tok_s"])
    paths = {k[:4]: v for k, v in paths.items() if k[4] == samplers[-1]}
    rec.update(main)
    rec["fused"], rec["compiled"], rec["live_attention"], rec["autotuned"] = variants[-1]
    if eng is not None and eng.dec.autotune_failed:
        rec["autotune_failed"] = eng.dec.autotune_failed
    rec["ratio"] = over_plain(rec["engine_tok_s"])
    if len(greedy_rows) == 2:
        rec["attention_tokens_agree"] = tokens_agree(greedy_rows[False], greedy_rows[True])
    # (flag, the other path's block, ratio name): e.g. `uncompiled`, `compiled_over_uncompiled`
    for flag, other_name, ratio in ((0, "unfused", "fused_over_unfused"), (1, "uncompiled", "compiled_over_uncompiled"),
                                    (2, "matmul_attention", "live_over_matmul"),
                                    (3, "default_compile", "autotuned_over_default")):
        if len({v[flag] for v in variants}) == 2:  # measured with and without this switch
            other = tuple(not x if i == flag else x for i, x in enumerate(variants[-1]))
            base = paths[other]
            rec[other_name] = base
            rec[ratio] = round(main["engine_tok_s"] / base["engine_tok_s"], 3)
            rec[f"{ratio}_sampled"] = round(main["engine_sampled_tok_s"] / base["engine_sampled_tok_s"], 3)
            rec[f"{other_name}_ratio"] = over_plain(base["engine_tok_s"])
    rate, n_tok, scores = critic_rate(backend, prompts, engine=True)
    rec["critic_prompts_s"] = round(rate, 1)
    rec["critic_prompt_tokens"] = round(n_tok, 1)
    rec["critic_mfu"] = round(2 * n_params * n_tok * rate / PEAK_BF16, 3)
    rec["critic_path"] = "engine prefill" if eng is not None else "forward"
    if eng is not None:  # the same prompts through the model's own forward, in this process
        p_rate, _, p_scores = critic_rate(backend, prompts, engine=False)
        rec["critic_forward_prompts_s"] = round(p_rate, 1)
        rec["critic_forward_mfu"] = round(2 * n_params * n_tok * p_rate / PEAK_BF16, 3)
        rec["critic_engine_over_forward"] = round(rate / p_rate, 3)
        rec["critic_max_abs_diff"] = round(max(abs(a[c] - b[c]) for a, b in zip(scores, p_scores) for c in a), 6)
        rec["critic_same_choice"] = round(sum(max(a, key=a.get) == max(b, key=b.get)
                                              for a, b in zip(scores, p_scores)) / len(scores), 4)
    if eng is not None and keep_graphs == "both":
        eng.dec.use_fused, eng.dec.use_compiled, eng.dec.use_attention_kernel, eng.dec.use_autotuned = variants[-1]
        eng.keep_step = False
        try:
            base = engine_paths(backend, prompts, greedy, sampled, batch, max_new, w_bytes)
        finally:
            eng.keep_step = True
        rec["graphs_per_call"] = base
        rec["kept_over_per_call"] = round(main["engine_tok_s"] / base["engine_tok_s"], 3)
        rec["kept_over_per_call_sampled"] = round(main["engine_sampled_tok_s"] / base["engine_sampled_tok_s"], 3)
    if eng is not None and fp8 == "both" and eng.dec.fp8:
        eng.dec.use_fused, eng.dec.use_compiled, eng.dec.use_attention_kernel, eng.dec.use_autotuned = variants[-1]
        # 270m: the real prompts share prefixes, so the critic takes PrefixScorer (the model's own modules)
        rec.update(fp8_block(backend, prompts, greedy, sampled, batch, max_new, w_bytes, main,
                             scores if model_name != "270m" else None, n_params))
    if eng is not None and kv_fp8 == "both" and eng.dec.kv_fp8:
        eng.dec.use_fused, eng.dec.use_compiled, eng.dec.use_attention_kernel, eng.dec.use_autotuned = variants[-1]
        rec.update(kv_fp8_block(backend, prompts, greedy, sampled, batch, max_new, w_bytes, main, "kv_fp8", "bf16"))
        if "fp8" in rec:  # --fp8 both too: FP8 projections and the e4m3 cache at once, against FP8 alone
            eng.dec.use_fp8 = True
            try:
                both = kv_fp8_block(backend, prompts, greedy, sampled, batch, max_new, w_bytes, rec["fp8"],
                                    "fp8_kv_fp8", "fp8")
            finally:
                eng.dec.use_fp8 = fp8 == "on"
            both["fp8_kv_fp8_over_bf16"] = round(both["fp8_kv_fp8"]["engine_tok_s"] / main["engine_tok_s"], 3)
            rec.update(both)
    slots = unequal_slots(rec)
    if slots:
        rec["unequal_slots"] = slots
        print(f"# {model_name}: the paths ran with different slot counts {slots}: their tok/s ratios compare "
              "different batches; compare engine_decode_ms_step at equal slots", file=sys.stderr, flush=True)
    rec["token_match"] = token_match
    rec["parameters"] = n_params
    rec["peak_mem_gb"] = round(torch.cuda.max_memory_allocated() / 1e9, 2) if torch.cuda.is_available() else None
    if partial is not None:  # kept if the run is cut short during hf_cb (its slowest part)
        partial(dict(rec))
    if hf_cb:  # last: it sizes its paged cache from free memory (the engine's cache is released first)
        rec.update(hf_cb_rate(backend, prompts, max_new))
    return rec


def unequal_slots(rec: dict[str, Any]) -> dict[str, int] | None:
    """Each path's slot count (the main path as `main`, every block by its name) when they differ, else None.
    A path given fewer slots than prompts decodes in waves, so its tok/s is not comparable with one that
    fitted them all (12B on the H100, 2026-12-07: bf16 228 slots beside the FP8 copies, the e4m3 cache 256)."""
    slots = {"main": rec.get("engine_slots")} | {k: v["engine_slots"] for k, v in rec.items()
                                                  if isinstance(v, dict) and "engine_slots" in v}
    seen = {v for v in slots.values() if v is not None}
    return {k: v for k, v in slots.items() if v is not None} if len(seen) > 1 else None


def greedy_each(backend: Any, prompts: list[str], max_new: int, switch: Any) -> dict[bool, list[list[int]]]:
    """The engine's greedy tokens with a switch off and on (`switch(on)` sets it), for their agreement."""
    eng = backend.engine()
    ids = [f"b{i}" for i in range(len(prompts))]
    rows = {}
    for on in (False, True):
        switch(on)
        with torch.inference_mode():
            rows[on] = eng.generate(backend.encode(prompts), ids, max_new, 0.0, 1.0, 0, [], 1)
    return rows


def fp8_block(backend: Any, prompts: list[str], greedy: GenerationParams, sampled: GenerationParams, batch: int,
              max_new: int, w_bytes: int, main: dict[str, Any], bf16_scores: list[dict[str, float]] | None,
              n_params: int) -> dict[str, Any]:
    """The engine with FP8 projections against its bf16 main path, on the same loaded model (`--fp8 both`)."""
    dec = backend.engine().dec
    try:
        rows = greedy_each(backend, prompts, max_new, lambda on: setattr(dec, "use_fp8", on))
        block = engine_paths(backend, prompts, greedy, sampled, batch, max_new, w_bytes)
        q_bytes = sum(f.weight.numel() for lay in dec.fp8 for f in (lay.qkv, lay.gate_up, lay.o, lay.down)
                      if f is not None)  # bf16 bytes 2 per weight, FP8 1
        if "limit_ms_step" in block:
            kv_ms = block["limit_ms_step"] - 1000 * w_bytes / HBM_BYTES_S
            fp8_limit = kv_ms + 1000 * (w_bytes - q_bytes) / HBM_BYTES_S
            block["limit_ms_step_fp8_bytes"] = round(fp8_limit, 2)
            block["limit_fraction_fp8_bytes"] = round(fp8_limit / block["engine_ms_step"], 3)
        if bf16_scores is not None:
            rate, n_tok, scores = critic_rate(backend, prompts, engine=True)
            block["critic_prompts_s"] = round(rate, 1)
            block["critic_mfu"] = round(2 * n_params * n_tok * rate / PEAK_BF16, 3)
    finally:
        dec.use_fp8 = False
    out: dict[str, Any] = {"fp8": block}
    out["fp8_over_bf16"] = round(block["engine_tok_s"] / main["engine_tok_s"], 3)
    out["fp8_over_bf16_sampled"] = round(block["engine_sampled_tok_s"] / main["engine_sampled_tok_s"], 3)
    out["fp8_tokens_agree"] = tokens_agree(rows[False], rows[True])
    if bf16_scores is not None:
        out["fp8_critic_same_choice"] = round(sum(max(a, key=a.get) == max(b, key=b.get)
                                                  for a, b in zip(scores, bf16_scores)) / len(scores), 4)
        out["fp8_critic_max_abs_diff"] = round(max(abs(a[c] - b[c]) for a, b in zip(scores, bf16_scores)
                                                   for c in a), 6)
    out["fp8_quantized_weights"] = q_bytes
    return out


def kv_fp8_block(backend: Any, prompts: list[str], greedy: GenerationParams, sampled: GenerationParams, batch: int,
                 max_new: int, w_bytes: int, base: dict[str, Any], name: str, base_name: str) -> dict[str, Any]:
    """The engine with its KV cache in e4m3 against `base` (the same path with its cache in the model dtype), on
    the same loaded model (`--kv-fp8 both`): the block `name`, `{name}_over_{base_name}` (and `_sampled`), and
    `{name}_tokens_agree` (greedy tokens against the same path's with the model dtype's cache)."""
    dec = backend.engine().dec
    try:
        rows = greedy_each(backend, prompts, max_new, lambda on: setattr(dec, "use_kv_fp8", on))
        block = engine_paths(backend, prompts, greedy, sampled, batch, max_new, w_bytes)
        if "limit_ms_step" in block:  # engine_paths counted e4m3's bytes: restate on the model dtype's
            w_ms = 1000 * w_bytes / HBM_BYTES_S
            wide = torch.finfo(dec.dtype).bits // 8
            block["limit_ms_step_kv_fp8_bytes"] = block["limit_ms_step"]
            block["limit_fraction_kv_fp8_bytes"] = block["limit_fraction"]
            block["limit_ms_step"] = round(w_ms + (block["limit_ms_step"] - w_ms) * wide, 2)
            block["limit_fraction"] = round(block["limit_ms_step"] / block["engine_ms_step"], 3)
    finally:
        dec.use_kv_fp8 = False
    return {name: block, f"{name}_over_{base_name}": round(block["engine_tok_s"] / base["engine_tok_s"], 3),
            f"{name}_over_{base_name}_sampled": round(block["engine_sampled_tok_s"] / base["engine_sampled_tok_s"], 3),
            f"{name}_tokens_agree": tokens_agree(rows[False], rows[True])}


def engine_paths(backend: Any, prompts: list[str], greedy: GenerationParams, sampled: GenerationParams,
                 batch: int, max_new: int, w_bytes: int) -> dict[str, Any]:
    """Engine greedy and sampled tok/s (each warmed at full size, best of REPEATS) and the limit fraction."""
    out: dict[str, Any] = {}
    _, warm_s, _, warm_texts = engine_run(backend, prompts, greedy)  # warm-up (stop tables, compilation, graphs)
    out["engine_warmup_s"] = round(warm_s, 2)
    (tok, secs, stats, texts), _ = best_of(lambda: engine_run(backend, prompts, greedy), seconds_of=lambda r: r[1])
    out["engine_tok_s"] = round(tok / secs, 1)
    out["engine_tokens"] = tok
    out["engine_ms_step"] = round(1000 * secs / max(1, stats.steps), 2) if stats else None
    out["engine_steps"] = stats.steps if stats else None
    out["engine_slots"] = stats.slots if stats else None
    out["engine_occupancy"] = stats.occupancy if stats else None  # slot-steps that drew a token (EngineStats)
    out["engine_graphs"] = stats.graphs if stats else None
    out["engine_compiled"] = stats.compiled if stats else None
    out["engine_attention_kernel"] = stats.attention_kernel if stats else None
    out["engine_kept_step"] = stats.kept_step if stats else None  # the timed call replayed the warm-up's graphs
    if stats is not None and stats.graphs:  # device-timeline spans of the timed call (CUDA events)
        out["engine_prefill_ms"] = stats.prefill_ms
        out["engine_capture_ms"] = stats.capture_ms
        out["engine_captures"] = stats.captures
        out["engine_decode_ms_step"] = round((1000 * secs - stats.prefill_ms - stats.capture_ms) / max(1, stats.steps), 2)
    _, warm_s, _, warm_sampled = engine_run(backend, prompts, sampled)  # warm-up of the sampling graphs
    out["engine_sampled_warmup_s"] = round(warm_s, 2)
    (tok_s, secs_s, st_s, texts_s), _ = best_of(lambda: engine_run(backend, prompts, sampled), seconds_of=lambda r: r[1])
    out["engine_sampled_tok_s"] = round(tok_s / secs_s, 1)
    out["sampled_over_greedy"] = round(out["engine_sampled_tok_s"] / out["engine_tok_s"], 3)
    out["engine_sampled_tokens"] = tok_s
    # the same texts from the call that captured the graphs and from a later one (kept graphs, refilled state)
    out["engine_repeat_same"] = warm_texts == texts and warm_sampled == texts_s
    if st_s is not None:
        out["engine_sampled_steps"] = st_s.steps
        out["engine_sampled_ms_step"] = round(1000 * secs_s / max(1, st_s.steps), 2)
        out["engine_sampler_compiled"] = st_s.sampler_compiled
        if stats is not None and stats.steps:  # per step, free of how many tokens the rows produced
            out["sampled_over_greedy_per_step"] = round(out["engine_ms_step"] / out["engine_sampled_ms_step"], 3)
        if st_s.graphs:
            out["engine_sampled_prefill_ms"] = st_s.prefill_ms
            out["engine_sampled_capture_ms"] = st_s.capture_ms
            out["engine_sampled_decode_ms_step"] = round(
                (1000 * secs_s - st_s.prefill_ms - st_s.capture_ms) / max(1, st_s.steps), 2)
    eng = backend.engine()
    if eng is not None and stats is not None and stats.steps:
        prompt_len = sum(len(x) for x in backend.encode(prompts)) / len(prompts)
        kv = eng.kv_bytes_per_token() * min(batch, len(prompts)) * (prompt_len + max_new / 2)
        out["limit_ms_step"] = round(1000 * (w_bytes + kv) / HBM_BYTES_S, 2)
        out["limit_fraction"] = round(out["limit_ms_step"] / out["engine_ms_step"], 3)
    return out


def hf_cb_rate(backend: Any, prompts: list[str], max_new: int) -> dict[str, Any]:
    """transformers' own continuous batching (`model.generate_batch`, default settings, greedy) on the
    same prompts: one timed call (its CUDA-graph warm-up inside), tokens it generated / seconds."""
    from transformers import GenerationConfig

    eng = backend.engine()
    if eng is not None:
        eng.release()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    cfg = GenerationConfig(max_new_tokens=max_new, do_sample=False, eos_token_id=backend.eos_ids,
                           pad_token_id=backend.pad_id)
    try:
        with torch.inference_mode():
            outs, secs = timed(lambda: backend.model.generate_batch(inputs=backend.encode(prompts), generation_config=cfg))
        tokens = sum(len(o.generated_tokens) for o in outs.values())
        return {"hf_cb_tok_s": round(tokens / secs, 1), "hf_cb_tokens": tokens, "hf_cb_seconds": round(secs, 2),
                "hf_cb_timing": "one call, default ContinuousBatchingConfig (its CUDA-graph warm-up included)"}
    except Exception as e:  # noqa: BLE001 - the reference point is optional; the record says why it is missing
        traceback.print_exc()
        return {"hf_cb_tok_s": None, "hf_cb_error": f"{type(e).__name__}: {e}"[:500]}
    finally:
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def plain_reference(backend: Any, prompts: list[str], max_new: int) -> list[list[int]]:
    """Plain greedy `generate` of every prompt, in batches of 64: the reference of the token matches."""
    rows: list[list[int]] = []
    for k in range(0, len(prompts), 64):
        rows += plain_generate(backend, prompts[k:k + 64], max_new, forced=False)
    return rows


def prefix_match(ref: list[list[int]], got: list[list[int]], eos: set[int]) -> float:
    """Common-prefix tokens of `got` and `ref` over the reference's tokens up to its first EOS (included)."""
    common = total = 0
    for r, g in zip(ref, got):
        r = r[: next((j + 1 for j, t in enumerate(r) if t in eos), len(r))]
        k = 0
        while k < min(len(r), len(g)) and r[k] == g[k]:
            k += 1
        common += k
        total += len(r)
    return round(common / max(1, total), 4)


def measure_token_match(backend: Any, prompts: list[str], max_new: int) -> float:
    """Common-prefix tokens of engine vs plain greedy output, over the reference's tokens (EOS included)."""
    ref_rows = plain_reference(backend, prompts, max_new)
    got = backend.engine().generate(backend.encode(prompts), [str(i) for i in range(len(prompts))], max_new, 0.0,
                                    1.0, 0, [], 0)
    return prefix_match(ref_rows, got, set(backend.eos_ids))


def release(backend: Any) -> None:
    """Drop a loaded model (engine cache, the per-process backend cache) before the next one loads."""
    from stage1_core import model as M

    eng = backend.engine()
    if eng is not None:
        eng.release()
    M._BACKENDS.clear()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default=None, help="default 4b,12b,27b,270m (smoke: tiny)")
    ap.add_argument("--batches", default="64,256")
    ap.add_argument("--dtypes", default="bfloat16,float32", help="270m only")
    ap.add_argument("--out", default=None)
    ap.add_argument("--smoke", action="store_true", help="CPU check of this script with random:gemma3-tiny")
    ap.add_argument("--fuse", choices=("on", "off", "both"), default="on",
                    help="engine with fused q/k/v and gate/up GEMMs (on), without (off), or both in turn on one "
                         "loaded model (both: the record's engine_* fields are the fused path's, `unfused` the other)")
    ap.add_argument("--compile", choices=("on", "off", "both"), default="on",
                    help="engine with its layers compiled (torch.compile, on), eager (off), or both in turn on one "
                         "loaded model (both: the record's engine_* fields are the compiled path's, `uncompiled` "
                         "the other)")
    ap.add_argument("--sampler", choices=("new", "legacy", "both"), default="new",
                    help="the engine's token draw as it is (new), as of 08ca440 (legacy: float32 logits, eager), or "
                         "both in turn on one engine (both: the record's engine_* fields are the new draw's, "
                         "`legacy_sampler` the other; adds `sampler_draw`, one draw alone)")
    ap.add_argument("--attention", choices=("on", "off", "both"), default="on",
                    help="decode attention by the live-KV Triton kernel (on), by two batched matmuls over the context "
                         "bucket (off), or both in turn on one engine (both: the record's engine_* fields are the "
                         "kernel's, `matmul_attention` the other; adds `attention_kernel`: numerics, one call alone)")
    ap.add_argument("--autotune", choices=("on", "off", "both"), default="off",
                    help="decode's stretches compiled by inductor's max-autotune (on; STAGE1_ENGINE_AUTOTUNE=1), by the "
                         "default compile (off), or both in turn on one engine (both: the record's engine_* fields "
                         "are the autotuned path's, `default_compile` the other, `autotuned_over_default`)")
    ap.add_argument("--keep-graphs", choices=("on", "off", "both"), default="on",
                    help="the decode step's CUDA graphs kept across calls like the last (on, the engine's default), "
                         "captured in every call (off), or both: the main path kept, `graphs_per_call` the other")
    ap.add_argument("--fp8", choices=("off", "on", "both"), default="off",
                    help="projections as FP8 GEMMs (fp8.py; STAGE1_ENGINE_FP8=1): on, the whole record; both: the "
                         "main path in bf16 and the `fp8` block after it, `fp8_over_bf16`, `fp8_tokens_agree`")
    ap.add_argument("--kv-fp8", choices=("off", "on", "both"), default="off",
                    help="the KV cache in e4m3 (decoder.py; STAGE1_ENGINE_KV_FP8=1): on, the whole record; both: the "
                         "main path's cache in the model dtype and the `kv_fp8` block after it")
    ap.add_argument("--no-hf-cb", action="store_true", help="skip transformers' generate_batch (hf_cb_tok_s)")
    ap.add_argument("--no-plain", action="store_true", help="skip the warmed plain generate (plain_warm_tok_s, ratio)")
    ap.add_argument("--tokenizer-dir", default=None,
                    help="random models: the embedded model's tokenizer from this HF folder instead of the one "
                         "converted from the embedded GGUF (a device machine without the GGUF)")
    ap.add_argument("--note", default=None, help="a note stored in each record (e.g. the command and commit)")
    a = ap.parse_args()
    if a.fuse == "off":
        os.environ["STAGE1_ENGINE_FUSE"] = "0"
    if a.compile == "off":
        os.environ["STAGE1_ENGINE_COMPILE"] = "0"
    elif torch.cuda.is_available() or a.compile == "both":
        os.environ.setdefault("STAGE1_ENGINE_COMPILE", "1")
    os.environ["STAGE1_ENGINE_ATTENTION"] = "0" if a.attention == "off" else "1"  # as the engine's CUDA default
    opts = {"fuse": a.fuse, "hf_cb": not a.no_hf_cb, "compile": a.compile, "sampler": a.sampler,
            "plain": not a.no_plain, "attention": a.attention, "autotune": a.autotune,
            "keep_graphs": a.keep_graphs,
            "fp8": a.fp8, "kv_fp8": a.kv_fp8}
    if a.fp8 != "off":
        os.environ["STAGE1_ENGINE_FP8"] = "1"
    if a.kv_fp8 != "off":
        os.environ["STAGE1_ENGINE_KV_FP8"] = "1"
    if a.autotune != "off":
        os.environ["STAGE1_ENGINE_AUTOTUNE"] = "1"
    if a.tokenizer_dir:
        use_tokenizer_dir(a.tokenizer_dir)
    date = dt.date.today().isoformat()
    out = Path(a.out or REPO / "bench" / "results" / f"gpu_engine-{date}{'-smoke' if a.smoke else ''}.json")
    records: list[dict[str, Any]] = json.loads(out.read_text())["records"] if out.is_file() else []
    batches = [int(b) for b in a.batches.split(",")]
    models = (a.models or ("tiny" if a.smoke else "4b,12b,27b,270m")).split(",")
    for name in models:
        t0 = time.perf_counter()
        try:
            if name == "270m":
                n, max_new = (16, 16) if a.smoke else (256, 128)
                prompts = real_prompts(n)
                for dtype in a.dtypes.split(","):
                    backend = load_backend(ModelConfig(dtype=dtype))
                    matches = {}
                    eng = backend.engine()
                    fp8_match = None
                    if eng is not None and eng.dec.fp8:  # the record's main path: FP8 only with --fp8 on
                        eng.dec.use_fp8 = True
                        fp8_match = measure_token_match(backend, prompts, 64 if not a.smoke else 8)
                        eng.dec.use_fp8 = a.fp8 == "on"
                    kv_match = None
                    if eng is not None and eng.dec.kv_fp8:  # the record's main path: e4m3 only with --kv-fp8 on
                        eng.dec.use_kv_fp8 = True
                        kv_match = measure_token_match(backend, prompts, 64 if not a.smoke else 8)
                        eng.dec.use_kv_fp8 = a.kv_fp8 == "on"
                    for compiled in ([False, True] if a.compile == "both" and eng is not None and eng.dec.compiled
                                     else [None]):
                        if compiled is not None:
                            eng.dec.use_compiled = compiled
                        matches[compiled] = measure_token_match(backend, prompts, 64 if not a.smoke else 8)
                    match = matches[list(matches)[-1]]
                    rec = record_for(backend, "270m", len(prompts), dtype, prompts, max_new, True, match, **opts)
                    if False in matches:
                        rec["token_match_uncompiled"] = matches[False]
                    if fp8_match is not None:
                        rec["fp8_token_match"] = fp8_match
                    if kv_match is not None:
                        rec["kv_fp8_token_match"] = kv_match
                    rec["load_seconds"] = backend.fingerprint.get("load_seconds")
                    rec["note"] = a.note
                    upsert(records, rec)
                    write(out, records)
                    print(json.dumps(rec), flush=True)
                    release(backend)
                continue
            mid = f"random:gemma3-{name}"
            cfg = ModelConfig(id=mid, dtype="float32" if a.smoke else "bfloat16")
            backend = load_backend(cfg)
            load_s = time.perf_counter() - t0
            max_new, plen = (8, 32) if a.smoke else (128, 128)
            prompts_all = bench_prompts(backend, max(batches), plen)
            for b in batches:
                def keep(r: dict[str, Any]) -> None:
                    r.update(load_seconds=round(load_s, 1), note=a.note)
                    upsert(records, r)
                    write(out, records)

                rec = record_for(backend, name, b, cfg.dtype, prompts_all[:b], max_new, True, None, partial=keep,
                                 **opts)
                rec["load_seconds"] = round(load_s, 1)
                rec["note"] = a.note
                upsert(records, rec)
                write(out, records)
                print(json.dumps(rec), flush=True)
            release(backend)
            del backend
        except Exception as e:  # noqa: BLE001 - record the failure and go on with the next model
            traceback.print_exc()
            upsert(records, {"model": name, "batch": None, "dtype": None, "error": f"{type(e).__name__}: {e}"})
            write(out, records)
        print(f"# {name}: {time.perf_counter() - t0:.1f}s", file=sys.stderr, flush=True)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
