"""Waiting on a condition in tests: poll until it holds or fail saying what was awaited."""

from __future__ import annotations

import time


def wait_until(predicate, timeout: float, what: str, interval: float = 0.1):
    """`predicate()`'s first truthy value, polled every `interval` s for up to `timeout` s."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")
