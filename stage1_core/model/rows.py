"""Small helpers of the engine's decoder: right-padded prompt batches, consecutive slots as a slice, whether
an exception is out of device memory, and an engine switch read from the environment (decoder.py, engine.py,
sampling.py, fp8.py use them).
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any, Sequence

if TYPE_CHECKING:
    import torch


def env_flag(env: str) -> bool | None:
    """The variable `env` as a switch: 1/true/yes/on, 0/false/no/off, or None (unset or anything else)."""
    v = os.environ.get(env, "").strip().lower()
    return True if v in ("1", "true", "yes", "on") else False if v in ("0", "false", "no", "off") else None


def pad_right(prompts: Sequence[Sequence[int]], rows: Sequence[int],
              device: Any) -> tuple["torch.Tensor", "torch.Tensor"]:
    """Prompts `rows` as one right-padded batch for `Decoder.prefill` (pad id 0; callers go longest first, so
    the first row sets the width): tokens (n, width) and lengths (n,), int64 on `device`."""
    import torch

    toks = torch.zeros((len(rows), len(prompts[rows[0]])), dtype=torch.long)
    for r, i in enumerate(rows):
        toks[r, : len(prompts[i])] = torch.tensor(list(prompts[i]), dtype=torch.long)
    lengths = torch.tensor([len(prompts[i]) for i in rows], dtype=torch.long)
    return toks.to(device), lengths.to(device)


def slot_slice(slots: Sequence[int]) -> slice | None:
    """`slots` as a slice when they are consecutive (the prefill then writes its K/V by a strided copy, not an
    index_put), else None."""
    if not slots:
        return None
    s0 = slots[0]
    return slice(s0, s0 + len(slots)) if list(slots) == list(range(s0, s0 + len(slots))) else None


def out_of_memory(e: BaseException) -> bool:
    """True when `e`, or an exception it wraps (torch.compile wraps its backend's), is out of device memory."""
    import torch

    seen = 0
    cur: BaseException | None = e
    while cur is not None and seen < 8:
        if isinstance(cur, torch.OutOfMemoryError):
            return True
        cur = getattr(cur, "inner_exception", None) or cur.__cause__ or cur.__context__
        seen += 1
    return False
