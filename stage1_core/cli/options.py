"""Print the pilot's option table (flag, flow parameter, default, config key, meaning) as docs/config.md
holds it, from the one declaration, `stage1_core.phases.options.PilotOptions`.

    PYTHONPATH=. python -m stage1_core.cli.options
"""

from __future__ import annotations

from stage1_core.phases.options import PilotOptions, markdown_table


def main() -> int:
    print(markdown_table(PilotOptions), end="")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
