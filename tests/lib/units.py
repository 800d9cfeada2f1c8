"""Reading the project's systemd units as the tests need them."""

from __future__ import annotations

import re
from pathlib import Path

SYSTEMD = Path(__file__).resolve().parents[2] / "systemd"


def unit_settings(path: Path) -> dict[str, list[str]]:
    """Key -> values of a unit file, continuation lines joined (enough for these units)."""
    settings: dict[str, list[str]] = {}
    text = re.sub(r"\\\n\s*", " ", path.read_text())
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";", "[")):
            continue
        key, _, value = line.partition("=")
        settings.setdefault(key.strip(), []).append(value.strip())
    return settings


def capability_bounding_set(path: Path) -> list[str]:
    """The capabilities a unit's CapabilityBoundingSet= lines leave (merged, as systemd
    merges them), lower case without ``cap_``: what ``setpriv --bounding-set`` takes."""
    names: list[str] = []
    for value in unit_settings(path).get("CapabilityBoundingSet", []):
        names = [] if not value else names + [n.lower().removeprefix("cap_") for n in value.split()]
    return names
