"""A model's size and what follows from it, read from headers before any weight loads: its parameter
count (`param_count`: the GGUF tensor table, the safetensors headers, a random model's spec), the
`auto` dtype (`resolve_dtype`: float32 up to SMALL_MODEL_PARAMS) and batch size (`resolve_batch_size`),
and the fits-in-memory check (`check_memory`: weights plus the KV cache of a full batch against the
device's free memory, InputError with the fix when it does not fit). Tests:
`python -m pytest -q tests/core/test_loader.py`.
"""

from __future__ import annotations

import functools
import json
import logging
import struct
from pathlib import Path
from typing import Any, Mapping, NamedTuple, Sequence

from stage1_core.infra.config import ModelConfig
from stage1_core.infra.errors import InputError
from stage1_core.model.random_weights import RANDOM_MODELS, random_param_count
from stage1_core.model.resolve import ResolvedModel, resolve_device, weight_files

log = logging.getLogger("stage1.loader")

NOMINAL_CONTEXT_TOKENS = 1024
"""Tokens per batch row the fits-in-memory check reserves KV cache for (prompt + completion)."""
AUTO_BATCH = {"cpu": 16, "cuda": 64}
"""batch_size "auto": rows per batch on the CPU and on a GPU (HFBackend.batch_size, the KV estimate)."""
_DTYPE_BYTES = {"float32": 4.0, "bfloat16": 2.0, "float16": 2.0}
_QUANT_BYTES = {"8bit": 1.0, "4bit": 0.5}


class ModelShape(NamedTuple):
    """What the memory estimate needs: parameter count and the KV cache's per-token shape."""

    n_params: int
    layers: int
    kv_heads: int
    head_dim: int


class MemoryEstimate(NamedTuple):
    """Bytes a load needs (weights, KV cache for the batch) and bytes the device has free."""

    weights: int
    kv_cache: int
    available: int | None

    @property
    def needed(self) -> int:
        """weights + kv_cache."""
        return self.weights + self.kv_cache


def estimate_memory(shape: ModelShape, *, weight_bytes: float, kv_bytes: float, batch: int,
                    context: int = NOMINAL_CONTEXT_TOKENS, available: int | None = None) -> MemoryEstimate:
    """Pure arithmetic: parameters x bytes per parameter, and the KV cache of a full batch.

    KV cache = layers x 2 (keys, values) x kv_heads x head_dim x kv_bytes x batch x context. Activations
    and the allocator's slack are not counted (the nominal context is the margin).

    Args:
        shape: the model's shape.
        weight_bytes: bytes per parameter (4 float32, 2 bfloat16, 1 8bit, 0.5 4bit).
        kv_bytes: bytes per KV element (the compute dtype's).
        batch: rows decoded together.
        context: tokens per row (NOMINAL_CONTEXT_TOKENS).
        available: free bytes on the device, if known.
    Returns:
        MemoryEstimate(weights, kv_cache, available).
    """
    weights = int(shape.n_params * weight_bytes)
    kv = int(shape.layers * 2 * shape.kv_heads * shape.head_dim * kv_bytes * batch * context)
    return MemoryEstimate(weights, kv, available)


def check_fits(est: MemoryEstimate, *, device: str, batch: int, quantize: str, dtype: str) -> None:
    """Raise unless the estimate fits the device's free memory (unknown free memory passes).

    Args:
        est: estimate_memory's result.
        device: the resolved device (for the message).
        batch: the batch size used in the estimate.
        quantize: ModelConfig.quantize (for the fix).
        dtype: the resolved dtype (for the message).
    Raises:
        InputError: field model.batch_size, with the GB needed (weights, KV) and available, and the fix.
    """
    if est.available is None or est.needed <= est.available:
        return
    gb = 1024 ** 3
    fixes = [f"a smaller model.batch_size (now {batch})"]
    if quantize != "4bit" and device.startswith("cuda"):
        fixes.append("model.quantize: 4bit")
    fixes.append("a bigger GPU" if device.startswith("cuda") else "a machine with more RAM, or a GPU")
    raise InputError(f"the model does not fit on {device}: needs {est.needed / gb:.1f} GB (weights "
                     f"{est.weights / gb:.1f} GB in {quantize if quantize != 'none' else dtype} + KV cache "
                     f"{est.kv_cache / gb:.1f} GB for {batch} rows x {NOMINAL_CONTEXT_TOKENS} tokens), "
                     f"{est.available / gb:.1f} GB available", field="model.batch_size",
                     expected=f"weights + KV cache <= {est.available / gb:.1f} GB",
                     fix="use " + ", or ".join(fixes))


def safetensors_param_count(files: Sequence[str | Path]) -> int:
    """Parameters in safetensors files, from their JSON headers (no tensor data read).

    A header is an 8-byte little-endian length followed by that many bytes of JSON:
    {name: {"dtype", "shape", "data_offsets"}, "__metadata__": {...}}.

    Args:
        files: the *.safetensors shards.
    Returns:
        The sum over tensors of the product of their shapes.
    Raises:
        InputError: a file is too short or its header is not JSON.
    """
    total = 0
    for f in files:
        with open(f, "rb") as fh:
            head = fh.read(8)
            n = struct.unpack("<Q", head)[0] if len(head) == 8 else -1
            raw = fh.read(n) if 0 < n < 100_000_000 else b""
        try:
            header = json.loads(raw)
        except ValueError:
            header = None
        if not isinstance(header, dict):
            raise InputError(f"{f} is not a readable safetensors file (bad header)", file=str(f), field="model.id",
                             expected="safetensors weights", fix="re-download or re-save the weights")
        for name, t in header.items():
            if name != "__metadata__":
                count = 1
                for d in t.get("shape", []):
                    count *= int(d)
                total += count
    return total


def _config_shape(config: Mapping[str, Any], n_params: int) -> ModelShape:
    """ModelShape from a config.json dict (a nested text_config wins); unknown KV dims count as 0."""
    c = config.get("text_config") if isinstance(config.get("text_config"), dict) else config
    layers, heads = int(c.get("num_hidden_layers") or 0), int(c.get("num_attention_heads") or 0)
    kv_heads = int(c.get("num_key_value_heads") or heads)
    head_dim = int(c.get("head_dim") or (int(c.get("hidden_size") or 0) // heads if heads else 0))
    return ModelShape(n_params, layers, kv_heads, head_dim)


def cuda_free_bytes(device: Any) -> int:
    """Bytes a new allocation on a CUDA device can get: what the driver reports free, plus what torch's
    caching allocator has reserved but holds no tensor in (freed blocks it keeps for reuse; the driver
    counts them as used, so a process that ran anything before would size itself too small)."""
    import torch

    free = int(torch.cuda.mem_get_info(device)[0])
    cached = int(torch.cuda.memory_reserved(device)) - int(torch.cuda.memory_allocated(device))
    return free + max(0, cached)


def available_memory(device: str) -> int | None:
    """Free bytes on a device: `cuda_free_bytes` on CUDA, available RAM on the CPU.

    Args:
        device: a resolved device.
    Returns:
        Free bytes, or None when unknown (other devices, unreadable /proc/meminfo without psutil).
    """
    if device.startswith("cuda"):
        import torch

        return cuda_free_bytes(torch.device(device))
    if device != "cpu":
        return None
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except ImportError:
        pass
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _shape_of(r: ResolvedModel, folder: Path | None) -> ModelShape | None:
    """The shape of a random model (its spec) or of an HF folder's safetensors (headers and config.json);
    None without a folder or for pickle weights."""
    if r.kind == "random":
        spec = RANDOM_MODELS[r.id[len("random:"):]]
        return ModelShape(random_param_count(spec), spec.layers, spec.kv_heads, spec.head_dim)
    if folder is None:
        return None
    safes, _ = weight_files(folder)
    if not safes:
        return None  # pickle weights: no header to read without unpickling
    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        config = {}
    return _config_shape(config if isinstance(config, dict) else {}, safetensors_param_count(safes))


SMALL_MODEL_PARAMS = 500_000_000
"""Up to this many parameters, `dtype: auto` keeps float32 on a GPU too. Measured on the embedded 270M
(H100, seeds 42, 1-4, bench/results/instruction_diversity-gpu-2026-12-05.json): in bfloat16 the A/B
critic accepted 0.43 of the instructions (every seed below the 0.5 bar, all five quickstarts halted),
in float32 0.60 with the CPU's verdicts (4 of 5 scale); the engine's greedy tokens matched plain
float32 generate 0.77 of the time in bfloat16, 1.0 in float32. At this size float32 costs seconds."""


def resolve_dtype(dtype: str, device: str, model: "ResolvedModel | None" = None) -> str:
    """"auto" -> float32 on CPU (CPUs without native bf16 run bf16 matmuls ~6x slower, measured
    here); on accelerators float32 for a model of at most SMALL_MODEL_PARAMS parameters (its count
    read from the weight headers, `param_count`), else bfloat16. Without `model` (or when its size
    cannot be read) an accelerator gets bfloat16. float16 is never offered: it overflows to NaN on Gemma."""
    if dtype != "auto":
        return dtype
    if resolve_device(device) == "cpu":
        return "float32"
    n = param_count(model) if model is not None else None
    return "float32" if n is not None and n <= SMALL_MODEL_PARAMS else "bfloat16"


@functools.lru_cache(maxsize=16)
def param_count(r: "ResolvedModel") -> int | None:
    """Parameters of a resolved model from its headers, no weights loaded: the GGUF tensor table, or
    what the memory check reads (`_shape_of`: a random model's spec, the safetensors headers). None
    for fake models, pickle weights and unreadable files (the load reports those)."""
    try:
        if r.gguf_file:
            from gguf import GGUFReader  # transformers' own GGUF dependency

            return int(sum(int(t.n_elements) for t in GGUFReader(r.path).tensors))
        shape = _shape_of(r, Path(r.path) if r.path else None)
        return shape.n_params if shape else None
    except (InputError, OSError, ValueError, KeyError, IndexError) as e:
        log.warning("model size unknown (%s): dtype auto takes the accelerator default", e)
        return None


def resolve_batch_size(batch_size: int | str, device: str) -> int:
    """Rows per batch: an integer as given; "auto" -> AUTO_BATCH (16 on the CPU, 64 on a GPU).

    Args:
        batch_size: ModelConfig.batch_size.
        device: a resolved device.
    Returns:
        The batch size.
    """
    if isinstance(batch_size, int):
        return batch_size
    return AUTO_BATCH["cpu"] if device == "cpu" else AUTO_BATCH["cuda"]


def check_memory(r: ResolvedModel, cfg: ModelConfig, device: str, folder: Path | None = None) -> MemoryEstimate | None:
    """The fits-in-memory check before weights load (estimate_memory vs available_memory).

    Args:
        r: the resolved model.
        cfg: its config (dtype, quantize, batch_size).
        device: the resolved device.
        folder: the HF folder the weights come from (None for random models).
    Returns:
        The estimate, or None when the shape is unknown (pickle weights).
    Raises:
        InputError: it does not fit (see check_fits).
    """
    shape = _shape_of(r, folder)
    if shape is None:
        return None
    dtype = resolve_dtype(cfg.dtype, device, r)
    batch = resolve_batch_size(cfg.batch_size, device)
    weight_bytes = _QUANT_BYTES.get(cfg.quantize, _DTYPE_BYTES.get(dtype, 4.0))
    kv_bytes = 2.0 if cfg.quantize != "none" else _DTYPE_BYTES.get(dtype, 4.0)
    est = estimate_memory(shape, weight_bytes=weight_bytes, kv_bytes=kv_bytes, batch=batch,
                          available=available_memory(device))
    check_fits(est, device=device, batch=batch, quantize=cfg.quantize, dtype=dtype)
    return est
