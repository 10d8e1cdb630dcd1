"""The Stage 1 generation engine: continuous batching over a static KV cache, stops found on the device.

`Engine(model, tokenizer, eos_ids, device)` wraps a loaded transformers decoder (Gemma 3, Llama,
Mistral, Qwen2/3: `supports(model)` says which) and completes token-id prompts:
- a fixed number of *slots* decode together; a slot whose row stopped is refilled with the next
  waiting prompt (prefill into that slot's rows of the cache), so a batch stays full until the queue
  is empty;
- the KV cache is static, `(slots, kv_heads, context, head_dim)` per layer; each slot has its own
  positions, so rows never wait for each other and never see padding;
- stop sequences are found on the device: an Aho-Corasick automaton over the stop strings' characters
  is compiled into a `(states, vocab)` transition table, so one gather per step advances every row's
  match state (no decode, no host sync per step);
- sampling randomness of a row comes from (run seed, item id, step) through a counter-based hash, so
  the same seed gives the same text at any batch size, in any batch company, after any OOM back-off;
- on CUDA the decode step is captured once per (slots, context, mode) in a CUDA graph and replayed;
  on the CPU it runs eagerly. Rows are harvested every `sync_every` steps (1 on the CPU).
The engine reuses the model's own modules (projections, norms, MLP, rotary tables), so its numerics
follow transformers'; `HFBackend` keeps plain `model.generate` as the reference path
(`model.engine: reference`).

Run it: `PYTHONPATH=. python -m stage1_core.cli.engine [--prompt TEXT] [--max-new-tokens N]` completes a
prompt greedily with the embedded model through both paths and prints both.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import logging
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Sequence

from stage1_core.infra.errors import DeviceOOM

if TYPE_CHECKING:
    import torch

log = logging.getLogger("stage1.engine")

SUPPORTED_CLASSES = frozenset({"Gemma3ForCausalLM", "LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM",
                               "Qwen3ForCausalLM"})
"""Decoder classes whose layers the engine knows how to run (others use the reference path)."""

TOP_CANDIDATES = 1024
"""Top-p / top-k sampling draws from the 1024 most likely tokens: the nucleus lies inside them unless
the distribution is nearly flat (then the draw is limited to those 1024)."""

_M32 = 0xFFFFFFFF


class EngineOOM(DeviceOOM):
    """The engine ran out of device memory with a single slot: nothing smaller can be tried."""


def supports(model: Any) -> str | None:
    """Why the engine cannot run `model`, or None when it can.

    Args:
        model: a transformers causal LM.
    Returns:
        None, or a short reason (unknown class, attention soft-capping, missing modules).
    """
    name = type(model).__name__
    if name not in SUPPORTED_CLASSES:
        return f"{name} is not one of {sorted(SUPPORTED_CLASSES)}"
    inner = getattr(model, "model", None)
    if inner is None or not hasattr(inner, "layers") or not hasattr(model, "lm_head"):
        return f"{name} lacks model.layers / lm_head"
    if getattr(model.config, "attn_logit_softcapping", None):
        return "attention logit soft-capping is not implemented in the engine"
    attn = inner.layers[0].self_attn
    if not all(hasattr(attn, k) for k in ("q_proj", "k_proj", "v_proj", "o_proj", "head_dim", "scaling")):
        return f"{type(attn).__name__} lacks q/k/v/o projections, head_dim or scaling"
    return None


# --------------------------------------------------------------------------- per-row randomness

def row_seed(seed: int, item_id: str) -> int:
    """A row's 31-bit sampling seed from the run seed and the item's stable id (never its position).

    Args:
        seed: the call's seed.
        item_id: the item's id.
    Returns:
        An int in [0, 2**31).
    """
    return int.from_bytes(hashlib.sha256(f"{seed}\x1f{item_id}".encode()).digest()[:4], "big") & 0x7FFFFFFF


def _mul32(x: "torch.Tensor", c: int) -> "torch.Tensor":
    """(x * c) mod 2**32 for 0 <= x < 2**32 in int64 without overflow (split in 16-bit halves)."""
    return ((x & 0xFFFF) * c + ((((x >> 16) * c) & 0xFFFF) << 16)) & _M32


def _mix32(x: "torch.Tensor") -> "torch.Tensor":
    """A 32-bit integer hash (lowbias32) on int64 tensors; same bits on every device."""
    x = x & _M32
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def uniform(seeds: "torch.Tensor", steps: "torch.Tensor") -> "torch.Tensor":
    """One uniform in [0, 1) per row from (row seed, step): counter-based, no generator state.

    Args:
        seeds: (n,) int64 row seeds.
        steps: (n,) int64 step numbers (tokens generated so far in that row).
    Returns:
        (n,) float32 uniforms, multiples of 2**-24.
    """
    h = _mix32(_mix32(seeds) ^ _mul32(steps & _M32, 0x9E3779B1))
    return (h >> 8).float() * (1.0 / (1 << 24))


@dataclass
class Sampling:
    """Sampling settings as device tensors (so one captured graph serves every call of a mode)."""

    mode: str  # "greedy" | "nucleus" | "full"
    temperature: "torch.Tensor"
    top_p: "torch.Tensor"
    top_k: "torch.Tensor"


def sampling_mode(temperature: float, top_p: float, top_k: int) -> str:
    """greedy (temperature 0), full (plain temperature sampling over the whole vocabulary), or nucleus."""
    if temperature == 0:
        return "greedy"
    return "full" if top_p >= 1.0 and top_k == 0 else "nucleus"


def sample(logits: "torch.Tensor", s: Sampling, seeds: "torch.Tensor", steps: "torch.Tensor") -> "torch.Tensor":
    """Draw one token per row, deterministically from (row seed, step).

    Temperature, then top-k, then top-p (transformers' order); the draw is an inverse-CDF lookup with
    the row's counter-based uniform. Graph-safe: no host sync, fixed shapes.

    Args:
        logits: (n, vocab) float32.
        s: the call's sampling settings.
        seeds, steps: (n,) int64.
    Returns:
        (n,) int64 token ids.
    """
    import torch

    if s.mode == "greedy":
        return logits.argmax(dim=-1)
    scaled = logits / s.temperature
    u = uniform(seeds, steps)
    if s.mode == "full":
        cdf = torch.softmax(scaled, dim=-1).cumsum(dim=-1)
        pick = torch.searchsorted(cdf, (u * cdf[:, -1]).unsqueeze(-1).contiguous(), right=True).squeeze(-1)
        return pick.clamp(max=logits.shape[-1] - 1)
    k = min(TOP_CANDIDATES, logits.shape[-1])
    vals, idx = scaled.topk(k, dim=-1)
    probs = torch.exp(vals - torch.logsumexp(scaled, dim=-1, keepdim=True))
    ranks = torch.arange(k, device=logits.device)
    limit = torch.where(s.top_k > 0, s.top_k, torch.full_like(s.top_k, k))
    probs = probs * (ranks < limit).to(probs.dtype)
    probs = probs / probs.sum(dim=-1, keepdim=True)  # renormalised over top-k (= 1 without top-k)
    cum = probs.cumsum(dim=-1)
    keep = (cum - probs) < s.top_p  # the mass strictly before a token is < top_p: always keeps the first
    kept = probs * keep.to(probs.dtype)
    kcum = kept.cumsum(dim=-1)
    j = (kcum <= (u * kcum[:, -1]).unsqueeze(-1)).sum(dim=-1).clamp(max=k - 1)
    return idx.gather(-1, j.unsqueeze(-1)).squeeze(-1)


# --------------------------------------------------------------------------- stop automaton

def token_strings(tokenizer: Any) -> list[str]:
    """Each vocabulary id decoded on its own (special tokens kept, as the backend decodes)."""
    n = len(tokenizer)
    return tokenizer.batch_decode([[i] for i in range(n)], skip_special_tokens=False,
                                  clean_up_tokenization_spaces=False)


def _cache_path(name: str) -> "Any":
    from stage1_core.model.cache import cache_dir

    return cache_dir() / "engine" / name


def _atomic_write(path: Any, write: Callable[[Any], None]) -> None:
    """Write through a temp file + rename (a cache file is whole or absent); failures only cost a rebuild."""
    import os

    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
        write(tmp)
        os.replace(tmp, path)
    except OSError as e:
        log.debug("engine cache not written (%s): %s", path, e)


def vocab_key(tokenizer: Any) -> str | None:
    """A hash of the tokenizer's vocabulary (None when it cannot list its tokens)."""
    convert = getattr(tokenizer, "convert_ids_to_tokens", None)
    if convert is None:
        return None
    toks = convert(list(range(len(tokenizer))))
    blob = json.dumps([type(tokenizer).__name__, toks], ensure_ascii=False).encode("utf-8", "surrogatepass")
    return hashlib.sha256(blob).hexdigest()[:20]


def cached_token_strings(tokenizer: Any, key: str | None) -> list[str]:
    """token_strings, memoized on disk under `{cache}/engine/` by vocabulary hash (decoding 262k ids
    one by one takes ~5 s on 2 CPU cores; reading them back ~0.2 s)."""
    if key is None:
        return token_strings(tokenizer)
    path = _cache_path(f"pieces-{key}.json")
    try:
        pieces = json.loads(path.read_text(encoding="utf-8"))
        if isinstance(pieces, list) and len(pieces) == len(tokenizer):
            return pieces
    except (OSError, ValueError):
        pass
    pieces = token_strings(tokenizer)
    _atomic_write(path, lambda tmp: tmp.write_text(json.dumps(pieces, ensure_ascii=False), encoding="utf-8"))
    return pieces


def cached_stop_tables(pieces: Sequence[str], stops: Sequence[str], key: str | None) -> tuple[Any, Any]:
    """build_stop_tables, memoized on disk by (vocabulary hash, stop strings)."""
    import numpy as np

    if key is None:
        return build_stop_tables(pieces, stops)
    skey = hashlib.sha256(json.dumps(sorted({s for s in stops if s})).encode()).hexdigest()[:16]
    path = _cache_path(f"stops-{key}-{skey}.npz")
    try:
        with np.load(path) as z:
            nxt, fires = z["next_state"].astype(np.int32), z["fires"]
        if nxt.shape == fires.shape and nxt.shape[1] == len(pieces):
            return nxt, fires
    except (OSError, ValueError, KeyError):
        pass
    nxt, fires = build_stop_tables(pieces, stops)
    small = nxt.astype(np.uint8) if nxt.max(initial=0) < 256 else nxt.astype(np.int16)

    def write(tmp: Any) -> None:
        with open(tmp, "wb") as f:
            np.savez(f, next_state=small, fires=fires)

    _atomic_write(path, write)
    return nxt, fires


def build_stop_tables(pieces: Sequence[str], stops: Sequence[str]) -> tuple[Any, Any]:
    """Compile stop strings into per-token transitions of an Aho-Corasick automaton.

    State 0 is "nothing matched yet". `next_state[s, t]` is the automaton's state after reading token
    t's text from state s; `fires[s, t]` says a stop string completed somewhere inside that text.
    Built vectorised over the vocabulary (numpy), one pass per state.

    Args:
        pieces: text of each token id.
        stops: the stop strings (empty ones ignored).
    Returns:
        (next_state int32 array (states, vocab), fires bool array (states, vocab)).
    """
    import numpy as np

    stops = sorted({s for s in stops if s})
    # trie
    goto: list[dict[str, int]] = [{}]
    out = [False]
    for s in stops:
        node = 0
        for ch in s:
            if ch not in goto[node]:
                goto.append({})
                out.append(False)
                goto[node][ch] = len(goto) - 1
            node = goto[node][ch]
        out[node] = True
    # failure links (BFS) and the full transition function over the stop alphabet
    alphabet = sorted({ch for s in stops for ch in s})
    col = {ch: i + 1 for i, ch in enumerate(alphabet)}  # column 0: any other character
    n_states = len(goto)
    delta = np.zeros((n_states, len(alphabet) + 1), dtype=np.int32)
    fail = [0] * n_states
    queue: list[int] = []
    for ch, nxt in goto[0].items():
        delta[0, col[ch]] = nxt
        queue.append(nxt)
    while queue:
        node = queue.pop(0)
        out[node] = out[node] or out[fail[node]]
        for ch, c in col.items():
            nxt = goto[node].get(ch)
            if nxt is None:
                delta[node, c] = delta[fail[node], c]
            else:
                fail[nxt] = int(delta[fail[node], c])
                delta[node, c] = nxt
                queue.append(nxt)
    is_out = np.array(out, dtype=bool)
    # tokens as rows of character columns (-1 = past the token's end), longest first
    vocab = len(pieces)
    lengths = np.array([len(p) for p in pieces], dtype=np.int64)
    width = int(lengths.max()) if vocab else 0
    chars = np.full((vocab, max(width, 1)), -1, dtype=np.int32)
    for t, p in enumerate(pieces):
        if p:
            chars[t, : len(p)] = [col.get(ch, 0) for ch in p]
    order = np.argsort(-lengths, kind="stable")
    sorted_chars, sorted_len = chars[order], lengths[order]
    next_state = np.zeros((n_states, vocab), dtype=np.int32)
    fires = np.zeros((n_states, vocab), dtype=bool)
    for s0 in range(n_states):
        state = np.full(vocab, s0, dtype=np.int32)
        fired = np.zeros(vocab, dtype=bool)
        for c in range(width):
            live = int(np.searchsorted(-sorted_len, -c, side="left"))  # rows whose length > c (sorted first)
            if live == 0:
                break
            st = delta[state[:live], sorted_chars[:live, c]]
            state[:live] = st
            fired[:live] |= is_out[st]
        next_state[s0, order] = state
        fires[s0, order] = fired
    return next_state, fires


# --------------------------------------------------------------------------- the decoder, run by hand

class _Decoder:
    """The model's layers run over a static, slot-indexed KV cache (prefill and decode)."""

    def __init__(self, model: Any) -> None:
        import torch

        self.model = model
        inner = model.model
        cfg = model.config
        self.embed, self.layers, self.norm, self.lm_head = inner.embed_tokens, inner.layers, inner.norm, model.lm_head
        self.softcap = getattr(cfg, "final_logit_softcapping", None)
        attn0 = self.layers[0].self_attn
        self.head_dim = int(attn0.head_dim)
        self.n_heads = int(cfg.num_attention_heads)
        self.n_kv = int(cfg.num_key_value_heads)
        self.group = self.n_heads // self.n_kv
        self.gemma_norms = hasattr(self.layers[0], "pre_feedforward_layernorm")
        types = list(getattr(cfg, "layer_types", None) or ["full_attention"] * len(self.layers))
        self.layer_types = types
        self.windows = [getattr(layer.self_attn, "sliding_window", None) for layer in self.layers]
        self.windows = [w if isinstance(w, int) and w > 0 else None for w in self.windows]
        p = next(model.parameters())
        self.device = p.device
        self.dtype = self.embed.weight.dtype if hasattr(self.embed, "weight") else p.dtype
        if self.dtype not in (torch.float32, torch.bfloat16, torch.float16):
            self.dtype = torch.bfloat16
        self.matmul_decode = self.device.type == "cuda"
        """Decode attention by two matmuls over the cache slice (CUDA), else SDPA (CPU: matches transformers)."""
        self._rope: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self._rope_len = 0

    # -- rotary tables ------------------------------------------------------------------------
    def rope_tables(self, length: int) -> None:
        """cos/sin for positions [0, length) per layer type, from the model's own rotary module."""
        import torch

        if length <= self._rope_len:
            return
        inner = self.model.model
        pos = torch.arange(length, device=self.device)[None]
        dummy = torch.zeros(1, dtype=self.dtype, device=self.device)
        for lt in sorted(set(self.layer_types)):
            rot = inner.rotary_emb
            if lt == "sliding_attention" and hasattr(inner, "rotary_emb_local"):
                rot = inner.rotary_emb_local  # older transformers: a separate local rotary module
                cos, sin = rot(dummy, pos)
            elif "layer_type" in inspect.signature(rot.forward).parameters:
                cos, sin = rot(dummy, pos, lt)
            else:
                cos, sin = rot(dummy, pos)
            self._rope[lt] = (cos[0].to(self.dtype), sin[0].to(self.dtype))  # (length, head_dim)
        self._rope_len = length

    @staticmethod
    def _rotate(x: "torch.Tensor", cos: "torch.Tensor", sin: "torch.Tensor") -> "torch.Tensor":
        import torch

        half = x.shape[-1] // 2
        rot = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
        return x * cos + rot * sin

    def _qkv(self, layer: Any, h: "torch.Tensor", li: int, pos: "torch.Tensor") -> tuple["torch.Tensor", ...]:
        """h (n, t, hidden), pos (n, t) -> q (n, heads, t, d), k and v (n, kv, t, d), rotated."""
        attn = layer.self_attn
        n, t, _ = h.shape
        q = attn.q_proj(h).view(n, t, self.n_heads, self.head_dim).transpose(1, 2)
        k = attn.k_proj(h).view(n, t, self.n_kv, self.head_dim).transpose(1, 2)
        v = attn.v_proj(h).view(n, t, self.n_kv, self.head_dim).transpose(1, 2)
        if hasattr(attn, "q_norm"):
            q, k = attn.q_norm(q), attn.k_norm(k)
        cos, sin = self._rope[self.layer_types[li]]
        c, s = cos[pos].unsqueeze(1), sin[pos].unsqueeze(1)  # (n, 1, t, d)
        return self._rotate(q, c, s), self._rotate(k, c, s), v

    def _attend(self, q: "torch.Tensor", k: "torch.Tensor", v: "torch.Tensor", mask: "torch.Tensor",
                scale: float) -> "torch.Tensor":
        """Grouped-query attention without repeating K/V: q (n, heads, t, d) -> (n, t, heads*d).

        `mask` is (n, 1, t, keys) or broadcastable; query heads of one KV head become extra query rows.
        """
        import torch.nn.functional as F

        n, _, t, d = q.shape
        qg = q.reshape(n, self.n_kv, self.group * t, d)
        if self.group > 1 and t > 1:
            mask = mask.repeat(1, 1, self.group, 1)  # rows are (group, position): repeat the position rows
        o = F.scaled_dot_product_attention(qg, k, v, attn_mask=mask, scale=scale)
        return o.reshape(n, self.n_heads, t, d).transpose(1, 2).reshape(n, t, self.n_heads * d)

    def _attend_one(self, q: "torch.Tensor", k: "torch.Tensor", v: "torch.Tensor", mask: "torch.Tensor",
                    scale: float) -> "torch.Tensor":
        """Decode attention (one query per row) as two batched matmuls over the cache slice, read in place.

        q (s, heads, 1, d); k, v (s, kv, keys, d) — a strided slice of the static cache, which SDPA's
        math fallback would copy; mask (s, 1, 1, keys). Scores are soft-maxed in float32. -> (s, 1, heads*d).
        """
        import torch

        s, _, _, d = q.shape
        qg = q.reshape(s, self.n_kv, self.group, d)
        scores = torch.matmul(qg, k.transpose(-1, -2)).float() * scale  # (s, kv, group, keys)
        scores = scores.masked_fill(~mask, float("-inf"))
        o = torch.matmul(torch.softmax(scores, dim=-1).to(v.dtype), v)  # (s, kv, group, d)
        return o.reshape(s, 1, self.n_heads * d)

    def _mlp_block(self, layer: Any, x: "torch.Tensor", attn_out: "torch.Tensor") -> "torch.Tensor":
        if self.gemma_norms:
            x = x + layer.post_attention_layernorm(attn_out)
            return x + layer.post_feedforward_layernorm(layer.mlp(layer.pre_feedforward_layernorm(x)))
        x = x + attn_out
        return x + layer.mlp(layer.post_attention_layernorm(x))

    def logits(self, h: "torch.Tensor") -> "torch.Tensor":
        """Final norm + LM head (+ soft-capping) of hidden states (n, hidden) -> float32 (n, vocab)."""
        import torch

        out = self.lm_head(self.norm(h)).float()
        if self.softcap:
            out = torch.tanh(out / self.softcap) * self.softcap
        return out

    def prefill(self, tokens: "torch.Tensor", lengths: "torch.Tensor", slots: "torch.Tensor",
                cache: list[tuple["torch.Tensor", "torch.Tensor"]]) -> "torch.Tensor":
        """Run right-padded prompts (n, t) from position 0, write their K/V into `slots` of the cache.

        Returns the last real position's hidden state per row, (n, hidden).
        """
        import torch

        n, t = tokens.shape
        pos = torch.arange(t, device=self.device).expand(n, t)
        qi = torch.arange(t, device=self.device)
        causal = qi[None, :] <= qi[:, None]  # (t, t): key <= query
        masks: dict[int | None, torch.Tensor] = {}
        x = self.embed(tokens)
        for li, layer in enumerate(self.layers):
            w = self.windows[li]
            if w not in masks:
                m = causal if w is None else causal & (qi[None, :] > qi[:, None] - w)
                masks[w] = m[None, None]
            q, k, v = self._qkv(layer, layer.input_layernorm(x), li, pos)
            ck, cv = cache[li]
            ck[slots, :, :t] = k
            cv[slots, :, :t] = v
            a = self._attend(q, k, v, masks[w], layer.self_attn.scaling)
            x = self._mlp_block(layer, x, layer.self_attn.o_proj(a))
        return x[torch.arange(n, device=self.device), lengths - 1]

    def decode(self, tokens: "torch.Tensor", pos: "torch.Tensor",
               cache: list[tuple["torch.Tensor", "torch.Tensor"]], context: int) -> "torch.Tensor":
        """One token per slot (s,) at positions (s,); keys are each slot's cache [0, pos]. Returns (s, hidden)."""
        import torch

        s = tokens.shape[0]
        keys = torch.arange(context, device=self.device)
        upto = keys[None, :] <= pos[:, None]  # (s, context)
        masks: dict[int | None, torch.Tensor] = {}
        rows = torch.arange(s, device=self.device)
        x = self.embed(tokens[:, None])
        for li, layer in enumerate(self.layers):
            w = self.windows[li]
            if w not in masks:
                m = upto if w is None else upto & (keys[None, :] > pos[:, None] - w)
                masks[w] = m[:, None, None, :]
            q, k, v = self._qkv(layer, layer.input_layernorm(x), li, pos[:, None])
            ck, cv = cache[li]
            ck[rows, :, pos] = k[:, :, 0]
            cv[rows, :, pos] = v[:, :, 0]
            if self.matmul_decode:
                a = self._attend_one(q, ck[:, :, :context], cv[:, :, :context], masks[w], layer.self_attn.scaling)
            else:
                a = self._attend(q, ck[:, :, :context], cv[:, :, :context], masks[w], layer.self_attn.scaling)
            x = self._mlp_block(layer, x, layer.self_attn.o_proj(a))
        return x[:, 0]


# --------------------------------------------------------------------------- the engine

@dataclass
class _State:
    """Per-slot decode state, all on the device (fixed shapes, updated in place)."""

    tok: "torch.Tensor"  # (s,) the token to feed next
    pos: "torch.Tensor"  # (s,) its position
    ngen: "torch.Tensor"  # (s,) tokens generated so far
    live: "torch.Tensor"  # (s,) bool: generating
    seed: "torch.Tensor"  # (s,) row seeds
    stop: "torch.Tensor"  # (s,) automaton state
    out: "torch.Tensor"  # (s, max_new) generated tokens
    max_new: "torch.Tensor"  # () int64


@dataclass
class EngineStats:
    """Counters of the last generate call (for benchmarks and logs)."""

    slots: int = 0
    steps: int = 0
    prefills: int = 0
    tokens: int = 0
    seconds: float = 0.0
    graphs: bool = False
    oom_backoffs: list[int] = field(default_factory=list)


class Engine:
    """Continuous-batching generation over a static KV cache (see the module docstring)."""

    def __init__(self, model: Any, tokenizer: Any, eos_ids: Sequence[int], *, slots: int | None = None,
                 use_graphs: bool | None = None, sync_every: int | None = None,
                 prefill_tokens: int | None = None) -> None:
        """Prepare the engine for a loaded model (nothing is allocated until the first call).

        Args:
            model: a supported transformers causal LM (see `supports`), in eval mode on its device.
            tokenizer: its tokenizer (token texts feed the stop automaton).
            eos_ids: token ids that end a row.
            slots: rows decoded together; None = 16 on the CPU, from free memory on CUDA.
            use_graphs: capture the decode step in a CUDA graph (default: on CUDA).
            sync_every: decode steps between harvests (default 1 on the CPU, 8 on CUDA).
            prefill_tokens: padded prompt tokens per prefill forward (default 2048 CPU, 32768 CUDA).
        Raises:
            ValueError: the model is not supported (`supports` says why).
        """
        why = supports(model)
        if why:
            raise ValueError(f"the stage1 engine cannot run this model: {why}")
        import torch

        self.model, self.tokenizer = model, tokenizer
        self.dec = _Decoder(model)
        self.device = self.dec.device
        self.cuda = self.device.type == "cuda"
        self.eos_ids = sorted({int(e) for e in eos_ids})
        self.slots_cfg = slots
        self.use_graphs = self.cuda if use_graphs is None else (use_graphs and self.cuda)
        self.sync_every = sync_every or (8 if self.cuda else 1)
        self.prefill_tokens = prefill_tokens or (32768 if self.cuda else 2048)
        self.vocab = int(model.lm_head.weight.shape[0]) if hasattr(model.lm_head, "weight") else len(tokenizer)
        self._pieces: list[str] | None = None
        self._stop_tables: dict[tuple[str, ...], tuple[torch.Tensor, torch.Tensor]] = {}
        self._eos_mask = torch.zeros(self.vocab, dtype=torch.bool, device=self.device)
        self._eos_mask[[e for e in self.eos_ids if e < self.vocab]] = True
        self._cache: list[tuple[torch.Tensor, torch.Tensor]] | None = None
        self._cache_shape: tuple[int, int] = (0, 0)
        self.stats = EngineStats()
        self.on_alloc: Callable[[int, int], None] | None = None  # test hook: (slots, context) before allocation

    # -- sizing ---------------------------------------------------------------------------------
    def kv_bytes_per_token(self) -> int:
        """Bytes of K and V for one token of one row, all layers."""
        import torch

        return 2 * len(self.dec.layers) * self.dec.n_kv * self.dec.head_dim * torch.finfo(self.dec.dtype).bits // 8

    def choose_slots(self, n_prompts: int, context: int) -> int:
        """Slots for a call: the configured number, else 16 on the CPU, else what free GPU memory holds
        (KV cache for `context` tokens per row + sampling workspace), at most 512 and n_prompts."""
        import torch

        if self.slots_cfg:
            return max(1, min(self.slots_cfg, n_prompts))
        if not self.cuda:
            from stage1_core.model.sizing import AUTO_BATCH

            return max(1, min(AUTO_BATCH["cpu"], n_prompts))
        free, _ = torch.cuda.mem_get_info(self.device)
        if self._cache is not None:
            free += sum(k.numel() * k.element_size() * 2 for k, _ in self._cache)
        per_row = self.kv_bytes_per_token() * context + self.vocab * 4 * 6  # KV + logits/softmax/cumsum
        fit = int(free * 0.7 // per_row)
        return max(1, min(512, n_prompts, fit))

    # -- stops ------------------------------------------------------------------------------------
    def _tables(self, stops: Sequence[str]) -> tuple["torch.Tensor", "torch.Tensor"]:
        import torch

        key = tuple(sorted({s for s in stops if s}))
        if key not in self._stop_tables:
            if self._pieces is None:
                self._vocab_key = vocab_key(self.tokenizer)
                self._pieces = cached_token_strings(self.tokenizer, self._vocab_key)[: self.vocab]
                self._pieces += [""] * (self.vocab - len(self._pieces))
            nxt, fires = cached_stop_tables(self._pieces, key, self._vocab_key)
            self._stop_tables[key] = (torch.from_numpy(nxt).long().to(self.device),
                                      torch.from_numpy(fires).to(self.device))
        return self._stop_tables[key]

    # -- cache --------------------------------------------------------------------------------
    def _ensure_cache(self, slots: int, context: int) -> None:
        import torch

        have_s, have_c = self._cache_shape
        if self._cache is not None and have_s >= slots and have_c >= context:
            return
        if self.on_alloc is not None:
            self.on_alloc(slots, context)
        self._cache = None
        if self.cuda:
            torch.cuda.empty_cache()
        shape = (slots, self.dec.n_kv, context, self.dec.head_dim)
        self._cache = [(torch.zeros(shape, dtype=self.dec.dtype, device=self.device),
                        torch.zeros(shape, dtype=self.dec.dtype, device=self.device)) for _ in self.dec.layers]
        self._cache_shape = (slots, context)

    def release(self) -> None:
        """Free the KV cache and captured graphs."""
        self._cache = None
        self._cache_shape = (0, 0)

    # -- public ---------------------------------------------------------------------------------
    def generate(self, prompts: Sequence[Sequence[int]], ids: Sequence[str], max_new_tokens: int,
                 temperature: float, top_p: float, top_k: int, stop_sequences: Sequence[str], seed: int,
                 progress: Callable[[int], None] | None = None,
                 tokens_progress: Callable[[int], None] | None = None) -> list[list[int]]:
        """Complete token-id prompts; each row stops at EOS, a stop sequence or max_new_tokens.

        Args:
            prompts: encoded prompts (BOS already added by the caller's policy).
            ids: one stable id per prompt; its randomness is derived from (seed, id).
            max_new_tokens, temperature, top_p, top_k: sampling settings (temperature 0 = greedy).
            stop_sequences: strings that end a row once its generated text contains one.
            seed: the call's seed.
            progress: called with the number of prompts finished, as they finish.
            tokens_progress: called with the number of tokens generated since the last call.
        Returns:
            Per prompt, in input order, the generated token ids (an ending EOS included; the caller
            cuts at the stop sequence).
        Raises:
            EngineOOM: out of device memory even with one slot.
            ValueError: ids and prompts differ in length, or ids repeat.
        """
        import torch

        from stage1_core.model.backend import item_ids

        ids = item_ids(prompts, ids)
        if not prompts:
            return []
        t0 = time.perf_counter()
        self.stats = EngineStats()
        longest = max(len(p) for p in prompts)
        context = -(-(longest + max_new_tokens + 1) // 64) * 64
        results: dict[int, list[int]] = {}
        slots = self.choose_slots(len(prompts), context)
        while True:
            try:
                with torch.inference_mode():
                    self._run(prompts, ids, results, slots, context, max_new_tokens, temperature, top_p, top_k,
                              stop_sequences, seed, progress, tokens_progress)
                break
            except torch.OutOfMemoryError as e:  # back off: every finished row is kept, the rest rerun
                self.release()
                if self.cuda:
                    torch.cuda.empty_cache()
                if slots == 1:
                    raise EngineOOM(f"out of device memory with a single slot (context {context} tokens): "
                                    f"{e}. Use a smaller model, model.quantize: 4bit, or shorter prompts / "
                                    "max_new_tokens") from None
                slots = max(1, slots // 2)
                self.stats.oom_backoffs.append(slots)
                log.warning("engine: out of memory; retrying the %d unfinished prompts with %d slots",
                            len(prompts) - len(results), slots)
        self.stats.seconds = time.perf_counter() - t0
        return [results[i] for i in range(len(prompts))]

    # -- the loop -------------------------------------------------------------------------------
    def _run(self, prompts: Sequence[Sequence[int]], ids: Sequence[str], results: dict[int, list[int]], slots: int,
             context: int, max_new: int, temperature: float, top_p: float, top_k: int, stops: Sequence[str],
             seed: int, progress: Callable[[int], None] | None, tokens_progress: Callable[[int], None] | None) -> None:
        import torch

        dev = self.device
        todo = [i for i in range(len(prompts)) if i not in results]
        # longest first: big prefills early, short stragglers fill the tail
        queue = sorted(todo, key=lambda i: (-len(prompts[i]), i))
        slots = max(1, min(slots, len(queue)))
        self._ensure_cache(slots, context)
        assert self._cache is not None
        self.dec.rope_tables(context)
        nxt_tab, fire_tab = self._tables(stops)
        smp = Sampling(sampling_mode(temperature, top_p, top_k),
                       torch.tensor(max(temperature, 1e-6), dtype=torch.float32, device=dev),
                       torch.tensor(top_p, dtype=torch.float32, device=dev),
                       torch.tensor(top_k, dtype=torch.long, device=dev))
        st = _State(tok=torch.zeros(slots, dtype=torch.long, device=dev),
                    pos=torch.zeros(slots, dtype=torch.long, device=dev),
                    ngen=torch.zeros(slots, dtype=torch.long, device=dev),
                    live=torch.zeros(slots, dtype=torch.bool, device=dev),
                    seed=torch.zeros(slots, dtype=torch.long, device=dev),
                    stop=torch.zeros(slots, dtype=torch.long, device=dev),
                    out=torch.zeros(slots, max_new, dtype=torch.long, device=dev),
                    max_new=torch.tensor(max_new, dtype=torch.long, device=dev))
        owner: list[int | None] = [None] * slots
        reach = [0] * slots  # per occupied slot: an upper bound of the position it decodes next
        step = self._step_fn(st, smp, nxt_tab, fire_tab, context, slots)
        self.stats.slots = slots
        self.stats.graphs = self.use_graphs
        harvested = reported = 0
        while queue or any(o is not None for o in owner):
            free = [s for s in range(slots) if owner[s] is None]
            if free and queue and (len(free) * 8 >= slots or len(free) == slots or len(queue) <= len(free)):
                take = [queue.pop(0) for _ in range(min(len(free), len(queue)))]
                self._admit(take, free[: len(take)], prompts, ids, seed, st, smp, nxt_tab, fire_tab, owner)
                for s, i in zip(free, take):
                    reach[s] = len(prompts[i])
            # attend only as far as any occupied row can reach before the next harvest (64-token buckets)
            need = max(reach[s] for s in range(slots) if owner[s] is not None) + self.sync_every
            bucket = min(context, -(-need // 64) * 64)
            for _ in range(self.sync_every):
                step(bucket)
            for s in range(slots):
                reach[s] += self.sync_every
            self.stats.steps += self.sync_every
            live, ngen = torch.stack((st.live.long(), st.ngen)).tolist()  # the one host sync per sync_every steps
            done = [s for s in range(slots) if owner[s] is not None and not live[s]]
            if tokens_progress is not None and harvested + sum(ngen) > reported:
                tokens_progress(harvested + sum(ngen) - reported)
                reported = harvested + sum(ngen)
            if done:
                outs = st.out[done].tolist()
                for r, s in enumerate(done):
                    i = owner[s]
                    assert i is not None
                    results[i] = outs[r][: ngen[s]]
                    owner[s] = None
                harvested += sum(ngen[s] for s in done)
                self.stats.tokens += sum(ngen[s] for s in done)
                if progress is not None:
                    progress(len(done))
                st.ngen[done] = 0  # freed slots count nothing towards the tokens bar

    def _admit(self, take: list[int], slots: list[int], prompts: Sequence[Sequence[int]], ids: Sequence[str],
               seed: int, st: _State, smp: Sampling, nxt_tab: "torch.Tensor", fire_tab: "torch.Tensor",
               owner: list[int | None]) -> None:
        """Prefill prompts `take` into `slots` (chunked by padded tokens) and draw their first tokens."""
        import torch

        dev = self.device
        assert self._cache is not None
        k = 0
        while k < len(take):
            width = len(prompts[take[k]])  # longest first: the chunk's first prompt is its widest
            n = max(1, min(len(take) - k, self.prefill_tokens // max(width, 1)))
            chunk, cslots = take[k:k + n], slots[k:k + n]
            k += n
            toks = torch.zeros((n, width), dtype=torch.long, device=dev)
            for r, i in enumerate(chunk):
                toks[r, : len(prompts[i])] = torch.tensor(list(prompts[i]), dtype=torch.long)
            lengths = torch.tensor([len(prompts[i]) for i in chunk], dtype=torch.long, device=dev)
            sl = torch.tensor(cslots, dtype=torch.long, device=dev)
            h = self.dec.prefill(toks, lengths, sl, self._cache)
            seeds = torch.tensor([row_seed(seed, ids[i]) for i in chunk], dtype=torch.long, device=dev)
            zero = torch.zeros(n, dtype=torch.long, device=dev)
            first = sample(self.dec.logits(h), smp, seeds, zero)
            stop_state = nxt_tab[zero, first]
            ended = fire_tab[zero, first] | self._eos_mask[first] | (st.max_new <= 1)
            st.tok[sl] = first
            st.pos[sl] = lengths
            st.ngen[sl] = 1
            st.seed[sl] = seeds
            st.stop[sl] = stop_state
            st.out[sl, 0] = first
            st.live[sl] = ~ended
            self.stats.prefills += 1
            for s, i in zip(cslots, chunk):
                owner[s] = i

    def _step_fn(self, st: _State, smp: Sampling, nxt_tab: "torch.Tensor", fire_tab: "torch.Tensor", context: int,
                 slots: int) -> Callable[[int], None]:
        """One decode step for every slot (masked for rows that are not live), eager or graph-replayed."""
        import torch

        assert self._cache is not None
        cache = self._cache if self._cache_shape[0] == slots else [(k[:slots], v[:slots]) for k, v in self._cache]
        rows = torch.arange(slots, device=self.device)
        last = st.out.shape[1] - 1

        def eager(bucket: int) -> None:
            h = self.dec.decode(st.tok, st.pos, cache, bucket)
            nxt = sample(self.dec.logits(h), smp, st.seed, st.ngen)
            live = st.live
            st.out[rows, st.ngen.clamp(max=last)] = torch.where(live, nxt, st.out[rows, st.ngen.clamp(max=last)])
            new_stop = nxt_tab[st.stop, nxt]
            fired = fire_tab[st.stop, nxt]
            ngen = st.ngen + live.long()
            ended = fired | self._eos_mask[nxt] | (ngen >= st.max_new)
            st.stop.copy_(torch.where(live, new_stop, st.stop))
            st.tok.copy_(torch.where(live, nxt, st.tok))
            st.pos.copy_(st.pos + live.long())
            st.ngen.copy_(ngen)
            st.live.copy_(live & ~ended)

        if not self.use_graphs:
            return eager
        graphs: dict[int, Any] = {}  # one graph per context bucket, sharing one memory pool
        pool = torch.cuda.graph_pool_handle()
        state = (st.tok, st.pos, st.ngen, st.live, st.stop, st.out)

        def capture(bucket: int) -> Any:
            saved = [t.clone() for t in state]
            side = torch.cuda.Stream(device=self.device)
            side.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(side):
                for _ in range(2):
                    eager(bucket)  # warm-up (allocator, kernels) before capture
            torch.cuda.current_stream(self.device).wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                eager(bucket)
            # warm-up and capture ran the step: undo it (rows rewrite the same K/V when they run it for real)
            for t, s in zip(state, saved):
                t.copy_(s)
            return graph

        def replay(bucket: int) -> None:
            if bucket not in graphs:
                try:
                    graphs[bucket] = capture(bucket)
                except Exception as e:  # noqa: BLE001 - a model whose kernels cannot be captured runs eagerly
                    log.warning("engine: CUDA graph capture failed (%s: %s); decoding eagerly", type(e).__name__, e)
                    self.use_graphs = False
                    graphs[bucket] = None
            g = graphs[bucket]
            if g is None:
                eager(bucket)
            else:
                g.replay()

        return replay
