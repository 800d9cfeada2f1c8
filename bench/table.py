"""One row per figure, and the plain-text table `make bench` prints.

Owns the shape of a measurement (what, value, baseline, ratio, target, verdict) and its
rendering; measures nothing itself.
"""

from __future__ import annotations

import resource
import time
from dataclasses import dataclass

from agent.text import format_table


@dataclass(frozen=True)
class Row:
    """One figure. ``met`` is None when the row has no target (a baseline, a detail)."""

    section: str
    what: str
    value: str
    baseline: str = ""
    ratio: str = ""
    target: str = ""
    met: bool | None = None

    @property
    def verdict(self) -> str:
        return {None: "", True: "ok", False: "MISSED"}[self.met]


HEADINGS = ("section", "what", "value", "baseline", "ratio", "target", "")


def render(rows: list[Row]) -> str:
    return format_table(HEADINGS, [(r.section, r.what, r.value, r.baseline, r.ratio, r.target, r.verdict)
                                   for r in rows], gap=" | ", rule_gap="-+-", rule_under_header_only=False)


def rate(count: int, seconds: float, unit: str = "records/s") -> str:
    return f"{count / seconds:,.0f} {unit}" if seconds > 0 else "inf"


def seconds(value: float) -> str:
    return f"{value * 1000:,.1f} ms" if value < 1 else f"{value:,.2f} s"


@dataclass(frozen=True)
class Timing:
    """Wall-clock seconds and CPU seconds (user + system, this process and its waited-for
    children). The kernel's netlink work runs in the sending or receiving process, so CPU
    time is what a method costs even when other work shares the machine; wall time is
    what a user waits."""

    wall: float
    cpu: float

    def best(self, other: Timing | None) -> Timing:
        if other is None:
            return self
        return Timing(min(self.wall, other.wall), min(self.cpu, other.cpu))


class Stopwatch:
    """``with Stopwatch() as watch: ...`` then ``watch.timing``."""

    timing: Timing

    def __enter__(self) -> Stopwatch:
        self._cpu = _cpu_seconds()
        self._wall = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        self.timing = Timing(time.perf_counter() - self._wall, _cpu_seconds() - self._cpu)


def _cpu_seconds() -> float:
    own = resource.getrusage(resource.RUSAGE_SELF)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime
