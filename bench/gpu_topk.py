"""The sampler's top candidates alone on the GPU: one `torch.topk` over the vocabulary against the two-stage
selection (`sampling.top_candidates`) at several slice counts.

    python bench/gpu_topk.py [--rows 64,256] [--vocab 262144] [--dtypes bfloat16,float32]
                             [--chunks 4,8,16,32,64,128,256] [--out FILE]

For each dtype and row count, on random logits of the shape the engine's draw sees (std 1.25, as a random
model's), in one process, every timing a CUDA graph replayed 50 times after 3 eager warm-ups (best of three
replays):
- `ms`: `torch.topk` (k = sampling.TOP_CANDIDATES) on the logits' own dtype (the draw's default),
  `chunks_<C>` the two-stage selection at C slices, and greedy's argmax for scale; `best_chunks` and
  `best_over_one_topk` (one topk's ms / the best two-stage ms).
- `same_values`: per slice count, the two-stage values equal `torch.topk`'s, on these logits and on tie-heavy
  ones (values rounded to 0.25, so thousands tie at the k-th).
- `draw_ms`: the whole top-p 0.9 / temperature 0.7 draw (sampling.Sampler, compiled) with one topk and at
  each slice count; `draw_tokens_agree`: the fraction of rows whose drawn token is the same as with one topk
  (equal logits may order candidates differently; 1.0 where none tie).

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


def record(rows: int, vocab: int, dtype: torch.dtype, chunk_counts: list[int], k: int = K) -> dict[str, Any]:
    cuda = torch.cuda.is_available()
    dev = "cuda" if cuda else "cpu"
    ms_of = timer(cuda)
    g = torch.Generator(device=dev).manual_seed(0)
    logits = (torch.randn(rows, vocab, device=dev, generator=g) * 1.25).to(dtype)
    ties = ((torch.randn(rows, vocab, device=dev, generator=g) * 1.25 * 4).round() / 4).to(dtype)
    chunk_counts = [c for c in chunk_counts if vocab % c == 0 and vocab // c >= k]
    rec: dict[str, Any] = {"rows": rows, "vocab": vocab, "dtype": str(dtype).replace("torch.", ""), "k": k,
                           "chunks": chunk_counts}
    with torch.inference_mode():
        rec["ms"] = {"one_topk": ms_of(lambda: logits.topk(k, dim=-1)), "argmax": ms_of(lambda: logits.argmax(-1))}
        rec["same_values"] = {}
        for c in chunk_counts:
            rec["ms"][f"chunks_{c}"] = ms_of(lambda: SM.top_candidates(logits, k, c))
            rec["same_values"][str(c)] = all(bool(torch.equal(SM.top_candidates(x, k, c)[0], x.topk(k, dim=-1).values))
                                             for x in (logits, ties))
        best = min(chunk_counts, key=lambda c: rec["ms"][f"chunks_{c}"]) if chunk_counts else None
        rec["best_chunks"] = best
        if best is not None:
            rec["best_over_one_topk"] = round(rec["ms"]["one_topk"] / rec["ms"][f"chunks_{best}"], 3)
        seeds = torch.tensor([SM.row_seed(1, f"d{i}") for i in range(rows)], dtype=torch.long, device=dev)
        steps = torch.full((rows,), 3, dtype=torch.long, device=dev)
        smp = SM.Sampling("nucleus", torch.tensor(0.7, device=dev), torch.tensor(0.9, device=dev),
                          torch.tensor(0, dtype=torch.long, device=dev))
        sampler = SM.Sampler(compile=cuda, chunks=0)
        args = (logits, smp, seeds, steps)
        want = sampler(*args)
        rec["draw_ms"] = {"one_topk": ms_of(lambda: sampler(*args))}
        rec["draw_tokens_agree"] = {}
        for c in chunk_counts:
            sampler.chunks = c
            got = sampler(*args)
            rec["draw_tokens_agree"][str(c)] = round(float((got == want).float().mean()), 4)
            rec["draw_ms"][f"chunks_{c}"] = ms_of(lambda: sampler(*args))
        rec["draw_compiled"] = sampler.use_compiled
        rec["draw_compile_failed"] = sampler.compile_failed
        if best is not None:
            rec["draw_best_over_one_topk"] = round(rec["draw_ms"]["one_topk"] / rec["draw_ms"][f"chunks_{best}"], 3)
    return rec


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", default="64,256")
    ap.add_argument("--vocab", type=int, default=262144)
    ap.add_argument("--dtypes", default="bfloat16,float32")
    ap.add_argument("--chunks", default="4,8,16,32,64,128,256")
    ap.add_argument("--out", default=None)
    ap.add_argument("--smoke", action="store_true", help="CPU, 8 rows of 16,384, k 64, to check the script")
    ap.add_argument("--note", default=None)
    a = ap.parse_args()
    chunk_counts = [int(c) for c in a.chunks.split(",")]
    if a.smoke:
        rec = record(8, 16384, torch.bfloat16, chunk_counts, k=64)
        assert all(rec["same_values"].values()), rec
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
            rec = record(rows, a.vocab, getattr(torch, dtype), chunk_counts)
            rec.update(device=torch.cuda.get_device_name(), torch=torch.__version__, note=a.note,
                       date=str(dt.date.today()))
            records.append(rec)
            print(json.dumps({k: rec[k] for k in ("rows", "dtype", "ms", "best_chunks", "same_values", "draw_ms",
                                                   "draw_tokens_agree")}), flush=True)
            GE.write(out, records)  # each record as it comes, atomically
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
