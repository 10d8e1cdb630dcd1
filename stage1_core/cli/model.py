"""Load a model and print its fingerprint and one greedy completion: a by-hand check of a model id.

    PYTHONPATH=. python -m stage1_core.cli.model [--id MODEL] [--bos-policy auto|always|never] [--prompt TEXT]
"""

from __future__ import annotations

import argparse
import json

from stage1_core.infra.config import EMBEDDED_MODEL, ModelConfig
from stage1_core.infra.errors import InputError
from stage1_core.infra.schemas import GenerationParams
from stage1_core.model import load_backend


def main(argv: list[str] | None = None) -> int:
    """CLI: load a model, print its fingerprint and one greedy completion.

    Args:
        argv: command-line arguments (default sys.argv[1:]).
    Returns:
        Exit code (0 ok, 2 bad input).
    """
    ap = argparse.ArgumentParser(prog="python -m stage1_core.cli.model", description=__doc__.split("\n")[0])
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
