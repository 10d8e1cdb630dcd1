"""The decode and prefill projections alone on the GPU: bf16 against FP8 GEMMs of the same shapes (not a test).

    python bench/gpu_fp8_gemm.py [--models gemma3-4b,gemma3-12b] [--rows 256,32768] [--out FILE]

For each model's four projections (q/k/v fused, o, gate/up fused, down; random_weights.RANDOM_MODELS) and each row
count (256: a decode step at batch 256; 32768: a prefill of 256 x 128 tokens), in one process, every timing a
CUDA graph replayed 50 times after 3 eager warm-ups (best of three replays):
- `bf16_ms`: `torch.nn.functional.linear` in bf16 (the engine's default);
- `fp8_rowwise_ms`: fp8.py's `Fp8Linear` as the engine runs it (per-token activation scales, one scale per
  weight row, fast accumulation), activation quantization included; `fp8_rowwise_gemm_ms` the
  `torch._scaled_mm` call alone on activations quantized beforehand, `quantize_ms` the quantization alone;
- `fp8_tensorwise_gemm_ms`: `torch._scaled_mm` with one scale per tensor (cuBLAS's FP8 path rather than
  the rowwise kernel), for comparison;
- per shape `weight_mb` and `bf16_tb_s` / `fp8_tb_s` (weight bytes read per second), `bf16_tflops` /
  `fp8_tflops`; per model the sums over the four projections and the ratios `fp8_over_bf16`.
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
from stage1_core.model import fp8 as Q  # noqa: E402
from stage1_core.model.random_weights import RANDOM_MODELS  # noqa: E402


def shapes(model: str) -> dict[str, tuple[int, int]]:
    """(out, in) of each projection as the engine runs it (fused where fusion.py fuses)."""
    s = RANDOM_MODELS[model]
    q, kv = s.heads * s.head_dim, s.kv_heads * s.head_dim
    return {"qkv": (q + 2 * kv, s.hidden), "o": (s.hidden, q), "gate_up": (2 * s.ffn, s.hidden),
            "down": (s.hidden, s.ffn)}


def ms(fn: Any) -> float:
    return GE.graph_ms(fn, reps=50, tries=3)


def one(out_f: int, in_f: int, rows: int) -> dict[str, Any]:
    g = torch.Generator(device="cuda").manual_seed(0)
    lin = torch.nn.Linear(in_f, out_f, bias=False, device="cuda", dtype=torch.bfloat16)
    w = lin.weight.detach()
    x = torch.randn(rows, in_f, device="cuda", generator=g, dtype=torch.bfloat16)
    f = Q.quantize([lin])
    assert f is not None
    xq, xs = Q.quantize_rows(x)
    wt = f.weight.t()
    one_a = torch.ones((), device="cuda")
    r: dict[str, Any] = {"out": out_f, "in": in_f, "rows": rows, "weight_mb": round(out_f * in_f * 2 / 1e6, 1)}
    with torch.inference_mode():
        r["bf16_ms"] = ms(lambda: torch.nn.functional.linear(x, w))
        r["fp8_rowwise_ms"] = ms(lambda: f(x))
        r["fp8_rowwise_gemm_ms"] = ms(lambda: torch._scaled_mm(xq, wt, scale_a=xs, scale_b=f.scale,
                                                                out_dtype=torch.bfloat16, use_fast_accum=True))
        r["quantize_ms"] = ms(lambda: Q.quantize_rows(x))
        try:
            r["fp8_tensorwise_gemm_ms"] = ms(lambda: torch._scaled_mm(xq, wt, scale_a=one_a, scale_b=one_a,
                                                                       out_dtype=torch.bfloat16, use_fast_accum=True))
        except Exception as e:  # noqa: BLE001 - a build without the tensorwise path: say so, go on
            r["fp8_tensorwise_error"] = f"{type(e).__name__}: {e}"[:200]
    flop = 2 * rows * out_f * in_f
    for k, b in (("bf16", 2), ("fp8", 1)):
        t = r["bf16_ms"] if k == "bf16" else r["fp8_rowwise_ms"]
        r[f"{k}_tb_s"] = round(out_f * in_f * b / (t / 1000) / 1e12, 2)
        r[f"{k}_tflops"] = round(flop / (t / 1000) / 1e12, 1)
    return r


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default="gemma3-4b,gemma3-12b")
    ap.add_argument("--rows", default="256,32768")
    ap.add_argument("--out", default=None)
    ap.add_argument("--note", default=None)
    a = ap.parse_args()
    if not torch.cuda.is_available() or Q.available(torch.device("cuda"), torch.bfloat16):
        print(f"gpu_fp8_gemm: needs a CUDA device with FP8 GEMMs "
              f"({Q.available(torch.device('cuda'), torch.bfloat16) if torch.cuda.is_available() else 'no CUDA'})",
              file=sys.stderr)
        return 2
    out = Path(a.out or REPO / "bench" / "results" / f"gpu_fp8_gemm-{dt.date.today()}.json")
    records = []
    for model in a.models.split(","):
        for rows in (int(r) for r in a.rows.split(",")):
            per = {name: one(o, i, rows) for name, (o, i) in shapes(model).items()}
            tot = {k: round(sum(p[k] for p in per.values()), 4)
                   for k in ("bf16_ms", "fp8_rowwise_ms", "fp8_rowwise_gemm_ms", "quantize_ms")}
            rec = {"model": model, "rows": rows, "projections": per, "layer_ms": tot,
                   "fp8_over_bf16": round(tot["bf16_ms"] / tot["fp8_rowwise_ms"], 3),
                   "fp8_gemm_only_over_bf16": round(tot["bf16_ms"] / tot["fp8_rowwise_gemm_ms"], 3),
                   "device": torch.cuda.get_device_name(), "torch": torch.__version__, "note": a.note,
                   "date": str(dt.date.today())}
            if all("fp8_tensorwise_gemm_ms" in p for p in per.values()):
                rec["layer_ms"]["fp8_tensorwise_gemm_ms"] = round(sum(p["fp8_tensorwise_gemm_ms"] for p in per.values()), 4)
            records.append(rec)
            print(json.dumps({k: rec[k] for k in ("model", "rows", "layer_ms", "fp8_over_bf16")}), flush=True)
            GE.write(out, records)  # each record as it comes, atomically
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
