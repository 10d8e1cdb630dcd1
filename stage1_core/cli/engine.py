"""Greedy completion of one prompt through the engine (`model.engine: stage1`) and the reference path
(plain generate), with times: a by-hand check of the engine on a real model.

    PYTHONPATH=. python -m stage1_core.cli.engine [--prompt TEXT] [--max-new-tokens N]
"""

from __future__ import annotations

import time


def main(argv: list[str] | None = None) -> int:
    """CLI: greedy completion of one prompt through the engine and through plain generate."""
    import argparse

    from stage1_core.infra.config import ModelConfig
    from stage1_core.model import load_backend
    from stage1_core.infra.schemas import GenerationParams

    ap = argparse.ArgumentParser(prog="python -m stage1_core.cli.engine", description=__doc__.split("\n")[0])
    ap.add_argument("--prompt", default="Instruction: Name three fruits.\nResponse:")
    ap.add_argument("--max-new-tokens", type=int, default=32)
    a = ap.parse_args(argv)
    params = GenerationParams(max_new_tokens=a.max_new_tokens, temperature=0.0, stop_sequences=["\n\n"])
    for engine in ("stage1", "reference"):
        backend = load_backend(ModelConfig(engine=engine))
        t0 = time.perf_counter()
        c = backend.generate([a.prompt], params, seed=0)[0]
        print(f"{engine:9s} {time.perf_counter() - t0:6.2f}s {c.model_dump_json()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
