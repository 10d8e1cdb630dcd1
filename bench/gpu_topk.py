"""The sampler's top candidates alone on the GPU: topk.py's Triton radix select against `torch.topk`.

    python bench/gpu_topk.py [--rows 64,256] [--vocab 262144] [--dtypes bfloat16,float32] [--out FILE]

For each dtype and row count, on random logits of the shape the engine's draw sees (std 1.25, as a random
model's), in one process, every timing a CUDA graph replayed 50 times after 3 eager warm-ups (best of three
replays):
- `exact`: the kernel's ids and values equal `reference_top`'s (value descending, id ascending among equal
  values) on these logits and on tie-heavy ones (values rounded to 0.25, so thousands tie at the k-th);
  `values_equal_torch_topk`: its values equal torch.topk's (the sorted top-k values have one answer).
- `ms`: torch.topk on the logits' own dtype (the draw's today), the kernel at its defaults, and a sweep of
  BLOCK x num_warps x splits (`sweep`), and
  torch's sort of the k packed keys per row alone (`sort_of_k`, part of the kernel's time).
- `draw_ms`: the whole top-p 0.9 / temperature 0.7 draw (sampling.py), eager and compiled, with torch.topk
  and with the kernel, and greedy's argmax for scale; `draw_tokens_agree`: the fraction of rows whose drawn
  token is the same both ways (ties at bf16 may order candidates differently; 1.0 on distinct logits).

`--smoke` runs the reference checks on the CPU (no kernel) so the script stays runnable here.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
os.environ.setdefault("DO_NOT_TRACK", "1")

import torch  # noqa: E402

from bench import gpu_engine as GE  # noqa: E402
from stage1_core.model import sampling as SM  # noqa: E402
from stage1_core.model import topk as TK  # noqa: E402

K = SM.TOP_CANDIDATES


def graph_ms(fn: Any) -> float:
    """ms per call of fn: captured once in a CUDA graph, replayed 50 times, best of three such timings."""
    return GE.graph_ms(fn, reps=50, tries=3)


def exact(logits: torch.Tensor, **kw: Any) -> bool:
    v, i = TK.top_candidates(logits, K, **kw)
    rv, ri = TK.reference_top(logits, K)
    return bool(torch.equal(i, ri) and torch.equal(v, rv))


def record(rows: int, vocab: int, dtype: torch.dtype) -> dict[str, Any]:
    dev = "cuda"
    g = torch.Generator(device=dev).manual_seed(0)
    logits = (torch.randn(rows, vocab, device=dev, generator=g) * 1.25).to(dtype)
    ties = ((torch.randn(rows, vocab, device=dev, generator=g) * 1.25 * 4).round() / 4).to(dtype)
    rec: dict[str, Any] = {"rows": rows, "vocab": vocab, "dtype": str(dtype).replace("torch.", ""), "k": K,
                           "block": TK.BLOCK, "num_warps": TK.NUM_WARPS, "splits": TK.SPLITS}
    with torch.inference_mode():
        packed = torch.randint(0, 1 << 47, (rows, K), device=dev, generator=g)  # the kernel's sort, alone
        rec["exact"] = exact(logits)
        rec["exact_ties"] = exact(ties)
        rec["values_equal_torch_topk"] = bool(torch.equal(TK.top_candidates(logits, K)[0],
                                                          logits.topk(K, dim=-1).values))
        rec["ms"] = {"torch_topk": graph_ms(lambda: logits.topk(K, dim=-1)),
                     "kernel": graph_ms(lambda: TK.top_candidates(logits, K)),
                     "argmax": graph_ms(lambda: logits.argmax(-1)),
                     "sort_of_k": graph_ms(lambda: packed.sort(dim=-1, descending=True))}
        rec["kernel_over_torch"] = round(rec["ms"]["torch_topk"] / rec["ms"]["kernel"], 3)
        sweep = {}
        for block in (1024, 2048, 4096):
            for warps in (4, 8):
                for splits in (8, 16, 32):
                    name = f"b{block}_w{warps}_s{splits}"
                    kw = {"block": block, "num_warps": warps, "splits": splits}
                    try:
                        ok = exact(logits, **kw)
                        sweep[name] = {"ms": graph_ms(lambda: TK.top_candidates(logits, K, **kw)), "exact": ok}
                    except Exception as e:  # noqa: BLE001 - a launch setting that does not build: say so, go on
                        sweep[name] = {"error": f"{type(e).__name__}: {e}"[:300]}
        rec["sweep"] = sweep
        seeds = torch.tensor([SM.row_seed(1, f"d{i}") for i in range(rows)], dtype=torch.long, device=dev)
        steps = torch.full((rows,), 3, dtype=torch.long, device=dev)
        smp = SM.Sampling("nucleus", torch.tensor(0.7, device=dev), torch.tensor(0.9, device=dev),
                          torch.tensor(0, dtype=torch.long, device=dev))
        on, off = SM.Sampler(compile=True, kernel=True), SM.Sampler(compile=True, kernel=False)
        args = (logits, smp, seeds, steps)
        a, b = on(*args), off(*args)
        rec["draw_kernel_used"] = on.kernel_used and on.use_compiled
        rec["draw_failed"] = on.compile_failed or on.kernel_failed or off.compile_failed
        rec["draw_tokens_agree"] = round(float((a == b).float().mean()), 4)
        rec["draw_ms"] = {
            "eager_torch_topk": graph_ms(lambda: SM.sample(*args)),
            "eager_kernel": graph_ms(lambda: SM.sample(*args, draw=SM._draw_top_kernel)),
            "compiled_torch_topk": graph_ms(lambda: off(*args)),
            "compiled_kernel": graph_ms(lambda: on(*args)),
        }
        rec["draw_kernel_over_torch"] = round(rec["draw_ms"]["compiled_torch_topk"] / rec["draw_ms"]["compiled_kernel"], 3)
    return rec


def smoke() -> int:
    """CPU: the reference's contract against torch.topk on distinct values, and its tie order."""
    x = torch.randn(4, 5000)
    v, i = TK.reference_top(x, 100)
    tv, ti = x.topk(100, dim=-1)
    assert torch.equal(v, tv) and torch.equal(i, ti)
    t = torch.tensor([[1.0, 3.0, 3.0, 2.0, 3.0]])
    assert TK.reference_top(t, 2)[1].tolist() == [[1, 2]]
    print("gpu_topk smoke: ok")
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", default="64,256")
    ap.add_argument("--vocab", type=int, default=262144)
    ap.add_argument("--dtypes", default="bfloat16,float32")
    ap.add_argument("--out", default=None)
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--note", default=None)
    a = ap.parse_args()
    if a.smoke:
        return smoke()
    if TK.available() is not None:
        print(f"gpu_topk: no kernel here: {TK.available()}", file=sys.stderr)
        return 2
    import triton

    records = []
    out = Path(a.out or REPO / "bench" / "results" / f"gpu_topk-{dt.date.today()}.json")
    for dtype in a.dtypes.split(","):
        for rows in (int(r) for r in a.rows.split(",")):
            rec = record(rows, a.vocab, getattr(torch, dtype))
            rec.update(device=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
                       note=a.note, date=str(dt.date.today()))
            records.append(rec)
            print(json.dumps({k: rec[k] for k in ("rows", "dtype", "exact", "exact_ties", "ms", "kernel_over_torch",
                                                   "draw_ms", "draw_tokens_agree")}), flush=True)
            out.parent.mkdir(parents=True, exist_ok=True)
            tmp = out.with_name(out.name + ".tmp")
            tmp.write_text(json.dumps({"records": records}, indent=1))
            os.replace(tmp, out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
