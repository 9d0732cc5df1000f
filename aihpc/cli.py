"""The ``aihpc`` command: ``aihpc allocate ...``, ``aihpc fit ...``."""

from __future__ import annotations

import argparse
import sys

from aihpc.allocate import InfeasibleError
from aihpc.allocate import cli as allocate_cli
from aihpc.errors import InputError

#: Exit status when the inputs are valid but no plan satisfies the constraints.
EXIT_INFEASIBLE = 3


def main(argv: list[str] | None = None) -> int:
    """Run one subcommand; bad input is one line on stderr and exit status 1, not a traceback."""
    parser = argparse.ArgumentParser(
        prog="aihpc", description="fit throughput models and plan GPU allocations"
    )
    sub = parser.add_subparsers(dest="command", required=True)
    allocate_cli.register(sub)
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except InfeasibleError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_INFEASIBLE
    except InputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
