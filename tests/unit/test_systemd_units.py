"""The systemd units in systemd/: they verify, they are hardened, and stopping the agent
cannot tear the data plane down.

``systemd-analyze verify`` checks a unit the way systemd would load it, including that
the ExecStart binary exists and is executable. The units point at /opt/openhnv/bin (the
venv an installation creates); the tests verify copies that point at this checkout's
venv instead, so the real console scripts are what gets checked.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.lib.units import SYSTEMD, unit_settings

CHECKOUT = Path(__file__).resolve().parents[2]
UNITS = ("hnv-agent.service", "hnv-controller.service")
INSTALLED_BIN = "/opt/openhnv/bin"
VENV_BIN = Path(sys.executable).parent


def _analyze() -> str:
    found = shutil.which("systemd-analyze")
    if not found:
        pytest.fail("systemd-analyze is missing: install Debian's systemd package (make setup)",
                    pytrace=False)
    return found


def _install_copy(directory: Path, *, with_lab_dropin: bool = False) -> dict[str, Path]:
    """Copies of the units with ExecStart pointing at this venv's console scripts."""
    directory.mkdir(parents=True, exist_ok=True)
    copies = {}
    for name in UNITS:
        text = (SYSTEMD / name).read_text().replace(INSTALLED_BIN, str(VENV_BIN))
        copies[name] = directory / name
        copies[name].write_text(text)
    if with_lab_dropin:
        # systemd-analyze picks up <unit>.d/*.conf next to the unit file, as systemd does.
        shutil.copytree(SYSTEMD / "hnv-agent.service.d", directory / "hnv-agent.service.d")
    return copies


def _verify(*units: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([_analyze(), "verify", *map(str, units)], capture_output=True,
                          text=True, check=False, timeout=60, cwd=units[0].parent)


def test_units_verify_without_a_single_complaint(tmp_path):
    copies = _install_copy(tmp_path)
    result = _verify(*copies.values())
    assert result.returncode == 0 and not result.stderr.strip() and not result.stdout.strip(), (
        f"systemd-analyze verify complained:\n{result.stdout}{result.stderr}")


def test_agent_with_lab_namespace_dropin_verifies(tmp_path):
    copies = _install_copy(tmp_path, with_lab_dropin=True)
    result = _verify(copies["hnv-agent.service"])
    assert result.returncode == 0 and not result.stderr.strip(), result.stderr


def test_verify_catches_a_broken_unit(tmp_path):
    # The check above is only worth something if verify does complain: a typo in a key
    # and an executable that does not exist must both be reported.
    copies = _install_copy(tmp_path)
    agent = copies["hnv-agent.service"]
    agent.write_text(agent.read_text().replace("Restart=on-failure", "Restart=on-falure")
                     .replace(f"{VENV_BIN}/hnv-agent", f"{VENV_BIN}/hnv-agent-missing"))
    result = _verify(agent)
    assert result.returncode != 0
    assert "hnv-agent-missing" in result.stderr
    assert "on-falure" in result.stderr


@pytest.mark.parametrize(("unit", "threshold"), [("hnv-agent.service", 25),
                                                  ("hnv-controller.service", 15)])
def test_exposure_stays_low(tmp_path, unit, threshold):
    # systemd's own audit of the sandbox: exposure is 0.0 (locked down) .. 10.0 (none);
    # --threshold is in tenths. The agent needs root's CAP_NET_ADMIN and the host
    # network, so it cannot reach the controller's score.
    copies = _install_copy(tmp_path)
    result = subprocess.run(
        [_analyze(), "security", "--offline=yes", f"--threshold={threshold}", str(copies[unit])],
        capture_output=True, text=True, check=False, timeout=60, cwd=tmp_path)
    overall = re.search(r"Overall exposure level for \S+: ([\d.]+)", result.stdout)
    assert result.returncode == 0, f"{unit}: {overall and overall.group(0)}, above {threshold / 10}"


def test_agent_holds_only_the_network_capabilities_and_cannot_clean_up_on_stop():
    agent = unit_settings(SYSTEMD / "hnv-agent.service")
    # CAP_NET_BIND_SERVICE: the DHCP servers it starts bind port 67; CAP_NET_RAW: their
    # router advertisements (tests/netns/test_dhcp_under_the_unit.py starts them under it).
    assert agent["CapabilityBoundingSet"] == ["CAP_NET_ADMIN CAP_NET_BIND_SERVICE CAP_NET_RAW"]
    assert agent["NoNewPrivileges"] == ["yes"]
    assert agent["RestrictAddressFamilies"] == ["AF_NETLINK AF_INET AF_INET6 AF_UNIX"]
    assert agent["Restart"] == ["on-failure"]
    # Stop = SIGTERM to the agent only; no ExecStop that could tear the data plane down.
    assert agent["KillMode"] == ["mixed"]
    assert "ExecStop" not in agent and "ExecStopPost" not in agent
    controller = unit_settings(SYSTEMD / "hnv-controller.service")
    assert controller["CapabilityBoundingSet"] == [""]
    assert controller["User"] == ["openhnv"]


@pytest.mark.parametrize("unit", UNITS)
def test_execstart_uses_only_flags_the_command_accepts(unit):
    settings = unit_settings(SYSTEMD / unit)
    argv = settings["ExecStart"][0].split()
    binary = Path(argv[0].replace(INSTALLED_BIN, str(VENV_BIN)))
    help_text = subprocess.run([str(binary), argv[1], "--help"], capture_output=True,
                               text=True, check=False, timeout=60).stdout
    flags = [a for a in argv[2:] if a.startswith("--")]
    assert flags
    unknown = [flag for flag in flags if flag not in help_text]
    assert not unknown, f"{unit}: {binary.name} {argv[1]} does not accept {unknown}"


@pytest.mark.parametrize(("unit", "example"), [("hnv-agent.service", "agent.env.example"),
                                               ("hnv-controller.service", "controller.env.example")])
def test_env_example_defines_every_variable_the_unit_uses(unit, example):
    used = set(re.findall(r"\$\{(\w+)\}", (SYSTEMD / unit).read_text()))
    defined = {line.split("=", 1)[0] for line in (SYSTEMD / example).read_text().splitlines()
               if line and not line.startswith("#")}
    assert used and used <= defined, f"{example} lacks {sorted(used - defined)}"


@pytest.mark.parametrize("unit", UNITS)
def test_units_are_supervised_by_notify_and_watchdog(unit):
    # The daemons send READY=1 and WATCHDOG=1 themselves (agent.sd_notify; the protocol
    # is tested in test_sd_notify.py); the unit must ask systemd to listen to the main
    # process only and to restart the service when the pings stop.
    settings = unit_settings(SYSTEMD / unit)
    assert settings["Type"] == ["notify"]
    assert settings["NotifyAccess"] == ["main"]
    assert settings["WatchdogSec"] == ["30s"]
    assert settings["Restart"] == ["on-failure"]
