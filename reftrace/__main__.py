"""The command line.

    python -m reftrace check --target inductor --examples 500 --out DIR
    python -m reftrace show examples/models.py:resnet18 --input 1x3x64x64 [--joint] [--partition mincut]
    python -m reftrace pareto examples/models.py:resnet18 [--input 2x3x64x64] [--out pareto.svg]
"""
from __future__ import annotations

import argparse
import sys
from typing import Sequence


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m reftrace", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    from reftrace.testing.cli import add_check_command
    add_check_command(commands)
    from reftrace.tools.show import add_show_command
    add_show_command(commands)
    from reftrace.tools.pareto import add_pareto_command
    add_pareto_command(commands)
    args = parser.parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
