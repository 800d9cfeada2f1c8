"""hnv-agent: the agent's command line.

Owns argument parsing and exit codes of ``hnv-agent``; each subcommand is one small
``add_<name>_command(subparsers)`` function so another can be added without touching
the rest (the daemon adds ``run``).

    hnv-agent apply STATE.json [--netns NS] [--dry-run]
        exit 0 done, 1 some object failed, 2 the document was refused (nothing touched)
    hnv-agent show records|provider-addresses|tunnels|ports [--netns NS] [-o json]
    hnv-agent run --controller URL [--controller URL ...] ...   (agent.daemon)
        several URLs: replicas of one fabric, watched one at a time; exit 2 for a URL
        that cannot be used, before anything else is done
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from agent.state import StateError, parse_host_state

EXIT_OK, EXIT_FAILED, EXIT_REFUSED = 0, 1, 2


def _apply(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s %(message)s")
    try:
        text = Path(args.state).read_text()
    except OSError as exc:
        print(f"state: cannot read {args.state}: {exc.strerror}", file=sys.stderr)
        return EXIT_REFUSED
    try:
        state = parse_host_state(text)
    except StateError as exc:
        for problem in exc.problems:
            print(problem, file=sys.stderr)
        print(f"refused {args.state}: nothing was changed", file=sys.stderr)
        return EXIT_REFUSED
    from agent.reconcile import Reconciler  # netlink only once the document is good

    with Reconciler(netns=args.netns, vm_dhcp=args.vm_dhcp) as reconciler:
        if args.dry_run:
            print(reconciler.plan(state).describe())
            return EXIT_OK
        result = reconciler.reconcile(state)
    if result.plan is not None:
        print(result.plan.describe())
    for error in result.errors:
        print(f"error: {error.kind} {error.object}: {error.message}", file=sys.stderr)
    print(f"generation {result.generation}: {result.applied}/{result.planned} operations "
          f"applied, {len(result.errors)} errors, {result.duration_s * 1000:.0f} ms")
    return EXIT_FAILED if result.errors else EXIT_OK


def _show(args: argparse.Namespace) -> int:
    from agent import show
    from agent.reconcile import Reconciler

    with Reconciler(netns=args.netns) as reconciler:
        if args.view == "tunnels":
            rows = show.tunnels(reconciler.tunnel_stats())
        else:
            have = reconciler.observe()
            rows = {"records": show.lookup_records, "provider-addresses": show.provider_addresses,
                    "ports": show.ports}[args.view](have)
    print(show.render(args.view, rows, args.output))
    return EXIT_OK


def add_apply_command(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("apply", help="apply a HostState document once")
    parser.add_argument("state", help="HostState JSON file")
    parser.add_argument("--netns", help="network namespace to apply in (default: this one)")
    parser.add_argument("--dry-run", action="store_true", help="print the plan, change nothing")
    parser.add_argument("--vm-dhcp", action="store_true",
                        help="lab: as hnv-agent run --vm-dhcp (the guests ask DHCP for their address)")
    parser.add_argument("-v", "--verbose", action="store_true", help="log each operation")
    parser.set_defaults(func=_apply)


def add_show_command(subparsers: argparse._SubParsersAction) -> None:
    from agent.show import VIEWS

    parser = subparsers.add_parser("show", help="read HNV state back from the kernel")
    parser.add_argument("view", choices=VIEWS)
    parser.add_argument("--netns", help="network namespace to read (default: this one)")
    parser.add_argument("-o", "--output", choices=("table", "json"), default="table")
    parser.set_defaults(func=_show)


def add_run_command(subparsers: argparse._SubParsersAction) -> None:
    from agent.daemon import add_run_parser

    add_run_parser(subparsers)


COMMANDS = [add_run_command, add_apply_command, add_show_command]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hnv-agent", description="openhnv per-host agent")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add_command in COMMANDS:
        add_command(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
