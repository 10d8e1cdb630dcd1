"""Where a decode step's time goes: the engine's kernels for one model and batch (not a test).

    python bench/engine_profile.py [--model random:gemma3-12b] [--batch 256] [--steps 4]

Prefills `batch` 128-token prompts into the engine's cache, then runs `steps` eager decode steps under
torch.profiler and prints the top kernels by device time, plus the step time with and without the
CUDA graph, each with the fused q/k/v and gate/up GEMMs and without (the profile runs the fused path).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("USE_HUB_KERNELS", "0")

import torch  # noqa: E402

from stage1_core.infra.config import ModelConfig  # noqa: E402
from stage1_core.model.engine import _State  # noqa: E402
from stage1_core.model.sampling import Sampling  # noqa: E402
from stage1_core.model import load_backend  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="random:gemma3-12b")
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--steps", type=int, default=4)
    a = ap.parse_args()
    backend = load_backend(ModelConfig(id=a.model))
    eng = backend.engine()
    dev = eng.device
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    acts = [torch.profiler.ProfilerActivity.CUDA] if dev.type == "cuda" else [torch.profiler.ProfilerActivity.CPU]
    s, ctx = a.batch, 320
    eng._ensure_cache(s, ctx)
    eng.dec.rope_tables(ctx)
    nxt, fire = eng._tables(["\n\n", "\nInstruction:", "\nResponse:"])
    smp = Sampling("greedy", torch.tensor(1.0, device=dev), torch.tensor(1.0, device=dev),
                   torch.tensor(0, device=dev))
    z = lambda dt=torch.long: torch.zeros(s, dtype=dt, device=dev)  # noqa: E731
    st = _State(tok=z(), pos=torch.full((s,), 128, device=dev), ngen=z(), live=torch.ones(s, dtype=torch.bool, device=dev),
                seed=z(), stop=z(), out=torch.zeros(s, 128, dtype=torch.long, device=dev),
                max_new=torch.tensor(10_000, device=dev))
    with torch.inference_mode():
        toks = torch.randint(10, 1000, (s, 128), device=dev)
        eng.dec.prefill(toks, torch.full((s,), 128, device=dev), torch.arange(s, device=dev), eng._cache)
        for fused in ((False, True) if eng.dec.fused else (False,)):
            eng.dec.use_fused = fused
            for graphs in ((False, True) if dev.type == "cuda" else (False,)):
                eng.use_graphs = graphs
                step = eng._step_fn(st, smp, nxt, fire, ctx, s)
                for _ in range(3):
                    step(192)
                sync()
                t0 = time.perf_counter()
                for _ in range(10):
                    step(192)
                sync()
                print(f"fused={fused} graphs={graphs}: {1000 * (time.perf_counter() - t0) / 10:.2f} ms/step "
                      f"(context 192, {s} rows)")
        eng.use_graphs = False
        step = eng._step_fn(st, smp, nxt, fire, ctx, s)
        with torch.profiler.profile(activities=acts) as prof:
            for _ in range(a.steps):
                step(192)
            sync()
    print(prof.key_averages().table(sort_by="cuda_time_total" if dev.type == "cuda" else "cpu_time_total", row_limit=25, max_name_column_width=70))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
