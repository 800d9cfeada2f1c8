"""A TCP service and client run from this process inside a namespace: the lab demo's
and the gateway tests' way to make a real connection across the lab and see the
address each end saw, without starting a process (a new Python costs tens of seconds
under emulation).

    service = TcpService("TenantVM01", "0.0.0.0", 8080, "TenantVM01 (Fabrikam2)")
    tcp_exchange("lab-external", "203.0.113.10", 80)      # -> "TenantVM01 (Fabrikam2)"
    service.peers                                          # ['203.0.113.1']
    http_get("TenantVM01", "203.0.113.1", 80)              # the page's body, or None

The socket is made inside the namespace (agent.netns.in_netns) and stays bound to it;
the threads that use it afterwards run in the caller's namespace.
"""

from __future__ import annotations

import socket
import threading

from agent.netns import in_netns


class TcpService:
    """A TCP service listening in a namespace: answers every connection with `reply` and
    notes the peer address it saw."""

    def __init__(self, netns: str, address: str, port: int, reply: str):
        self.reply = reply.encode()
        self.peers: list[str] = []

        def listen() -> socket.socket:
            return socket.create_server((address, port), reuse_port=False)

        self.server = in_netns(netns, listen)
        self.server.settimeout(0.5)
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while not self.stopping.is_set():
            try:
                conn, peer = self.server.accept()
            except (TimeoutError, OSError):
                continue
            self.peers.append(peer[0])
            with conn:
                conn.sendall(self.reply)

    def close(self) -> None:
        self.stopping.set()
        self.thread.join(timeout=5)
        self.server.close()


def tcp_exchange(netns: str, address: str, port: int, timeout: float = 3.0, send: bytes = b"") -> str | None:
    """Connect from inside `netns`, send `send`, read the answer until the peer closes;
    None when no connection was made."""

    def connect() -> socket.socket | None:
        try:
            return socket.create_connection((address, port), timeout=timeout)
        except OSError:
            return None

    conn = in_netns(netns, connect)
    if conn is None:
        return None
    with conn:
        if send:
            conn.sendall(send)
        chunks = []
        try:
            while chunk := conn.recv(256):
                chunks.append(chunk)
        except OSError:
            pass
    return b"".join(chunks).decode()


def http_get(netns: str, address: str, port: int = 80, path: str = "/", timeout: float = 3.0) -> str | None:
    """The body of an HTTP/1.0 GET made from inside `netns`; None when no connection was
    made or the answer is not a 200."""
    host = f"[{address}]" if ":" in address else address
    answer = tcp_exchange(netns, address, port, timeout,
                          send=f"GET {path} HTTP/1.0\r\nHost: {host}\r\n\r\n".encode())
    if answer is None:
        return None
    head, _, body = answer.partition("\r\n\r\n")
    status = head.split("\r\n", 1)[0].split()
    if len(status) < 2 or status[1] != "200":
        return None
    return body
