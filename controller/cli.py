"""hnv-controller: init a state directory, manage tokens, run the API server.

    hnv-controller init   --state-dir DIR [--host NAME ...] [--force]
                          [--tls-name DNS ...] [--tls-address IP ...]
    hnv-controller token  list   --state-dir DIR
    hnv-controller token  create --state-dir DIR --role admin|host [--host NAME] [--ttl 30d]
    hnv-controller token  revoke --state-dir DIR ID [ID ...]
    hnv-controller run    --state-dir DIR [--store URL] [--listen 0.0.0.0:8080] [--insecure-http]
                          [--max-body-bytes N] [--max-batch-bytes N] [--migration-bound SECONDS]
    hnv-controller migrate --state-dir DIR [--store URL]
    hnv-controller migrate-store --from URL --to URL

Every command that opens the store takes `--store URL`: `sqlite:///PATH` (the default is
DIR/controller.db) or a PostgreSQL connection string (`postgresql://USER@HOST/DB`, or
libpq keywords such as `host=a,b dbname=hnv target_session_attrs=read-write`), shared by
any number of `run` replicas (`controller.store.postgres`). A store whose schema is older
than the code is refused until `migrate` upgrades it; a newer one is always refused.
`migrate-store` copies a whole store (objects, leases, allocations, generations, token
hashes) into an empty one: a controller started on the copy serves the same host states.

`init` creates DIR (0700), DIR/controller.db (SQLite, WAL, 0600), DIR/admin.token and
DIR/hosts/<NAME>.token (0600; the database keeps only their SHA-256 hashes; a host file
name is the host name percent-escaped), and the private CA and server certificate under
DIR/tls (`controller.tls`; default names: this machine's host name, localhost,
127.0.0.1, ::1). `init --force` revokes every admin token and mints a new one.
`token list` shows each token's id, role, host, creation, expiry and revocation, never
the token. `token revoke` takes effect on the controller's next request.
`run` serves HTTPS with DIR/tls/server.crt; without it, it refuses to start unless
`--insecure-http` is given (and then logs that tokens cross the network in clear).
`run` refuses to serve from a DIR, or with a token file, that group or others can
read. `run` takes an exclusive lock on DIR/controller.lock: the controller keeps the fabric in
memory and is the only writer of its database, so a second controller on the same
directory is refused rather than allowed to hand out the same addresses. Under systemd
(Type=notify) it sends READY=1 once the store is loaded and feeds the watchdog from the
server's event loop while the database answers. `run --gateway-failover-after SECONDS`
(default 10, 0 for off) moves a gateway service's active role when its host's agent stops
reporting (`controller.gateway_failover`).

This module owns the command line and the process; the work is in `controller.fabric`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import fcntl
import logging
import os
import socket
import sqlite3
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from agent import sd_notify
from controller.auth import (
    ADMIN,
    HOST,
    host_token_file_name,
    issue_token_with_id,
    parse_ttl,
    write_secret_file,
)
from controller.models import MIGRATION_BOUND_S
from controller.store import (
    SCHEMA_VERSION,
    SchemaError,
    StoreUnavailable,
    StoreUrlError,
    is_postgresql,
    open_store,
    sqlite_path,
)

DEFAULT_STATE_DIR = "/var/lib/openhnv-controller"
DB_NAME = "controller.db"
DEFAULT_GATEWAY_FAILOVER_AFTER_S = 10.0  # run --gateway-failover-after (controller.gateway_failover)
FAILOVER_ENV = "HNV_GATEWAY_FAILOVER_AFTER"  # ... its default from the unit's environment file
DEFAULT_MAX_BODY_BYTES = 64 * 1024
DEFAULT_MAX_BATCH_BYTES = 16 * 1024 * 1024

log = logging.getLogger("openhnv.controller")
IDLE_CONNECTION_KEEP_S = 60  # seconds an idle HTTP connection stays open (see `run`)


def _state_dir(path: str) -> Path:
    """The state directory, made (or kept) owner-only: it holds tokens and keys."""
    state_dir = Path(path)
    state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(state_dir, 0o700)
    return state_dir


class StoreRefused(Exception):
    """The store cannot be opened; the message is the one line the command prints."""


STORE_ENV = "HNV_STORE_URL"  # --store's default (systemd/controller.env.example)


def _store_url(args: argparse.Namespace) -> str:
    return getattr(args, "store", None) or f"sqlite:///{Path(args.state_dir).absolute() / DB_NAME}"


def _open(url: str, migrate: bool = False, **options: Any) -> Any:
    """The store a URL names, or `StoreRefused` with why (bad URL, schema, unreachable)."""
    try:
        return open_store(url, migrate=migrate, **options)
    except (StoreUrlError, SchemaError, StoreUnavailable) as exc:
        raise StoreRefused(str(exc)) from None
    except (sqlite3.Error, OSError) as exc:  # a path that is no database, or not ours to open
        raise StoreRefused(f"{url}: {exc}") from None


def _store(args: argparse.Namespace) -> Any:
    url = _store_url(args)
    if not is_postgresql(url):
        _state_dir(args.state_dir)
    return _open(url)


def host_token_path(state_dir: Path, host: str) -> Path:
    return Path(state_dir) / "hosts" / host_token_file_name(host)


def _mint_into_file(store: Any, path_of, role: str, host: str | None, expires: float | None) -> tuple[int, Path]:
    """Mint a token, store its hash, write it to `path_of(token id)`; if the file cannot be
    written the token is revoked at once (nobody would hold it)."""
    token_id, token = issue_token_with_id(store, role, host, expires)
    path = path_of(token_id)
    try:
        write_secret_file(path, token)
    except OSError:
        store.revoke_tokens([token_id])
        raise
    return token_id, path


def cmd_init(args: argparse.Namespace) -> int:
    from controller.tls import DEFAULT_ADDRESSES, default_names, ensure_tls

    state_dir = _state_dir(args.state_dir)
    admin_path = state_dir / "admin.token"
    try:
        files, created = ensure_tls(state_dir, args.tls_name or default_names(),
                                    args.tls_address or list(DEFAULT_ADDRESSES))
    except ValueError as exc:
        print(f"hnv-controller init: --tls-address: {exc}", file=sys.stderr)
        return 2
    for path in created:
        print(f"created {path}")
    print(f"CA certificate for agents and hnvctl (--ca-file): {files.ca_cert}")
    store = _store(args)
    # Owner-only, whatever made the directory: `run` refuses any other mode.
    state_dir.chmod(0o700)
    try:
        if admin_path.exists() and not args.force:
            print(f"{admin_path} exists; keeping the admin token (use --force for a new one)", file=sys.stderr)
        else:
            # Why revoke first: --force is what an operator runs when the admin token may
            # have leaked; the old one must be dead before the new one exists.
            revoked = store.revoke_tokens(role=ADMIN)
            if revoked:
                print(f"revoked admin token(s) {', '.join(map(str, revoked))}")
            _mint_into_file(store, lambda _: admin_path, ADMIN, None, None)
            print(f"admin token: {admin_path}")
        for host in args.host or ():
            _, path = _mint_into_file(store, lambda _: host_token_path(state_dir, host), HOST, host, None)
            print(f"host token of {_printable(host)}: {path}")
    finally:
        store.close()
    return 0


def _existing_store(args: argparse.Namespace) -> Any:
    state_dir = Path(args.state_dir)
    if not is_postgresql(_store_url(args)) and not (state_dir / DB_NAME).exists() and not args.store:
        print(f"{state_dir} is not initialised; run: hnv-controller init --state-dir {state_dir}", file=sys.stderr)
        return None
    return _store(args)


def cmd_token_create(args: argparse.Namespace) -> int:
    state_dir = Path(args.state_dir)
    if (args.role == HOST) != bool(args.host):
        print("hnv-controller token create: --host NAME is required with --role host and "
              "refused with --role admin", file=sys.stderr)
        return 2
    expires = None
    if args.ttl:
        try:
            expires = datetime.datetime.now().timestamp() + parse_ttl(args.ttl)
        except ValueError as exc:
            print(f"hnv-controller token create: --ttl: {exc}", file=sys.stderr)
            return 2
    store = _existing_store(args)
    if store is None:
        return 2
    try:
        if args.role == HOST:
            path_of = lambda _: host_token_path(state_dir, args.host)  # noqa: E731
        else:
            path_of = lambda token_id: state_dir / f"admin-{token_id}.token"  # noqa: E731
        try:
            token_id, path = _mint_into_file(store, path_of, args.role, args.host, expires)
        except OSError as exc:
            print(f"hnv-controller token create: {exc.filename}: {exc.strerror or exc}", file=sys.stderr)
            return 1
    finally:
        store.close()
    whose = f"host {_printable(args.host)}" if args.host else "admin"
    until = f", expires {_time(expires)}" if expires else ""
    print(f"token {token_id} ({whose}{until}): {path}")
    return 0


def cmd_token_list(args: argparse.Namespace) -> int:
    store = _existing_store(args)
    if store is None:
        return 2
    try:
        rows = store.list_tokens()
    finally:
        store.close()
    table = [("ID", "ROLE", "HOST", "CREATED", "EXPIRES", "REVOKED")]
    table += [(str(row.id), row.role, _printable(row.host or "-"), _time(row.created),
               _time(row.expires), _time(row.revoked)) for row in rows]
    widths = [max(len(line[column]) for line in table) for column in range(len(table[0]))]
    for line in table:
        print("  ".join(cell.ljust(width) for cell, width in zip(line, widths)).rstrip())
    return 0


def cmd_token_revoke(args: argparse.Namespace) -> int:
    store = _existing_store(args)
    if store is None:
        return 2
    try:
        known = {row.id: row for row in store.list_tokens()}
        unknown = [token_id for token_id in args.ids if token_id not in known]
        if unknown:
            print(f"hnv-controller token revoke: no token has id {unknown[0]} (see: hnv-controller token list)",
                  file=sys.stderr)
            return 2
        revoked = store.revoke_tokens(list(args.ids))
    finally:
        store.close()
    for token_id in args.ids:
        state = "revoked" if token_id in revoked else "was already revoked"
        print(f"token {token_id} {state}")
    return 0


def _time(stamp: float | None) -> str:
    if stamp is None:
        return "-"
    return datetime.datetime.fromtimestamp(stamp, datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _printable(text: str) -> str:
    """A host name as a terminal may show it: control characters escaped."""
    return "".join(ch if ch.isprintable() else ascii(ch)[1:-1] for ch in text)


def _token_id(text: str) -> int:
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"{text!r} is not a token id (a number from: hnv-controller token list)")
    return int(text)


def _byte_count(text: str) -> int:
    if not text.isdigit() or int(text) < 1024:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a number of bytes, at least 1024")
    return int(text)


def _seconds_bound(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 <= value <= 3600:  # also refuses nan and inf
        raise argparse.ArgumentTypeError(f"{text!r}: expected a number of seconds from 0 to 3600")
    return value


def _failover_seconds(text: str) -> float:
    """--gateway-failover-after: seconds, 0 for off (hence not the agent's positive-only parser)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not 0 <= value < 86400:
        raise argparse.ArgumentTypeError(f"{text}: expected 0 (off) or a number of seconds below 86400")
    return value


def _parse_listen(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit():
        raise argparse.ArgumentTypeError(f"--listen {text!r}: expected ADDRESS:PORT, e.g. 0.0.0.0:8080")
    return host.strip("[]") or "0.0.0.0", int(port)


def _open_to_others(state_dir: Path) -> list[tuple[Path, int]]:
    """The state directory and token files that group or others may read, with their modes."""
    paths = [state_dir, state_dir / "admin.token", state_dir / "hosts",
             *sorted((state_dir / "hosts").glob("*.token"))]
    modes = [(p, p.stat().st_mode & 0o777) for p in paths if p.exists()]
    return [(p, mode) for p, mode in modes if mode & 0o077]


def cmd_migrate(args: argparse.Namespace) -> int:
    url = _store_url(args)
    if not is_postgresql(url) and url.startswith("sqlite:///") and not sqlite_path(url).exists():
        print(f"hnv-controller migrate: no database at {url}", file=sys.stderr)
        return 2
    store = _open(url, migrate=True)
    store.close()
    print(f"store schema at version {SCHEMA_VERSION}")
    return 0


def cmd_migrate_store(args: argparse.Namespace) -> int:
    """Copy a whole store into an empty one (for example SQLite -> PostgreSQL)."""
    if args.source == args.target:
        print("hnv-controller migrate-store: --from and --to name the same store", file=sys.stderr)
        return 2
    source = _open(args.source)
    try:
        target = _open(args.target)
        try:
            if not target.is_empty():
                print("hnv-controller migrate-store: --to: the store already holds a fabric or tokens; "
                      "migrate into an empty database", file=sys.stderr)
                return 2
            dump = source.dump()
            target.restore(dump)
        finally:
            target.close()
    finally:
        source.close()
    snapshot = dump.snapshot
    print(f"copied {len(snapshot.objects)} objects, {len(snapshot.allocations)} allocations, "
          f"{len(snapshot.leases)} leases, {len(snapshot.hosts)} host generations, {len(dump.tokens)} token hashes")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    state_dir = Path(args.state_dir)
    shared = is_postgresql(_store_url(args))
    if not shared and not args.store and not (state_dir / DB_NAME).exists():
        print(f"{state_dir} is not initialised; run: hnv-controller init --state-dir {state_dir}", file=sys.stderr)
        return 2
    # The store and the tokens must be the controller's alone: refuse, rather than serve
    # from a directory or with a token that group or others can read (a copy with `cp -r`,
    # a wrong mode). systemd resets the mode of a StateDirectory= itself at each start,
    # but not of the files in it.
    for path, mode in _open_to_others(state_dir):
        wanted = "0700" if path.is_dir() else "0600"
        print(f"{path}: mode {mode:04o} lets group or others in; the controller's store and "
              f"tokens must be owner-only: chmod {wanted} {path}", file=sys.stderr)
        return 2
    from controller.tls import server_names, tls_files

    tls = tls_files(state_dir)
    if not args.insecure_http and not tls.server_ready():
        print(f"{tls.server_cert} is missing: run hnv-controller init --state-dir {state_dir} "
              "(it creates the CA and the server certificate), or pass --insecure-http "
              "to send tokens in clear", file=sys.stderr)
        return 2
    if not shared:
        # One writer per SQLite file; PostgreSQL replicas serialise in the database.
        lock = open(state_dir / "controller.lock", "w")
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(f"another controller is running on {state_dir}", file=sys.stderr)
            return 1
        lock.write(f"{os.getpid()}\n")
        lock.flush()
    # Imported only now: a refusal above costs no second of importing the web stack.
    import uvicorn

    from controller.api import create_app
    from controller.fabric import Fabric

    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s %(message)s")
    options = {} if shared else {"synchronous": args.synchronous}
    store = _open(_store_url(args), **options)
    try:
        fabric = Fabric(store, migration_bound=args.migration_bound)
    except StoreUnavailable as exc:
        raise StoreRefused(str(exc)) from None
    log.info("event=store_opened store=%s shared=%s revision=%d", "postgresql" if shared else "sqlite",
             shared, fabric.revision)
    address, port = args.listen
    if args.insecure_http:
        ssl_options = {}
        log.warning("event=insecure_http listen=%s:%d reason=\"--insecure-http: plain HTTP, bearer tokens "
                    "cross the network in clear\"", address, port)
    else:
        ssl_options = {"ssl_certfile": str(tls.server_cert), "ssl_keyfile": str(tls.server_key)}
        log.info("event=tls listen=%s:%d certificate=%s names=%s ca=%s", address, port, tls.server_cert,
                 ",".join(server_names(tls)), tls.ca_cert)
    app = create_app(fabric, max_body_bytes=args.max_body_bytes, max_batch_bytes=args.max_batch_bytes,
                     gateway_failover_after=args.gateway_failover_after)
    log.info("event=gateway_failover_configured after_s=%g", args.gateway_failover_after)
    # systemd supervision (agent.sd_notify; no-ops outside systemd): the store is loaded.
    sd_notify.notify("READY=1", "STATUS=store loaded, serving")
    supervise_from_event_loop(app, fabric.store)
    # uvicorn's access log prints the request line only (never headers), so tokens stay out.
    # Watch streams never end by themselves: give open connections a short grace on
    # SIGTERM, then close them (agents reconnect to the next controller process).
    # An agent that is answered "not yet" (its host not added, a 503) asks again on the same
    # connection after its backoff, going round the replicas (agent.watch): keep an idle
    # connection a minute (uvicorn's default is 5 s), so a retry finds it open and costs
    # a request, not a TLS handshake. An idle connection costs a socket, nothing more.
    config = uvicorn.Config(app, host=address, port=port, log_level=args.log_level,
                            access_log=args.access_log, timeout_graceful_shutdown=2,
                            timeout_keep_alive=IDLE_CONNECTION_KEEP_S, **ssl_options)
    server = uvicorn.Server(config)
    listening = config.bind_socket()
    if args.gateway_failover_after:
        # A watch stream to a host that vanished (power cut: no FIN, no RST) would look
        # open for the kernel's ~15 minutes of retransmissions, and its host would never
        # look silent. Heartbeats are data: unacknowledged for the failover time, the
        # connection is dropped, so a lost gateway host is failed over within about twice
        # the failover time plus one heartbeat. Not shorter: an agent that is alive but
        # slow to read gets as long as failover itself tolerates. Accepted connections
        # inherit it (Linux).
        user_timeout_ms = int(max(1.0, args.gateway_failover_after) * 1000)
        listening.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, user_timeout_ms)
    server.run(sockets=[listening])
    return 0 if server.started else 3  # uvicorn's own code for a server that never started


def supervise_from_event_loop(app: Any, store: Any) -> None:
    """Feed systemd's watchdog from the server's event loop, while the store answers.

    The task runs on the loop that serves every request, so a blocked loop starves the
    watchdog as surely as a hung process; the store is read in a worker thread (its lock
    may be held by a long commit) and a failed read withholds WATCHDOG=1, so systemd
    restarts a controller that lost its SQLite file. A shared (PostgreSQL) store that
    does not answer is no reason for a restart: the replica serves reads and watch
    streams from memory meanwhile, answers writes 503 and reconnects by itself, while a
    restarted one could not even load; so then only the event loop is watched, and the
    failure is logged. STOPPING=1 goes out at shutdown.
    """
    interval = sd_notify.watchdog_interval()
    served = app.router.lifespan_context

    async def feed_watchdog() -> None:
        while True:
            try:
                await asyncio.wait_for(asyncio.to_thread(store.check), timeout=interval)
                sd_notify.notify("WATCHDOG=1")
            except Exception as exc:  # noqa: BLE001 - no WATCHDOG=1 is the report
                if isinstance(exc, StoreUnavailable) and getattr(store, "shared", False):
                    sd_notify.notify("WATCHDOG=1")
                    logging.getLogger("openhnv.controller").warning(
                        "event=database_unreachable reason=%r", str(exc))
                else:
                    logging.getLogger("openhnv.controller").warning(
                        "event=watchdog_withheld reason=%r", f"{type(exc).__name__}: {exc}")
            await asyncio.sleep(interval)

    @contextlib.asynccontextmanager
    async def lifespan(app_: Any) -> AsyncIterator[Any]:
        task = asyncio.get_running_loop().create_task(feed_watchdog()) if interval else None
        try:
            async with served(app_) as state:
                yield state
        finally:
            sd_notify.notify("STOPPING=1")
            if task is not None:
                task.cancel()

    app.router.lifespan_context = lifespan


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hnv-controller", description="openhnv controller (the VMM role)")
    sub = parser.add_subparsers(dest="command", required=True)

    init = sub.add_parser("init", help="create the state directory, database, tokens, CA and server certificate")
    init.add_argument("--state-dir", default=DEFAULT_STATE_DIR)
    init.add_argument("--host", action="append", help="also mint a token for this host (repeatable)")
    init.add_argument("--force", action="store_true", help="revoke every admin token and mint a new one")
    init.add_argument("--tls-name", action="append", metavar="DNS",
                      help="DNS name of the server certificate (repeatable; default: this machine's "
                           "host name and localhost)")
    init.add_argument("--tls-address", action="append", metavar="IP",
                      help="IP address of the server certificate (repeatable; default 127.0.0.1 and ::1)")
    init.set_defaults(func=cmd_init)

    token = sub.add_parser("token", help="list, create or revoke tokens")
    token_sub = token.add_subparsers(dest="token_command", required=True)
    listing = token_sub.add_parser("list", help="every token: id, role, host, created, expires, revoked")
    listing.add_argument("--state-dir", default=DEFAULT_STATE_DIR)
    listing.set_defaults(func=cmd_token_list)
    create = token_sub.add_parser("create", help="mint a token into a 0600 file")
    create.add_argument("--state-dir", default=DEFAULT_STATE_DIR)
    create.add_argument("--role", choices=(ADMIN, HOST), default=HOST)
    create.add_argument("--host", help="the host this token is for (with --role host)")
    create.add_argument("--ttl", help="lifetime, e.g. 30d, 12h, 45m (default: until revoked)")
    create.set_defaults(func=cmd_token_create)
    revoke = token_sub.add_parser("revoke", help="revoke tokens by id (effective on the next request)")
    revoke.add_argument("--state-dir", default=DEFAULT_STATE_DIR)
    revoke.add_argument("ids", nargs="+", type=_token_id, metavar="ID")
    revoke.set_defaults(func=cmd_token_revoke)

    run = sub.add_parser("run", help="serve the API (HTTPS)")
    run.add_argument("--state-dir", default=DEFAULT_STATE_DIR)
    run.add_argument("--listen", type=_parse_listen, default=("0.0.0.0", 8080), help="ADDRESS:PORT")
    run.add_argument("--insecure-http", action="store_true",
                     help="serve plain HTTP (tokens cross the network in clear; for a closed test bed only)")
    run.add_argument("--max-body-bytes", type=_byte_count, default=DEFAULT_MAX_BODY_BYTES, metavar="N",
                     help=f"largest request body of one object, else 413 (default {DEFAULT_MAX_BODY_BYTES})")
    run.add_argument("--max-batch-bytes", type=_byte_count, default=DEFAULT_MAX_BATCH_BYTES, metavar="N",
                     help="largest body of /batch and /v1/fabric/apply, else 413 "
                          f"(default {DEFAULT_MAX_BATCH_BYTES})")
    # argparse applies `type` to a string default: a bad environment value is refused too.
    run.add_argument("--gateway-failover-after", type=_failover_seconds, metavar="SECONDS",
                     default=os.environ.get(FAILOVER_ENV) or str(DEFAULT_GATEWAY_FAILOVER_AFTER_S),
                     help="move a gateway service's active role to the next host whose agent reports when the "
                          "active host's agent has not reported for this long; 0 turns failover off "
                          f"(default: ${FAILOVER_ENV} when set, else {DEFAULT_GATEWAY_FAILOVER_AFTER_S:g})")
    run.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    run.add_argument("--no-access-log", dest="access_log", action="store_false")
    run.add_argument("--synchronous", default="FULL", choices=["FULL", "NORMAL"],
                     help="SQLite durability: FULL survives power loss, NORMAL only process crashes")
    run.add_argument("--migration-bound", type=_seconds_bound, default=MIGRATION_BOUND_S, metavar="SECONDS",
                     help="how long a stage of a migration waits for its hosts' InSync before the next one is "
                          f"published anyway (default {MIGRATION_BOUND_S:g})")
    run.set_defaults(func=cmd_run)

    migrate = sub.add_parser("migrate", help="upgrade the store's schema to this version's")
    migrate.add_argument("--state-dir", default=DEFAULT_STATE_DIR)
    migrate.set_defaults(func=cmd_migrate)

    copy = sub.add_parser("migrate-store", help="copy a whole store into an empty one (e.g. SQLite -> PostgreSQL)")
    copy.add_argument("--from", dest="source", required=True, metavar="URL", help="the store to copy")
    copy.add_argument("--to", dest="target", required=True, metavar="URL", help="an empty store to copy into")
    copy.set_defaults(func=cmd_migrate_store)

    for command in (init, listing, create, revoke, run, migrate):
        # The environment as the default (the unit's env file): a URL on ExecStart would
        # be readable by every user in /proc/PID/cmdline.
        command.add_argument("--store", metavar="URL", default=os.environ.get(STORE_ENV) or None,
                             help="sqlite:///PATH (default: STATE_DIR/controller.db) or a PostgreSQL "
                                  "connection string (postgresql://USER@HOST/DB, or 'host=a,b dbname=hnv "
                                  f"target_session_attrs=read-write'); default: ${STORE_ENV} when set")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except StoreRefused as exc:
        print(f"hnv-controller {args.command}: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
