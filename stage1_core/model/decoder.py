"""The engine's decoder: the model's own layers run by hand over a static, slot-indexed KV cache.

`Decoder(model)` reuses the loaded transformers modules (embeddings, norms, projections, MLP, rotary
tables), so its numerics follow transformers'. `prefill` runs right-padded prompts from position 0 and
writes their K/V into chosen slots of the cache; `decode` runs one token per slot at each slot's own
position. The cache is `(slots, kv_heads, context, head_dim)` per layer. Grouped-query attention never
repeats K/V: query heads of one KV head become extra query rows. Sliding-window layers mask by window.
On CUDA decode attention is the live-KV kernel (below) or two batched matmuls over the cache slice read
in place; on the CPU it is SDPA (which matches transformers there). `next_token_logprobs` runs prompts
through prefill without a cache, for the critic. With fusion (fusion.py, on by default) each layer's q/k/v and
gate/up projections are one GEMM each.

With `compile` (CUDA; `STAGE1_ENGINE_COMPILE`, see `compile_enabled`) the two stretches of a layer around
its attention run through `torch.compile` (inductor, no CUDA graphs of its own: the engine captures the
whole decode step itself): input norm, q/k/v GEMM, q/k norms and rotary before it; o_proj, the norms and
residual adds, gate/up GEMM, activation and down_proj after it. Norms, residuals, rotary and the
activation then run as a few fused kernels instead of ~30 small ones per layer. Each stretch is compiled
once for all layers (the layer's modules are arguments, so their weights are graph inputs), once for
decode and once for prefill (dynamic shapes); the KV-cache writes and the attention stay eager.

With `attention` (CUDA with triton, on by default there; `STAGE1_ENGINE_ATTENTION`, see `attention_enabled`) decode attention
is attention.py's Triton kernel, which reads only each row's live keys `[max(0, pos - window + 1), pos]`
from the cache instead of the two batched matmuls over the whole `[:context]` slice with a mask; it reads
the positions from the device, so the step does not depend on `context` at all (the engine then captures
one graph per call instead of one per 64-token bucket). A kernel that fails turns itself off for this
decoder (logged once) and the matmul path runs. Prefill attention stays SDPA.

With `fp8` (`STAGE1_ENGINE_FP8=1`, off by default: lossy, an experiment) the projections run as FP8 GEMMs
on copies of their weights quantized at build time (fp8.py); `use_fp8` switches them per call.

With `kv_fp8` (`STAGE1_ENGINE_KV_FP8=1`, off by default: lossy, an experiment) the KV cache holds e4m3 with
unit scale (fp8.to_e4m3) instead of the model's dtype: `cache_dtype` says which, the engine allocates the
cache in it (`use_kv_fp8` may be switched between calls: the engine then allocates anew). Decode casts
its K/V inside the compiled stretch before the cache write; prefill attends over its own K/V in the model's
dtype and casts them for the write. The live-KV kernel converts what it reads; the matmul and SDPA paths
convert the slice they read (slow: a fallback). Cache writes go through uint8 views of the e4m3 tensors.
"""

from __future__ import annotations

import inspect
import logging
from typing import TYPE_CHECKING, Any, Sequence

from stage1_core.model import attention as live_attention
from stage1_core.model import fp8 as fp8_weights
from stage1_core.model.fusion import FusedLayer, fuse_projections
from stage1_core.model.rows import env_flag as _flag
from stage1_core.model.rows import out_of_memory as _out_of_memory
from stage1_core.model.rows import pad_right

if TYPE_CHECKING:
    import torch

log = logging.getLogger("stage1.engine")

COMPILE_ENV = "STAGE1_ENGINE_COMPILE"
ATTENTION_ENV = "STAGE1_ENGINE_ATTENTION"


SCORE_ENV = "STAGE1_ENGINE_SCORE"
AUTOTUNE_ENV = "STAGE1_ENGINE_AUTOTUNE"


def _switch(env: str, device_type: str) -> bool:
    """An engine switch: the variable `env` (see `_flag`), else on CUDA only."""
    v = _flag(env)
    return device_type == "cuda" if v is None else v


def compile_enabled(device_type: str) -> bool:
    """Whether the engine compiles its layers by default: `STAGE1_ENGINE_COMPILE` 1/0, else on CUDA only
    (the CPU path stays eager: inductor's C++ build there costs more than it saves)."""
    return _switch(COMPILE_ENV, device_type)


def score_enabled(device_type: str) -> bool:
    """Whether the critic's plain path (prompts without a shared prefix) runs through the engine's prefill
    (`Decoder.next_token_logprobs`: compiled, no KV cache) instead of transformers' forward:
    `STAGE1_ENGINE_SCORE` 1/0, else on CUDA only (on the CPU neither is faster; the forward stays)."""
    return _switch(SCORE_ENV, device_type)


def attention_enabled(device_type: str) -> bool:
    """Whether the engine's decode attention is the live-KV Triton kernel (attention.py) by default:
    `STAGE1_ENGINE_ATTENTION` 1/0, else on CUDA; either way only on CUDA when triton imports (the CPU keeps
    SDPA). Measured on an H100 (docs/performance.md, 2026-12-06): 1.12x the matmul path at 12B and 1.21x
    at 4B (batch 256), 0.99x on the 270M in float32, the same greedy tokens there."""
    return _switch(ATTENTION_ENV, device_type) and device_type == "cuda" and live_attention.available() is None


def _pre_attn(dec: "Decoder", layer: Any, fused: FusedLayer | None, x: "torch.Tensor", c: "torch.Tensor",
              s: "torch.Tensor") -> tuple["torch.Tensor", ...]:
    """x (n, t, hidden) -> q (n, heads, t, d), k and v (n, kv, t, d): input norm, projections, q/k norms, rotary
    (c, s: (n, 1, t, d) cos/sin at the rows' positions)."""
    attn = layer.self_attn
    h = layer.input_layernorm(x)
    n, t, _ = h.shape
    if fused is not None and fused.qkv is not None:
        q, k, v = fused.qkv(h)  # one GEMM, split along the last dimension (views)
    else:
        q, k, v = attn.q_proj(h), attn.k_proj(h), attn.v_proj(h)
    q = q.view(n, t, dec.n_heads, dec.head_dim).transpose(1, 2)
    k = k.view(n, t, dec.n_kv, dec.head_dim).transpose(1, 2)
    v = v.view(n, t, dec.n_kv, dec.head_dim).transpose(1, 2)
    if hasattr(attn, "q_norm"):
        q, k = attn.q_norm(q), attn.k_norm(k)
    return Decoder._rotate(q, c, s), Decoder._rotate(k, c, s), v


def _post_attn(dec: "Decoder", layer: Any, fused: FusedLayer | None, x: "torch.Tensor",
               a: "torch.Tensor") -> "torch.Tensor":
    """The rest of a layer after attention: o_proj, norms and residuals, MLP. a (n, t, heads*d) -> x."""
    o = getattr(fused, "o", None)  # an FP8 layer's own O projection (fp8.Fp8Layer)
    attn_out = o(a) if o is not None else layer.self_attn.o_proj(a)
    if dec.gemma_norms:
        x = x + layer.post_attention_layernorm(attn_out)
        return x + layer.post_feedforward_layernorm(_mlp(layer, fused, layer.pre_feedforward_layernorm(x)))
    x = x + attn_out
    return x + _mlp(layer, fused, layer.post_attention_layernorm(x))


def _mlp(layer: Any, fused: FusedLayer | None, x: "torch.Tensor") -> "torch.Tensor":
    """down(act(gate(x)) * up(x)), with gate and up as one GEMM when fused."""
    if fused is None or fused.gate_up is None:
        return layer.mlp(x)
    gate, up = fused.gate_up(x)
    down = getattr(fused, "down", None)  # an FP8 layer's own down projection
    h = layer.mlp.act_fn(gate) * up
    return down(h) if down is not None else layer.mlp.down_proj(h)


# distinct code objects, so decode's static-shape graphs and prefill's dynamic ones are cached apart
def _pre_attn_decode(dec: "Decoder", layer: Any, fused: Any, x: Any, c: Any, s: Any) -> Any:
    q, k, v = _pre_attn(dec, layer, fused, x, c, s)
    if dec.use_kv_fp8:  # decode's K/V only go to the cache: cast them here, fused with the rotary
        return q, fp8_weights.to_e4m3(k), fp8_weights.to_e4m3(v)
    return q, k, v


def _post_attn_decode(dec: "Decoder", layer: Any, fused: Any, x: Any, a: Any) -> Any:
    return _post_attn(dec, layer, fused, x, a)


def _pre_attn_prefill(dec: "Decoder", layer: Any, fused: Any, x: Any, c: Any, s: Any) -> Any:
    return _pre_attn(dec, layer, fused, x, c, s)


def _post_attn_prefill(dec: "Decoder", layer: Any, fused: Any, x: Any, a: Any) -> Any:
    return _post_attn(dec, layer, fused, x, a)


class Decoder:
    """The model's layers run over a static, slot-indexed KV cache (prefill and decode)."""

    def __init__(self, model: Any, fuse: bool = True, compile: Any = False, attention: bool = False,
                 autotune: bool | None = None, fp8: bool | None = None, kv_fp8: bool | None = None) -> None:
        """Take the model's modules; with `fuse`, concatenate q/k/v and gate/up of each layer (fusion.py);
        with `compile` (True = inductor, or a torch.compile backend), compile the stretches of a layer
        around its attention; with `attention` (CUDA only), decode attention by the live-KV kernel
        (see the module docstring). With `autotune` (and `compile` True; None = `STAGE1_ENGINE_AUTOTUNE` is 1,
        off by default: an experiment) decode's stretches are compiled by inductor's max-autotune, which
        times candidate GEMM kernels for each shape (minutes per new slot count) and keeps the fastest.
        With `fp8` (None = `STAGE1_ENGINE_FP8` is 1, off by default) the projections run as FP8 GEMMs
        (fp8.py) where the device has them. With `kv_fp8` (None = `STAGE1_ENGINE_KV_FP8` is 1, off by default)
        the KV cache holds e4m3 (`cache_dtype`).

        `use_fused`, `use_compiled`, `use_autotuned` and `use_attention_kernel` may be switched later (the
        modules still hold the same weights, as views): the benchmark measures the paths on one loaded model.
        """
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
        self.fused: list[FusedLayer] = fuse_projections(self.layers) if fuse else []
        self.use_fused = bool(self.fused)
        """Run the fused GEMMs where a layer has them (else the model's own projection modules)."""
        if fp8 is None:
            fp8 = _flag(fp8_weights.ENV) is True
        self.fp8_unavailable = fp8_weights.available(self.device, self.dtype) if fp8 else None
        self.fp8 = fp8_weights.quantize_layers(self.layers) if fp8 and self.fp8_unavailable is None else []
        if self.fp8_unavailable:
            log.warning("engine: FP8 projections asked for but not run: %s", self.fp8_unavailable)
        self.use_fp8 = bool(self.fp8)
        """Run the FP8 projections (before the fused ones; `fp8` on and the device has FP8 GEMMs)."""
        if kv_fp8 is None:
            kv_fp8 = _flag(fp8_weights.KV_ENV) is True
        self.kv_fp8_unavailable = fp8_weights.kv_available(self.device) if kv_fp8 else None
        if self.kv_fp8_unavailable:
            log.warning("engine: an e4m3 KV cache asked for but not used: %s", self.kv_fp8_unavailable)
        self.kv_fp8 = bool(kv_fp8) and self.kv_fp8_unavailable is None
        """An e4m3 KV cache can be used here (asked for, and the device converts e4m3)."""
        self.use_kv_fp8 = self.kv_fp8
        """Keep the KV cache in e4m3 (`cache_dtype`); switch only between calls (the engine reallocates)."""
        self.compiled: dict[str, Any] = {}
        if compile:
            backend = "inductor" if compile is True else compile
            self.compiled = {f.__name__.lstrip("_"): torch.compile(f, backend=backend, dynamic=dyn)
                             for f, dyn in ((_pre_attn_decode, None), (_post_attn_decode, None),
                                            (_pre_attn_prefill, True), (_post_attn_prefill, True))}
        self.use_compiled = bool(self.compiled)
        """Run the compiled stretches (else the same functions eagerly)."""
        if autotune is None:
            autotune = _flag(AUTOTUNE_ENV) is True
        self.autotuned: dict[str, Any] = {}
        if compile is True and autotune:  # decode's static shapes only: prefill's dynamic ones leave little to tune
            self.autotuned = {f.__name__.lstrip("_"): torch.compile(f, mode="max-autotune-no-cudagraphs",
                                                                    dynamic=False)
                              for f in (_pre_attn_decode, _post_attn_decode)}
        self.use_autotuned = bool(self.autotuned)
        """Run decode's stretches as autotuned (else as compiled by default)."""
        self.autotune_failed: str | None = None
        self.compile_failed: str | None = None
        self.attention_kernel = bool(attention) and self.matmul_decode and live_attention.available() is None
        """The live-KV decode kernel can run here (asked for, CUDA, triton imports)."""
        self.use_attention_kernel = self.attention_kernel
        """Decode attention by the kernel (else the matmul path); off for good once the kernel fails."""
        self.attention_splits = 1
        """The kernel's programs per (row, KV head) along the keys (attention.decode_attention)."""
        self.attention_failed: str | None = None

    def _stretch(self, name: str, *args: Any) -> Any:
        """Run one stretch of a layer (pre_attn_decode, post_attn_prefill, ...), compiled when on; a stretch
        whose compilation fails turns compilation off for this decoder (logged) and runs eagerly."""
        import torch

        eager = globals()["_" + name]
        if self.use_compiled:
            fn = self.autotuned.get(name) if self.use_autotuned else None
            try:
                return (fn or self.compiled[name])(self, *args)
            except Exception as e:  # noqa: BLE001 - inductor/triton missing or failing: the eager path is exact
                if _out_of_memory(e):
                    raise torch.OutOfMemoryError(str(e)) from e  # the engine backs off; compilation stays on
                if fn is not None:  # autotuning failed: decode's stretches as compiled by default
                    self.use_autotuned = False
                    self.autotune_failed = f"{type(e).__name__}: {e}"[:500]
                    log.warning("engine: max-autotune of the decode step failed (%s)", self.autotune_failed)
                    return self._stretch(name, *args)
                self.use_compiled = False
                self.compile_failed = f"{type(e).__name__}: {e}"[:500]
                log.warning("engine: torch.compile of the layers failed (%s); running them eagerly",
                            self.compile_failed)
        return eager(self, *args)

    def _attend_live(self, q: "torch.Tensor", ck: "torch.Tensor", cv: "torch.Tensor", pos: "torch.Tensor",
                     window: int | None, scale: float) -> "torch.Tensor | None":
        """Decode attention by the live-KV kernel, or None when it fails (then it is off for this decoder,
        logged once, and the caller takes the matmul path). Out of memory is re-raised."""
        import torch

        try:
            return live_attention.decode_attention(q, ck, cv, pos, scale, window, splits=self.attention_splits)
        except Exception as e:  # noqa: BLE001 - triton missing or failing: the matmul path is exact
            if _out_of_memory(e):
                raise torch.OutOfMemoryError(str(e)) from e
            self.use_attention_kernel = False
            self.attention_failed = f"{type(e).__name__}: {e}"[:500]
            log.warning("engine: the live-KV decode attention kernel failed (%s); using the matmul path",
                        self.attention_failed)
            return None

    @property
    def cache_dtype(self) -> "torch.dtype":
        """The KV cache's dtype: e4m3 when `use_kv_fp8`, else the model's."""
        import torch

        return torch.float8_e4m3fn if self.use_kv_fp8 else self.dtype

    @staticmethod
    def _writable(t: "torch.Tensor") -> "torch.Tensor":
        """`t` as its cache writes take it: e4m3 as uint8 (index_put and copies of e4m3 are not everywhere)."""
        import torch

        return t.view(torch.uint8) if t.dtype == torch.float8_e4m3fn else t

    def _fused(self, li: int) -> Any:
        if self.use_fp8 and self.fp8:
            return self.fp8[li]
        return self.fused[li] if self.use_fused and self.fused else None

    # -- rotary tables ------------------------------------------------------------------------
    def paths(self) -> tuple[Any, ...]:
        """Which paths a decode step takes now, and the rotary tables' length (what a kept graph relies on)."""
        return (self.use_fused, self.use_compiled, self.use_autotuned, self.use_attention_kernel,
                self.attention_splits, self.use_fp8, self.use_kv_fp8, self._rope_len)

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

    def _rope_at(self, pos: "torch.Tensor") -> dict[str, tuple["torch.Tensor", "torch.Tensor"]]:
        """cos/sin per layer type at positions pos (n, t), shaped (n, 1, t, d): gathered once per forward."""
        return {lt: (cos[pos].unsqueeze(1), sin[pos].unsqueeze(1)) for lt, (cos, sin) in self._rope.items()}

    @staticmethod
    def _rotate(x: "torch.Tensor", cos: "torch.Tensor", sin: "torch.Tensor") -> "torch.Tensor":
        import torch

        half = x.shape[-1] // 2
        rot = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
        return x * cos + rot * sin

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

    def logits(self, h: "torch.Tensor", float32: bool = True) -> "torch.Tensor":
        """Final norm + LM head (+ soft-capping) of hidden states (n, hidden) -> float32 (n, vocab); with
        `float32=False`, the LM head's own dtype where no soft-capping applies (the engine's sampler upcasts
        only what it needs: sampling.py)."""
        import torch

        out = self.lm_head(self.norm(h))
        if self.softcap:
            out = out.float()
            return torch.tanh(out / self.softcap) * self.softcap
        return out.float() if float32 else out

    def prefill(self, tokens: "torch.Tensor", lengths: "torch.Tensor", slots: "torch.Tensor | slice | None",
                cache: list[tuple["torch.Tensor", "torch.Tensor"]] | None) -> "torch.Tensor":
        """Run right-padded prompts (n, t) from position 0, write their K/V into `slots` of the cache (a
        tensor of slot ids, or a slice of consecutive ones: `rows.slot_slice`); `cache` None: write nothing, as
        when scoring a prompt's next token.

        Returns the last real position's hidden state per row, (n, hidden).
        """
        import torch

        n, t = tokens.shape
        pos = torch.arange(t, device=self.device).expand(n, t)
        qi = torch.arange(t, device=self.device)
        causal = qi[None, :] <= qi[:, None]  # (t, t): key <= query
        masks: dict[int | None, torch.Tensor] = {}
        rot = self._rope_at(pos)
        x = self.embed(tokens)
        for li, layer in enumerate(self.layers):
            w = self.windows[li]
            if w not in masks:
                m = causal if w is None else causal & (qi[None, :] > qi[:, None] - w)
                masks[w] = m[None, None]
            c, sn = rot[self.layer_types[li]]
            q, k, v = self._stretch("pre_attn_prefill", layer, self._fused(li), x, c, sn)
            if cache is not None:
                ck, cv = cache[li]
                kw, vw = (k, v) if ck.dtype == k.dtype else (fp8_weights.to_e4m3(k), fp8_weights.to_e4m3(v))
                self._writable(ck)[slots, :, :t] = self._writable(kw)
                self._writable(cv)[slots, :, :t] = self._writable(vw)
            a = self._attend(q, k, v, masks[w], layer.self_attn.scaling)
            x = self._stretch("post_attn_prefill", layer, self._fused(li), x, a)
        return x[torch.arange(n, device=self.device), lengths - 1]

    def next_token_logprobs(self, prompts: Sequence[Sequence[int]], token_ids: Sequence[int],
                            max_tokens: int = 32768) -> "torch.Tensor":
        """Log-probabilities (float32, over the full vocabulary) of `token_ids` as the next token of each
        prompt: the prompts run through `prefill` (compiled when on) without touching a cache, right padded,
        longest first, in forwards of at most `max_tokens` padded tokens; only each prompt's last position
        goes through the LM head. What the critic's plain path computes (HFBackend.next_token_logprobs).

        Args:
            prompts: token ids per prompt (BOS included by the caller's policy), each non-empty.
            token_ids: the candidate tokens.
            max_tokens: padded prompt tokens per forward.
        Returns:
            (n, len(token_ids)) float32 on the model's device, in input order.
        """
        import torch

        dev, n = self.device, len(prompts)
        out = torch.empty(n, len(token_ids), dtype=torch.float32, device=dev)
        order = sorted(range(n), key=lambda i: (-len(prompts[i]), i))
        if not order:
            return out
        self.rope_tables(len(prompts[order[0]]))
        cand = torch.tensor(list(token_ids), dtype=torch.long, device=dev)
        k = 0
        while k < n:
            width = len(prompts[order[k]])  # longest first: a forward's first prompt is its widest
            rows = order[k:k + max(1, min(n - k, max_tokens // width))]
            k += len(rows)
            h = self.prefill(*pad_right(prompts, rows, dev), None, None)
            lp = torch.log_softmax(self.logits(h), dim=-1)
            out[torch.tensor(rows, dtype=torch.long, device=dev)] = lp.index_select(-1, cand)
        return out

    def decode(self, tokens: "torch.Tensor", pos: "torch.Tensor",
               cache: list[tuple["torch.Tensor", "torch.Tensor"]], context: int) -> "torch.Tensor":
        """One token per slot (s,) at positions (s,); keys are each slot's cache [0, pos] (from pos - window + 1
        on sliding layers), all below `context` (which the live-KV kernel does not need). Returns (s, hidden)."""
        import torch

        s = tokens.shape[0]
        keys = torch.arange(context, device=self.device)
        masks: dict[int | None, torch.Tensor] = {}

        def mask(w: int | None) -> "torch.Tensor":  # (s, 1, 1, context), built once per window and step
            if w not in masks:
                m = keys[None, :] <= pos[:, None]
                masks[w] = (m if w is None else m & (keys[None, :] > pos[:, None] - w))[:, None, None, :]
            return masks[w]

        rows = torch.arange(s, device=self.device)
        rot = self._rope_at(pos[:, None])
        x = self.embed(tokens[:, None])
        for li, layer in enumerate(self.layers):
            w = self.windows[li]
            c, sn = rot[self.layer_types[li]]
            q, k, v = self._stretch("pre_attn_decode", layer, self._fused(li), x, c, sn)
            ck, cv = cache[li]
            if k.dtype != ck.dtype:  # the stretch casts when use_kv_fp8; a cache of the other dtype is a bug
                raise ValueError(f"decode: K/V in {k.dtype} for a {ck.dtype} cache (use_kv_fp8 switched "
                                 "without reallocating the cache)")
            self._writable(ck)[rows, :, pos] = self._writable(k)[:, :, 0]
            self._writable(cv)[rows, :, pos] = self._writable(v)[:, :, 0]
            scale = layer.self_attn.scaling
            a = self._attend_live(q, ck, cv, pos, w, scale) if self.use_attention_kernel else None
            if a is None:
                kc, vc = ck[:, :, :context], cv[:, :, :context]
                if kc.dtype != q.dtype:  # an e4m3 cache on a fallback path: convert the slice (slow)
                    kc, vc = kc.to(q.dtype), vc.to(q.dtype)
                if self.matmul_decode:
                    a = self._attend_one(q, kc, vc, mask(w), scale)
                else:
                    a = self._attend(q, kc, vc, mask(w), scale)
            x = self._stretch("post_attn_decode", layer, self._fused(li), x, a)
        return x[:, 0]
