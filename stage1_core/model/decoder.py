"""The engine's decoder: the model's own layers run by hand over a static, slot-indexed KV cache.

`Decoder(model)` reuses the loaded transformers modules (embeddings, norms, projections, MLP, rotary
tables), so its numerics follow transformers'. `prefill` runs right-padded prompts from position 0 and
writes their K/V into chosen slots of the cache; `decode` runs one token per slot at each slot's own
position. The cache is `(slots, kv_heads, context, head_dim)` per layer. Grouped-query attention never
repeats K/V: query heads of one KV head become extra query rows. Sliding-window layers mask by window.
On CUDA decode attention is two batched matmuls over the cache slice read in place; on the CPU it is
SDPA (which matches transformers there). With fusion (fusion.py, on by default) each layer's q/k/v and
gate/up projections are one GEMM each.
"""

from __future__ import annotations

import inspect
from typing import TYPE_CHECKING, Any

from stage1_core.model.fusion import FusedLayer, fuse_projections

if TYPE_CHECKING:
    import torch


class Decoder:
    """The model's layers run over a static, slot-indexed KV cache (prefill and decode)."""

    def __init__(self, model: Any, fuse: bool = True) -> None:
        """Take the model's modules; with `fuse`, concatenate q/k/v and gate/up of each layer (fusion.py).

        `use_fused` may be switched off later (the modules still hold the same weights, as views):
        the benchmark measures both paths on one loaded model.
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
        fused = self.fused[li].qkv if self.use_fused else None
        if fused is not None:
            q, k, v = fused(h)  # one GEMM, split along the last dimension (views)
        else:
            q, k, v = attn.q_proj(h), attn.k_proj(h), attn.v_proj(h)
        q = q.view(n, t, self.n_heads, self.head_dim).transpose(1, 2)
        k = k.view(n, t, self.n_kv, self.head_dim).transpose(1, 2)
        v = v.view(n, t, self.n_kv, self.head_dim).transpose(1, 2)
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

    def _mlp(self, layer: Any, li: int, x: "torch.Tensor") -> "torch.Tensor":
        """down(act(gate(x)) * up(x)), with gate and up as one GEMM when fused."""
        fused = self.fused[li].gate_up if self.use_fused else None
        if fused is None:
            return layer.mlp(x)
        gate, up = fused(x)
        return layer.mlp.down_proj(layer.mlp.act_fn(gate) * up)

    def _mlp_block(self, layer: Any, li: int, x: "torch.Tensor", attn_out: "torch.Tensor") -> "torch.Tensor":
        if self.gemma_norms:
            x = x + layer.post_attention_layernorm(attn_out)
            return x + layer.post_feedforward_layernorm(self._mlp(layer, li, layer.pre_feedforward_layernorm(x)))
        x = x + attn_out
        return x + self._mlp(layer, li, layer.post_attention_layernorm(x))

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
            x = self._mlp_block(layer, li, x, layer.self_attn.o_proj(a))
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
            x = self._mlp_block(layer, li, x, layer.self_attn.o_proj(a))
        return x[:, 0]
