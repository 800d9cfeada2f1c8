"""system tier: hosts booted like real hosts (``netns_lab.bootlab``), one lab per session.

Three VMs boot the project's host image (Debian 12, Debian's kernel, systemd as PID 1)
under qemu, cabled to one switch; openhnv is installed on them by the "Installing on a host"
commands of docs/operating.md, run as they stand. The tests then do what an operator does on
those hosts (systemctl, journalctl, ping, a capture on the switch) and check what the
operator would check. Figures (pings lost, seconds to restart, timings) are printed at
the end of the run.

Needs root, mmdebstrap, qemu and Debian's apt sources to build the image (cached in
``/var/cache/openhnv/images``). When it cannot be built here, every test is skipped
with the reason: the summary says SKIP, never PASS.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from netns_lab import bootlab, hostimage, vm

FIGURES: dict[str, str] = {}


@pytest.fixture(scope="session")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[bootlab.BootLab]:
    if os.geteuid() != 0:
        pytest.skip("the system tier needs root (an image build, a namespace, taps): sudo make system")
    if vm.in_vm():
        pytest.skip("the system tier boots its own VMs from the machine, not inside a lab VM")
    try:
        image = hostimage.cached_image()
    except hostimage.ImageUnavailable as exc:
        pytest.skip(f"no host image: {exc}")
    run_dir = tmp_path_factory.mktemp("bootlab")
    disk_mtime = image.disk.stat().st_mtime_ns
    with bootlab.booted_lab(run_dir, image) as booted:
        booted.install()
        FIGURES.update({k: f"{v:.1f} s" for k, v in booted.timings.items()})
        yield booted
    # Copy-on-write: the cached image was booted three times and never written.
    assert image.disk.stat().st_mtime_ns == disk_mtime, "the cached host image was written to"


def record(name: str, value: str) -> None:
    """A figure for the end-of-run summary (and the test's own output)."""
    FIGURES[name] = value
    print(f"{name}: {value}")


def pytest_terminal_summary(terminalreporter) -> None:
    if FIGURES:
        terminalreporter.section("system tier figures")
        for name, value in FIGURES.items():
            terminalreporter.write_line(f"  {name:<60} {value}")
