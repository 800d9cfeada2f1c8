"""hnv-controller run refuses a state directory that group or others can enter, and says why."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

CHECKOUT = Path(__file__).resolve().parents[2]


def _controller(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "controller.cli", *args], cwd=CHECKOUT,
                          capture_output=True, text=True, timeout=60, check=False)


@pytest.mark.parametrize("mode", [0o750, 0o705, 0o777])
def test_run_refuses_a_state_dir_open_to_group_or_others(tmp_path, mode):
    state = tmp_path / "controller"
    state.mkdir(mode=0o755)
    assert _controller("init", "--state-dir", str(state), "--host", "CON-HyperV6").returncode == 0
    assert state.stat().st_mode & 0o777 == 0o700  # init makes it owner-only, whoever made it
    state.chmod(mode)
    proc = _controller("run", "--state-dir", str(state), "--listen", "127.0.0.1:0")
    assert proc.returncode == 2
    assert proc.stderr.strip() == (
        f"{state}: mode {mode:04o} lets group or others in; the controller's store and tokens "
        f"must be owner-only: chmod 0700 {state}")
    assert state.stat().st_mode & 0o777 == mode  # refused, not "fixed" behind the operator's back


def test_run_refuses_a_token_file_others_can_read(tmp_path):
    state = tmp_path / "controller"
    assert _controller("init", "--state-dir", str(state), "--host", "CON-HyperV6").returncode == 0
    token = state / "admin.token"
    token.chmod(0o644)
    proc = _controller("run", "--state-dir", str(state), "--listen", "127.0.0.1:0")
    assert proc.returncode == 2
    assert proc.stderr.strip() == (
        f"{token}: mode 0644 lets group or others in; the controller's store and tokens "
        f"must be owner-only: chmod 0600 {token}")
