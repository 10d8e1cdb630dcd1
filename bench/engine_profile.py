"""Where a generate call's time goes: the engine's prefill, decode step and captures for one model and
batch, and its top kernels (not a test).

    python bench/engine_profile.py [--model random:gemma3-12b] [--batch 256] [--steps 4] [--out FILE]
                                   [--fp8 off|on|both] [--kv-fp8] [--compiled-only] [--tokenizer-dir DIR]

On one loaded model, for each path (compiled layers off / on; `Engine(compile=...)`, decoder.py; with
`--fp8 on` or `both` also the compiled path with FP8 projections, fp8.py, as `compiled_fp8`), with
the fused q/k/v and gate/up GEMMs unless said otherwise:
- `prefill_ms`: one prefill of `batch` 128-token prompts into consecutive slots of the engine's cache, as
  `Engine.generate` admits a batch (synchronised, best of 3 after a warm-up);
- `step_ms`: one decode step at a 192-token context, eager and CUDA-graph replayed (the mean of 10 after
  3 warm-ups), fused and unfused (uncompiled path only);
- `generate`: a whole `Engine.generate` of the benchmark's shape (`batch` prompts, 128 new tokens, stops
  armed, greedy) after a warm-up, best of 3: seconds, steps, ms/step, and the device-timeline spans of
  its prefills and graph captures (EngineStats.prefill_ms / capture_ms); what remains is decode;
- the top kernels by device time of `--steps` eager decode steps and of one prefill (torch.profiler).
Prints a table per path and writes the numbers as JSON (`--out`).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("USE_HUB_KERNELS", "0")

import torch  # noqa: E402

from bench import gpu_engine as GE  # noqa: E402
from stage1_core.infra.config import ModelConfig  # noqa: E402
from stage1_core.model.rows import slot_slice  # noqa: E402
from stage1_core.model.step import StepState  # noqa: E402
from stage1_core.model.sampling import Sampling  # noqa: E402
from stage1_core.model import load_backend  # noqa: E402

STOPS = ["\n\n", "\nInstruction:", "\nResponse:"]


def kernel_table(prof: Any, cuda: bool, rows: int = 40) -> list[dict[str, Any]]:
    """The top kernels (name, device ms total, calls) of a profile, by device time."""
    out = []
    for e in prof.key_averages():
        t = (getattr(e, "device_time_total", None) or getattr(e, "cuda_time_total", 0)) if cuda else e.cpu_time_total
        out.append({"name": e.key[:90], "ms": round(t / 1000, 3), "calls": e.count})
    return sorted(out, key=lambda r: -r["ms"])[:rows]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="random:gemma3-12b")
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--out", default=None)
    ap.add_argument("--no-compile", action="store_true", help="profile the uncompiled path only")
    ap.add_argument("--compiled-only", action="store_true", help="profile the compiled path(s) only")
    ap.add_argument("--fp8", choices=("off", "on", "both"), default="off",
                    help="the compiled path with FP8 projections too (both) or instead of bf16 (on)")
    ap.add_argument("--kv-fp8", action="store_true",
                    help="every path with its KV cache in e4m3 (decoder.py, STAGE1_ENGINE_KV_FP8=1)")
    ap.add_argument("--tokenizer-dir", default=None,
                    help="random models: the embedded tokenizer from this HF folder, not the embedded GGUF "
                         "(as bench/gpu_engine.py's)")
    a = ap.parse_args()
    if a.tokenizer_dir:
        from bench.gpu_engine import use_tokenizer_dir

        use_tokenizer_dir(a.tokenizer_dir)
    if a.fp8 != "off":
        os.environ["STAGE1_ENGINE_FP8"] = "1"  # the decoder quantizes its copies when the engine is built
    if a.kv_fp8:
        os.environ["STAGE1_ENGINE_KV_FP8"] = "1"
    backend = load_backend(ModelConfig(id=a.model))
    eng = backend.engine()
    dev = eng.device
    cuda = dev.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    acts = [torch.profiler.ProfilerActivity.CUDA] if cuda else [torch.profiler.ProfilerActivity.CPU]
    s, ctx, plen, max_new = a.batch, 320, 128, 128
    rec: dict[str, Any] = {"model": a.model, "batch": s, "device": torch.cuda.get_device_name() if cuda else "cpu",
                           **GE.versions(), "context": 192, "kv_fp8": eng.dec.use_kv_fp8, "paths": {}}
    eng._ensure_cache(s, ctx)
    eng.dec.rope_tables(ctx)
    nxt, fire = eng._tables(STOPS)
    smp = Sampling("greedy", torch.tensor(1.0, device=dev), torch.tensor(1.0, device=dev),
                   torch.tensor(0, device=dev))
    st = StepState.zeros(s, max_new, dev)  # every row live at the prompt's end, never ending (max_new far off)
    st.pos.fill_(plen)
    st.live.fill_(True)
    st.max_new.fill_(10_000)
    g = torch.Generator().manual_seed(0)
    prompts = [[2] + torch.randint(10, 100_000, (plen - 1,), generator=g).tolist() for _ in range(s)]
    toks = torch.tensor(prompts, device=dev)
    # the slots as the engine passes a batch admitted at once (rows.slot_slice): a strided copy writes the K/V,
    # not the index_put that a tensor of slot ids takes, so the kernel table shows the engine's own writes
    lengths, slots = torch.full((s,), plen, device=dev), slot_slice(range(s))
    modes = [(False, False)] if (a.no_compile or not eng.dec.compiled) else [(False, False), (True, False)]
    if a.compiled_only:
        modes = [m for m in modes if m[0]] or modes
    if a.fp8 != "off":
        rec["fp8_unavailable"] = eng.dec.fp8_unavailable
        if eng.dec.fp8:  # FP8 on the compiled path (or the only one there is)
            targets = [m for m in modes if m[0]] or modes
            modes = [m for m in modes if a.fp8 == "both" or m not in targets] + [(c, True) for c, _ in targets]
    for compiled, fp8 in modes:
        eng.dec.use_compiled = compiled
        eng.dec.use_fused = bool(eng.dec.fused)
        eng.dec.use_fp8 = fp8
        st.pos.fill_(plen)
        path: dict[str, Any] = {"compiled": compiled, "fp8": fp8}
        rec["paths"][("compiled" if compiled else "uncompiled") + ("_fp8" if fp8 else "")] = path
        with torch.inference_mode():
            t0 = time.perf_counter()
            eng.dec.prefill(toks, lengths, slots, eng._cache)
            sync()
            path["first_prefill_s"] = round(time.perf_counter() - t0, 2)  # compilation included when on
            best = float("inf")
            for _ in range(3):
                sync()
                t0 = time.perf_counter()
                eng.dec.prefill(toks, lengths, slots, eng._cache)
                sync()
                best = min(best, time.perf_counter() - t0)
            path["prefill_ms"] = round(1000 * best, 1)
            path["step_ms"] = {}
            for fused in ((False, True) if (eng.dec.fused and not compiled) else (bool(eng.dec.fused),)):
                eng.dec.use_fused = fused
                for graphs in ((False, True) if cuda else (False,)):
                    eng.use_graphs = graphs
                    step = eng._step_fn(st, smp, nxt, fire, ctx, s)
                    t0 = time.perf_counter()
                    for _ in range(3):
                        step(192)
                    sync()
                    warm = time.perf_counter() - t0
                    t0 = time.perf_counter()
                    for _ in range(10):
                        step(192)
                    sync()
                    ms = 1000 * (time.perf_counter() - t0) / 10
                    key = f"{'fused' if fused else 'unfused'}_{'graph' if graphs else 'eager'}"
                    path["step_ms"][key] = round(ms, 2)
                    print(f"compiled={compiled} {key}: {ms:.2f} ms/step (context 192, {s} rows; "
                          f"3 warm-up steps {warm:.1f} s)", flush=True)
            eng.dec.use_fused = bool(eng.dec.fused)
            eng.use_graphs = cuda
            gen: list[dict[str, Any]] = []
            for i in range(4):  # a warm-up, then 3 timed
                t0 = time.perf_counter()
                eng.generate(prompts, [f"p{j}" for j in range(s)], max_new, 0.0, 1.0, 0, STOPS, seed=1)
                secs = time.perf_counter() - t0
                stt = eng.stats
                gen.append({"seconds": round(secs, 3), "steps": stt.steps, "ms_step": round(1000 * secs / stt.steps, 2),
                            "tokens": stt.tokens, "prefill_ms": stt.prefill_ms, "capture_ms": stt.capture_ms,
                            "captures": stt.captures, "graphs": stt.graphs, "compiled": stt.compiled,
                            "decode_ms_step": round((1000 * secs - stt.prefill_ms - stt.capture_ms) / stt.steps, 2)})
                print(f"compiled={compiled} generate #{i}: {json.dumps(gen[-1])}", flush=True)
            path["generate_warmup"] = gen[0]
            path["generate"] = min(gen[1:], key=lambda r: r["seconds"])
            eng._ensure_cache(s, ctx)
            eng.use_graphs = False
            step = eng._step_fn(st, smp, nxt, fire, ctx, s)
            step(192)
            sync()
            with torch.profiler.profile(activities=acts) as prof:
                for _ in range(a.steps):
                    step(192)
                sync()
            path["decode_kernels"] = kernel_table(prof, cuda)
            path["decode_profile_steps"] = a.steps
            path["decode_device_ms_step"] = round(sum(
                ((getattr(e, "self_device_time_total", None) or getattr(e, "self_cuda_time_total", 0)) if cuda
                 else e.self_cpu_time_total) for e in prof.key_averages()) / 1000 / a.steps, 2)
            with torch.profiler.profile(activities=acts) as prof:
                eng.dec.prefill(toks, lengths, slots, eng._cache)
                sync()
            path["prefill_kernels"] = kernel_table(prof, cuda, 15)
            eng.use_graphs = cuda
        print(f"\n== compiled={compiled} fp8={fp8}: decode device {path['decode_device_ms_step']} ms/step (eager, profiled), "
              f"prefill {path['prefill_ms']} ms, generate {json.dumps(path['generate'])}")
        for r in path["decode_kernels"]:
            print(f"  {r['ms'] / a.steps:8.3f} ms/step {r['calls'] // a.steps:5d}/step  {r['name']}")
        print("  prefill:")
        for r in path["prefill_kernels"]:
            print(f"  {r['ms']:8.1f} ms {r['calls']:6d}  {r['name']}")
    rec["compile_failed"] = eng.dec.compile_failed
    rec["peak_mem_gb"] = round(torch.cuda.max_memory_allocated() / 1e9, 2) if cuda else None
    text = json.dumps(rec, indent=1)
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
