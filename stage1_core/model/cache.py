"""The Stage 1 cache folder and the on-disk sha256 memo of weight files.

`cache_dir` is `$STAGE1_CACHE_DIR` (default `~/.cache/stage1`), which holds the assembled embedded GGUF
(`gguf/`), the dequantized HF folders (`models/`) and `weights_sha256.json`: `cached_sha256` hashes a
file once and remembers the digest by (resolved path, size, mtime_ns), so a model's fingerprint costs a
stat per file after the first run. `write_cache_json` is the cache's bookkeeping writer (see its
docstring for why it is not `stage1_core.infra.storage`'s). Tests: `python -m pytest -q tests/core/test_model.py`.
"""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path
from typing import Any

from stage1_core.infra.storage import sha256_file


def cache_dir() -> Path:
    """The Stage 1 cache folder: `$STAGE1_CACHE_DIR` or `~/.cache/stage1`.

    Returns:
        The folder path (not created).
    """
    return Path(os.environ.get("STAGE1_CACHE_DIR") or Path.home() / ".cache" / "stage1").expanduser()


def write_cache_json(path: Path, obj: Any) -> None:
    """Atomic JSON write for cache bookkeeping (temp + rename; deliberately not a `faults` point).

    Not `stage1_core.infra.storage.write_json_atomic`: that writer is a `write` fault point (a cache
    write would shift which run file `STAGE1_FAULT=write:N` hits), names its temp file by pid only (this
    one adds the thread id, so two threads of one process never share a temp file) and raises WriteError,
    while a failed cache write must stay an OSError the callers can ignore (a read-only cache costs a
    re-hash).

    Args:
        path: the JSON file (its folder is created).
        obj: what to write (indent 1, sorted keys).
    Raises:
        OSError: the write or the rename failed; the temp file is removed.
    """
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


def record_sha256(path: Path, digest: str) -> None:
    """Remember `digest` as the sha256 of `path` at its current size and mtime (a file just written or
    checked), so the next `cached_sha256` of it is a stat; an unwritable cache is ignored."""
    st = path.stat()
    cache = _read_hash_cache()
    cache[str(path.resolve())] = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": digest}
    try:
        write_cache_json(_hash_cache_path(), cache)
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
    record_sha256(p, digest)
    return digest
