"""Stop sequences found on the device: an Aho-Corasick automaton compiled into per-token tables.

The stop strings' characters make an Aho-Corasick automaton; reading each vocabulary token's text from
each state gives a `(states, vocab)` transition table and a `fires` table, so one gather per decode
step advances every row's match state (no decode, no host sync). Each token's text and the tables are
memoized on disk under `{cache}/engine/`, keyed by a hash of the vocabulary (and the stop strings),
each written whole or not at all; a corrupt or unreadable cache file is rebuilt, never trusted.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import threading
from pathlib import Path
from typing import Any, Sequence

log = logging.getLogger("stage1.engine")


def token_strings(tokenizer: Any) -> list[str]:
    """Each vocabulary id decoded on its own (special tokens kept, as the backend decodes)."""
    n = len(tokenizer)
    return tokenizer.batch_decode([[i] for i in range(n)], skip_special_tokens=False,
                                  clean_up_tokenization_spaces=False)


def _cache_path(name: str) -> Path:
    from stage1_core.model.cache import cache_dir

    return cache_dir() / "engine" / name


def _write_cache(path: Path, data: bytes) -> None:
    """Write a cache file whole or not at all (temp file + rename); a failure only costs a rebuild next
    time, so it is logged, not raised.

    Not `stage1_core.infra.storage`'s writers: those are `write` fault points (a cache write would
    shift which run file `STAGE1_FAULT=write:N` hits), name the temp file by pid only (two backends of
    one process, e.g. a base model and a judge in two threads, may write the same cache file at once)
    and raise WriteError for run outputs; the model cache's bookkeeping writer follows the same rules.
    """
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}-{threading.get_ident()}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_bytes(data)
        os.replace(tmp, path)
    except OSError as e:
        log.debug("engine cache not written (%s): %s", path, e)
    finally:
        try:
            tmp.unlink(missing_ok=True)
        except OSError:
            pass


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
        pieces = json.loads(path.read_bytes().decode("utf-8", "surrogatepass"))
        if isinstance(pieces, list) and len(pieces) == len(tokenizer):
            return pieces
    except (OSError, ValueError):
        pass
    pieces = token_strings(tokenizer)
    _write_cache(path, json.dumps(pieces, ensure_ascii=False).encode("utf-8", "surrogatepass"))
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
    buf = io.BytesIO()
    np.savez(buf, next_state=small, fires=fires)
    _write_cache(path, buf.getvalue())
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
