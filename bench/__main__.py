"""``python -m bench [records] [convergence] [datapath] [tunnels] [ha]``: run the benchmarks, print one table.

Owns the order of the sections and the machine line printed above the table (cores, CPU
model, kernel, date), which docs/benchmarks.md copies. Each section
measures its own baseline in the same run; a section that cannot run here says why in
its row instead of silently disappearing. Progress goes to stderr, the table to stdout.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys
import traceback

from bench.table import Row, render

SECTIONS = ("records", "convergence", "datapath", "tunnels", "ha")


def machine() -> str:
    model = "unknown CPU"
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    # The load average says how much else shared the CPUs while the figures were taken.
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    return f"{os.cpu_count()} cores, {model}, kernel {platform.release()}, {now}, load average {load}"


def _run_section(name: str, quick: bool) -> list[Row]:
    log = lambda line: print(line, file=sys.stderr, flush=True)  # noqa: E731
    if name == "records":
        from bench import records

        return records.run(records.QUICK_SIZES if quick else records.SIZES, log=log)
    if name == "convergence":
        from bench import convergence

        return convergence.run(quick=quick, log=log)
    if name == "tunnels":
        from bench import tunnels

        return tunnels.run(quick=quick, log=log)
    if name == "ha":
        from bench import ha

        return ha.run(quick=quick, log=log)
    from bench import datapath

    return datapath.run(quick=quick, log=log)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    parser.add_argument("sections", nargs="*", metavar="SECTION",
                        help=f"which sections to run: {', '.join(SECTIONS)} (default: all)")
    parser.add_argument("--quick", action="store_true", help="smaller sizes, for a smoke run")
    args = parser.parse_args(argv)
    unknown = [name for name in args.sections if name not in SECTIONS]
    if unknown:
        parser.error(f"no section {unknown[0]!r}: choose from {', '.join(SECTIONS)}")
    if os.geteuid() != 0:
        print("bench: needs root (it creates network namespaces): run `sudo make bench`", file=sys.stderr)
        return 1
    rows: list[Row] = []
    failed = False
    for name in args.sections or SECTIONS:
        print(f"bench: {name} ...", file=sys.stderr, flush=True)
        try:
            rows += _run_section(name, args.quick)
        except Exception as exc:  # one broken section must not hide the others' figures
            traceback.print_exc()
            rows.append(Row(name, "did not complete", f"{type(exc).__name__}: {exc}"[:100], met=False))
            failed = True
    print(f"machine: {machine()}")
    print(render(rows))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
