"""Critic scoring from a shared prefix's KV, broadcast to every row (never copied per row).

Critic prompts of one rubric share a long token prefix (instructions + few-shot examples) and differ in
a short suffix (the judged item + "Answer:"). `PrefixScorer.score` groups prompts by shared prefix
(`prefix_groups`), runs each prefix once at batch 1 (memoized across calls while the weights are
unchanged), then runs the suffixes in batches of `batch_size` rows. During a suffix batch the model
runs with the attention implementation `stage1_prefix` (registered here with transformers'
`AttentionInterface`): each layer's attention gets only the suffix K/V from the model and reads that
layer's prefix K/V, (1, kv_heads, P, head_dim), from the active `_Context`. Scores against the prefix
are one (kv_heads, B*G*S, D) x (kv_heads, D, P) matmul (query heads grouped per KV head, batch folded
into the query rows), scores against the suffix are causal with left padding masked, both parts share
one softmax, sliding-window layers mask keys a window or more behind the query (positions continue
from the prefix length). Nothing of size B x P x head_dim is made; memory beyond the plain forward's
is the attention scores, computed in row chunks of at most `_SCORE_BYTES` (256 MiB CPU, 2 GiB CUDA).

Only the model classes in `SUPPORTED` take this path (their attention modules call the registered
function with post-RoPE q/k/v and the `sliding_window` kwarg, and their decoders build no mask for an
unregistered implementation); other models, and prompts without a worthwhile shared prefix, are left
to the caller's plain full-prompt forward (the reference).

Run it: `PYTHONPATH=. python -m stage1_core.cli.scoring` scores a few critic prompts both ways with the
embedded model and prints the largest difference.
"""

from __future__ import annotations

import contextlib
import contextvars
import inspect
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Iterator, Sequence

from stage1_core.infra import faults

if TYPE_CHECKING:
    import torch

ATTN_NAME = "stage1_prefix"
"""The attention implementation name the suffix passes run under."""

SUPPORTED = frozenset({"Gemma3ForCausalLM", "Gemma2ForCausalLM", "LlamaForCausalLM", "MistralForCausalLM",
                       "Qwen2ForCausalLM", "Qwen3ForCausalLM"})
"""Causal LM classes whose layers call the configured attention function with the suffix's post-RoPE
q/k/v (no cache passed) and whose decoders skip mask building for an unregistered mask implementation."""

PREFIX_MIN_TOKENS = 16
"""A shared prefix shorter than this is not worth a separate pass."""
PREFIX_PASS_COST = 8
"""Fixed cost of one prefix pass, in prompt tokens, when choosing prefix groups."""
_SCORE_BYTES = {"cpu": 1 << 28, "cuda": 1 << 31}
"""Bound on one chunk's float32 attention scores by device type (rows of a batch are attended in
chunks under it)."""

ProgressFn = Callable[[int], None]


def prefix_groups(encoded: Sequence[Sequence[int]], min_tokens: int = PREFIX_MIN_TOKENS,
                  pass_cost: int = PREFIX_PASS_COST) -> tuple[list[tuple[int, list[int]]], list[int]]:
    """Partition prompts into shared-prefix groups worth a prefix pass, and the rest.

    Prompts are sorted by token ids, so a group's longest common prefix is the minimum LCP of its
    sorted neighbours; a dynamic program over the sorted order picks the contiguous groups that minimise
    the tokens run (prefix once + suffixes + `pass_cost` per prefix). Every suffix keeps at least one
    token (the prefix shrinks when a prompt equals it).

    Args:
        encoded: token ids per prompt.
        min_tokens: shortest prefix worth a pass.
        pass_cost: fixed cost of a prefix pass, in tokens.
    Returns:
        ([(prefix_len, indices)], rest): groups of 2+ prompts with prefix >= min_tokens, and the
        indices left for the plain path.
    """
    n = len(encoded)
    order = sorted(range(n), key=lambda i: list(encoded[i]))
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
            if p < min_tokens:
                break  # p only shrinks as the group grows leftwards
            cost = best[i] + csum[j] - csum[i] - (j - i - 1) * p + pass_cost
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


# --------------------------------------------------------------------------- attention


@dataclass
class _Context:
    """What the registered attention function needs during one suffix batch.

    Attributes:
        prefix: per layer, (keys, values, first position), keys/values (kv_heads, L, head_dim) holding
            prefix positions first..first+L-1 (a sliding layer's cache may keep only the window's tail).
        prefix_len: P; the suffix's real tokens sit at positions P, P+1, ...
        pad: (B,) left padding of each suffix row.
        width: S, the padded suffix length.
        masks: memo of boolean "allowed" masks by (part, window, first).
    """

    prefix: list[tuple["torch.Tensor", "torch.Tensor", int]]
    prefix_len: int
    pad: "torch.Tensor"
    width: int
    masks: dict[tuple[Any, ...], Any] = field(default_factory=dict)

    def suffix_mask(self, window: int | None) -> "torch.Tensor":
        """(B, 1, S, S): key column <= query column, key not padding, within the window."""
        import torch

        key = ("suffix", window)
        if key not in self.masks:
            col = torch.arange(self.width, device=self.pad.device)
            q, k = col[:, None], col[None, :]
            allowed = (k <= q)[None] & (col[None, None, :] >= self.pad[:, None, None])
            if window is not None:
                allowed = allowed & (q - k < window)[None]
            self.masks[key] = allowed[:, None]
        return self.masks[key]

    def prefix_mask(self, window: int | None, first: int, length: int) -> "torch.Tensor | None":
        """(1, B, 1, S, L) for the (kv_heads, B, G, S, L) prefix scores, or None when every prefix key is
        within the window of every query."""
        import torch

        if window is None or self.prefix_len + self.width - 1 - first < window:
            return None
        key = ("prefix", window, first, length)
        if key not in self.masks:
            col = torch.arange(self.width, device=self.pad.device)
            qpos = self.prefix_len + (col[None, :] - self.pad[:, None]).clamp(min=0)  # (B, S)
            kpos = first + torch.arange(length, device=self.pad.device)
            self.masks[key] = (qpos[:, :, None] - kpos[None, None, :] < window)[None, :, None]
        return self.masks[key]


_ACTIVE: contextvars.ContextVar[_Context | None] = contextvars.ContextVar("stage1_prefix_context", default=None)


def prefix_attention(module: Any, query: "torch.Tensor", key: "torch.Tensor", value: "torch.Tensor",
                     attention_mask: Any, dropout: float = 0.0, scaling: float | None = None,
                     sliding_window: int | None = None, softcap: float | None = None,
                     **kwargs: Any) -> tuple["torch.Tensor", None]:
    """Attention of the suffix queries over [this layer's shared prefix K/V] + [the suffix's own K/V].

    The transformers attention-function signature (registered as `ATTN_NAME`); `attention_mask` is
    ignored (the masks come from the active context).

    Args:
        module: the attention module (its `layer_idx` picks the prefix K/V).
        query: (B, H, S, D) post-RoPE queries.
        key, value: (B, KVH, S, D) post-RoPE suffix keys and values.
        scaling: score scale (default D ** -0.5); softcap: Gemma 2's attention logit soft-capping.
        sliding_window: the layer's window (None for a full-attention layer).
    Returns:
        ((B, S, H, D) attention output, None).
    Raises:
        RuntimeError: called outside a `PrefixScorer` suffix pass.
    """
    import torch

    ctx = _ACTIVE.get()
    if ctx is None:
        raise RuntimeError(f"attention implementation {ATTN_NAME!r} runs only inside PrefixScorer.score")
    kp, vp, first = ctx.prefix[module.layer_idx]
    b, h, s, d = query.shape
    kvh = key.shape[1]
    g = h // kvh
    scale = d ** -0.5 if scaling is None else scaling
    smask = ctx.suffix_mask(sliding_window)
    pmask = ctx.prefix_mask(sliding_window, first, kp.shape[1])
    per_row = h * s * (kp.shape[1] + s) * 4 * 3
    step = max(1, _SCORE_BYTES.get(query.device.type, 1 << 28) // max(per_row, 1))
    out = query.new_empty(b, s, h, d)
    for lo in range(0, b, step):
        hi = min(b, lo + step)
        out[lo:hi] = _attend(query[lo:hi], key[lo:hi], value[lo:hi], kp, vp, smask[lo:hi],
                             None if pmask is None else pmask[:, lo:hi], scale, softcap)
    return out, None


def _attend(q: "torch.Tensor", ks: "torch.Tensor", vs: "torch.Tensor", kp: "torch.Tensor", vp: "torch.Tensor",
            smask: "torch.Tensor", pmask: "torch.Tensor | None", scale: float,
            softcap: float | None) -> "torch.Tensor":
    """One chunk of rows: (b, S, H, D) output. Prefix scores are laid out (KVH, b, G, S, P), suffix
    scores (b, KVH, G, S, S); a joint softmax (shared max, shared normaliser) spans both."""
    import torch

    b, h, s, d = q.shape
    kvh, plen = kp.shape[0], kp.shape[1]
    g = h // kvh
    qg = q.reshape(b, kvh, g * s, d) * scale  # query heads grouped by their KV head (as repeat_kv pairs them)
    qf = qg.transpose(0, 1).reshape(kvh, b * g * s, d)  # batch folded into rows: one bmm per KV head
    sp = torch.bmm(qf, kp.transpose(1, 2))  # (KVH, b*G*S, P): the prefix K is read, not copied
    ss = torch.matmul(qg, ks.transpose(2, 3))  # (b, KVH, G*S, S)
    if softcap is not None:
        sp, ss = torch.tanh(sp / softcap) * softcap, torch.tanh(ss / softcap) * softcap
    sp = sp.float().view(kvh, b, g, s, plen)
    ss = ss.float().view(b, kvh, g, s, s)
    if pmask is not None:
        sp = sp.masked_fill(~pmask, float("-inf"))
    ss = ss.masked_fill(~smask[:, :, None], float("-inf"))
    m = torch.maximum(sp.amax(-1).transpose(0, 1), ss.amax(-1))  # (b, KVH, G, S)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    ep = torch.exp(sp - m.transpose(0, 1)[..., None])
    es = torch.exp(ss - m[..., None])
    z = ep.sum(-1).transpose(0, 1) + es.sum(-1)
    ep = (ep / z.transpose(0, 1)[..., None]).to(vp.dtype)
    es = (es / z[..., None]).to(vs.dtype)
    op = torch.bmm(ep.reshape(kvh, b * g * s, plen), vp).view(kvh, b, g, s, d).permute(1, 3, 0, 2, 4)
    os_ = torch.matmul(es.reshape(b, kvh, g * s, s), vs).view(b, kvh, g, s, d).permute(0, 3, 1, 2, 4)
    return (op + os_).reshape(b, s, h, d)


def _register() -> None:
    from transformers import AttentionInterface

    AttentionInterface.register(ATTN_NAME, prefix_attention)


# --------------------------------------------------------------------------- scorer


class PrefixScorer:
    """Next-token log-probabilities of prompts, from shared prefixes broadcast over suffix batches.

    Args:
        model: a transformers causal LM (eval mode).
        pad_id: the token id used for left padding.
        device: where inputs go.
        lock: held around every model call (the backend's lock), if given.
        memo_size: prefixes kept across calls (the critic scores one rubric's prefixes call after call).
    """

    def __init__(self, model: Any, pad_id: int, device: str, lock: Any = None, memo_size: int = 8) -> None:
        self.model, self.pad_id, self.device = model, pad_id, device
        self.lock = lock if lock is not None else threading.RLock()
        self.memo_size = memo_size
        self._memo: OrderedDict[tuple[int, ...], list[tuple[Any, Any, int]]] = OrderedDict()
        self._memo_token: tuple[int, int, int] | None = None
        self._cache_kw = self._find_cache_kwarg()

    def supported(self) -> bool:
        """This model's class is in SUPPORTED and its forward takes a KV cache."""
        config = getattr(self.model, "config", None)
        return type(self.model).__name__ in SUPPORTED and self._cache_kw is not None and config is not None \
            and not getattr(config, "is_encoder_decoder", False) and bool(self._attention_modules())

    def _find_cache_kwarg(self) -> str | None:
        try:
            params = inspect.signature(self.model.forward).parameters
        except (TypeError, ValueError):
            return None
        return next((k for k in ("cache", "past_key_values") if k in params), None)

    def _attention_modules(self) -> list[Any]:
        return [m for m in self.model.modules()
                if hasattr(m, "layer_idx") and hasattr(m, "q_proj") and hasattr(m, "config")]

    def _weights_token(self) -> tuple[int, int, int]:
        """Changes when the model object, any parameter's storage or in-place version, or a sliding
        window changes."""
        windows = (getattr(self.model.config, "sliding_window", None),
                   tuple(getattr(m, "sliding_window", None) for m in self._attention_modules()))
        return id(self.model), hash(tuple((p.data_ptr(), getattr(p, "_version", 0)) for p in self.model.parameters())), \
            hash(windows)

    def score(self, encoded: Sequence[Sequence[int]], cand_ids: Sequence[int], batch_size: int,
              progress: ProgressFn | None = None) -> tuple[dict[int, list[float]], list[int]]:
        """Score the prompts that share a worthwhile prefix; leave the others to the plain path.

        Args:
            encoded: token ids per prompt (BOS included).
            cand_ids: the candidate token ids.
            batch_size: suffix rows per forward pass.
            progress: called with the number of prompts finished after each batch.
        Returns:
            ({prompt index: log-probability per candidate (float32 log-softmax)}, indices not scored here:
            those in no prefix group, and rows whose logits were not finite).
        """
        if not encoded:
            return {}, []
        if not self.supported():
            return {}, list(range(len(encoded)))
        groups, rest = prefix_groups(encoded)
        out: dict[int, list[float]] = {}
        for plen, members in groups:
            prefix = tuple(encoded[members[0]][:plen])
            states = self._prefix_states(prefix)
            if states is None:
                rest.extend(members)
                continue
            order = sorted(members, key=lambda i: (len(encoded[i]), i))
            for k in range(0, len(order), batch_size):
                idx = order[k:k + batch_size]
                rest.extend(self._suffix_batch(states, plen, [list(encoded[i][plen:]) for i in idx], idx,
                                               list(cand_ids), out))
                if progress is not None:
                    progress(len(idx))
                faults.maybe_fault("critic")
        return out, sorted(rest)

    def _prefix_states(self, prefix: tuple[int, ...]) -> list[tuple[Any, Any, int]] | None:
        """Per layer (keys, values, first position) of the prefix, each (KVH, L, D); memoized (LRU,
        valid while the weights are unchanged). None when the cache layout is not one this path knows."""
        import torch
        from transformers import DynamicCache

        with self.lock, torch.inference_mode():
            token = self._weights_token()
            if token != self._memo_token:
                self._memo.clear()
                self._memo_token = token
            if prefix in self._memo:
                self._memo.move_to_end(prefix)
                return self._memo[prefix]
            config = self.model.config
            cache = DynamicCache(config=config)
            ids = torch.tensor([list(prefix)], dtype=torch.long, device=self.device)
            self.model(input_ids=ids, use_cache=True, **{self._cache_kw: cache},  # type: ignore[dict-item]
                       logits_to_keep=torch.empty(0, dtype=torch.long, device=self.device))
            layers = getattr(cache, "layers", None) or []
            windows = {m.layer_idx: getattr(m, "sliding_window", None) for m in self._attention_modules()}
            if len(layers) != len(windows) or set(windows) != set(range(len(layers))):
                return None
            states = []
            for i, layer in enumerate(layers):
                keys, values = getattr(layer, "keys", None), getattr(layer, "values", None)
                if not isinstance(keys, torch.Tensor) or not isinstance(values, torch.Tensor) \
                        or keys.dim() != 4 or keys.shape[0] != 1 or keys.shape != values.shape:
                    return None
                kept, w = keys.shape[2], windows[i] or getattr(layer, "sliding_window", None)
                if kept != len(prefix) and not (w is not None and len(prefix) > kept >= w - 1):
                    return None  # a truncated layer that is not a sliding window's tail
                states.append((keys[0].contiguous(), values[0].contiguous(), len(prefix) - kept))
            self._memo[prefix] = states
            while len(self._memo) > self.memo_size:
                self._memo.popitem(last=False)
        return states

    def _suffix_batch(self, states: list[tuple[Any, Any, int]], plen: int, suffixes: list[list[int]],
                      idx: list[int], cand_ids: list[int], out: dict[int, list[float]]) -> list[int]:
        """Run one batch of suffixes over the broadcast prefix; store finite rows, return the others."""
        import torch

        width = max(len(x) for x in suffixes)
        ids = torch.full((len(suffixes), width), self.pad_id, dtype=torch.long)
        pad = torch.tensor([width - len(x) for x in suffixes], dtype=torch.long)
        for r, x in enumerate(suffixes):
            ids[r, width - len(x):] = torch.tensor(x, dtype=torch.long)
        ids, pad = ids.to(self.device), pad.to(self.device)
        pos = plen + (torch.arange(width, device=self.device)[None, :] - pad[:, None]).clamp(min=0)
        ctx = _Context(prefix=states, prefix_len=plen, pad=pad, width=width)
        with self.lock, torch.inference_mode(), self._attention(ctx):
            logits = self.model(input_ids=ids, position_ids=pos, use_cache=False, logits_to_keep=1).logits[:, -1, :]
            finite = torch.isfinite(logits).all(dim=-1).tolist()
            lp = torch.log_softmax(logits.float(), dim=-1)[:, cand_ids].cpu().tolist()
        for r, i in enumerate(idx):
            if finite[r]:
                out[i] = lp[r]
        return [i for r, i in enumerate(idx) if not finite[r]]

    @contextlib.contextmanager
    def _attention(self, ctx: _Context) -> Iterator[None]:
        """Run the model's attention as `prefix_attention` over `ctx` (restored afterwards)."""
        _register()
        configs = list({id(c): c for c in [self.model.config] + [m.config for m in self._attention_modules()]}.values())
        saved = [c._attn_implementation for c in configs]
        token = _ACTIVE.set(ctx)
        try:
            for c in configs:
                c._attn_implementation = ATTN_NAME
            yield
        finally:
            for c, old in zip(configs, saved):
                c._attn_implementation = old
            _ACTIVE.reset(token)
