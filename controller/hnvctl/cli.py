"""hnvctl's command line: the parser and `main` (exit codes, one-line refusals).

`main(argv, stdout=, stderr=, environ=)` is the console script and is called in
process by the lab's walkthrough. Exit codes: 0 done; 2 bad input (an argument, a
document, or a 4xx from the controller), with one line on stderr naming the object,
the field and the reason, and nothing changed; 1 no controller could be reached, or one
failed (5xx). Several controller URLs (repeated --controller, or commas in
HNV_CONTROLLER) are tried in order as `controller.client` says: the next one only after
a connection failure or a 503; a time-out after a write was sent is reported, not
retried elsewhere. Every line it prints on stderr is escaped (`output.error_line`).

Owns the parser and the mapping of failures to exit codes; what commands do is
`commands`/`apply`'s, how they look `output`'s.
"""

from __future__ import annotations

import argparse
import os
import sys
import typing
from typing import TextIO

from agent.watch import controller_urls
from controller.client import (
    CONNECT_TIMEOUT,
    DEFAULT_CONTROLLER,
    ApiRefused,
    ControllerClient,
    ControllerError,
    read_ca_file,
    read_token,
)
from controller.hnvctl.apply import cmd_apply
from controller.hnvctl.commands import (
    Context,
    cmd_create,
    cmd_delete,
    cmd_host_state,
    cmd_hosts,
    cmd_ip_list,
    cmd_list,
    cmd_lookup_records,
    cmd_migrate,
    cmd_remove_switch,
    cmd_set,
    cmd_set_switch,
    cmd_show,
    vsid_argument,
)
from controller.hnvctl.flags import EXIT_BAD_INPUT, EXIT_OK, EXIT_UNAVAILABLE, UsageError, add_object_flags
from controller.hnvctl.output import Output, error_line
from controller.models import Kind, LeaseKind

DESCRIPTION = "hnvctl: the command line over the controller's REST API (what the VMM cmdlets are)."




class _Parser(argparse.ArgumentParser):
    """argparse that reports a bad command line in one line instead of usage + exit."""

    def error(self, message: str) -> typing.NoReturn:
        raise UsageError(f"{self.prog.removeprefix('hnvctl').strip() or 'hnvctl'}: {message}")


def _globals() -> argparse.ArgumentParser:
    # SUPPRESS keeps a subcommand's copy of these flags from overwriting the top level's.
    common = _Parser(add_help=False)
    common.add_argument("--controller", action="append", default=argparse.SUPPRESS, metavar="URL",
                        help="controller URL; repeat it (or separate URLs with commas) for replicas of one "
                             "fabric: they are tried in order, the next only when one cannot be connected to "
                             "or answers 503; a request that timed out or broke after it was sent is reported, "
                             "never sent to another (a write may have been applied) "
                             f"(env HNV_CONTROLLER, default {DEFAULT_CONTROLLER})")
    common.add_argument("--ca-file", default=argparse.SUPPRESS, help="CA certificate that signed the controller's (its tls/ca.crt; env HNV_CA_FILE)")
    common.add_argument("--token-file", default=argparse.SUPPRESS, help="file holding the bearer token (env HNV_TOKEN_FILE, or the token in HNV_TOKEN)")
    common.add_argument("--connect-timeout", type=_connect_seconds, default=argparse.SUPPRESS, metavar="SECONDS",
                        help="seconds to open a connection (TCP and TLS handshake) to one controller before "
                             f"trying the next (env HNV_CONNECT_TIMEOUT, default {CONNECT_TIMEOUT:g})")
    common.add_argument("-o", "--output", choices=("table", "json"), default=argparse.SUPPRESS, help="table (default) or json")
    return common


def plural(kind: Kind) -> str:
    return kind.label + ("es" if kind.label.endswith("ch") else "s")


KIND_COMMANDS = {kind.name.replace("_", "-"): kind for kind in Kind}
# The cmdlet a verb group mirrors, where its name does not say it.
CMDLETS = {
    Kind.gateway_service: "Add-SCNetworkService",
    Kind.gateway: "Add-SCVMNetworkGateway",
    Kind.nat_connection: "Add-SCNATConnection",
    Kind.nat_rule: "Add-SCNATRule",
    Kind.customer_route: "New-NetVirtualizationCustomerRoute",
}


def build_parser() -> argparse.ArgumentParser:
    common = _globals()
    parser = _Parser(prog="hnvctl", description=DESCRIPTION, parents=[common])
    groups = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    groups.required = True
    for command, kind in KIND_COMMANDS.items():
        cmdlet = f" ({CMDLETS[kind]})" if kind in CMDLETS else ""
        group = groups.add_parser(command, help=f"{plural(kind)}{cmdlet}: create, list, show, set, delete",
                                  parents=[common])
        verbs = group.add_subparsers(dest="verb", metavar="VERB", parser_class=_Parser)
        verbs.required = True
        create = verbs.add_parser("create", help=f"create a {kind.label}", parents=[common])
        create.add_argument("name")
        add_object_flags(create, kind)
        create.set_defaults(run=cmd_create, kind=kind)
        listing = verbs.add_parser("list", help=f"list {plural(kind)}", parents=[common])
        listing.add_argument("--filter", action="append", type=_filter, metavar="FIELD=VALUE", help="only objects whose field equals the value")
        listing.set_defaults(run=cmd_list, kind=kind)
        show = verbs.add_parser("show", help=f"show one {kind.label}", parents=[common])
        show.add_argument("name", help="name (VM subnet: VMNETWORK/NAME; IP pool: SITE/NAME or VMNETWORK/SUBNET/NAME)")
        show.set_defaults(run=cmd_show, kind=kind)
        change = verbs.add_parser("set", help=f"change a {kind.label}", parents=[common])
        change.add_argument("name")
        add_object_flags(change, kind)
        change.set_defaults(run=cmd_set, kind=kind)
        delete = verbs.add_parser("delete", help=f"delete a {kind.label} (refused while in use)", parents=[common])
        delete.add_argument("name")
        delete.set_defaults(run=cmd_delete, kind=kind)
        if kind is Kind.host:
            switch = verbs.add_parser("set-switch", help="give the host a virtual switch (New-SCVirtualNetwork)", parents=[common])
            switch.add_argument("host")
            switch.add_argument("--logical-switch", required=True)
            switch.add_argument("--nic", action="append", help="a NIC of the team (repeat; default: all the host's NICs)")
            switch.add_argument("--uplink-port-profile", help="default: the logical switch's first")
            switch.add_argument("--management-vm-network", help="create the management adapter on this VM network")
            switch.add_argument("--management-adapter-name", default="Management")
            switch.set_defaults(run=cmd_set_switch)
            state = verbs.add_parser("state", help="the host state compiled for the host's agent (JSON)", parents=[common])
            state.add_argument("host")
            state.set_defaults(run=cmd_host_state)
            remove = verbs.add_parser("remove-switch", help="remove the host's virtual switch", parents=[common])
            remove.add_argument("host")
            remove.set_defaults(run=cmd_remove_switch)
        if kind is Kind.vm:
            migrate = verbs.add_parser("migrate", help="move a VM to another host (lookup records follow)", parents=[common])
            migrate.add_argument("name")
            migrate.add_argument("--host", required=True)
            migrate.set_defaults(run=cmd_migrate)
    ip = groups.add_parser("ip", help="IP address leases (Get-SCIPAddress)", parents=[common])
    ip_verbs = ip.add_subparsers(dest="verb", metavar="VERB", parser_class=_Parser)
    ip_verbs.required = True
    ip_list = ip_verbs.add_parser("list", help="every lease and what holds it", parents=[common])
    ip_list.add_argument("--pool", help="pool key, e.g. Virtualization/Default")
    ip_list.add_argument("--kind", choices=[kind.value for kind in LeaseKind])
    ip_list.add_argument("--host")
    ip_list.add_argument("--vm-network")
    ip_list.set_defaults(run=cmd_ip_list)
    lookup = groups.add_parser("lookup-records", help="a host's lookup records (Get-NetVirtualizationLookupRecord)", parents=[common])
    lookup.add_argument("--host", required=True)
    lookup.add_argument("--vsid", type=vsid_argument, help="only this VirtualSubnetID")
    lookup.set_defaults(run=cmd_lookup_records)
    hosts = groups.add_parser("hosts", help="hosts and their sync status", parents=[common])
    hosts.add_argument("--wait", type=_seconds, metavar="SECONDS", help="wait until the hosts are InSync (exit 1 if not in time)")
    hosts.add_argument("--host", action="append", help="with --wait: only these hosts (repeat)")
    hosts.set_defaults(run=cmd_hosts)
    apply = groups.add_parser("apply", help="make the fabric hold the documents, as one transaction (idempotent)", parents=[common])
    apply.add_argument("-f", "--file", action="append", required=True, help="fabric YAML ('-' for stdin; repeat for several)")
    apply.add_argument("--dry-run", action="store_true", help="print the changes the controller would make, change nothing")
    apply.add_argument("--prune", action="store_true", help="also delete live objects the documents do not state")
    apply.set_defaults(run=cmd_apply)
    return parser


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not 0 <= value <= 86400:
        raise argparse.ArgumentTypeError(f"{text} is outside 0..86400 seconds")
    return value


MAX_CONNECT_TIMEOUT = 300.0  # past this a controller that answers nothing is better reported


def _connect_seconds(text: str) -> float:
    value = _seconds(text)
    if not 0 < value <= MAX_CONNECT_TIMEOUT:
        raise argparse.ArgumentTypeError(f"{text} is outside (0, {MAX_CONNECT_TIMEOUT:g}] seconds")
    return value


def _filter(text: str) -> tuple[str, str]:
    name, sep, value = text.partition("=")
    if not sep or not name:
        raise argparse.ArgumentTypeError(f"{text!r} is not FIELD=VALUE")
    return name.replace("-", "_"), value


def _connect_timeout_from(environ) -> float:
    """$HNV_CONNECT_TIMEOUT, checked like the flag, else the client's default."""
    text = environ.get("HNV_CONNECT_TIMEOUT")
    if not text:
        return CONNECT_TIMEOUT
    try:
        return _connect_seconds(text)
    except argparse.ArgumentTypeError as exc:
        raise UsageError(f"HNV_CONNECT_TIMEOUT: {exc}") from None


# --- main ------------------------------------------------------------------------------------


def main(argv: list[str] | None = None, stdout: TextIO | None = None, stderr: TextIO | None = None,
         environ: dict[str, str] | None = None) -> int:
    stdout = stdout or sys.stdout
    stderr = stderr or sys.stderr
    environ = os.environ if environ is None else environ
    try:
        args = build_parser().parse_args(argv)
    except UsageError as exc:
        error_line(exc, stderr)
        return EXIT_BAD_INPUT
    except SystemExit as exc:  # --help
        return int(exc.code or 0)
    given = getattr(args, "controller", None) or environ.get("HNV_CONTROLLER") or DEFAULT_CONTROLLER
    out = Output(getattr(args, "output", None) or "table", stdout)
    try:
        try:
            urls = controller_urls(given)
        except ValueError as exc:
            raise UsageError(f"--controller: {exc}") from None
        token = read_token(getattr(args, "token_file", None), environ)
        ca_file = read_ca_file(getattr(args, "ca_file", None), environ)
        if ca_file and not os.path.isfile(ca_file):
            raise UsageError(f"--ca-file: {ca_file}: no such file")
        connect_timeout = getattr(args, "connect_timeout", None) or _connect_timeout_from(environ)
    except (UsageError, ControllerError) as exc:
        error_line(exc, stderr)
        return EXIT_BAD_INPUT

    def connect() -> ControllerClient:
        return ControllerClient(urls, token, ca_file=ca_file, connect_timeout=connect_timeout)

    ctx = Context(connect, out)
    try:
        return args.run(ctx, args)
    except UsageError as exc:
        error_line(exc, stderr)
        return EXIT_BAD_INPUT
    except ApiRefused as exc:
        hint = ""
        if exc.status == 401 and not token:
            hint = " (hnvctl sent none: give --token-file, or set HNV_TOKEN_FILE or HNV_TOKEN)"
        error_line(f"{exc.one_line()}{hint}", stderr)
        return EXIT_BAD_INPUT
    except ControllerError as exc:
        error_line(exc, stderr)
        return EXIT_UNAVAILABLE
    except BrokenPipeError:
        # `hnvctl ip list | head`: the reader left. Point stdout at /dev/null so the
        # interpreter's final flush does not raise again, and end quietly.
        if stdout is sys.stdout:
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_OK
    finally:
        ctx.close()


if __name__ == "__main__":
    raise SystemExit(main())