"""Model resolution: turn `model.id` into a validated `ResolvedModel` without loading weights.

`resolve_model` accepts `embedded:gemma-3-270m`, a local HF folder (config.json + *.safetensors +
tokenizer files), a `.gguf` file, a hub id already in the local HF cache (nothing is ever
downloaded), `fake:<seed>` or `random:<name>`; it resolves the BOS policy (`stage1_core.model.guards`)
and checks that `model.quantize` can run here (`check_quantize`), raising InputError naming the field
and the fix. `resolve_device` resolves `device: auto`. Tests: `python -m pytest -q tests/core/test_model.py`.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from stage1_core.infra.config import EMBEDDED_MODEL, ModelConfig
from stage1_core.infra.errors import InputError
from stage1_core.model.gguf import embedded_gguf_path, read_gguf_metadata
from stage1_core.model.guards import BOS_POLICY_BY_FAMILY, resolve_bos_policy
from stage1_core.model.random_weights import RANDOM_FAMILY, RANDOM_MODELS


ModelKind = Literal["embedded", "gguf", "hf_folder", "hub_cache", "fake", "random"]

_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")
_NOT_WEIGHTS = {"training_args.bin", "optimizer.pt", "scheduler.pt", "rng_state.pth"}
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "vocab.json")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


@dataclass(frozen=True)
class ResolvedModel:
    """A validated model reference (no weights loaded).

    Attributes:
        kind: embedded | gguf | hf_folder | hub_cache | fake | random.
        id: the id as configured.
        path: the HF folder or the .gguf file (None for fake and random).
        gguf_file: the GGUF file name when kind is embedded/gguf.
        family: config.json `model_type` or GGUF `general.architecture`.
        bos_policy: "always" or "never" (resolved).
        revision: configured revision, or the hub snapshot commit.
    """

    kind: ModelKind
    id: str
    path: str | None
    gguf_file: str | None
    family: str
    bos_policy: Literal["always", "never"]
    revision: str | None = None


def _token_str(value: Any) -> str | None:
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _folder_bos_token(folder: Path) -> str | None:
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        try:
            data = json.loads((folder / name).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        tok = _token_str(data.get("bos_token"))
        if tok is not None:
            return tok
    return None


def weight_files(folder: Path) -> tuple[list[Path], list[Path]]:
    """(name-sorted *.safetensors, name-sorted pickle weight files) of a model folder; trainer state
    files (optimizer.pt, training_args.bin, ...) are not weights."""
    safes = sorted(folder.glob("*.safetensors"))
    pickles = sorted(p for p in folder.iterdir()
                     if p.suffix in _PICKLE_SUFFIXES and p.name not in _NOT_WEIGHTS and p.is_file())
    return safes, pickles


def _resolve_folder(cfg: ModelConfig, folder: Path, kind: ModelKind, revision: str | None) -> ResolvedModel:
    where = str(folder)
    cfg_file = folder / "config.json"
    if not cfg_file.is_file():
        raise InputError(f"model folder has no config.json: {folder}", file=where, field="model.id",
                         expected="a Hugging Face model folder (config.json, *.safetensors, tokenizer files)",
                         fix="point model.id at the folder that holds config.json")
    try:
        model_type = json.loads(cfg_file.read_text(encoding="utf-8")).get("model_type")
    except (OSError, ValueError, AttributeError) as e:
        raise InputError(f"config.json is not valid JSON: {e}", file=str(cfg_file), field="model.id",
                         expected="a JSON object with model_type", fix="repair or re-export config.json") from None
    if not isinstance(model_type, str) or not model_type:
        raise InputError("config.json has no model_type", file=str(cfg_file), field="model_type",
                         expected="a model_type such as gemma3_text, llama, qwen2", fix="re-export the model folder")
    safes, pickles = weight_files(folder)
    if not safes:
        if pickles and not cfg.allow_pickle:
            raise InputError(f"only pickle weights ({', '.join(p.name for p in pickles)}) in {folder}; pickle files can "
                             "run code when loaded", file=where, field="model.allow_pickle",
                             expected="*.safetensors weights", fix="convert the weights to safetensors, or set "
                             "model.allow_pickle: true if you trust this folder")
        if not pickles:
            raise InputError(f"no weights in {folder}", file=where, field="model.id",
                             expected="*.safetensors weight files", fix="point model.id at a complete model folder")
    if not any((folder / n).is_file() for n in _TOKENIZER_FILES):
        raise InputError(f"no tokenizer files in {folder}", file=where, field="model.id",
                         expected=f"one of {', '.join(_TOKENIZER_FILES)}", fix="save the tokenizer into the model folder")
    policy = resolve_bos_policy(model_type, cfg.bos_policy, _folder_bos_token(folder))
    return ResolvedModel(kind, cfg.id, where, None, model_type, policy, revision)


def resolve_gguf(cfg: ModelConfig, path: Path, kind: ModelKind) -> ResolvedModel:
    """Resolve a .gguf file: family from `general.architecture`, BOS policy from the family (and the
    GGUF's BOS token where the family's policy depends on it). InputError on an unreadable GGUF."""
    meta = read_gguf_metadata(path, ["general.architecture"])
    family = meta.get("general.architecture")
    if not isinstance(family, str):
        raise InputError(f"{path} has no general.architecture", file=str(path), field="model.id",
                         expected="a GGUF written by llama.cpp tools", fix="re-export the GGUF")
    bos_token = None
    if cfg.bos_policy == "auto" and BOS_POLICY_BY_FAMILY.get(family) == "always_unless_control":
        meta = read_gguf_metadata(path, ["tokenizer.ggml.bos_token_id", "tokenizer.ggml.tokens"])
        tokens, bos_id = meta.get("tokenizer.ggml.tokens") or [], meta.get("tokenizer.ggml.bos_token_id")
        bos_token = tokens[bos_id] if isinstance(bos_id, int) and bos_id < len(tokens) else None
    policy = resolve_bos_policy(family, cfg.bos_policy, bos_token)
    return ResolvedModel(kind, cfg.id, str(path), path.name, family, policy, cfg.revision)


def _looks_like_path(s: str) -> bool:
    return s.startswith(("/", ".", "~")) or s.endswith(".gguf") or "\\" in s or s.count("/") > 1


def resolve_model(cfg: ModelConfig) -> ResolvedModel:
    """Validate `cfg.id`, the BOS policy and `cfg.quantize` without loading weights.

    Args:
        cfg: the model config.
    Returns:
        The ResolvedModel.
    Raises:
        InputError: unknown embedded or random name, bad fake seed, missing path, folder without
            config.json / weights / tokenizer, pickle-only weights without allow_pickle, unreadable
            GGUF, a hub id not in the local HF cache (nothing is downloaded), a family without a BOS
            policy, or a quantize setting this machine cannot run (see check_quantize).
    """
    r = _resolve_id(cfg)
    check_quantize(cfg, r)
    return r


def _resolve_id(cfg: ModelConfig) -> ResolvedModel:
    mid = cfg.id.strip()
    if mid.startswith("random:"):
        name = mid[len("random:"):]
        if name not in RANDOM_MODELS:
            raise InputError(f"unknown random-weight model '{mid}'", field="model.id",
                             expected=" | ".join(f"random:{n}" for n in RANDOM_MODELS),
                             fix="pick one of the listed sizes (random weights are for benchmarks only)")
        return ResolvedModel("random", mid, None, None, RANDOM_FAMILY, resolve_bos_policy(RANDOM_FAMILY, cfg.bos_policy))
    if mid.startswith("embedded:"):
        if mid != EMBEDDED_MODEL:
            raise InputError(f"unknown embedded model '{mid}'", field="model.id", expected=EMBEDDED_MODEL,
                             fix=f"use {EMBEDDED_MODEL}, a local model folder, a .gguf file or a cached hub id")
        return resolve_gguf(cfg, embedded_gguf_path(), "embedded")
    if mid.startswith("fake:"):
        from stage1_core.model.fake import parse_fake_id

        try:
            parse_fake_id(mid)
        except ValueError as e:
            raise InputError(f"bad fake model id '{mid}': {e}", field="model.id",
                             expected="fake:<integer seed>[,runaway=P][,limit=P][,bad=P]", fix="e.g. fake:0") from None
        return ResolvedModel("fake", mid, None, None, "fake", "never", None)
    path = Path(mid).expanduser()
    if path.exists():
        if path.is_dir():
            return _resolve_folder(cfg, path.resolve(), "hf_folder", cfg.revision)
        if path.suffix == ".gguf":
            return resolve_gguf(cfg, path.resolve(), "gguf")
        raise InputError(f"model path is a file but not a .gguf: {path}", file=str(path), field="model.id",
                         expected="a model folder or a .gguf file", fix="point model.id at the folder holding config.json")
    if _looks_like_path(mid) or not _HUB_ID.match(mid):
        raise InputError(f"model path not found: {mid}", file=mid, field="model.id",
                         expected="an existing model folder or .gguf file", fix="check the path (it is resolved "
                         f"relative to {os.getcwd()})")
    from huggingface_hub import snapshot_download

    try:
        folder = Path(snapshot_download(mid, revision=cfg.revision, local_files_only=True))
    except Exception as e:  # LocalEntryNotFoundError, RevisionNotFoundError, HFValidationError, ...
        rev = f" at revision {cfg.revision}" if cfg.revision else ""
        raise InputError(f"no local path '{mid}' exists, and model '{mid}'{rev} is not in the local Hugging Face "
                         f"cache; Stage 1 never downloads "
                         f"({type(e).__name__})", field="model.id", expected="a hub id already downloaded to "
                         "the local HF cache, a local folder, or a .gguf file",
                         fix=f"run `hf download {mid}` on a machine with access (set HF_HOME to share the cache), "
                         "or pass a local folder") from None
    return _resolve_folder(cfg, folder, "hub_cache", cfg.revision or folder.name)


def resolve_device(device: str) -> str:
    """"auto" -> "cuda" when a GPU is visible, else "cpu"; anything else as given."""
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _bitsandbytes_importable() -> bool:
    import importlib.util

    return importlib.util.find_spec("bitsandbytes") is not None


def check_quantize(cfg: ModelConfig, r: ResolvedModel) -> None:
    """Fail early when `cfg.quantize` cannot run here (before any weights load).

    Checked: quantize on the CPU (bitsandbytes needs CUDA), on a random-weight model, and, where a GPU
    is visible, without bitsandbytes installed. An explicit `device: cuda` on a machine without a GPU
    (a CPU planner) passes; the loader checks again on the worker.

    Args:
        cfg: the model config.
        r: its resolution.
    Raises:
        InputError: naming model.quantize, with the fix.
    """
    if cfg.quantize == "none" or r.kind == "fake":
        return
    if r.kind == "random":
        raise InputError(f"model.quantize {cfg.quantize} is not supported for random-weight models", field="model.quantize",
                         expected="none", fix="set model.quantize: none (random models are built directly in the dtype)")
    device = resolve_device(cfg.device)
    if device == "cpu" or device.startswith(("cpu", "mps")):
        raise InputError(f"model.quantize {cfg.quantize} needs a CUDA GPU, but the model would run on '{device}'",
                         field="model.quantize", expected="none on the CPU (bitsandbytes quantizes on CUDA only)",
                         fix="set model.quantize: none, or run on a CUDA GPU worker (when planning on a CPU "
                             "machine for GPU workers, set model.device: cuda)")
    import torch

    if torch.cuda.is_available() and not _bitsandbytes_importable():
        raise InputError(f"model.quantize {cfg.quantize} needs bitsandbytes, which is not installed",
                         field="model.quantize", expected="none, or bitsandbytes installed",
                         fix="pip install 'stage1[gpu]' (bitsandbytes), or set model.quantize: none")
