"""How every capture of the project runs tcpdump: one place for the flags that decide
whether a capture holds what crossed the wire.

``--immediate-mode`` hands each packet to tcpdump at once: otherwise libpcap holds
packets in its ring until a block fills or times out, and a capture stopped right after
a short ping holds nothing. ``-U`` writes each packet to the file as it arrives. Kept
free of heavy imports: the test helpers and the multi-kernel lab use it too.
"""

from __future__ import annotations

from pathlib import Path


def tcpdump_argv(interface: str, pcap: Path, bpf_filter: str = "", *extra: str) -> list[str]:
    """tcpdump capturing on ``interface`` into ``pcap``; ``extra`` goes before the filter."""
    argv = ["tcpdump", "-i", interface, "-n", "-U", "--immediate-mode", *extra, "-w", str(pcap)]
    return argv + bpf_filter.split()
