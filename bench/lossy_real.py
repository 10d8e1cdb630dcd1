"""The engine's lossy switches on the real embedded model: the e4m3 KV cache's range, and every switch's tokens.

    python bench/lossy_real.py [--dtype float32] [--prompts 64] [--max-new 64] [--out FILE]
    python bench/lossy_real.py --teacher-forced [--per-layer] [--prompts 64] [--out FILE]

The engine's e4m3 cache (`STAGE1_ENGINE_KV_FP8=1`, decoder.py) writes K and V with unit scale (fp8.to_e4m3:
saturating at +-448, no calibration), and its FP8 projections (`STAGE1_ENGINE_FP8=1`, fp8.py) quantize weights
per row and activations per token. Their GPU records use random weights, which cannot say what either does to a
real model's text, so this runs the embedded Gemma 3 270M (the CPU is enough: both run there, slowly) on the
benchmark's real phase-1 and phase-3 prompts (bench/gpu_engine.py's `real_prompts`) and writes one record:
- `layers`: per layer, from each prompt's prefill cache (after k_norm and the rotary, as the engine stores
  them): `k_amax` / `v_amax` (largest magnitude), `k_clipped` / `v_clipped` (fraction above 448, which the
  cast saturates), `k_subnormal` / `v_subnormal` (fraction below 2**-6, where e4m3 keeps fewer bits), and
  `k_rel_err` / `v_rel_err` (||to_e4m3(x) - x|| / ||x||, mean over prompts);
- the engine's greedy tokens against one plain greedy `generate` of the same prompts (`--prompts` prompts,
  `--max-new` tokens), as common-prefix tokens over the reference's, EOS included (gpu_engine's
  `prefix_match`, as its `measure_token_match`): `token_match` (no switch), `kv_fp8_token_match` (e4m3
  cache), `fp8_token_match` (FP8 projections), `fp8_kv_fp8_token_match` (both); `*engine_seconds`, each
  engine call's wall time; and `samples`, the first prompts' texts of plain `generate` and of each path.

`--teacher-forced` writes another record instead (default `lossy_teacher-DATE.json`): which part of each switch
costs what, without generation's compounding. Each prompt runs through the model's own forward once plainly and
once per variant, and `variants` gives per variant the mean KL divergence of the next-token distribution from
the plain one over every prompt position (`kl`) and how often the two argmaxes agree (`top1`):
- `kv_e4m3`: K and V rounded to e4m3 as the cache receives them (`Cache.update`), so every position attends over
  the rounded values (harsher than the engine, whose prefill attends over its own unrounded K/V);
- `fp8_all`: every projection as fp8.py's `Fp8Linear` (the engine's numerics: per-row weight scales, per-token
  activation scales, `torch._scaled_mm`); `fp8_qkv`, `fp8_o`, `fp8_gate_up`, `fp8_down`: one group alone;
  `fp8_all_but_down`: all but `down_proj`;
- simulated variants (`sim_*`: each projection's weight and/or input rounded to e4m3 and back in float32, then a
  float32 matmul; `sim_w_rows_a_rows` is fp8_all's numerics without `_scaled_mm`, a check that the simulation
  holds): `sim_w_rows` (weights per output row alone), `sim_a_rows` (inputs per token alone), `sim_w_rows_a_g128`
  (inputs with one scale per 128 channels, DeepSeek-V3's activation grouping), `sim_w_g128_a_g128` (both operands
  per 128 channels of a row, finer for the weights than DeepSeek-V3's 128x128 blocks): which half of the FP8 GEMM
  costs what, and what finer scales would buy before anyone builds them.
`--per-layer` adds `layers`: fp8_all's numerics (simulated) in one layer at a time, the rest plain: where the
loss sits (ignoring the compounding between layers).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
for _flag in ("STAGE1_ENGINE_KV_FP8", "STAGE1_ENGINE_FP8"):  # read at build: the paths must exist to switch to
    os.environ[_flag] = "1"

from bench import gpu_engine as GE  # noqa: E402  (sets the offline and telemetry variables)

import torch  # noqa: E402

from stage1_core.infra.config import ModelConfig  # noqa: E402
from stage1_core.infra.provenance import lock_sha256  # noqa: E402
from stage1_core.model import fp8 as Q  # noqa: E402
from stage1_core.model import load_backend  # noqa: E402

SUBNORMAL = 2.0 ** -6
SAMPLES = 4
"""Texts of the first prompts kept per path (`samples`), to read what a lower token match looks like."""


def cpu_name() -> str:
    """The CPU's model name (/proc/cpuinfo), else the platform's machine."""
    try:
        return next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                    if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.machine()


def cache_stats(model: Any, encoded: list[list[int]]) -> list[dict[str, float]]:
    """Per layer, the K and V of each prompt's prefill (one prompt at a time: no padding in the figures)."""
    acc: list[dict[str, list[float]]] = []
    with torch.inference_mode():
        for ids in encoded:
            cache = model(input_ids=torch.tensor([ids], device=model.device), use_cache=True).past_key_values
            for i, layer in enumerate(cache.layers):
                if len(acc) <= i:
                    acc.append({})
                for name, x in (("k", layer.keys), ("v", layer.values)):
                    x = x.float()
                    a = x.abs()
                    q = Q.to_e4m3(x).float()
                    for key, val in ((f"{name}_amax", a.max()), (f"{name}_clipped", (a > Q.E4M3_MAX).float().mean()),
                                     (f"{name}_subnormal", (a < SUBNORMAL).float().mean()),
                                     (f"{name}_rel_err", (q - x).norm() / x.norm())):
                        acc[i].setdefault(key, []).append(float(val))
    return [{k: round(max(v) if k.endswith("amax") else sum(v) / len(v), 5) for k, v in layer.items()}
            for layer in acc]


GROUPS = {"qkv": ("q_proj", "k_proj", "v_proj"), "o": ("o_proj",), "gate_up": ("gate_proj", "up_proj"),
          "down": ("down_proj",)}
"""The projections `--teacher-forced` quantizes, by group (attribute names of Gemma's attention and MLP)."""


@contextlib.contextmanager
def replaced(layers: Any, groups: Any, forward_for: Any) -> Any:
    """Every projection of `groups` in `layers` runs `forward_for(module)` instead of its own forward; restored
    on exit."""
    saved = []
    try:
        for layer in layers:
            for part in (layer.self_attn, layer.mlp):
                for name in (n for g in groups for n in GROUPS[g]):
                    mod = getattr(part, name, None)
                    if mod is not None:
                        forward = forward_for(mod)
                        saved.append((mod, mod.forward))
                        mod.forward = forward
        yield
    finally:
        for mod, forward in saved:
            mod.forward = forward


def fp8_groups(model: Any, groups: Any) -> Any:
    """The model's projections of `groups` run as fp8.py's `Fp8Linear` (the weights quantized once, as the engine
    does); restored on exit."""
    def fp8(mod: Any) -> Any:
        linear = Q.quantize([mod])
        if linear is None:
            raise ValueError(f"lossy_real: {mod} cannot be quantized (fp8.quantizable)")
        return linear

    return replaced(model.model.layers, groups, fp8)


@contextlib.contextmanager
def kv_e4m3() -> Any:
    """Every K and V the model's cache receives rounded to e4m3 (unit scale) and back; restored on exit."""
    from transformers import cache_utils

    update = cache_utils.Cache.update

    def rounded(self: Any, k: Any, v: Any, *args: Any, **kwargs: Any) -> Any:
        return update(self, Q.to_e4m3(k).to(k.dtype), Q.to_e4m3(v).to(v.dtype), *args, **kwargs)

    cache_utils.Cache.update = rounded
    try:
        yield
    finally:
        cache_utils.Cache.update = update


def fake_e4m3(x: Any, group: int | None = None) -> Any:
    """`x` (float32) rounded to e4m3 and back with fp8.py's scales (`quantize_rows`: amax / 448 per row of its last
    dimension), or with one scale per `group` channels of it: the FP8 GEMM's rounding without the FP8 GEMM."""
    if group is not None and x.shape[-1] % group == 0:
        return fake_e4m3(x.reshape(*x.shape[:-1], x.shape[-1] // group, group)).reshape(x.shape)
    q, scale = Q.quantize_rows(x)
    return q.float() * scale


SIMULATED = {"sim_w_rows_a_rows": (None, None), "sim_w_rows": (None, False), "sim_a_rows": (False, None),
             "sim_w_rows_a_g128": (None, 128), "sim_w_g128_a_g128": (128, 128)}
"""The simulated variants: (weight grouping, input grouping); None is one scale per row, False no rounding."""


def simulated(model: Any, weights: int | bool | None, inputs: int | bool | None, layers: Any = None) -> Any:
    """Every projection of `layers` (default all) as a float32 matmul of e4m3-rounded operands (`fake_e4m3` with
    grouping `weights` / `inputs`; False leaves that operand exact); restored on exit."""
    def projection(mod: Any) -> Any:
        w = mod.weight.detach().float()
        w = w if weights is False else fake_e4m3(w, weights)

        def forward(x: Any) -> Any:
            xf = x.float() if inputs is False else fake_e4m3(x.float(), inputs)
            y = xf @ w.t()
            return (y if mod.bias is None else y + mod.bias).to(x.dtype)
        return forward

    return replaced(model.model.layers if layers is None else layers, GROUPS, projection)


def log_probs(model: Any, encoded: list[list[int]]) -> list[Any]:
    """Each prompt's next-token log-probabilities at every position (float32), from the model's own forward."""
    with torch.inference_mode():
        return [torch.log_softmax(model(input_ids=torch.tensor([ids], device=model.device),
                                        use_cache=True).logits[0].float(), -1) for ids in encoded]


def divergence(ref: list[Any], got: list[Any]) -> dict[str, float]:
    """Mean KL(ref || got) of the next-token distributions over every position, and how often the argmaxes agree."""
    kl = top = n = 0.0
    for r, g in zip(ref, got):
        kl += float((r.exp() * (r - g)).sum())
        top += float((r.argmax(-1) == g.argmax(-1)).sum())
        n += r.shape[0]
    return {"kl": round(kl / n, 5), "top1": round(top / n, 4)}


def teacher_forced(model: Any, encoded: list[list[int]], per_layer: bool = False) -> dict[str, Any]:
    """The `--teacher-forced` variants against the plain forward (see the module doc): {"variants": ...}, and
    {"layers": [...]} with `per_layer`."""
    ref = log_probs(model, encoded)
    variants = {"kv_e4m3": kv_e4m3, "fp8_all": lambda: fp8_groups(model, GROUPS),
                **{f"fp8_{g}": (lambda g=g: fp8_groups(model, [g])) for g in GROUPS},
                "fp8_all_but_down": lambda: fp8_groups(model, ["qkv", "o", "gate_up"]),
                **{name: (lambda w=w, a=a: simulated(model, w, a)) for name, (w, a) in SIMULATED.items()}}
    out: dict[str, Any] = {"variants": {}}
    for name, variant in variants.items():
        t = time.perf_counter()
        with variant():
            got = log_probs(model, encoded)
        out["variants"][name] = {**divergence(ref, got), "seconds": round(time.perf_counter() - t, 1)}
        print(f"lossy_real: {name} {out['variants'][name]}", file=sys.stderr)
    if per_layer:
        out["layers"] = []
        for i, layer in enumerate(model.model.layers):
            with simulated(model, None, None, layers=[layer]):
                out["layers"].append({"layer": i, **divergence(ref, log_probs(model, encoded))})
            print(f"lossy_real: layer {out['layers'][-1]}", file=sys.stderr)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--max-new", type=int, default=64)
    ap.add_argument("--out", default=None)
    ap.add_argument("--teacher-forced", action="store_true", help="the per-part record instead (module doc)")
    ap.add_argument("--per-layer", action="store_true", help="--teacher-forced: add `layers` (module doc)")
    ap.add_argument("--note", default=None)
    a = ap.parse_args()
    date = dt.date.today().isoformat()
    kind = "lossy_teacher" if a.teacher_forced else "lossy_real"
    out = Path(a.out or REPO / "bench" / "results" / f"{kind}-{date}.json")
    t0 = time.perf_counter()
    backend = load_backend(ModelConfig(dtype=a.dtype))
    if a.teacher_forced:
        prompts = GE.real_prompts(a.prompts)
        encoded = backend.encode(prompts)
        rec = {"model": "270m", "dtype": a.dtype, "cpu": cpu_name(), "torch": torch.__version__,
               "prompts": len(prompts), "positions": sum(map(len, encoded)),
               **teacher_forced(backend.model, encoded, a.per_layer), "seconds": round(time.perf_counter() - t0, 1),
               "lock_sha256": lock_sha256(), "date": date, "note": a.note}
        GE.write(out, [rec])
        print(json.dumps(rec, indent=1))
        return 0
    eng = backend.engine()
    if eng is None or not eng.dec.kv_fp8 or not eng.dec.fp8:
        why = ("no engine for this model" if eng is None
               else eng.dec.kv_fp8_unavailable or eng.dec.fp8_unavailable or "no FP8 projections were built")
        print(f"lossy_real: the engine cannot run its lossy switches here: {why}", file=sys.stderr)
        return 2
    prompts = GE.real_prompts(a.prompts)
    encoded = backend.encode(prompts)
    layers = cache_stats(backend.model, encoded)
    ref = GE.plain_reference(backend, prompts, a.max_new)
    paths = {"token_match": (False, False), "kv_fp8_token_match": (False, True),
             "fp8_token_match": (True, False), "fp8_kv_fp8_token_match": (True, True)}

    def texts(rows: list[list[int]]) -> list[str]:
        return [backend.tokenizer.decode(r, skip_special_tokens=True) for r in rows[:SAMPLES]]

    match: dict[str, Any] = {}
    samples: dict[str, Any] = {"plain_texts": texts(ref)}
    for name, (fp8, kv) in paths.items():
        eng.dec.use_fp8, eng.dec.use_kv_fp8 = fp8, kv
        t = time.perf_counter()
        got = eng.generate(encoded, [str(i) for i in range(len(prompts))], a.max_new, 0.0, 1.0, 0, [], 0)
        match[name.replace("token_match", "engine_seconds")] = round(time.perf_counter() - t, 1)
        match[name] = GE.prefix_match(ref, got, set(backend.eos_ids))
        samples[name.replace("token_match", "texts")] = texts(got)
        print(f"lossy_real: {name} {match[name]}", file=sys.stderr)
    eng.dec.use_fp8 = eng.dec.use_kv_fp8 = False
    rec = {"model": "270m", "dtype": a.dtype, "device": str(eng.device), "cpu": cpu_name(),
           "torch": torch.__version__, "prompts": len(prompts), "max_new": a.max_new, **match,
           "k_amax": max(lay["k_amax"] for lay in layers), "v_amax": max(lay["v_amax"] for lay in layers),
           "clipped_layers": [i for i, lay in enumerate(layers) if lay["k_clipped"] or lay["v_clipped"]],
           "layers": layers, "samples": samples, "seconds": round(time.perf_counter() - t0, 1),
           "lock_sha256": lock_sha256(), "date": date, "note": a.note}
    GE.write(out, [rec])
    print(json.dumps({k: v for k, v in rec.items() if k not in ("layers", "samples")}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
