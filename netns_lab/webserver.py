"""The external network's web server: it answers every GET with the caller's address.

The lab's external namespace (topology ``external``) stands for the Internet behind the
HNV gateway's front-end. A tenant VM that fetches its page learns the address it
arrived from, which is what a user checks of NAT: ``ip netns exec TenantVM01 wget -qO-
http://203.0.113.1/`` prints ``you came from 203.0.113.10``, Fabrikam2's NAT address,
and TenantVM03 of Fabrikam3 (the same CA) ``203.0.113.11``. Each request is also one
logfmt line in its log (``event=http_request client=... path=...``).

Standard library only (http.server): the lab forks it from its own process like the
daemons (netns_lab.processes.spawn), so it costs no interpreter start under emulation;
``python -m netns_lab.webserver --listen 203.0.113.1:80`` is the same program.
"""

from __future__ import annotations

import argparse
import ipaddress
import socket
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from agent.logfmt import quote


def answer(server_address: str, client: str) -> str:
    """The page: who answered and the address the caller came from (its last line)."""
    return f"hello from the external network ({server_address})\nyou came from {client}\n"


def came_from(page: str) -> str | None:
    """The caller's address in a page of :func:`answer`, or None if it is not one."""
    lines = page.strip().splitlines()
    if not lines or not lines[-1].startswith("you came from "):
        return None
    return lines[-1].removeprefix("you came from ").strip()


class _Handler(BaseHTTPRequestHandler):
    server_version = "openhnv-lab-external"

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        body = answer(self.server.server_address[0], self.client_address[0]).encode()
        self.send_response(200)
        self.send_header("Content-Type", "text/plain; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args) -> None:  # noqa: A002 - http.server's name
        # The path is what a client sent: quoted, so it cannot forge log lines.
        print(f"event=http_request client={self.client_address[0]} path={quote(self.path[:200])}",
              flush=True)


def _listen(text: str) -> tuple[str, int]:
    address, _, port = text.rpartition(":")
    try:
        ipaddress.ip_address(address.strip("[]"))
        number = int(port)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not ADDRESS:PORT") from None
    if not 1 <= number <= 65535:
        raise argparse.ArgumentTypeError(f"port {number} is outside 1..65535")
    return address.strip("[]"), number


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m netns_lab.webserver", description=__doc__.splitlines()[0])
    parser.add_argument("--listen", type=_listen, required=True, metavar="ADDRESS:PORT")
    args = parser.parse_args(argv)
    server_class = type("Server", (ThreadingHTTPServer,), {
        "address_family": socket.AF_INET6 if ":" in args.listen[0] else socket.AF_INET})
    server = server_class(args.listen, _Handler)
    print(f"event=listening address={args.listen[0]} port={args.listen[1]}", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
