"""Throw-away kernel-lab VM: run one command under the distribution kernel with virtme-ng.

Owns how a command gets from this machine into a VM and how its result comes back. The
running kernel may lack gretap, 802.1Q, bonding, VRF or VLAN-filtering bridges (see
``netns_lab.features``) and may not be able to load modules. virtme-ng boots the
distribution's kernel (``/boot/vmlinuz-*``, Debian package linux-image-amd64) in qemu with
this machine's file system as the guest's root, read-only: the same checkout and the same
``.venv`` run inside, so there is no image to build. One directory (``rwdir``) is shared
read-write; the guest script, the exit code and any artefacts (junit XML, captures) pass
through it.

Inside the guest, before the command runs: the kernel modules of the data plane are
loaded, loopback is up, Python is told not to write into the read-only tree, and
``OPENHNV_IN_VM=1`` tells tests and ``hnv-lab`` where they are.

The root is 9p without a page cache: every open, stat and read of every Python module is
a round trip to qemu, for every interpreter the tests start. The checkout, the venv and
Python's standard library are therefore shared a second time (``--rodir``) and mounted
again in the guest with ``cache=loose`` (:func:`cached_dirs`): read-only in the guest and
left alone on the host during a run, so the guest's cache cannot go stale. Measured in
the kernel tier's VM on a loaded machine: importing ``controller.hnvctl`` took 150 s from
the uncached root and 90-110 s with the checkout and venv cached.

    python -m netns_lab.vm -- python -m pytest tests/kernel
    result = run_in_vm(["python", "-m", "pytest", "tests/kernel"])

Boot costs ~25-40 s without KVM: callers boot once per batch of work, not per test.
"""

from __future__ import annotations

import argparse
import codecs
import contextlib
import os
import re
import selectors
import shlex
import shutil
import signal
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from netns_lab.features import MODULES

# The checkout: netns_lab/ sits at its top.
CHECKOUT = Path(__file__).resolve().parent.parent

IN_VM_ENV = "OPENHNV_IN_VM"
RWDIR_ENV = "OPENHNV_VM_RWDIR"
KVM_ENV = "OPENHNV_VM_KVM"  # "0" or "1" overrides the KVM check

EXIT_CODE_FILE = "exit-code"
GUEST_SCRIPT_FILE = "guest.sh"

# Loaded in the guest besides MODULES; missing ones are fine (tc netem for impairment;
# tun for /dev/net/tun, where a hypervisor makes a real VM's tap).
OPTIONAL_MODULES: tuple[str, ...] = ("sch_netem", "tun")


def in_vm() -> bool:
    """True inside a VM started by :func:`run_in_vm`."""
    return os.environ.get(IN_VM_ENV) == "1"


def _version_key(release: str) -> list[tuple[int, int | str]]:
    # "6.1.0-56-amd64" -> numbers compare as numbers, the rest as text.
    return [(0, int(p)) if p.isdigit() else (1, p) for p in re.split(r"[.\-+~]", release)]


def newest_kernel(boot: Path = Path("/boot"), modules: Path = Path("/lib/modules")) -> Path:
    """The newest ``vmlinuz-<release>`` whose modules are installed (the guest loads them)."""
    candidates = [
        p for p in boot.glob("vmlinuz-*")
        if (modules / p.name.removeprefix("vmlinuz-")).is_dir()
    ]
    if not candidates:
        raise FileNotFoundError(
            f"no kernel with modules in {boot} and {modules}: install linux-image-amd64"
        )
    return max(candidates, key=lambda p: _version_key(p.name.removeprefix("vmlinuz-")))


def kvm_usable() -> bool:
    """Whether to run the VMs under KVM: only when asked (``OPENHNV_VM_KVM=1``).

    ``/dev/kvm`` can exist, open and even create VMs and vCPUs on hosts where qemu then
    aborts at the first register write (nested virtualisation without the MSRs qemu
    sets, "failed to set MSR 0x10a"), and on some nested hosts a paused probe VM starts
    and quits cleanly while a real guest then never gets through its boot (no console
    output for half an hour, where TCG boots in under a minute). No cheap probe tells
    the second case apart, so KVM is opt-in: ``OPENHNV_VM_KVM=1`` still asks qemu itself
    first (a paused microvm with ``-cpu host``, ~40 ms).
    """
    if os.environ.get(KVM_ENV) != "1":
        return False
    if not os.access("/dev/kvm", os.R_OK | os.W_OK) or not shutil.which("qemu-system-x86_64"):
        return False
    try:
        proc = subprocess.run(
            ["qemu-system-x86_64", "-accel", "kvm", "-cpu", "host", "-M", "microvm",
             "-m", "64", "-nodefaults", "-display", "none", "-monitor", "stdio", "-S"],
            input="quit\n", capture_output=True, text=True, timeout=20, check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return False
    return proc.returncode == 0


def _venv_bin() -> Path:
    # sys.executable is <venv>/bin/python when run from the venv; keep the symlink path.
    return Path(sys.executable).parent


def cached_dirs(rwdir: Path) -> list[Path]:
    """The directories the guest mounts again with 9p's page cache on: the checkout, the
    venv (when it is not inside the checkout) and the standard library. Never one holding
    the shared read-write directory (that mount would hide it), nor /usr itself (the
    guest's shell runs from it, so it cannot be mounted again)."""
    wanted = [CHECKOUT, _venv_bin().parent.resolve(), Path(sysconfig.get_paths()["stdlib"]).resolve()]
    dirs: list[Path] = []
    for path in wanted:
        if path in (Path("/"), Path("/usr")) or rwdir.resolve().is_relative_to(path):
            continue
        if not any(path.is_relative_to(d) for d in dirs):
            dirs.append(path)
    return dirs


def _find_vng() -> str:
    local = _venv_bin() / "vng"
    if local.exists():
        return str(local)
    found = shutil.which("vng")
    if not found:
        raise FileNotFoundError("vng not found: pip install -e '.[test]' (virtme-ng)")
    return found


def guest_script(
    command: Sequence[str] | str,
    *,
    rwdir: Path,
    cwd: Path = CHECKOUT,
    env: Mapping[str, str] | None = None,
) -> str:
    """The shell script the guest runs: set-up, the command, the exit code into ``rwdir``.

    ``command`` is an argv list (quoted here) or a shell command line (used as is).
    """
    cmdline = command if isinstance(command, str) else shlex.join(command)
    modules = " ".join((*MODULES, *OPTIONAL_MODULES))
    guest_env = {
        IN_VM_ENV: "1",
        RWDIR_ENV: str(rwdir),
        # The tree is read-only in the guest: no bytecode, no pytest cache, and a
        # writable home and hypothesis database on the guest's own tmpfs.
        "HOME": "/tmp/openhnv-home",
        "PYTHONDONTWRITEBYTECODE": "1",
        "PYTEST_ADDOPTS": "-p no:cacheprovider",
        "HYPOTHESIS_STORAGE_DIRECTORY": "/tmp/openhnv-home/hypothesis",
        "PATH": f"{_venv_bin()}:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        **(env or {}),
    }
    exports = "\n".join(f"export {k}={shlex.quote(v)}" for k, v in guest_env.items())
    rc_file = shlex.quote(str(rwdir / EXIT_CODE_FILE))
    cached = " ".join(shlex.quote(str(d)) for d in cached_dirs(rwdir))
    return f"""\
#!/bin/sh
# Generated by netns_lab.vm: runs inside the throw-away VM.
# The read-only trees shared a second time (--rodir) are mounted again with the page
# cache on. A tree that cannot be unmounted stays as it is (uncached, still correct);
# one unmounted but not mounted again shows through the root: the same files, uncached.
cd /
for dir in {cached}; do
    tag=$(awk -v d="$dir" '$2 == d && $3 == "9p" {{print $1}}' /proc/mounts)
    [ -n "$tag" ] && umount "$dir" 2>/dev/null &&
        mount -t 9p -o ro,trans=virtio,version=9p2000.L,msize=512000,cache=loose "$tag" "$dir" || true
done
# Modules first: the command may expect gretap, VLAN, bond, VRF devices to be creatable
# without relying on autoload. A module the kernel lacks is not fatal here; the feature
# probe inside the tests says what is missing.
for m in {modules}; do modprobe -q "$m" 2>/dev/null || true; done
ip link set lo up
mkdir -p /run/netns
{exports}
mkdir -p "$HOME" "$HYPOTHESIS_STORAGE_DIRECTORY"
cd {shlex.quote(str(cwd))} || {{ echo 126 > {rc_file}; exit 126; }}
# In a subshell: an `exit` in a shell command line must still reach the lines below.
(
{cmdline}
)
rc=$?
# Written to the shared directory as well: some vng versions lose the guest's exit code.
echo "$rc" > {rc_file}
sync
exit "$rc"
"""


def vng_command(
    script: Path,
    *,
    rwdir: Path,
    kernel: Path,
    kvm: bool,
    memory: str = "2G",
    cpus: int = 2,
) -> list[str]:
    """The ``vng`` argv that boots ``kernel`` and runs ``script`` with ``rwdir`` writable."""
    cmd = [_find_vng(), "--run", str(kernel)]
    if not kvm:
        cmd.append("--disable-kvm")
    cmd += [
        "--memory", memory,
        "--cpus", str(cpus),
        "--rwdir", str(rwdir),
        *(arg for path in cached_dirs(rwdir) for arg in ("--rodir", str(path))),
        "--cwd", str(CHECKOUT),
        "--exec", f"sh {shlex.quote(str(script))}",
    ]
    return cmd


def _print_through(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


def _relay(proc: subprocess.Popen, deadline: float | None, sink: Callable[[str], None]) -> bool:
    """Pass ``proc``'s output to ``sink`` as it comes; False if ``deadline`` passed first."""
    assert proc.stdout is not None
    fd = proc.stdout.fileno()
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    with selectors.DefaultSelector() as selector:
        selector.register(fd, selectors.EVENT_READ)
        while True:
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                return False
            if not selector.select(remaining):
                continue
            data = os.read(fd, 65536)
            if not data:  # EOF: vng, qemu and everything they started are gone
                sink(decoder.decode(b"", final=True))
                return True
            sink(decoder.decode(data))


@contextlib.contextmanager
def _sigterm_raises() -> Iterator[None]:
    """Turn SIGTERM into SystemExit while waiting for the VM, so cleanup code runs."""
    if threading.current_thread() is not threading.main_thread():
        yield  # signal handlers can only be set from the main thread
        return

    def _raise(signum, frame):
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, _raise)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@dataclass(frozen=True)
class VMResult:
    """What came back from the guest."""

    returncode: int  # the command's exit code, or vng's when the command never finished
    completed: bool  # the command ran to the end and reported its exit code
    rwdir: Path  # shared directory; holds the exit code and any artefacts
    seconds: float  # wall time including boot
    kvm: bool
    output: str | None = None  # stdout+stderr when run with capture=True


def run_in_vm(
    command: Sequence[str] | str,
    *,
    rwdir: Path | None = None,
    cwd: Path = CHECKOUT,
    env: Mapping[str, str] | None = None,
    kernel: Path | None = None,
    memory: str = "2G",
    cpus: int = 2,
    timeout: float | None = None,
    capture: bool = False,
) -> VMResult:
    """Boot a throw-away VM, run ``command`` in ``cwd`` as root, return its result.

    The VM's output (guest stdout and stderr, vng's messages) streams to this
    process's stdout, or is returned in ``VMResult.output`` if ``capture`` is set. ``rwdir``
    (created under the system temp dir when not given, and left for the caller) is
    writable inside the guest at the same path; the guest also finds it in
    ``$OPENHNV_VM_RWDIR``.
    """
    if rwdir is None:
        rwdir = Path(tempfile.mkdtemp(prefix="openhnv-vm-"))
    rwdir = rwdir.resolve()
    rwdir.mkdir(parents=True, exist_ok=True)
    rc_file = rwdir / EXIT_CODE_FILE
    rc_file.unlink(missing_ok=True)
    script = rwdir / GUEST_SCRIPT_FILE
    script.write_text(guest_script(command, rwdir=rwdir, cwd=cwd, env=env))

    kvm = kvm_usable()
    argv = vng_command(script, rwdir=rwdir, kernel=kernel or newest_kernel(),
                       kvm=kvm, memory=memory, cpus=cpus)
    # vng calls virtme-run by name: the venv's bin must be on PATH.
    host_env = dict(os.environ, PATH=f"{_venv_bin()}:{os.environ.get('PATH', '/usr/bin:/bin')}")
    started = time.monotonic()
    # A session of its own, so a timeout can stop vng and its qemu together. Output
    # always goes through a pipe that we relay: qemu opens /proc/self/fd/1 as a "file"
    # chardev with O_TRUNC, so handing it our stdout directly would truncate a log file
    # that stdout is redirected to (CI logs: the earlier tiers' output vanished).
    proc = subprocess.Popen(
        argv, env=host_env, cwd=CHECKOUT, start_new_session=True,
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )
    deadline = None if timeout is None else started + timeout
    captured: list[str] = []
    try:
        with _sigterm_raises():
            finished = _relay(proc, deadline, captured.append if capture else _print_through)
        if not finished:  # timed out
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    except BaseException:
        # Ctrl-C, SIGTERM (e.g. a test runner's timeout) or any error here: qemu lives in
        # its own session and would otherwise keep running, orphaned, eating a CPU.
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        raise
    finally:
        proc.stdout.close()
    output = "".join(captured)
    seconds = time.monotonic() - started

    try:
        returncode, completed = int(rc_file.read_text().strip()), True
    except (OSError, ValueError):
        # The guest never reported: boot failure, crash or timeout. Never report success.
        returncode, completed = (proc.returncode or 1), False
    return VMResult(returncode, completed, rwdir, seconds, kvm, output if capture else None)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m netns_lab.vm",
        description="Run a command as root inside a throw-away VM booting the distribution kernel.",
    )
    parser.add_argument("--kernel", type=Path, help="kernel image (default: newest /boot/vmlinuz-*)")
    parser.add_argument("--memory", default="2G")
    parser.add_argument("--cpus", type=int, default=2)
    parser.add_argument("--rwdir", type=Path, help="directory shared read-write (default: a temp dir, removed afterwards)")
    parser.add_argument("--timeout", type=float, help="seconds before the VM is killed")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- COMMAND [ARGS...]")
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("no command given")

    kernel = args.kernel or newest_kernel()
    print(f"vm: booting {kernel} to run: {shlex.join(command)}", file=sys.stderr, flush=True)
    result = run_in_vm(command, rwdir=args.rwdir, kernel=kernel, memory=args.memory,
                       cpus=args.cpus, timeout=args.timeout)
    how = "exit code" if result.completed else "guest did not report; vng exit code"
    print(f"vm: {how} {result.returncode} after {result.seconds:.0f} s "
          f"({'KVM' if result.kvm else 'TCG, no KVM'})", file=sys.stderr)
    if args.rwdir is None:
        shutil.rmtree(result.rwdir, ignore_errors=True)
    return result.returncode


if __name__ == "__main__":
    sys.exit(main())
