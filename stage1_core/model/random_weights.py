"""Random-weight models (`random:<name>`): benchmark-only Gemma 3 text decoders of the released sizes,
on the embedded model's tokenizer. This module holds their dims (`RANDOM_MODELS`), their exact
parameter count (`random_param_count`, used by the fits-in-memory check before anything is built) and
their transformers config (`random_gemma3_config`); `stage1_core.model.loader` builds them on the device.
Tests: `python -m pytest -q tests/core/test_loader.py`.
"""

from __future__ import annotations

from typing import Any, NamedTuple


class RandomSpec(NamedTuple):
    """Text-decoder dims of a random-weight Gemma 3 (those of the released checkpoints, tiny aside)."""

    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    ffn: int
    query_pre_attn_scalar: int


RANDOM_MODELS: dict[str, RandomSpec] = {
    "gemma3-tiny": RandomSpec(64, 2, 2, 1, 32, 128, 32),
    "gemma3-4b": RandomSpec(2560, 34, 8, 4, 256, 10240, 256),
    "gemma3-12b": RandomSpec(3840, 48, 16, 8, 256, 15360, 256),
    "gemma3-27b": RandomSpec(5376, 62, 32, 16, 128, 21504, 168),
}
"""`random:<name>` models: benchmark-only Gemma 3 text decoders with random weights (normal, std 0.02)
on the embedded model's tokenizer. They skip the sentinels (nothing else may) and the QC gate always
halts a run that used one."""
RANDOM_FAMILY = "gemma3_text"
RANDOM_VOCAB = 262144
RANDOM_WEIGHTS_VERSION = "random-weights-v1"
RANDOM_SENTINELS_NOTE = "skipped (random weights)"


def random_param_count(spec: RandomSpec, vocab: int = RANDOM_VOCAB) -> int:
    """Parameters of a random Gemma 3 text decoder (tied embeddings, q/k norms, four norms per layer).

    Args:
        spec: the dims.
        vocab: vocabulary size.
    Returns:
        The parameter count (equal to the built model's).
    """
    h, q, kv = spec.hidden, spec.heads * spec.head_dim, spec.kv_heads * spec.head_dim
    per_layer = h * q + 2 * h * kv + q * h + 3 * h * spec.ffn + 4 * h + 2 * spec.head_dim
    return vocab * h + spec.layers * per_layer + h


def random_gemma3_config(spec: RandomSpec, tokenizer: Any) -> Any:
    """The Gemma3TextConfig of a random model: real Gemma 3 layout (5 sliding : 1 full, window 1024,
    rope local 10k / global 1M linear x8), the tokenizer's special ids.

    Args:
        spec: the dims.
        tokenizer: the embedded model's tokenizer (vocabulary of RANDOM_VOCAB).
    Returns:
        A transformers.Gemma3TextConfig.
    """
    from transformers import Gemma3TextConfig

    layer_types = ["full_attention" if (i + 1) % 6 == 0 else "sliding_attention" for i in range(spec.layers)]
    return Gemma3TextConfig(
        vocab_size=RANDOM_VOCAB, hidden_size=spec.hidden, num_hidden_layers=spec.layers,
        num_attention_heads=spec.heads, num_key_value_heads=spec.kv_heads, head_dim=spec.head_dim,
        intermediate_size=spec.ffn, query_pre_attn_scalar=spec.query_pre_attn_scalar, sliding_window=1024,
        layer_types=layer_types, max_position_embeddings=131072, initializer_range=0.02,
        rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                         "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1000000.0}},
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True)
