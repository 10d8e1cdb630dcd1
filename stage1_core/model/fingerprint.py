"""A model's cheap provenance: `model_fingerprint` (id, kind, path, revision, weights sha256, family, BOS
policy, dtype, quantize) without loading weights, the weight hashes memoized on disk
(`stage1_core.model.cache`). `weights_sha256` is the identity of a model's weights that run folders,
caches and the dequantized folders key on. Tests: `python -m pytest -q tests/core/test_model.py`.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

from stage1_core.infra.config import ModelConfig
from stage1_core.model.cache import cached_sha256
from stage1_core.model.random_weights import RANDOM_SENTINELS_NOTE, RANDOM_WEIGHTS_VERSION
from stage1_core.model.resolve import ResolvedModel, resolve_model, weight_files
from stage1_core.model.sizing import resolve_dtype


def weights_sha256(r: ResolvedModel) -> str:
    """The identity of a model's weights (a GGUF or HF folder; not fake or random): the GGUF file's
    sha256, or the sha256 of the concatenated sha256s of the name-sorted safetensors shards (pickle
    files when there are none)."""
    assert r.path is not None
    if r.gguf_file:
        return cached_sha256(r.path)
    safes, pickles = weight_files(Path(r.path))
    shas = [cached_sha256(p) for p in (safes or pickles)]
    return hashlib.sha256("".join(shas).encode("ascii")).hexdigest()


def _fingerprint_of(r: ResolvedModel, cfg: ModelConfig) -> dict[str, Any]:
    """model_fingerprint of an already resolved model (HFBackend adds device, load time, sentinels)."""
    if r.kind == "fake":
        return {"id": r.id, "kind": "fake", "weights_sha256": hashlib.sha256(f"{r.id}:v1".encode()).hexdigest()}
    if r.kind == "random":
        return {"id": r.id, "kind": "random", "path": None, "revision": None,
                "weights_sha256": hashlib.sha256(f"{r.id}:{RANDOM_WEIGHTS_VERSION}".encode()).hexdigest(),
                "family": r.family, "bos_policy": r.bos_policy, "dtype": resolve_dtype(cfg.dtype, cfg.device, r),
                "quantize": cfg.quantize, "sentinels": RANDOM_SENTINELS_NOTE}
    return {"id": r.id, "kind": r.kind, "path": r.path, "revision": r.revision, "weights_sha256": weights_sha256(r),
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
