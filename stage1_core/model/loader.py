"""Model loading: the weights of a resolved model onto a device, with transformers, local files only.

`load_hf_model` loads an HF folder (on CUDA straight to the device, in the resolved dtype or quantized
by bitsandbytes), a GGUF through its dequantized folder (built once by `_gguf_as_hf_folder`, cached as
`stage1_core.model.dequantized` records it), or builds a random-weight model on the device; the
fits-in-memory check (`stage1_core.model.sizing`) runs first. Every `from_pretrained` passes
OFFLINE_LOAD. Resolution is `stage1_core.model.resolve`'s job; use the facade (`stage1_core.model`).

Run it: through the facade, `PYTHONPATH=. python -m stage1_core.cli.model [--id MODEL]`; tests:
`python -m pytest -q tests/core/test_model.py tests/core/test_loader.py`.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path
from typing import Any

from stage1_core.infra.config import ModelConfig
from stage1_core.infra.storage import sha256_file
from stage1_core.model.cache import record_sha256
from stage1_core.model.dequantized import cached_folder_problem, gguf_folder_path, write_source_record
from stage1_core.model.fingerprint import weights_sha256
from stage1_core.model.gguf import embedded_gguf_path
from stage1_core.model.random_weights import RANDOM_MODELS, random_gemma3_config
from stage1_core.model.resolve import ResolvedModel, check_quantize, resolve_gguf, weight_files
from stage1_core.model.sizing import check_memory, resolve_dtype

log = logging.getLogger("stage1.loader")

OFFLINE_LOAD: dict[str, Any] = {"local_files_only": True, "trust_remote_code": False, "use_kernels": False}
"""Keywords of every model `from_pretrained` the project makes: local files only, no remote code, and no
hub kernels (transformers >= 5.25 otherwise swaps layers for kernels fetched from the hub on CUDA,
which fails offline and changes numerics between installs)."""


def _quantization_config(quantize: str) -> Any:
    """transformers.BitsAndBytesConfig for "8bit" / "4bit" (nf4, bf16 compute, double quant)."""
    import torch
    import transformers

    if quantize == "8bit":
        return transformers.BitsAndBytesConfig(load_in_8bit=True)
    return transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                           bnb_4bit_compute_dtype=torch.bfloat16, bnb_4bit_use_double_quant=True)


def _gguf_as_hf_folder(r: ResolvedModel, dtype: str) -> Path:
    """The GGUF dequantized once into an HF folder under `{cache}/models/` (atomic; reused afterwards).

    The folder records what it was built for (`dequantized.SOURCE_RECORD`): the GGUF's sha256, the
    dtype, the versions of transformers, gguf and torch that dequantized it, the sha256 of every file
    and of its weights. A folder whose record does not match this GGUF and dtype, or whose files
    changed, is rebuilt."""
    import torch
    import transformers

    sha = weights_sha256(r)
    final = gguf_folder_path(r, dtype, sha)
    name = final.name
    gguf = Path(r.path or "")
    if (final / "config.json").is_file():
        problem = cached_folder_problem(final, gguf_sha256=sha, dtype=dtype)
        if problem is None:
            return final
        log.warning("cached model folder %s is damaged (%s); rebuilding it from %s", final, problem, gguf)
        shutil.rmtree(final, ignore_errors=True)
    tmp = final.with_name(f"{name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        kw = {"gguf_file": gguf.name, "local_files_only": True, "trust_remote_code": False}
        tok = transformers.AutoTokenizer.from_pretrained(str(gguf.parent), **kw)
        model = transformers.AutoModelForCausalLM.from_pretrained(str(gguf.parent), dtype=getattr(torch, dtype),
                                                                  gguf_file=gguf.name, **OFFLINE_LOAD)
        model.hf_quantizer = None  # save_pretrained refuses a gguf-dequantized model otherwise
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(str(tmp))
        tok.save_pretrained(str(tmp))
        files = {p.name: sha256_file(p) for p in sorted(tmp.iterdir()) if p.is_file()}
        write_source_record(tmp, gguf=gguf, gguf_sha256=sha, dtype=dtype, files=files)
        try:
            os.rename(tmp, final)
        except OSError:
            if not (final / "config.json").is_file():  # someone else finished first, or a real failure
                raise
        else:  # the rename keeps size and mtime: the next load's check is a stat per file, not a re-hash
            for fname, digest in files.items():
                record_sha256(final / fname, digest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def _load_random(r: ResolvedModel, device: str, dtype_name: str) -> tuple[Any, Any]:
    """Build a random Gemma 3 directly on `device` in `dtype_name` (seed 0; no host copy)."""
    import torch
    import transformers

    embedded = resolve_gguf(ModelConfig(), embedded_gguf_path(), "embedded")
    tok_dtype = dtype_name if dtype_name in ("float32", "bfloat16") else "bfloat16"
    tok = transformers.AutoTokenizer.from_pretrained(str(_gguf_as_hf_folder(embedded, tok_dtype)),
                                                     local_files_only=True, trust_remote_code=False)
    config = random_gemma3_config(RANDOM_MODELS[r.id[len("random:"):]], tok)
    dev = torch.device(device)
    with torch.random.fork_rng(devices=[dev] if dev.type == "cuda" else []):
        torch.manual_seed(0)
        with dev:
            model = transformers.Gemma3ForCausalLM._from_config(config, dtype=getattr(torch, dtype_name))
    return model.to(dtype=getattr(torch, dtype_name)).eval(), tok


def load_hf_model(r: ResolvedModel, cfg: ModelConfig, device: str) -> tuple[Any, Any]:
    """Load a resolved (non-fake) model and its tokenizer with transformers, local files only.

    On CUDA the weights go straight to the device (`device_map={"": device}`, no full host copy), in
    the resolved dtype or quantized by bitsandbytes (`cfg.quantize`); on the CPU they load as usual.
    Random models (`random:<name>`) are built on the device. The fits-in-memory check runs first.

    Args:
        r: resolve_model(cfg); a GGUF is first dequantized into a cached HF folder.
        cfg: the model config (dtype, quantize, batch_size).
        device: a resolved device ("cpu", "cuda", "cuda:1", ...).
    Returns:
        (model in eval mode on `device`, tokenizer); the chat template is left as loaded.
    Raises:
        InputError: the model does not fit the device's free memory, or quantize cannot run here.
        OSError: the folder's files cannot be read.
    """
    import torch
    import transformers

    dtype_name = resolve_dtype(cfg.dtype, device, r)
    check_quantize(cfg.model_copy(update={"device": device}), r)  # again on the worker that loads
    if r.kind == "random":
        check_memory(r, cfg, device)
        return _load_random(r, device, dtype_name)
    dtype = getattr(torch, dtype_name)
    folder = _gguf_as_hf_folder(r, dtype_name) if r.gguf_file else Path(r.path or "")
    check_memory(r, cfg, device, folder)
    if r.gguf_file:
        log.info("loading %s dequantized in %s", r.id, folder)
    safes, _ = weight_files(folder)
    tok = transformers.AutoTokenizer.from_pretrained(str(folder), local_files_only=True, trust_remote_code=False)
    kw: dict[str, Any] = {"dtype": dtype, "use_safetensors": bool(safes), **OFFLINE_LOAD}
    if device.startswith("cuda"):
        kw["device_map"] = {"": device}
        if cfg.quantize != "none":
            kw["quantization_config"] = _quantization_config(cfg.quantize)
        return transformers.AutoModelForCausalLM.from_pretrained(str(folder), **kw).eval(), tok
    model = transformers.AutoModelForCausalLM.from_pretrained(str(folder), **kw)
    return model.to(device).eval(), tok
