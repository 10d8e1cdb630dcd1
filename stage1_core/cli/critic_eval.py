"""Measure the critic on a labelled file: accuracy, AUC and margins per kind (the command line of
stage1_core.phases.critic_eval).

    python -m stage1_core.cli.critic_eval --labels stage1_core/data/critic_dev.test.jsonl [--model ID]
        [--config FILE] [--set critic.labels=[Yes,No] ...] [--critic-only]

The labels file is JSON Lines, one item per line:
`{"kind": "instruction"|"pair", "instruction": str, "response": str (pairs only), "label": "good"|"bad"}`
(optional `note` and `split` strings are allowed). Prints exactly one JSON object on stdout
(`{"model", "critic", "instruction", "pair"}`); logs go to stderr. Exit 2 on bad input (the error
names file, line and field), 0 otherwise.

How items are scored (the pipeline's score, `--critic-only`'s raw margin, AUC):
`stage1_core.phases.critic_eval`.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from typing import Any

import yaml

from stage1_core.infra.config import load_pilot_config
from stage1_core.infra.errors import InputError
from stage1_core.model import Backend
from stage1_core.phases.critic import ABCritic
from stage1_core.phases.critic_eval import critic_settings, evaluate, load_labels
from stage1_core.phases.seeds import load_seeds

log = logging.getLogger("stage1.critic_eval")


def _parse_set(values: list[str]) -> dict[str, Any]:
    over: dict[str, Any] = {}
    for v in values:
        key, eq, raw = v.partition("=")
        if not eq or not key:
            raise InputError(f"--set needs KEY=VALUE, got {v!r}", file="command line", field="--set",
                             expected="a dotted config key and a YAML value, e.g. critic.labels=[Yes,No]", fix="correct --set")
        node = over
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = yaml.safe_load(raw)
    return over


def main(argv: list[str] | None = None, backend: Backend | None = None) -> int:
    """CLI entry point. Returns the exit code (0 ok, 2 bad input)."""
    ap = argparse.ArgumentParser(prog="python -m stage1_core.cli.critic_eval", description=__doc__.split("\n\n")[0])
    ap.add_argument("--labels", required=True, help="JSON Lines file of labelled items")
    ap.add_argument("--model", default=None, help="model id (default: the config's model.id)")
    ap.add_argument("--config", default=None, help="a pilot config YAML deep-merged over configs/pilot.yaml")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key (YAML value)")
    ap.add_argument("--critic-only", action="store_true", help="rank the raw critic margins (no heuristics)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(name)s: %(message)s")
    try:
        over = _parse_set(args.set)
        if args.model:
            over.setdefault("model", {})["id"] = args.model
        cfg = load_pilot_config(args.config, over or None)
        items = load_labels(args.labels)
    except InputError as e:
        print(e.render(), file=sys.stderr)
        return 2
    t0 = time.monotonic()
    if backend is None:
        from stage1_core.model import load_backend
        backend = load_backend(cfg.model)
    log.info("model ready in %.1fs; scoring %d items from %s", time.monotonic() - t0, len(items), args.labels)
    t1 = time.monotonic()
    result = evaluate(items, ABCritic(backend, cfg.critic), heuristics=not args.critic_only,
                      instruction_filter=cfg.instruction_filter,
                      seed_texts={s.instruction for s in load_seeds(cfg.seeds_path).seeds})
    log.info("scored in %.1fs", time.monotonic() - t1)
    fp = backend.fingerprint
    model = {k: fp.get(k) for k in ("id", "revision", "weights_sha256", "dtype", "device", "bos_policy")}
    print(json.dumps({"model": model, "critic": {**critic_settings(cfg), "critic_only": args.critic_only},
                      "instruction": result["instruction"], "pair": result["pair"]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
