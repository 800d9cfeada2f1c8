"""Bearer tokens: minting, hashing, and deciding who may do what.

An admin token may do everything. A host token may read only its own host's state
and write only its own status. Tokens are 32 random bytes (URL-safe base64); only
their SHA-256 hashes are stored, so the database never holds a usable token, and no
code path here logs one.

This module owns token files and the role check; it knows nothing of the fabric.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
from dataclasses import dataclass
from pathlib import Path

from controller.models import FabricError
from controller.store import Store

ADMIN = "admin"
HOST = "host"


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
    return hashlib.sha256(token.encode()).hexdigest()


def mint_token() -> str:
    return secrets.token_urlsafe(32)


def write_secret_file(path: Path, content: str) -> None:
    """Write a token file readable by its owner only (0600), created that way atomically."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(content + "\n")
    os.replace(tmp, path)


def issue_token(store: Store, role: str, host: str | None = None) -> str:
    token = mint_token()
    store.add_token(hash_token(token), role, host)
    return token


class Authenticator:
    """Resolves an Authorization header to a Principal; caches hashes it has seen."""

    def __init__(self, store: Store):
        self.store = store
        self._known: dict[str, Principal] = {}

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
        digest = hash_token(token)
        principal = self._known.get(digest)
        if principal is None:
            found = self.store.find_token(digest)
            if found is None:
                raise Unauthorized("unknown token", "Authorization", "the token is not known to this controller")
            principal = Principal(found[0], found[1])
            self._known[digest] = principal
        return principal

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
        if not hmac.compare_digest(principal.host or "", host):
            raise Forbidden(
                f"{action} of host {host} is refused",
                "Authorization",
                f"{principal.describe()} may not {action} of another host",
            )
        return principal
