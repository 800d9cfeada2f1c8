"""netns_lab.vm: kernel choice, the vng command line and the guest script."""

from __future__ import annotations

import shlex
import subprocess
import time
from pathlib import Path

from netns_lab import vm
from netns_lab.features import MODULES


def test_newest_kernel_sorts_versions_numerically_and_needs_modules(tmp_path):
    boot, modules = tmp_path / "boot", tmp_path / "modules"
    boot.mkdir()
    for release in ("6.1.0-9-amd64", "6.1.0-56-amd64", "6.10.0-1-amd64", "5.10.0-30-amd64"):
        (boot / f"vmlinuz-{release}").touch()
    for release in ("6.1.0-9-amd64", "6.1.0-56-amd64", "5.10.0-30-amd64"):
        (modules / release).mkdir(parents=True)
    # 6.10 would win but has no modules: the guest could not load ip_gre from it.
    assert vm.newest_kernel(boot, modules) == boot / "vmlinuz-6.1.0-56-amd64"


def test_newest_kernel_without_any_says_what_to_install(tmp_path):
    try:
        vm.newest_kernel(tmp_path, tmp_path)
    except FileNotFoundError as e:
        assert "linux-image-amd64" in str(e)
    else:
        raise AssertionError("no kernel found but no error raised")


def test_vng_command_shares_rwdir_and_disables_kvm_when_unusable(tmp_path):
    script = tmp_path / "guest.sh"
    cmd = vm.vng_command(script, rwdir=tmp_path, kernel=Path("/boot/vmlinuz-6.1.0-56-amd64"),
                         kvm=False, memory="2G", cpus=2)
    assert cmd[1:3] == ["--run", "/boot/vmlinuz-6.1.0-56-amd64"]
    assert "--disable-kvm" in cmd
    assert cmd[cmd.index("--rwdir") + 1] == str(tmp_path)
    assert cmd[cmd.index("--memory") + 1] == "2G" and cmd[cmd.index("--cpus") + 1] == "2"
    assert cmd[cmd.index("--exec") + 1] == f"sh {script}"
    with_kvm = vm.vng_command(script, rwdir=tmp_path, kernel=Path("/k"), kvm=True)
    assert "--disable-kvm" not in with_kvm


def test_the_checkout_is_shared_again_for_the_page_cache_unless_it_holds_the_rwdir(tmp_path):
    cmd = vm.vng_command(tmp_path / "guest.sh", rwdir=tmp_path, kernel=Path("/k"), kvm=False)
    rodirs = [cmd[i + 1] for i, arg in enumerate(cmd) if arg == "--rodir"]
    assert str(vm.CHECKOUT) in rodirs
    assert "/" not in rodirs and "/usr" not in rodirs
    script = vm.guest_script(["true"], rwdir=tmp_path)
    remount = script.index("cache=loose")
    assert remount < script.index("\ntrue\n"), "the command ran before the cached mounts"
    assert f"for dir in {vm.CHECKOUT}" in script
    # A shared directory inside the checkout: a second mount of the checkout would hide it.
    inside = vm.CHECKOUT / "build" / "vm-rwdir"
    assert vm.CHECKOUT not in vm.cached_dirs(inside)
    cmd = vm.vng_command(inside / "guest.sh", rwdir=inside, kernel=Path("/k"), kvm=False)
    assert str(vm.CHECKOUT) not in [cmd[i + 1] for i, arg in enumerate(cmd) if arg == "--rodir"]


def test_guest_script_loads_modules_then_runs_the_command_and_records_its_exit(tmp_path):
    script = vm.guest_script(["python", "-m", "pytest", "tests/kernel", "-k", "a b"],
                             rwdir=tmp_path, cwd=Path("/src/openhnv"), env={"EXTRA": "x y"})
    for module in MODULES:
        assert module in script
    lines = script.splitlines()
    command_line = lines.index(shlex.join(["python", "-m", "pytest", "tests/kernel", "-k", "a b"]))
    assert lines.index("for m in " + " ".join((*MODULES, *vm.OPTIONAL_MODULES))
                       + '; do modprobe -q "$m" 2>/dev/null || true; done') < command_line
    assert "cd /src/openhnv || " in script
    assert f"echo \"$rc\" > {tmp_path / vm.EXIT_CODE_FILE}" in script
    assert "export OPENHNV_IN_VM=1" in script
    assert "export PYTHONDONTWRITEBYTECODE=1" in script
    assert "export PYTEST_ADDOPTS='-p no:cacheprovider'" in script
    assert "export EXTRA='x y'" in script


def test_guest_script_runs_and_propagates_exit_code(tmp_path):
    # The script is plain sh: run it here (without the VM) with modprobe/ip made
    # harmless, and check it records the command's exit status.
    fakebin = tmp_path / "bin"
    fakebin.mkdir()
    for tool in ("modprobe", "ip"):
        (fakebin / tool).write_text("#!/bin/sh\nexit 0\n")
        (fakebin / tool).chmod(0o755)
    # HOME and the hypothesis directory too: the script creates them.
    script = vm.guest_script("test \"$OPENHNV_IN_VM\" = 1 && exit 7", rwdir=tmp_path, cwd=tmp_path,
                             env={"HOME": str(tmp_path / "home"),
                                  "HYPOTHESIS_STORAGE_DIRECTORY": str(tmp_path / "hypothesis")})
    script = script.replace("mkdir -p /run/netns", ":")  # not ours to create on the host
    proc = subprocess.run(["sh", "-c", script], env={"PATH": f"{fakebin}:/usr/bin:/bin"},
                          capture_output=True, text=True)
    assert proc.returncode == 7, proc.stderr
    assert (tmp_path / vm.EXIT_CODE_FILE).read_text().strip() == "7"


def test_relay_passes_output_through_and_reports_eof():
    proc = subprocess.Popen(["sh", "-c", "printf 'boot\\n'; printf 'r\\303\\251sultat'"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    seen: list[str] = []
    assert vm._relay(proc, None, seen.append) is True
    proc.wait()
    assert "".join(seen) == "boot\nrésultat"


def test_relay_gives_up_at_the_deadline():
    proc = subprocess.Popen(["sleep", "30"], stdout=subprocess.PIPE)
    try:
        started = time.monotonic()
        assert vm._relay(proc, started + 0.3, lambda text: None) is False
        assert time.monotonic() - started < 5
    finally:
        proc.kill()
        proc.wait()
