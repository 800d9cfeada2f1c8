"""Reading a continuous ping's output: what the labs' no-loss checks count.

A ping stopped with SIGINT prints its statistics at once: an echo sent a moment before
is counted as transmitted and never as received, though nothing lost it. So a no-loss
check counts by sequence number and leaves out the echoes sent in the last
PING_IN_FLIGHT seconds; the caller keeps the ping running that long past what it
measures.
"""

from __future__ import annotations

import re

# Echoes sent in the last seconds before a ping is stopped may still be in flight.
PING_IN_FLIGHT = 2.0
PING_RE = re.compile(r"(\d+) packets transmitted, (\d+) (?:packets )?received")


def ping_summary(output: str) -> dict:
    """ping's own summary: transmitted, received, loss; the last lines kept for the report."""
    match = PING_RE.search(output)
    transmitted, received = (int(match.group(1)), int(match.group(2))) if match else (0, 0)
    return {"transmitted": transmitted, "received": received, "lost": transmitted - received,
            "summary": "\n".join(output.strip().splitlines()[-2:])}


def ping_losses(output: str, interval: float) -> tuple[int, int, list[int]]:
    """(sent, answered, echoes lost) from a ping stopped by SIGINT; the echoes sent in the
    last PING_IN_FLIGHT seconds before it stopped are not counted as lost."""
    sent = ping_summary(output)["transmitted"]
    answered = {int(seq) for seq in re.findall(r"icmp_seq=(\d+) ttl=", output)}
    settled = sent - int(PING_IN_FLIGHT / interval)
    return sent, len(answered), [seq for seq in range(1, settled + 1) if seq not in answered]
