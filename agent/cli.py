"""hnv-agent: the per-host agent's command line.

Owns argument parsing and dispatch only; each subcommand lives with the code it runs
(``run``: agent.daemon). Subcommands register themselves through ``add_*_parser``.
"""

from __future__ import annotations

import argparse
import sys

from agent.daemon import add_run_parser


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hnv-agent",
        description="openhnv per-host agent: realise the controller's desired state in the kernel",
    )
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    add_run_parser(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
