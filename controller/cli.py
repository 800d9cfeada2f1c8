"""hnv-controller: init a state directory, mint tokens, run the API server.

    hnv-controller init  --state-dir DIR [--host NAME ...]
    hnv-controller token --state-dir DIR --host NAME
    hnv-controller run   --state-dir DIR [--listen 0.0.0.0:8080]

`init` creates DIR/controller.db (SQLite, WAL), DIR/admin.token and
DIR/hosts/<NAME>.token (mode 0600; the database keeps only their SHA-256 hashes).
`init` makes DIR owner-only (0700) and `run` refuses to serve from a DIR, or with a
token file, that group or others can read. `run` takes an exclusive lock on DIR/controller.lock: the controller keeps the fabric in
memory and is the only writer of its database, so a second controller on the same
directory is refused rather than allowed to hand out the same addresses.

This module owns the command line and the process; the work is in `controller.fabric`.
"""

from __future__ import annotations

import argparse
import fcntl
import logging
import os
import sys
from pathlib import Path

from controller.auth import ADMIN, HOST, issue_token, write_secret_file
from controller.store import Store

DEFAULT_STATE_DIR = "/var/lib/openhnv-controller"
DB_NAME = "controller.db"


def _store(state_dir: Path) -> Store:
    state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    return Store(state_dir / DB_NAME)


def host_token_path(state_dir: Path, host: str) -> Path:
    return state_dir / "hosts" / f"{host}.token"


def cmd_init(args: argparse.Namespace) -> int:
    state_dir = Path(args.state_dir)
    admin_path = state_dir / "admin.token"
    store = _store(state_dir)
    # Owner-only, whatever made the directory: `run` refuses any other mode.
    state_dir.chmod(0o700)
    try:
        if admin_path.exists() and not args.force:
            print(f"{admin_path} exists; keeping the admin token (use --force for a new one)", file=sys.stderr)
        else:
            write_secret_file(admin_path, issue_token(store, ADMIN))
            print(f"admin token: {admin_path}")
        for host in args.host or ():
            path = host_token_path(state_dir, host)
            write_secret_file(path, issue_token(store, HOST, host))
            print(f"host token of {host}: {path}")
    finally:
        store.close()
    return 0


def cmd_token(args: argparse.Namespace) -> int:
    state_dir = Path(args.state_dir)
    if not (state_dir / DB_NAME).exists():
        print(f"{state_dir} is not initialised; run: hnv-controller init --state-dir {state_dir}", file=sys.stderr)
        return 2
    store = _store(state_dir)
    try:
        token = issue_token(store, HOST, args.host)
    finally:
        store.close()
    path = host_token_path(state_dir, args.host)
    write_secret_file(path, token)
    print(f"host token of {args.host}: {path}")
    return 0


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


def cmd_run(args: argparse.Namespace) -> int:
    state_dir = Path(args.state_dir)
    if not (state_dir / DB_NAME).exists():
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
    fabric = Fabric(Store(state_dir / DB_NAME, synchronous=args.synchronous))
    address, port = args.listen
    # uvicorn's access log prints the request line only (never headers), so tokens stay out.
    # Watch streams never end by themselves: give open connections a short grace on
    # SIGTERM, then close them (agents reconnect to the next controller process).
    uvicorn.run(create_app(fabric), host=address, port=port, log_level=args.log_level,
                access_log=args.access_log, timeout_graceful_shutdown=2)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hnv-controller", description="openhnv controller (the VMM role)")
    sub = parser.add_subparsers(dest="command", required=True)

    init = sub.add_parser("init", help="create the state directory, database and tokens")
    init.add_argument("--state-dir", default=DEFAULT_STATE_DIR)
    init.add_argument("--host", action="append", help="also mint a token for this host (repeatable)")
    init.add_argument("--force", action="store_true", help="mint a new admin token even if one exists")
    init.set_defaults(func=cmd_init)

    token = sub.add_parser("token", help="mint one more host token")
    token.add_argument("--state-dir", default=DEFAULT_STATE_DIR)
    token.add_argument("--host", required=True)
    token.set_defaults(func=cmd_token)

    run = sub.add_parser("run", help="serve the API")
    run.add_argument("--state-dir", default=DEFAULT_STATE_DIR)
    run.add_argument("--listen", type=_parse_listen, default=("0.0.0.0", 8080), help="ADDRESS:PORT")
    run.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    run.add_argument("--no-access-log", dest="access_log", action="store_false")
    run.add_argument("--synchronous", default="FULL", choices=["FULL", "NORMAL"],
                     help="SQLite durability: FULL survives power loss, NORMAL only process crashes")
    run.set_defaults(func=cmd_run)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
