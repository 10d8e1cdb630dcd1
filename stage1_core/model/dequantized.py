"""The cache of dequantized GGUFs: a GGUF is turned into float weights once and kept as an HF folder
under `{cache}/models/` (built by `stage1_core.model.loader`). This module owns that folder's name
(`gguf_folder_path`: family, GGUF sha256, transformers version, dtype) and its record (SOURCE_RECORD:
the GGUF, the dtype, the package versions that built it, every file's sha256): writing it, checking a
folder against it (`cached_folder_problem`), and reading it back for provenance (`dequantized_record`,
`cached_dequantized`, `builder_versions`). Tests: `python -m pytest -q tests/core/test_loader.py
tests/core/test_dequantized_drift.py`.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Mapping

from stage1_core.infra.config import ModelConfig
from stage1_core.infra.provenance import package_version
from stage1_core.model.cache import cache_dir, cached_sha256, write_cache_json
from stage1_core.model.fingerprint import weights_sha256
from stage1_core.model.resolve import ResolvedModel, resolve_device, resolve_model
from stage1_core.model.sizing import resolve_dtype

SOURCE_RECORD = "stage1_source.json"
"""What a cached HF folder was built from and with, and the sha256 of every file in it."""


def builder_versions() -> dict[str, str | None]:
    """Versions of the packages that turn a GGUF into float weights (a change may change the weights)."""
    return {dist: package_version(dist) for dist in ("transformers", "gguf", "torch")}


def gguf_folder_path(r: ResolvedModel, dtype: str, sha: str) -> Path:
    """Where the GGUF `r` (sha256 `sha`) dequantized in `dtype` lives: `{cache}/models/<family>-<sha[:16]>-
    tf<transformers version>[-<dtype> unless bfloat16]`."""
    import transformers

    name = f"{r.family}-{sha[:16]}-tf{transformers.__version__}" + ("" if dtype == "bfloat16" else f"-{dtype}")
    return cache_dir() / "models" / name


def _safetensors_digest(files: Mapping[str, str]) -> str:
    """sha256 over the name-sorted *.safetensors digests of a folder's file record (as weights_sha256)."""
    shas = [digest for name, digest in sorted(files.items()) if name.endswith(".safetensors")]
    return hashlib.sha256("".join(shas).encode("ascii")).hexdigest()


def write_source_record(folder: Path, *, gguf: Path, gguf_sha256: str, dtype: str, files: dict[str, str]) -> None:
    """Record in a freshly built folder what it was built from and with (SOURCE_RECORD): the GGUF, its
    sha256, the dtype, every file's sha256, the weights' digest and builder_versions().

    Args:
        folder: the built folder (before it is renamed into place).
        gguf: the GGUF it was built from.
        gguf_sha256: that GGUF's sha256.
        dtype: the dtype it was built in.
        files: file name -> sha256 of every file in the folder.
    Raises:
        OSError: the record cannot be written.
    """
    write_cache_json(folder / SOURCE_RECORD, {"gguf": str(gguf), "gguf_sha256": gguf_sha256, "dtype": dtype,
                                              "files": files, "weights_sha256": _safetensors_digest(files),
                                              "built_with": builder_versions()})


def cached_folder_problem(folder: Path, *, gguf_sha256: str | None = None, dtype: str | None = None) -> str | None:
    """Why a cached HF model folder cannot be trusted (built from another GGUF or dtype; a file
    missing, truncated or edited; no record of its files), or None when every recorded file has its
    recorded sha256 (memoized by size and mtime, so a later check costs a stat per file).

    Args:
        folder: a folder written by `loader._gguf_as_hf_folder`.
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
        folder: a folder written by `loader._gguf_as_hf_folder`.
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
    dtype, sha = resolve_dtype(cfg.dtype, resolve_device(cfg.device), r), weights_sha256(r)
    folder = gguf_folder_path(r, dtype, sha)
    if cached_folder_problem(folder, gguf_sha256=sha, dtype=dtype) is not None:
        return None
    return dequantized_record(folder)
