"""FP8 weights for the engine's decoder GEMMs: an opt-in experiment (`STAGE1_ENGINE_FP8=1`), lossy.

At batch 256 a decode step's weight GEMMs sit at the H100's ridge point (256 FLOP per bf16 weight byte
against ~295): bound by compute as much as by bandwidth (docs/performance.md). FP8 (e4m3) weights halve
the bytes and double the tensor-core ceiling. Each projection's weight is quantized once, when the
decoder is built, with one float32 scale per output row (amax / 448); each GEMM's input is quantized per
row (per token) on the fly, and `torch._scaled_mm` multiplies them with both scales applied in its epilogue
(rowwise scaling, fast accumulation), writing the activations' own dtype.

What is quantized: per layer, Q/K/V (one weight, fused or concatenated here), O, gate/up (one weight) and
down: every plain `nn.Linear` whose dimensions are multiples of 16 (the FP8 GEMM's alignment). The
embedding, the LM head and the norms stay as they are, and so does the model itself: the FP8 copies are
new tensors (about half the projections' bytes more in memory), the model's own modules (plain
`generate`, the reference path) keep their weights.

It changes numerics (3 mantissa bits per weight and input): off by default. `bench/gpu_engine.py --fp8 both`
measures it against bf16 in one process. On an H100 at 4B, batch 256 (docs/performance.md, 2026-12-07) it
ran 1.09x bf16's greedy tok/s. Its prefill and critic ran 1.27x faster. On those random weights its greedy
tokens agreed 0.876 with bf16's, and the critic's choice 0.906. `_scaled_mm` needs an FP8 tensor
core on CUDA (compute capability 8.9 or more); the CPU runs the same op (the tests).

The KV cache in e4m3 (`STAGE1_ENGINE_KV_FP8=1`, also off by default, lossy; see decoder.py) is a separate
switch: K and V are written with unit scale (`to_e4m3`: no calibration, as vLLM's uncalibrated fp8 cache),
so a decode step reads half the cache bytes, and twice the rows fit in the same memory.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Sequence

from stage1_core.model.fusion import already_fused, fusable
from stage1_core.model.rows import env_flag

if TYPE_CHECKING:
    import torch

ENV = "STAGE1_ENGINE_FP8"
KV_ENV = "STAGE1_ENGINE_KV_FP8"
E4M3_MAX = 448.0
_EPS = 1e-12


def available(device: "torch.device", dtype: "torch.dtype | None" = None) -> str | None:
    """None when FP8 GEMMs run on `device` for activations of `dtype`, else why not."""
    import torch

    if not hasattr(torch, "_scaled_mm") or not hasattr(torch, "float8_e4m3fn"):
        return f"torch {torch.__version__} has no _scaled_mm / float8_e4m3fn"
    cap = torch.cuda.get_device_capability(device) if device.type == "cuda" else None
    if cap is not None and cap < (8, 9):
        return f"{torch.cuda.get_device_name(device)} has no FP8 tensor cores (compute capability < 8.9)"
    if cap is not None and cap != (9, 0) and dtype == torch.float32:  # CUTLASS's rowwise path writes bf16/fp16 only
        return (f"{torch.cuda.get_device_name(device)}: FP8 GEMMs with float32 output need compute capability 9.0 "
                "(H100, H200); load the model in bfloat16 (model.dtype)")
    if device.type not in ("cuda", "cpu"):
        return f"no FP8 GEMM on {device.type}"
    return None


def lossy_switches() -> list[str]:
    """The lossy engine switches this process sets (`STAGE1_ENGINE_FP8`, `STAGE1_ENGINE_KV_FP8` on), by name: the
    phases' cache keys hash them, so output made with one is never a hit for a run without it (or the reverse)."""
    return [e for e in (ENV, KV_ENV) if env_flag(e) is True]


def to_e4m3(x: "torch.Tensor") -> "torch.Tensor":
    """`x` cast to e4m3 with unit scale, saturating at +-448 (a plain cast may turn what overflows into NaN)."""
    import torch

    return x.clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)


def kv_available(device: "torch.device") -> str | None:
    """None when the engine can keep its KV cache in e4m3 on `device`, else why not (CUDA needs compute
    capability 8.9 or more, where triton converts e4m3; the CPU casts the slices it reads)."""
    import torch

    if not hasattr(torch, "float8_e4m3fn"):
        return f"torch {torch.__version__} has no float8_e4m3fn"
    if device.type == "cuda" and torch.cuda.get_device_capability(device) < (8, 9):
        return f"{torch.cuda.get_device_name(device)} has no e4m3 conversions (compute capability < 8.9)"
    if device.type not in ("cuda", "cpu"):
        return f"no e4m3 KV cache on {device.type}"
    return None


def quantize_rows(x: "torch.Tensor") -> tuple["torch.Tensor", "torch.Tensor"]:
    """Each row of a 2-D tensor to e4m3 with its own float32 scale (amax / 448).

    Returns:
        (q, scale): q (m, k) float8_e4m3fn, scale (m, 1) float32, with q * scale ≈ x.
    """
    import torch

    scale = x.abs().amax(dim=-1, keepdim=True).float().clamp(min=_EPS) / E4M3_MAX
    q = (x.float() / scale).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)
    return q, scale


@dataclass
class Fp8Linear:
    """y = x W^T (+ b) with W in e4m3 and one scale per output row; split by `sizes` when it stands for
    several projections (as fusion.FusedLinear)."""

    weight: "torch.Tensor"  # (out, in) float8_e4m3fn
    scale: "torch.Tensor"  # (1, out) float32
    bias: "torch.Tensor | None"
    sizes: tuple[int, ...]

    def __call__(self, x: "torch.Tensor") -> Any:
        import torch

        lead, k = x.shape[:-1], x.shape[-1]
        xq, xs = quantize_rows(x.reshape(-1, k))
        y = torch._scaled_mm(xq, self.weight.t(), scale_a=xs, scale_b=self.scale, out_dtype=x.dtype,
                             use_fast_accum=True)
        if self.bias is not None:
            y = y + self.bias
        y = y.view(*lead, y.shape[-1])
        return y.split(self.sizes, dim=-1) if len(self.sizes) > 1 else y


@dataclass
class Fp8Layer:
    """A layer's FP8 projections (the decoder's per-layer projections, as fusion.FusedLayer, plus O and
    down); None where that part stays with the model's modules."""

    qkv: Fp8Linear | None
    gate_up: Fp8Linear | None
    o: Fp8Linear | None
    down: Fp8Linear | None


def quantizable(mods: Sequence[Any]) -> bool:
    """What fusion.py can concatenate (plain `nn.Linear` modules of one floating dtype, device and input
    width, biases on all or none), not already FP8, every dimension a multiple of 16."""
    import torch

    return (fusable(mods) and mods[0].weight.dtype != torch.float8_e4m3fn
            and mods[0].weight.shape[1] % 16 == 0 and all(m.weight.shape[0] % 16 == 0 for m in mods))


def quantize(mods: Sequence[Any]) -> Fp8Linear | None:
    """One Fp8Linear for the modules' concatenated weights (new tensors; the modules keep theirs), or None."""
    import torch

    if not quantizable(mods):
        return None
    with torch.no_grad():
        fused = already_fused(mods) if len(mods) > 1 else None  # fusion.py's rows: no second concatenation
        if fused is not None:
            w, bias = fused.weight.detach(), (fused.bias.detach() if fused.bias is not None else None)
        else:
            w = torch.cat([m.weight.detach() for m in mods], dim=0) if len(mods) > 1 else mods[0].weight.detach()
            bias = torch.cat([m.bias.detach() for m in mods]) if mods[0].bias is not None else None
        q, scale = quantize_rows(w)
    return Fp8Linear(q, scale.reshape(1, -1).contiguous(), bias, tuple(int(m.weight.shape[0]) for m in mods))


def quantize_layers(layers: Sequence[Any]) -> list[Fp8Layer]:
    """FP8 projections for every decoder layer (`self_attn.{q,k,v,o}_proj`, `mlp.{gate,up,down}_proj`)."""
    out = []
    for layer in layers:
        attn, mlp = layer.self_attn, layer.mlp
        gated = all(hasattr(mlp, k) for k in ("gate_proj", "up_proj", "down_proj", "act_fn"))
        out.append(Fp8Layer(qkv=quantize([attn.q_proj, attn.k_proj, attn.v_proj]),
                            gate_up=quantize([mlp.gate_proj, mlp.up_proj]) if gated else None,
                            o=quantize([attn.o_proj]),
                            down=quantize([mlp.down_proj]) if gated else None))
    return out
