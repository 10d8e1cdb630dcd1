"""Print a flow's option table (flag, flow parameter, default, config key, meaning) as the docs hold it,
from its one declaration: pilot (docs/config.md), scale (docs/scale.md), sft (docs/sft.md), eval (docs/eval.md).

    PYTHONPATH=. python -m stage1_core.cli.options [pilot|scale|sft|eval]
"""

from __future__ import annotations

import sys

from stage1_core.infra.options import markdown_table
from stage1_core.phases.options import PilotOptions
from stage1_core.scale.options import ScaleOptions
from stage1_core.train.options import EvalOptions, SFTOptions

OPTIONS = {"pilot": PilotOptions, "scale": ScaleOptions, "sft": SFTOptions, "eval": EvalOptions}
DOCS = {"pilot": "docs/config.md", "scale": "docs/scale.md", "sft": "docs/sft.md", "eval": "docs/eval.md"}


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    name = args[0] if args else "pilot"
    if name not in OPTIONS:
        print(f"usage: python -m stage1_core.cli.options [{'|'.join(OPTIONS)}]", file=sys.stderr)
        return 2
    print(markdown_table(OPTIONS[name]), end="")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
