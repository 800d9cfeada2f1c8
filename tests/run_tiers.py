"""Run the test tiers in order and summarise each: ``python -m tests.run_tiers [TIER...] [-- PYTEST ARGS]``.

Owns the decision of *where* each tier runs. unit, netns and pg (a throw-away PostgreSQL
cluster of its own) run here with pytest. The
kernel tier runs here when the running kernel has every feature it needs
(``netns_lab.features.missing()`` is empty, or we are already inside the VM); otherwise
the whole tier runs inside ONE throw-away VM (``netns_lab.vm``): boot once per tier, not
per test. Either way pytest writes a junit XML file (through the VM's shared directory
when in the VM), and the summary printed at the end is read from it.

Every tier runs even when an earlier one failed (unless ``--fail-fast``), so one run
shows the whole picture; the exit status is non-zero if any tier failed, ran no tests,
or did not report.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

from netns_lab import features, vm

CHECKOUT = Path(__file__).resolve().parent.parent
# multikernel, system and vagrant boot their own VMs (one kernel per host: netns_lab.multivm,
# netns_lab.bootlab's hosts booted with systemd, and the Vagrantfile's machines under
# libvirt) from this machine: they run here, never inside the kernel tier's VM.
TIERS = ("unit", "netns", "pg", "kernel", "multikernel", "system", "vagrant")


@dataclass
class TierResult:
    tier: str
    ok: bool
    summary: str  # "12 passed, 1 failed" or why there is no count
    seconds: float
    where: str  # "here" or "VM (TCG)"
    skipped: bool = False  # every test skipped: shown as SKIP with the reason, never PASS


def _junit_summary(junit: Path) -> tuple[str, int] | None:
    """("3 passed, 1 failed", tests run) from pytest's junit XML, None if there is none.

    When every test was skipped, the summary is the skip reason (the first one).
    """
    try:
        root = ET.parse(junit).getroot()
    except (OSError, ET.ParseError):
        return None
    suite = root if root.tag == "testsuite" else root.find("testsuite")
    if suite is None:
        return None
    counts = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    passed = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    if counts["tests"] and counts["skipped"] == counts["tests"]:
        reason = next((s.get("message", "") for s in suite.iter("skipped")), "")
        return f"{counts['skipped']} skipped: {reason}", counts["tests"]
    parts = [f"{passed} passed"]
    parts += [f"{counts[k]} {k}" for k in ("failures", "errors", "skipped") if counts[k]]
    return ", ".join(parts), counts["tests"]


# The unit tier's tests mostly wait (on servers, agents and timeouts they start): four
# pytest-xdist workers take it from 260 s to 150 s on two cores; `worksteal` lets an idle
# worker take tests queued behind a long one (the API fuzzing's shards start side by side
# in one worker's share). The other tiers share a kernel, a PostgreSQL cluster or a VM, and
# their timings are what they test: one process.
TIER_OPTIONS = {"unit": ("-n", "4", "--dist", "worksteal")}
SLOWEST = 30  # each tier's slowest tests, listed in its output (where the time goes)


def _pytest_args(tier: str, extra: list[str], junit: Path) -> list[str]:
    # Extra arguments naming files of this tier replace the tier's directory.
    targets = [] if any(a.startswith(f"tests/{tier}") for a in extra) else [f"tests/{tier}"]
    return ["-m", "pytest", *targets, *TIER_OPTIONS.get(tier, ()), f"--durations={SLOWEST}",
            f"--junitxml={junit}", "-o", f"junit_suite_name={tier}", *extra]


def _kernel_needs_vm() -> list[str]:
    """Features the kernel tier lacks here; empty when it can run on this kernel."""
    if vm.in_vm():
        return []  # inside the VM already: run, and let the tier's conftest complain
    return features.missing()


def run_tier(tier: str, extra: list[str], workdir: Path, vm_timeout: float | None = None) -> TierResult:
    junit = workdir / f"junit-{tier}.xml"
    started = time.monotonic()
    lacking = _kernel_needs_vm() if tier == "kernel" else []
    if lacking:
        print(f"\n== tier {tier}: this kernel lacks {', '.join(lacking)}; "
              f"running the tier in a VM booting {vm.newest_kernel()} ==", flush=True)
        rwdir = workdir / "vm"
        junit = rwdir / junit.name
        # The host's venv python, by absolute path: the guest shares this file system.
        result = vm.run_in_vm([sys.executable, *_pytest_args(tier, extra, junit)], rwdir=rwdir,
                               timeout=vm_timeout)
        returncode = result.returncode
        where = f"VM ({'KVM' if result.kvm else 'TCG'})"
        if not result.completed:
            why = (f"killed after {vm_timeout:.0f} s" if vm_timeout and result.seconds >= vm_timeout
                   else f"vng exit {returncode}")
            return TierResult(tier, False, f"the VM did not report ({why})",
                              time.monotonic() - started, where)
    else:
        print(f"\n== tier {tier} ==", flush=True)
        returncode = subprocess.run([sys.executable, *_pytest_args(tier, extra, junit)],
                                    cwd=CHECKOUT, check=False).returncode
        where = "here"
    seconds = time.monotonic() - started
    parsed = _junit_summary(junit)
    if parsed is None:
        return TierResult(tier, False, f"no test report (pytest exit {returncode})", seconds, where)
    summary, ran = parsed
    if ran == 0:
        return TierResult(tier, False, "no tests ran", seconds, where)
    return TierResult(tier, returncode == 0, summary, seconds, where,
                      skipped=returncode == 0 and summary.split()[1:2] == ["skipped:"])


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra: list[str] = []
    if "--" in argv:
        at = argv.index("--")
        argv, extra = argv[:at], argv[at + 1:]
    parser = argparse.ArgumentParser(prog="python -m tests.run_tiers", description=__doc__.splitlines()[0])
    parser.add_argument("tiers", nargs="*", metavar="TIER",
                        help=f"one or more of {', '.join(TIERS)} (default: all, in that order)")
    parser.add_argument("--fail-fast", action="store_true", help="stop after the first failing tier")
    # The kernel tier took 32 minutes under TCG on two cores (51 tests, idle) and 52 before
    # its process cost was cut: an hour and a half leaves room for a slower or busier
    # machine, and still stops a VM that hangs.
    parser.add_argument("--vm-timeout", type=float, default=5400, metavar="SECONDS",
                        help="kill a tier's VM after this long (default: %(default)s); the tier fails")
    parser.add_argument("--keep", type=Path, metavar="DIR",
                        help="keep junit XML files (and the VM's shared directory) in DIR")
    args = parser.parse_args(argv)
    args.tiers = args.tiers or list(TIERS)
    if unknown := [t for t in args.tiers if t not in TIERS]:
        parser.error(f"unknown tier {', '.join(unknown)}; tiers are {', '.join(TIERS)}")

    workdir = args.keep or Path(tempfile.mkdtemp(prefix="openhnv-tiers-"))
    workdir.mkdir(parents=True, exist_ok=True)
    results: list[TierResult] = []
    try:
        for tier in args.tiers:
            results.append(run_tier(tier, extra, workdir.resolve(), args.vm_timeout))
            if args.fail_fast and not results[-1].ok:
                break
    finally:
        if args.keep is None:
            shutil.rmtree(workdir, ignore_errors=True)

    print("\n== test tiers ==")
    for r in results:
        status = "SKIP" if r.skipped else "PASS" if r.ok else "FAIL"
        print(f"  {r.tier:<11} {status}  {r.summary:<40} {r.seconds:6.1f} s  {r.where}")
    skipped = [t for t in args.tiers if t not in {r.tier for r in results}]
    if skipped:
        print(f"  not run (--fail-fast): {', '.join(skipped)}")
    return 0 if results and all(r.ok for r in results) and not skipped else 1


if __name__ == "__main__":
    os.chdir(CHECKOUT)
    # SIGTERM (make interrupted, a CI timeout) ends like Ctrl-C: cleanup code runs, and a
    # tier's VM is killed by netns_lab.vm rather than left running.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    sys.exit(main())
