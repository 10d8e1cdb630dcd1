"""Fused projections for the engine's decoder: Q/K/V as one weight and gate/up as one weight per layer.

A decode step multiplies a few hundred rows by each layer's weights; five separate GEMMs (q, k, v, gate,
up) read the same input five times and launch five kernels, two concatenated weights make that two.
`fuse_projections` concatenates each layer's plain `nn.Linear` weights along the output dimension into
one new tensor and then points the model's own modules at row slices of it (views: the model keeps
working unchanged, `model.generate` and the reference path included, and no second copy of the weights
stays in memory). Row slices of a contiguous `(out, in)` weight are contiguous, so the unfused path
reads exactly the layout it read before.

Only plain `torch.nn.Linear` modules of one floating dtype and device are fused (a quantized or
adapter-wrapped projection is left alone, and the decoder calls the modules as before for that layer).
`STAGE1_ENGINE_FUSE=0` turns fusion off for a process (the benchmark's unfused baseline).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Sequence

if TYPE_CHECKING:
    import torch

ENV = "STAGE1_ENGINE_FUSE"


def fusion_enabled() -> bool:
    """Whether the engine fuses projections by default in this process (`STAGE1_ENGINE_FUSE`, default on)."""
    return os.environ.get(ENV, "1").strip().lower() not in ("0", "false", "no", "off")


@dataclass
class FusedLinear:
    """One GEMM standing for several projections of the same input: y = x W^T (+ b), split by `sizes`."""

    weight: "torch.Tensor"  # (sum(sizes), in)
    bias: "torch.Tensor | None"
    sizes: tuple[int, ...]

    def __call__(self, x: "torch.Tensor") -> tuple["torch.Tensor", ...]:
        import torch.nn.functional as F

        return F.linear(x, self.weight, self.bias).split(self.sizes, dim=-1)


@dataclass
class FusedLayer:
    """A layer's fused projections; None where that part could not be fused (the modules run instead)."""

    qkv: FusedLinear | None
    gate_up: FusedLinear | None


def fusable(mods: Sequence[Any]) -> bool:
    """True when every module is a plain `nn.Linear` on one device, one floating dtype and one input
    width, with a bias on all of them or on none."""
    import torch

    if not mods or not all(type(m) is torch.nn.Linear for m in mods):
        return False
    w0 = mods[0].weight
    return (w0.dtype.is_floating_point
            and all(m.weight.dtype == w0.dtype and m.weight.device == w0.device for m in mods)
            and all(m.weight.shape[1] == w0.shape[1] for m in mods)
            and len({m.bias is None for m in mods}) == 1)


def concat_linears(mods: Sequence[Any]) -> FusedLinear:
    """Concatenate the modules' weights (and biases) into one tensor; each module's own weight becomes
    a view of its rows of it, so the model computes what it computed before from the same memory."""
    import torch

    with torch.no_grad():
        weight = torch.cat([m.weight.detach() for m in mods], dim=0)
        bias = torch.cat([m.bias.detach() for m in mods]) if mods[0].bias is not None else None
        row = 0
        sizes = []
        for m in mods:
            n = int(m.weight.shape[0])
            grad = m.weight.requires_grad
            m.weight = torch.nn.Parameter(weight[row:row + n], requires_grad=grad)
            if bias is not None:
                m.bias = torch.nn.Parameter(bias[row:row + n], requires_grad=m.bias.requires_grad)
            sizes.append(n)
            row += n
    return FusedLinear(weight, bias, tuple(sizes))


_CACHE_ATTR = "_stage1_fused"


def already_fused(mods: Sequence[Any]) -> FusedLinear | None:
    """The FusedLinear an earlier engine made of these modules, if their weights are still its rows
    (a second engine on the same model reuses it instead of concatenating again), else None."""
    f = mods[0].__dict__.get(_CACHE_ATTR)
    if not isinstance(f, FusedLinear) or len(f.sizes) != len(mods):
        return None
    row = 0
    for m, n in zip(mods, f.sizes):
        if tuple(m.weight.shape) != (n, f.weight.shape[1]) or m.weight.data_ptr() != f.weight[row].data_ptr():
            return None
        if (m.bias is None) != (f.bias is None) or (f.bias is not None and m.bias.data_ptr() != f.bias[row:].data_ptr()):
            return None
        row += n
    return f


def fuse(mods: Sequence[Any]) -> FusedLinear | None:
    """One FusedLinear for `mods` (reused when they are already fused), or None when they cannot be."""
    if not fusable(mods):
        return None
    f = already_fused(mods) or concat_linears(mods)
    mods[0].__dict__[_CACHE_ATTR] = f
    return f


def fuse_projections(layers: Sequence[Any]) -> list[FusedLayer]:
    """Fuse q/k/v and gate/up of every decoder layer (see the module docstring).

    Args:
        layers: the model's decoder layers (`self_attn.{q,k,v}_proj`, `mlp.{gate,up,down}_proj` + `act_fn`).
    Returns:
        One FusedLayer per layer; a part that cannot be fused is None.
    """
    out = []
    for layer in layers:
        attn, mlp = layer.self_attn, layer.mlp
        qkv = fuse([attn.q_proj, attn.k_proj, attn.v_proj])
        gate_up = None
        if all(hasattr(mlp, k) for k in ("gate_proj", "up_proj", "down_proj", "act_fn")):
            gate_up = fuse([mlp.gate_proj, mlp.up_proj])
        out.append(FusedLayer(qkv, gate_up))
    return out
