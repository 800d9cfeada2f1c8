"""Running a command-line entry point inside the test's own process.

Under TCG emulation a new Python interpreter costs tens of seconds of imports (minutes on
a loaded machine); the kernel tier calls ``hnv-agent`` and ``hnv-lab`` through their real
``main`` functions instead, with stdout and stderr captured, wherever the command does not
need a process of its own (a command the test kills, or one that forks daemons, still
runs as a subprocess).
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Callable, Sequence
from dataclasses import dataclass


@dataclass
class CliResult:
    returncode: int
    stdout: str
    stderr: str


def run_main(main: Callable[[list[str]], int], args: Sequence[str]) -> CliResult:
    """``main(args)`` with its output captured, as a subprocess's result would read."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(list(args))
        except SystemExit as exc:  # argparse refusals
            code = exc.code if isinstance(exc.code, int) else 2
    return CliResult(code, out.getvalue(), err.getvalue())
