"""An agent's watch stream over a management path that goes away and comes back, on this
kernel: a real controller (`hnv-controller run`, its TCP_USER_TIMEOUT from
--gateway-failover-after) in one namespace, the agent's own WatchStream in another,
a veth between them.

What happens when a host's first apply moves its management address onto its team and
switch: the path carries nothing for a while, the controller's heartbeats go
unacknowledged and it drops the connection, telling no one. The agent, which only
reads, used to sit on the dead connection until three heartbeats were missed, while
the controller counted the host silent (and failed its gateway role over). With TCP
keepalive on the agent's connections (agent.watch.KEEPALIVE_SOCKET_OPTIONS) the first
probe after the path is back is answered with a reset, and the watch reconnects at once.
"""

from __future__ import annotations

import threading
import time

from agent.netns import entered_netns, in_netns
from agent.watch import Backoff, ControllerEndpoint, WatchStream
from tests.lib.controller import LiveController
from tests.lib.netns import veth_pair
from tests.lib.seed_fabric import VIRTUAL_HOSTS, build_seed_fabric
from tests.lib.wait import wait_until

HOST = "CON-HyperV6"
CONTROLLER_IP, AGENT_IP = "10.99.0.1", "10.99.0.2"
HEARTBEAT = 5.0  # the agent's default: three missed ones are 15 s of blindness
FAILOVER_AFTER = 1.0  # the controller's TCP_USER_TIMEOUT: it drops an unacknowledged stream after 1 s


def sockets(namespace, port: int, state: str = "established") -> list[str]:
    """The controller's TCP sockets on `port` to the agent in `state` (ss, in its
    namespace; the test's admin client has its own)."""
    out = namespace.run("ss", "-Htn", "state", state, f"( sport = :{port} )").stdout
    return [line for line in out.splitlines() if f" {AGENT_IP}:" in line]


def test_a_stream_the_controller_dropped_while_the_path_was_down_is_reconnected_once_it_is_back(
        make_netns, tmp_path):
    controller_ns, agent_ns = make_netns.create(), make_netns.create()
    veth_pair(controller_ns, "mgmt0", agent_ns, "mgmt0")
    controller_ns.ip("addr", "add", f"{CONTROLLER_IP}/24", "dev", "mgmt0")
    agent_ns.ip("addr", "add", f"{AGENT_IP}/24", "dev", "mgmt0")
    for namespace in (controller_ns, agent_ns):
        namespace.ip("link", "set", "lo", "up")

    ctl = LiveController(tmp_path / "state", hosts=VIRTUAL_HOSTS, process=True, address=CONTROLLER_IP,
                         run_args=("--gateway-failover-after", f"{FAILOVER_AFTER:g}"))
    with entered_netns(controller_ns.name):  # the process and the test's admin client live there
        ctl.__enter__()
    watch = None
    try:
        with entered_netns(controller_ns.name):
            build_seed_fabric(ctl.admin)
        states: list = []
        endpoint = ControllerEndpoint(ctl.base_url, HOST, ctl.host_token(HOST))
        watch = WatchStream(endpoint, on_state=states.append, heartbeat=HEARTBEAT,
                            backoff=Backoff(initial=0.1, cap=0.2))
        thread = threading.Thread(target=in_netns, args=(agent_ns.name, watch.run), daemon=True)
        thread.start()
        wait_until(lambda: states, 30, "the host's state")
        assert len(sockets(controller_ns, ctl.port)) == 1

        # The management address moves: nothing crosses until it is back.
        agent_ns.ip("link", "set", "mgmt0", "down")
        # The controller's next heartbeat (within 5 s) goes unacknowledged: dropped 1 s
        # later, and forgotten (no socket in any state: nothing is retransmitted that
        # would tell the agent once the path is back).
        wait_until(lambda: not sockets(controller_ns, ctl.port, "all"), 6 * HEARTBEAT,
                   "the controller to forget the stream")
        # Its kernel may still hold that heartbeat in the neighbour queue for the agent's
        # address (a packet waits there while ARP resolves) and deliver it when the link
        # is back, which would tell the agent by itself; a path down for longer than the
        # queue lives (3 s of ARP probes) delivers nothing. Flushed: nothing arrives.
        controller_ns.ip("neigh", "flush", "dev", "mgmt0")
        agent_ns.ip("link", "set", "mgmt0", "up")
        back = time.monotonic()
        wait_until(lambda: len(states) >= 2, 3 * HEARTBEAT * 2, "the state on a new stream")
        took = time.monotonic() - back
        # Without keepalive: three heartbeats after the last one received (15 s; the drop
        # came about 6 s after it), so about 9 s after the path was back (measured: 9.0 s;
        # with: 1.1 s, the probe interval).
        assert took < HEARTBEAT, f"the watch reconnected {took:.1f} s after the path was back"
        assert len(sockets(controller_ns, ctl.port)) == 1
    finally:
        if watch is not None:
            watch.stop()
        with entered_netns(controller_ns.name):
            ctl.__exit__(None, None, None)
