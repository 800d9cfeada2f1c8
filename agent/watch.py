"""The agent's side of the controller protocol: the watch stream in, the sync status out.

Owns the HTTP conversation with the controllers and nothing else:

- ``controller_urls`` reads and checks the controller URLs an operator gives (several
  replicas of one fabric, comma- or space-separated or repeated); ``ControllerEndpoint``
  holds them, the one in use, the host name and the token. The agent talks to one
  controller at a time. Each host ranks the controllers by a hash of (host, URL)
  (rendezvous hashing): it starts on its first, and ``move_on`` passes to its next one,
  wrapping round, and logs ``event=controller_switch from=... to=...``. So a fleet
  spreads evenly over the replicas, a host returns to the same one after a restart, and
  the hosts of a replica that dies spread evenly over the others instead of all landing
  on the one listed after it.

- ``WatchStream`` follows ``GET /v1/hosts/{host}/state?watch=1`` (NDJSON, never closed by
  the server) of the controller in use, in its own thread. It hands every ``state``
  message's document to a callback as it came, undecoded beyond JSON: deciding whether to
  hold it is intake's job, applying it the loop's. A stream that stays silent longer than a few heartbeats is dead
  (a half-open TCP connection never says so): the read timeout is ``heartbeat x
  missed_heartbeats``; a connection the controller has forgotten (it dropped it while the
  path was down) is found sooner, by TCP keepalive (``KEEPALIVE_SOCKET_OPTIONS``): the
  first probe after the path is back is answered with a reset. Every way a connection ends (refused, 4xx, 5xx, timeout, garbage on
  the line) leads to the same place: move on to the next controller (the same one when
  there is only one) and connect after a capped exponential backoff with jitter, so a
  thousand agents do not hammer a controller that just came back. A connection the
  controller answered with an error status is kept (HTTP keep-alive) for the next try at
  that controller, so an agent waiting to be added costs it a request per retry, not a
  TLS handshake; any other end closes it. Replicas of one fabric
  serve the same generations, so the agent resumes where it was: intake holds what it has
  when the next one sends the same generation, and ignores an older one. Anything
  else (a callback that raises, a bug) ends ``run`` with the exception: in the agent the
  thread runs under agent.supervision, which logs it, counts it and starts ``run`` again.
- ``StatusReporter`` sends ``PUT /v1/hosts/{host}/status`` from its own thread to the
  controller the watch uses, latest status wins, retried with the same backoff until a
  controller has it.

A failed or empty fetch produces no document at all; nothing here can turn an outage into
"the desired state is empty", and while no controller answers nothing reaches the loop.
The bearer token goes into a header and nowhere else: it is never logged, never part of a
URL or an exception message.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import random
import re
import socket
import ssl
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from importlib import metadata
from typing import Any
from urllib.parse import urlsplit

import httpx

from agent.logfmt import quote as _quote
from agent.text import printable

log = logging.getLogger(__name__)

try:
    AGENT_VERSION = metadata.version("openhnv")
except metadata.PackageNotFoundError:  # running from a checkout that was not installed
    AGENT_VERSION = "0.0.0"
AGENT_NAME = "openhnv-agent/" + ".".join(AGENT_VERSION.split(".")[:2])

# TCP keepalive on every connection to a controller: a probe after KEEPALIVE_IDLE_S
# without traffic, then one a second, KEEPALIVE_PROBES unanswered end it. Why: a
# controller that dropped its end while the path was down (its TCP_USER_TIMEOUT, when
# this host's first apply moved its management address) sends nothing to say so, and
# the watch, which only reads, would sit on a dead connection until three heartbeats
# were missed (15 s) while the controller counts the host silent. The first probe
# after the path is back is answered with a reset: the watch reconnects within a
# second. A live connection's probes are answered by the controller's kernel.
KEEPALIVE_IDLE_S = 1
KEEPALIVE_PROBES = 10
KEEPALIVE_SOCKET_OPTIONS = (
    (socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1),
    (socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, KEEPALIVE_IDLE_S),
    (socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, 1),
    (socket.IPPROTO_TCP, socket.TCP_KEEPCNT, KEEPALIVE_PROBES),
)

# How long the agent keeps an idle connection to a controller: under the controller's
# 60 s (controller.cli), so the client lets go first and never sends on a connection
# the server is closing.
KEEPALIVE_EXPIRY_S = 55.0


@dataclass(frozen=True)
class Backoff:
    """Capped exponential backoff with "equal jitter": half fixed, half random.

    Attempt n waits between d/2 and d, d = min(cap, initial * 2**n): never zero (no
    hot loop), never more than the cap, and agents restarted together drift apart.
    """

    initial: float = 0.5
    cap: float = 30.0

    def delay(self, attempt: int, rng: Callable[[], float] = random.random) -> float:
        ceiling = min(self.cap, self.initial * (2 ** min(attempt, 32)))
        return ceiling / 2 + rng() * ceiling / 2


def describe_error_response(response: httpx.Response) -> str:
    """One line from a controller error body ({"error", "field", "reason"}), else the status."""
    try:
        body = response.json()
    except ValueError:
        body = None
    if isinstance(body, dict) and body.get("error"):
        text = str(body["error"])
        if body.get("field"):
            text += f" (field {body['field']})"
        return text
    return f"HTTP {response.status_code} {response.reason_phrase}".strip()


# Between two URLs in one value: commas, whitespace, or both (an env file's "a, b c").
_URL_SEPARATORS = re.compile(r"[,\s]+")


def controller_urls(values: str | Iterable[str]) -> tuple[str, ...]:
    """The controller URLs in ``values`` (each value may hold several, comma- or
    space-separated), checked, in the order given, without repeats or trailing slashes.

    Raises ValueError naming the first bad URL and why: not http:// or https://, no host,
    a bad port, credentials, a query or a fragment in it, a control character; or no URL
    at all. A URL is shown escaped (agent.text.printable): it may come from anywhere.
    Plain http:// stays allowed, as before, for controllers run with --insecure-http.
    """
    texts = [values] if isinstance(values, str) else list(values)
    urls: list[str] = []
    for text in texts:
        for url in _URL_SEPARATORS.split(text.strip()):
            if not url:
                continue
            shown = printable(url)
            if any(not char.isprintable() for char in url):
                raise ValueError(f"controller URL '{shown}' holds a control character")
            if not url.startswith(("http://", "https://")):
                raise ValueError(f"controller URL '{shown}' must start with http:// or https://")
            try:
                parts = urlsplit(url)
                parts.port  # raises on a port that is not a number in 0..65535
            except ValueError as exc:
                raise ValueError(f"controller URL '{shown}': {exc}") from None
            if not parts.hostname:
                raise ValueError(f"controller URL '{shown}' names no host")
            if parts.username is not None or parts.password is not None:
                raise ValueError(f"controller URL {printable(parts.scheme)}://...@{printable(parts.hostname)} "
                                 "must not hold credentials (the token goes in a file, never in a URL)")
            if parts.query or parts.fragment:
                raise ValueError(f"controller URL '{shown}' must not have a query or a fragment")
            url = url.rstrip("/")
            if url not in urls:
                urls.append(url)
    if not urls:
        raise ValueError("no controller URL given")
    return tuple(urls)


@functools.cache
def default_trust() -> ssl.SSLContext:
    """httpx's default trust store, built once for the process: given `verify=True`,
    httpx builds it again for every client it makes (56 ms of CPU here, over a second
    under emulation), which an agent whose controller is down did at every retry."""
    return httpx.create_ssl_context()


class ControllerEndpoint:
    """Where the controllers are and how to authenticate: their URLs, the one in use, the
    host name, bearer token, and the CA file that signed the controllers' certificates
    (https:// URLs; without one, the system's CAs are trusted).

    ``url`` is the controller in use; ``move_on(reason)`` makes the next one the one in
    use, logs the switch and calls ``on_switch(from_url, to_url, reason)`` (metrics).
    Shared by the watch and the status reporter, so both talk to the same controller.
    """

    def __init__(
        self,
        url: str | Iterable[str],
        host: str,
        token: str,
        ca_file: str | None = None,
        on_switch: Callable[[str, str, str], None] = lambda old, new, reason: None,
    ):
        self.urls = controller_urls(url)
        if not token:
            raise ValueError("the host token is empty")
        self.host = host
        self.on_switch = on_switch
        # This host's order of the controllers (rendezvous hashing; see the module).
        # (A cryptographic digest because CRC32's output for near-identical inputs is
        # correlated: the ranking must look random across hosts.)
        self.order = tuple(sorted(self.urls, key=lambda each: hashlib.blake2b(f"{host}\0{each}".encode()).digest()))
        self._index = 0
        self._lock = threading.Lock()
        self._headers = {"Authorization": f"Bearer {token}", "User-Agent": AGENT_NAME}
        # Loaded once, here: an unreadable CA file is a start-up error, not a retry loop.
        self._verify = ssl.create_default_context(cafile=ca_file) if ca_file else default_trust()

    def __repr__(self) -> str:  # never show the token
        return f"ControllerEndpoint(url={self.url!r}, host={self.host!r})"

    @property
    def url(self) -> str:
        """The controller in use."""
        return self.order[self._index]

    def move_on(self, reason: str) -> str:
        """Make this host's next controller the one in use (the same one when there is
        only one); returns its URL."""
        with self._lock:
            old = self.url
            self._index = (self._index + 1) % len(self.order)
            new = self.url
        if new != old:
            log.warning("event=controller_switch from=%s to=%s reason=%s", _quote(old), _quote(new), _quote(reason))
            self.on_switch(old, new, reason)
        return new

    def state_path(self) -> str:
        return f"/v1/hosts/{self.host}/state"

    def status_path(self) -> str:
        return f"/v1/hosts/{self.host}/status"

    def client(self, timeout: httpx.Timeout) -> httpx.Client:
        """A client of the controller in use."""
        # A kept connection stays usable as long as the controller keeps it (a minute:
        # controller.cli); httpx's own default would drop it after 5 s idle.
        transport = httpx.HTTPTransport(verify=self._verify, limits=httpx.Limits(keepalive_expiry=KEEPALIVE_EXPIRY_S),
                                        socket_options=KEEPALIVE_SOCKET_OPTIONS)
        return httpx.Client(base_url=self.url, headers=self._headers, timeout=timeout, transport=transport)


class WatchStream:
    """Follows the watch stream of the controller in use in a thread and reconnects
    forever, moving on to the next controller whenever a connection fails or ends.

    Callbacks run on the watch thread and must only record and signal (the reconcile
    loop does the work): ``on_state(document)`` for each state message,
    ``on_connection(connected, reason)`` when the stream comes up or goes down,
    ``on_heartbeat(generation)`` for each heartbeat.
    """

    def __init__(
        self,
        endpoint: ControllerEndpoint,
        *,
        on_state: Callable[[Any], None],
        on_connection: Callable[[bool, str], None] = lambda connected, reason: None,
        on_heartbeat: Callable[[int | None], None] = lambda generation: None,
        heartbeat: float = 5.0,
        missed_heartbeats: int = 3,
        backoff: Backoff = Backoff(),
    ):
        self.endpoint = endpoint
        self.on_state = on_state
        self.on_connection = on_connection
        self.on_heartbeat = on_heartbeat
        self.heartbeat = heartbeat
        self.missed_heartbeats = missed_heartbeats
        self.backoff = backoff
        self.connects = 0  # successful connections so far (a reconnect makes it 2+)
        self._clients: dict[str, httpx.Client] = {}  # per controller URL; used by the watch thread only
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Run in a thread of its own, unsupervised (the agent supervises ``run`` instead)."""
        self._thread = threading.Thread(target=self.run, name="hnv-watch", daemon=True)
        self._thread.start()

    def stop(self, timeout: float | None = None) -> None:
        """Stop reconnecting; a read in progress ends within one read timeout."""
        self._stop.set()
        if self._thread is not None and timeout:
            self._thread.join(timeout)

    def run(self) -> None:
        """Follow the stream until ``stop``; raises only what no reconnect can mend."""
        attempt = 0
        try:
            while not self._stop.is_set():
                received, reason = self._follow_once()
                if self._stop.is_set():
                    break
                # A connection that delivered messages resets the backoff: the controller was
                # fine, the stream merely ended. One that failed before any message backs off,
                # so a fleet whose every controller is down slows down to the cap.
                attempt = 0 if received else attempt + 1
                # Whatever ended the connection (refused, 5xx, missed heartbeats, a 4xx), the
                # next try goes to the next controller: a replica that is going away or
                # misbehaving is left behind, and with one URL this is the same controller.
                self.endpoint.move_on(reason)
                delay = self.backoff.delay(attempt)
                log.info("event=watch_retry delay_s=%.2f attempt=%d controller=%s", delay, attempt, self.endpoint.url)
                self._stop.wait(delay)
        finally:
            for url in list(self._clients):
                self._drop_client(url)

    def _client_of(self, url: str, timeout: httpx.Timeout) -> httpx.Client:
        """The client of controller `url`, kept across attempts: an agent the controller
        answers "not yet" (a host not yet added, a 503) asks again on the same kept-alive
        connection, not with a new TLS handshake each time, which a fleet of waiting
        agents would make the controller pay for every few seconds."""
        client = self._clients.get(url)
        if client is None:
            client = self._clients[url] = self.endpoint.client(timeout)
        return client

    def _drop_client(self, url: str) -> None:
        """Close `url`'s client after a stream that ran or broke: its connection is spent."""
        client = self._clients.pop(url, None)
        if client is not None:
            client.close()

    def _follow_once(self) -> tuple[int, str]:
        """One connection, from connect to its end: the number of messages read, and why
        it ended."""
        read_timeout = self.heartbeat * self.missed_heartbeats
        timeout = httpx.Timeout(connect=5.0, read=read_timeout, write=5.0, pool=5.0)
        params = {"watch": "1", "heartbeat": f"{self.heartbeat:g}"}
        received = 0
        connected = False
        refused = False  # answered with an error status: the connection itself is sound
        reason = "stream ended"
        url = self.endpoint.url
        try:
            client = self._client_of(url, timeout)
            with client.stream("GET", self.endpoint.state_path(), params=params) as response:
                if response.status_code != 200:
                    response.read()
                    refused = True
                    reason = describe_error_response(response)
                    log.warning(
                        "event=watch_refused controller=%s status=%d error=%s",
                        url, response.status_code, _quote(reason),
                    )
                    return 0, f"HTTP {response.status_code}: {reason}"
                connected = True
                self.connects += 1
                log.info("event=watch_connected controller=%s", url)
                self.on_connection(True, "connected")
                for line in response.iter_lines():
                    if self._stop.is_set():
                        reason = "agent stopping"
                        break
                    if not line.strip():
                        continue
                    self._dispatch(json.loads(line))
                    received += 1
        except httpx.ReadTimeout:
            reason = f"no message for {read_timeout:g}s ({self.missed_heartbeats} heartbeats missed)"
        except (httpx.HTTPError, httpx.StreamError, httpx.InvalidURL) as exc:
            # StreamError and InvalidURL are not HTTPErrors, yet end a connection all the same.
            reason = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        except (ValueError, KeyError, TypeError) as exc:
            # Not NDJSON, or not our messages: the stream is out of step; start over.
            reason = f"malformed message on the stream: {exc}"
        except BaseException as exc:
            # Anything else (a callback that raised) ends run(); the stream is down all the same.
            reason = f"{type(exc).__name__}: {exc}"
            if connected:
                self.on_connection(False, reason)
            raise
        finally:
            if not refused:
                self._drop_client(url)
        if connected:
            log.warning("event=watch_lost controller=%s reason=%s", self.endpoint.url, _quote(reason))
            self.on_connection(False, reason)
        else:
            log.warning("event=watch_unreachable controller=%s reason=%s", self.endpoint.url, _quote(reason))
        return received, reason

    def _dispatch(self, message: Any) -> None:
        if not isinstance(message, dict):
            raise ValueError(f"expected a JSON object, got {type(message).__name__}")
        kind = message.get("type")
        if kind == "state":
            log.info("event=watch_state generation=%s", message.get("generation"))
            self.on_state(message.get("state"))
        elif kind == "heartbeat":
            generation = message.get("generation")
            self.on_heartbeat(generation if isinstance(generation, int) else None)
        else:
            # A message type from a newer controller: skip it, keep the stream.
            log.info("event=watch_unknown_message type=%s", _quote(kind))


# What the controller accepts in a status report (it refuses more with 422): the first
# errors, each text cut; the count of the rest goes in a last entry.
STATUS_MAX_ERRORS = 100
STATUS_MAX_TEXT = 1024


@dataclass(frozen=True)
class StatusReport:
    """The body of PUT /v1/hosts/{host}/status."""

    generation: int
    errors: tuple[dict[str, Any], ...] = ()

    def body(self) -> dict[str, Any]:
        errors = [{**error, **{name: str(error[name])[:STATUS_MAX_TEXT] for name in ("object", "message")
                               if name in error}} for error in self.errors[:STATUS_MAX_ERRORS]]
        if len(self.errors) > STATUS_MAX_ERRORS:
            errors[-1] = {"kind": "agent", "object": "status",
                          "message": f"{len(self.errors) - STATUS_MAX_ERRORS + 1} more errors not listed"}
        return {"generation": self.generation, "errors": errors, "agent": AGENT_NAME}


class StatusReporter:
    """Sends the latest status to the controller in use from its own thread; latest wins.

    ``submit`` never blocks on the network. A report that fails is retried with backoff
    until it succeeds or a newer one replaces it; ``resend`` asks for the last report to
    go out again (after a reconnect the controller may have restarted and forgotten it).
    """

    def __init__(
        self,
        endpoint: ControllerEndpoint,
        *,
        backoff: Backoff = Backoff(),
        on_reply: Callable[[dict[str, Any]], None] = lambda reply: None,
        timeout: float = 5.0,
    ):
        self.endpoint = endpoint
        self.backoff = backoff
        self.on_reply = on_reply
        self.timeout = timeout
        self.last_reply: dict[str, Any] | None = None
        self._pending: StatusReport | None = None
        self._last_sent: StatusReport | None = None
        self._condition = threading.Condition()
        self._stop = False
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Run in a thread of its own, unsupervised (the agent supervises ``run`` instead)."""
        self._thread = threading.Thread(target=self.run, name="hnv-status", daemon=True)
        self._thread.start()

    def stop(self, timeout: float | None = None) -> None:
        with self._condition:
            self._stop = True
            self._condition.notify_all()
        if self._thread is not None and timeout:
            self._thread.join(timeout)

    def submit(self, report: StatusReport) -> None:
        with self._condition:
            if report == self._last_sent and self._pending is None:
                return  # the controller already has exactly this
            self._pending = report
            self._condition.notify_all()

    def resend(self) -> None:
        with self._condition:
            if self._pending is None and self._last_sent is not None:
                self._pending = self._last_sent
                self._condition.notify_all()

    def run(self) -> None:
        """Send reports until ``stop``; a report not yet sent when this raises is kept."""
        client: httpx.Client | None = None
        client_url = None  # the controller `client` talks to
        attempt = 0
        try:
            while True:
                with self._condition:
                    while self._pending is None and not self._stop:
                        self._condition.wait()
                    if self._stop:
                        return
                    report = self._pending
                if client is None or client_url != self.endpoint.url:
                    # The watch moved to another controller: report to that one.
                    if client is not None:
                        client.close()
                    client_url = self.endpoint.url
                    client = self.endpoint.client(httpx.Timeout(self.timeout))
                if self._put(client, report):
                    attempt = 0
                    with self._condition:
                        self._last_sent = report
                        if self._pending == report:
                            self._pending = None
                    continue
                attempt += 1
                delay = self.backoff.delay(attempt)
                with self._condition:
                    # Wake early only to stop; a newer report waits for the backoff too.
                    self._condition.wait_for(lambda: self._stop, timeout=delay)
        finally:
            if client is not None:
                client.close()

    def _put(self, client: httpx.Client, report: StatusReport) -> bool:
        try:
            response = client.put(self.endpoint.status_path(), json=report.body())
        except (httpx.HTTPError, httpx.StreamError, httpx.InvalidURL) as exc:
            log.warning(
                "event=status_unsent generation=%d controller=%s reason=%s",
                report.generation, client.base_url, _quote(f"{type(exc).__name__}: {exc}"),
            )
            return False
        if response.status_code != 200:
            log.warning(
                "event=status_refused generation=%d controller=%s status=%d error=%s",
                report.generation, client.base_url, response.status_code, _quote(describe_error_response(response)),
            )
            # A 4xx will not get better by retrying the same body, but the controller may
            # be mid-restart (e.g. host not yet known): retry with backoff like a 5xx.
            return False
        try:
            reply = response.json()
        except ValueError:
            reply = {}
        self.last_reply = reply if isinstance(reply, dict) else {}
        log.info(
            "event=status_sent generation=%d controller=%s errors=%d sync=%s reason=%s",
            report.generation, client.base_url, len(report.errors),
            self.last_reply.get("sync"), _quote(self.last_reply.get("reason", "")),
        )
        self.on_reply(self.last_reply)
        return True
