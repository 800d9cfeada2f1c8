"""Unit-tier fixtures.

``live_controller`` starts a real controller (uvicorn on a free loopback port, SQLite under
tmp_path; see tests/lib/controller.py) and stops it after the test::

    def test_something(live_controller):
        ctl = live_controller(hosts=["CON-HyperV6"])   # process=True for the real CLI process
        ctl.admin.get("/v1/hosts")
"""

from __future__ import annotations

import pytest

from tests.lib.controller import LiveController


@pytest.fixture
def live_controller(tmp_path):
    started: list[LiveController] = []

    def start(hosts=(), process: bool = False) -> LiveController:
        ctl = LiveController(tmp_path / f"controller{len(started)}", hosts=hosts, process=process)
        started.append(ctl)
        return ctl.__enter__()

    yield start
    for ctl in reversed(started):
        ctl.__exit__(None, None, None)
