"""The lab's capture sees a short ping even when it is stopped right after it.

libpcap holds packets in its ring until a block fills or times out; without immediate
mode a capture stopped at once after `ping -c 3 -i 0.2` held nothing at all, which made
the demo's wire checks depend on how slow the machine was.
"""

from __future__ import annotations

from netns_lab.capture import Capture
from tests.lib.netns import veth_pair


def test_capture_stopped_right_after_a_short_ping_holds_every_frame(make_netns, tmp_path):
    a, b = make_netns(), make_netns()
    veth_pair(a, "veth-a", b, "veth-b")
    a.ip("addr", "add", "10.99.0.1/24", "dev", "veth-a")
    b.ip("addr", "add", "10.99.0.2/24", "dev", "veth-b")
    assert a.ping("10.99.0.2"), "the peer must answer before the capture proves anything"

    capture = Capture(b.name, "veth-b", tmp_path / "short.pcap", bpf_filter="icmp").start()
    a.run("ping", "-c", "3", "-i", "0.2", "-q", "10.99.0.2")
    frames = capture.stop()

    requests = [f for f in frames if "echo-request" in f.what and f.inner_dst == "10.99.0.2"]
    replies = [f for f in frames if "echo-reply" in f.what and f.inner_dst == "10.99.0.1"]
    assert (len(requests), len(replies)) == (3, 3), [f.line() for f in frames]
