"""The atomic writers and hashing: a run never leaves a half-written final file or folder.

Every writer writes `NAME.tmp-<pid>` in the same folder, fsyncs, then `os.replace`s it onto NAME.
An OSError on the way (disk full, quota, permissions, read-only file system) becomes one
`errors.WriteError` naming the file, the errno and the fix; the temp file is removed and NAME keeps
its previous bytes.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any, Iterable

import yaml

from stage1_core.infra import faults
from stage1_core.infra.errors import WriteError


def sha256_file(path: str | Path) -> str:
    """Hex sha256 of a file's bytes, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def canonical_json(obj: Any) -> str:
    """Deterministic JSON (sorted keys, no spaces) for hashing."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write `data` to `path` through `NAME.tmp-<pid>`, fsync and `os.replace`.

    Raises:
        WriteError: the operating system refused a step (ENOSPC, EACCES, EROFS, EDQUOT, ...); the
            temp file is removed and `path` is as it was.
    """
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    step = "creating its folder"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        step = "writing the temp file"
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        faults.maybe_fault("write", str(path))
        step = "renaming the temp file onto it"
        os.replace(tmp, path)
    except OSError as e:
        raise WriteError(str(path), e.errno or 0, e.strerror or str(e), step, temp_left=_remove(tmp),
                         existed=os.path.lexists(path)) from e
    finally:
        _remove(tmp)


def _remove(tmp: Path) -> str | None:
    """Delete a temp file if it is there. Returns its path if it is there and cannot be deleted."""
    try:
        tmp.unlink(missing_ok=True)
    except OSError:
        return str(tmp) if os.path.lexists(tmp) else None
    return None


def write_bytes_atomic(path: str | Path, data: bytes) -> None:
    """Write bytes atomically (see the module docstring): a PNG, an archive."""
    _atomic_write_bytes(Path(path), data)


def fsync_dir(d: str | Path) -> None:
    """Flush a folder's entries (a rename into it) to disk."""
    fd = os.open(d, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(root: str | Path) -> None:
    """Flush every file under `root`, then `root` itself."""
    for p in sorted(Path(root).rglob("*")):
        if p.is_file():
            with open(p, "rb") as f:
                os.fsync(f.fileno())
    fsync_dir(root)


def publish_dir(staging: str | Path, final: str | Path) -> None:
    """The atomic writer for a folder: `staging` (complete, in the same parent) is flushed and renamed
    onto `final`, replacing an earlier `final`, so a reader sees the old folder or the new one whole,
    never a half-written one.

    Raises:
        WriteError: the operating system refused the flush or the rename.
    """
    staging, final = Path(staging), Path(final)
    try:
        fsync_tree(staging)
        if final.exists():
            shutil.rmtree(final)
        os.replace(staging, final)
        fsync_dir(final.parent)
    except OSError as e:
        raise WriteError(str(final), e.errno or 0, e.strerror or str(e), "renaming the finished folder onto it",
                         temp_left=str(staging) if staging.exists() else None, existed=final.exists()) from e


def write_text_atomic(path: str | Path, text: str) -> None:
    _atomic_write_bytes(Path(path), text.encode("utf-8"))


def write_json_atomic(path: str | Path, obj: Any) -> None:
    write_text_atomic(path, json.dumps(obj, indent=2, ensure_ascii=False, default=str) + "\n")


def write_yaml_atomic(path: str | Path, obj: Any) -> None:
    write_text_atomic(path, yaml.safe_dump(obj, sort_keys=False, allow_unicode=True, width=100))


def write_jsonl_atomic(path: str | Path, rows: Iterable[dict[str, Any]]) -> int:
    """Write rows as JSON Lines atomically. Returns the row count."""
    lines = [json.dumps(r, ensure_ascii=False, default=str) for r in rows]
    write_text_atomic(path, "".join(line + "\n" for line in lines))
    return len(lines)


def file_manifest(path: str | Path, rows: int | None = None) -> dict[str, Any]:
    """{path, rows, sha256} of a written file; rows counted from JSONL lines when not given (None for
    other files)."""
    p = Path(path)
    if rows is None and p.suffix == ".jsonl":
        with open(p, "rb") as f:
            rows = sum(1 for line in f if line.strip())
    return {"path": str(p), "rows": rows, "sha256": sha256_file(p)}


def read_json(path: str | Path) -> Any:
    with open(path, encoding="utf-8") as f:
        return json.load(f)
