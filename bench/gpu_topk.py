"""The sampler's draw alone on the GPU, against the argmax greedy takes: what the sampled path pays per
step (the engine's sampled/greedy gap).

    python bench/gpu_topk.py [--rows 64,256] [--vocab 262144] [--dtypes bfloat16,float32] [--out FILE]

For each dtype and row count, on random logits of the shape the engine's draw sees (std 1.25, as a random
model's), in one process, every timing a CUDA graph replayed 50 times after 3 eager warm-ups (best of three
replays):
- `ms`: `torch.topk` (k = sampling.TOP_CANDIDATES) on the logits' own dtype, the draw's candidates, and
  greedy's argmax.
- `draw_ms`: the whole top-p 0.9 / temperature 0.7 draw (sampling.Sampler, compiled), and
  `draw_over_argmax`.

(Until 2026-12-07 it also timed a two-stage top-k at several slice counts; slower at every count, it was
removed: docs/performance.md.)

`--smoke` runs the same on the CPU at a small size (eager timings, no graphs) so the script stays runnable here.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
os.environ.setdefault("DO_NOT_TRACK", "1")

import torch  # noqa: E402

from bench import gpu_engine as GE  # noqa: E402
from stage1_core.model import sampling as SM  # noqa: E402

K = SM.TOP_CANDIDATES


def timer(cuda: bool) -> Callable[[Callable[[], Any]], float]:
    """ms per call: on CUDA a graph replayed 50 times, best of three; on the CPU the best of 5 eager calls."""
    if cuda:
        return lambda fn: GE.graph_ms(fn, reps=50, tries=3)

    def eager_ms(fn: Callable[[], Any]) -> float:
        fn()
        best = float("inf")
        for _ in range(5):
            t0 = time.perf_counter()
            fn()
            best = min(best, time.perf_counter() - t0)
        return round(1000 * best, 3)

    return eager_ms


def record(rows: int, vocab: int, dtype: torch.dtype, k: int = K) -> dict[str, Any]:
    cuda = torch.cuda.is_available()
    dev = "cuda" if cuda else "cpu"
    ms_of = timer(cuda)
    g = torch.Generator(device=dev).manual_seed(0)
    logits = (torch.randn(rows, vocab, device=dev, generator=g) * 1.25).to(dtype)
    rec: dict[str, Any] = {"rows": rows, "vocab": vocab, "dtype": str(dtype).replace("torch.", ""), "k": k}
    with torch.inference_mode():
        rec["ms"] = {"topk": ms_of(lambda: logits.topk(k, dim=-1)), "argmax": ms_of(lambda: logits.argmax(-1))}
        seeds = torch.tensor([SM.row_seed(1, f"d{i}") for i in range(rows)], dtype=torch.long, device=dev)
        steps = torch.full((rows,), 3, dtype=torch.long, device=dev)
        smp = SM.Sampling("nucleus", torch.tensor(0.7, device=dev), torch.tensor(0.9, device=dev),
                          torch.tensor(0, dtype=torch.long, device=dev))
        sampler = SM.Sampler(compile=cuda)
        args = (logits, smp, seeds, steps)
        rec["draw_same_as_eager"] = bool(torch.equal(sampler(*args), SM.sample(*args)))
        rec["draw_ms"] = ms_of(lambda: sampler(*args))
        rec["draw_over_argmax"] = round(rec["draw_ms"] / rec["ms"]["argmax"], 2)
        rec["draw_compiled"] = sampler.use_compiled
        rec["draw_compile_failed"] = sampler.compile_failed
    return rec


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", default="64,256")
    ap.add_argument("--vocab", type=int, default=262144)
    ap.add_argument("--dtypes", default="bfloat16,float32")
    ap.add_argument("--out", default=None)
    ap.add_argument("--smoke", action="store_true", help="CPU, 8 rows of 16,384, k 64, to check the script")
    ap.add_argument("--note", default=None)
    a = ap.parse_args()
    if a.smoke:
        rec = record(8, 16384, torch.bfloat16, k=64)
        assert rec["draw_same_as_eager"], rec
        print(json.dumps(rec))
        print("gpu_topk smoke: ok")
        return 0
    if not torch.cuda.is_available():
        print("gpu_topk: no CUDA device here (--smoke checks the script on the CPU)", file=sys.stderr)
        return 2
    records = []
    out = Path(a.out or REPO / "bench" / "results" / f"gpu_topk-{dt.date.today()}.json")
    for dtype in a.dtypes.split(","):
        for rows in (int(r) for r in a.rows.split(",")):
            rec = record(rows, a.vocab, getattr(torch, dtype))
            rec.update(device=torch.cuda.get_device_name(), torch=torch.__version__, note=a.note,
                       date=str(dt.date.today()))
            records.append(rec)
            print(json.dumps({k: rec[k] for k in ("rows", "dtype", "ms", "draw_ms", "draw_over_argmax",
                                                   "draw_same_as_eager")}), flush=True)
            GE.write(out, records)  # each record as it comes, atomically
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
