"""Bearer tokens: minting, hashing, file names, and deciding who may do what.

An admin token may do everything. A host token may read only its own host's state
and write only its own status. Tokens are 32 random bytes (URL-safe base64); only
their SHA-256 hashes are stored, so the database never holds a usable token, and no
code path here logs one.

Every request looks its token up in the store (`Store.find_token`, an indexed read on a
connection of its own): a token revoked by `hnv-controller token revoke` in another
process or on another controller replica, or expired, is refused on the very next request.
The one exception: a replica cut off from its PostgreSQL store accepts a token it verified
in the last minute (`controller.store.postgres.TOKEN_GRACE_S`) so reads and watches go on
during the outage; no revocation can be recorded meanwhile anyway.

Host names are compared as UTF-8 bytes (`hmac.compare_digest` refuses non-ASCII str).
A token file's name is the host name percent-escaped (`host_token_file_name`), so no
host name can reach outside the directory or exceed a file name's length.

This module owns token files and the role check; it knows nothing of the fabric or HTTP.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import re
import secrets
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

from controller.models import FabricError
from controller.store import Store

ADMIN = "admin"
HOST = "host"

# What a route needs, as `api.py` declares it on each route (x-access in the OpenAPI).
PUBLIC = "public"  # no token (health, metrics, the API's own description)
OWN_HOST = "host"  # the admin token, or the token of the host named in the path
# ADMIN: the admin token only.


class Unauthorized(FabricError):
    status = 401


class Forbidden(FabricError):
    status = 403


@dataclass(frozen=True)
class Principal:
    role: str  # ADMIN or HOST
    host: str | None = None

    def describe(self) -> str:
        return "the admin token" if self.role == ADMIN else f"the token of host {self.host}"


def hash_token(token: str) -> str:
    # surrogateescape: any header bytes hash; a garbage token is just unknown.
    return hashlib.sha256(token.encode("utf-8", "surrogateescape")).hexdigest()


def mint_token() -> str:
    return secrets.token_urlsafe(32)


def same_host(a: str, b: str) -> bool:
    """Constant-time equality of two host names, on their UTF-8 bytes."""
    return hmac.compare_digest(a.encode("utf-8", "surrogateescape"), b.encode("utf-8", "surrogateescape"))


_MAX_FILE_STEM = 180  # bytes; a file name may hold 255, and '.token' and a digest follow


def host_token_file_name(host: str) -> str:
    """The token file's name for a host: every byte but [A-Za-z0-9_.~-] percent-escaped
    (so '/' can never separate a path), a leading '.' escaped too (no '.', '..' or hidden
    files), and a name too long for the file system cut and suffixed with its digest."""
    stem = quote(host, safe="")
    if stem.startswith("."):
        stem = "%2E" + stem[1:]
    if len(stem) > _MAX_FILE_STEM:
        stem = f"{stem[:_MAX_FILE_STEM - 17]}~{hashlib.sha256(host.encode()).hexdigest()[:16]}"
    return f"{stem}.token"


def write_secret_file(path: Path, content: str) -> None:
    """Write a token file readable by its owner only (0600), created that way atomically."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(content + "\n")
    os.replace(tmp, path)


_TTL = re.compile(r"^\s*(\d+)\s*([smhd])\s*$")
_TTL_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_ttl(text: str) -> float:
    """'30d', '12h', '45m', '90s' -> seconds; ValueError with the reason otherwise."""
    match = _TTL.match(text)
    if not match or int(match.group(1)) == 0:
        raise ValueError(f"{text!r} is not a lifetime like 30d, 12h, 45m or 90s")
    return float(int(match.group(1)) * _TTL_SECONDS[match.group(2)])


def issue_token(store: Store, role: str, host: str | None = None, expires: float | None = None) -> str:
    return issue_token_with_id(store, role, host, expires)[1]


def issue_token_with_id(
    store: Store, role: str, host: str | None = None, expires: float | None = None
) -> tuple[int, str]:
    token = mint_token()
    return store.add_token(hash_token(token), role, host, expires), token


class Authenticator:
    """Resolves an Authorization header to a Principal, against the store, every time."""

    def __init__(self, store: Store):
        self.store = store

    def principal(self, authorization: str | None) -> Principal:
        if not authorization:
            raise Unauthorized(
                "no bearer token", "Authorization", "send 'Authorization: Bearer <token>'"
            )
        scheme, _, token = authorization.partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            raise Unauthorized(
                "the Authorization header is not a bearer token",
                "Authorization",
                "send 'Authorization: Bearer <token>'",
            )
        found = self.store.find_token(hash_token(token))
        if found is None:
            raise Unauthorized(
                "unknown token", "Authorization",
                "the token is not known to this controller, or it was revoked or has expired",
            )
        return Principal(found[0], found[1])

    def authorize(self, authorization: str | None, access: str, host: str | None, action: str) -> Principal | None:
        """Check a request against a route's access (PUBLIC, OWN_HOST or ADMIN)."""
        if access == PUBLIC:
            return None
        if access == OWN_HOST and host is not None:
            return self.require_host(authorization, host, action)
        return self.require_admin(authorization, action)

    def require_admin(self, authorization: str | None, action: str) -> Principal:
        principal = self.principal(authorization)
        if principal.role != ADMIN:
            raise Forbidden(
                f"{action} needs the admin token",
                "Authorization",
                f"{principal.describe()} may only read its own state and write its own status",
            )
        return principal

    def require_host(self, authorization: str | None, host: str, action: str) -> Principal:
        principal = self.principal(authorization)
        if principal.role == ADMIN:
            return principal
        if not same_host(principal.host or "", host):
            raise Forbidden(
                f"{action} of host {host} is refused",
                "Authorization",
                f"{principal.describe()} may not {action} of another host",
            )
        return principal
