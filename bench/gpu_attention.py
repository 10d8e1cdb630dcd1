"""The live-KV decode attention kernel alone, over a cache in the model's dtype and in e4m3 (not a test).

    python bench/gpu_attention.py [--model gemma3-12b] [--rows 256] [--contexts 256,1024] [--out FILE]

No model is loaded: the shapes are those of one decode layer of `random:<model>` (random_weights.RANDOM_MODELS:
query heads, KV heads, head dim; the scale of `query_pre_attn_scalar`), the inputs random normal. For each
context C, the rows' positions are drawn uniformly from [C/2, C) (mean about 3C/4: at C = 256 the 12B record's
mean of 192 live keys) and, for each cache dtype (bf16 and e4m3, the latter `fp8.to_e4m3` of the bf16 values),
each launch setting (BLOCK_N, warps, stages) and key split of attention.py's `decode_attention`
(gpu_engine.py's `launch_sweep` over its LAUNCHES) gets:
- `ms`: one call, captured in a CUDA graph and replayed 50 times after warm-ups, best of three
  (gpu_engine.py's `graph_ms`); a setting that does not compile records its error instead;
- `tb_s`: live K/V bytes read per second (each row's keys up to its position, K and V);
- `max_abs_err`: against `reference_attention` in float64 over the same (e4m3-rounded) K/V.
Per context and cache, `best` names the fastest setting and `default` the engine's (attention.py's BLOCK_N,
NUM_WARPS, NUM_STAGES, one split), with `best_over_default`.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
os.environ.setdefault("DO_NOT_TRACK", "1")

import torch  # noqa: E402

from bench import gpu_engine as GE  # noqa: E402
from stage1_core.infra.provenance import lock_sha256  # noqa: E402
from stage1_core.model import attention as A  # noqa: E402
from stage1_core.model import fp8 as Q  # noqa: E402
from stage1_core.model.random_weights import RANDOM_MODELS  # noqa: E402

def sweep(model: str, rows: int, ctx: int, seed: int = 0, device: str = "cuda") -> dict[str, Any]:
    """Every launch setting and split over a bf16 and an e4m3 cache at one context (see the module doc)."""
    spec = RANDOM_MODELS[model]
    heads, kv, d = spec.heads, spec.kv_heads, spec.head_dim
    scale = spec.query_pre_attn_scalar ** -0.5
    dev = torch.device(device)
    g = torch.Generator(device=dev).manual_seed(seed)
    k = torch.randn(rows, kv, ctx, d, device=dev, generator=g).to(torch.bfloat16)
    v = torch.randn(rows, kv, ctx, d, device=dev, generator=g).to(torch.bfloat16)
    q = torch.randn(rows, heads, 1, d, device=dev, generator=g).to(torch.bfloat16)
    pos = torch.randint(ctx // 2, ctx, (rows,), device=dev, generator=g)
    live_keys = float((pos + 1).sum())
    out: dict[str, Any] = {"context": ctx, "rows": rows, "mean_live_keys": round(live_keys / rows, 1)}
    default = f"n{A.BLOCK_N}_w{A.NUM_WARPS}_s{A.NUM_STAGES}_splits1"
    for name, kk, vv in (("bfloat16", k, v), ("e4m3", Q.to_e4m3(k), Q.to_e4m3(v))):
        ref = A.reference_attention(q.double(), kk.double(), vv.double(), pos, scale, None).float()
        live_bytes = live_keys * kv * d * 2 * kk.element_size()
        cells = GE.launch_sweep(q, kk, vv, pos, scale, tries=3, ref=ref)
        for cell in cells.values():
            if "ms" in cell:
                cell["tb_s"] = round(live_bytes / cell["ms"] / 1e9, 3)
        timed = {key: c["ms"] for key, c in cells.items() if "ms" in c}
        best = min(timed, key=timed.__getitem__)
        out[name] = {"live_kv_mb": round(live_bytes / 1e6, 2), "default": default, "best": best,
                     "best_over_default": round(timed[default] / timed[best], 3) if default in timed else None,
                     "settings": cells}
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="gemma3-12b", choices=sorted(RANDOM_MODELS))
    ap.add_argument("--rows", type=int, default=256)
    ap.add_argument("--contexts", default="256,1024")
    ap.add_argument("--out", default=None)
    ap.add_argument("--note", default=None)
    a = ap.parse_args()
    if not torch.cuda.is_available():
        print("gpu_attention: needs a CUDA device (the kernel is Triton)", file=sys.stderr)
        return 2
    why = A.available()
    if why is not None:
        print(f"gpu_attention: the kernel cannot run here: {why}", file=sys.stderr)
        return 2
    date = dt.date.today().isoformat()
    out = Path(a.out or REPO / "bench" / "results" / f"gpu_attention-{date}.json")
    rec = {"model": a.model, "device": torch.cuda.get_device_name(), **GE.versions(),
           "lock_sha256": lock_sha256(), "date": date, "note": a.note,
           "contexts": [sweep(a.model, a.rows, int(c)) for c in a.contexts.split(",")]}
    GE.write(out, [rec])
    for c in rec["contexts"]:
        for name in ("bfloat16", "e4m3"):
            b = c[name]
            print(f"ctx {c['context']} {name}: default {b['default']} "
                  f"{b['settings'][b['default']].get('ms')} ms, best {b['best']} {b['settings'][b['best']]['ms']} ms "
                  f"({b['best_over_default']}x)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
