"""`POST /v1/fabric/apply`: a whole fabric document, applied as one transaction.

The body is the fabric document (`examples/seed-fabric.yaml`'s content, as JSON). The
route checks the admin token before it reads the body, decodes it (a key given twice
is refused, not silently dropped), validates it with the document models and hands it
to `controller.fabric_document.apply_document`, which plans against the fabric itself
and runs ONE `Fabric.transact`. `?dry_run=true` answers exactly what a real run would
do and changes nothing; `?prune=true` also deletes what the document does not state.
A refusal is the JSON error shape naming the document's object and field
(`vms[3] (TenantVM04): ...`, field `vms[3].host`); nothing changes.

This module owns the HTTP side of apply (body decoding, the answer's schema, the
OpenAPI description); the rules are the fabric's, the plan `fabric_document`'s.
"""

from __future__ import annotations

import json
from typing import Any, Literal

from fastapi import FastAPI, Header, Query, Request
from pydantic import BaseModel, Field
from pydantic.alias_generators import to_camel
from starlette.concurrency import run_in_threadpool

from controller.auth import Authenticator
from controller.fabric import Fabric
from controller.fabric_document import SECTIONS, Change, DocumentError, apply_document, read_document
from controller.models import Kind

APPLY_PATH = "/v1/fabric/apply"


class FieldChange(BaseModel):
    field: str = Field(description="the field as the document names it (camelCase)")
    before: Any = Field(default=None, description="the live value")
    after: Any = Field(default=None, description="the document's value")


class PlannedChange(BaseModel):
    op: Literal["create", "update", "delete"]
    kind: Kind
    key: str
    path: str | None = Field(description="where the document states the object ('vms[3]'); null for a pruned one")
    fields: list[FieldChange] = Field(default_factory=list, description="update: the fields that change")
    summary: str = Field(description="one line: '+ VM TenantVM04', '~ logical network X (mtu: 1500 -> 1600)'")


class ApplyAnswer(BaseModel):
    dry_run: bool
    prune: bool
    applied: bool = Field(description="true when the changes are now in the fabric (not a dry run)")
    changes: list[PlannedChange] = Field(description="in the order they run; empty: the fabric already matches")


class Problem(BaseModel):
    field: str | None
    reason: str


class ApplyErrorBody(BaseModel):
    error: str
    field: str | None = None
    reason: str
    problems: list[Problem] = Field(default_factory=list,
                                    description="a refused document: every problem found, not only the first")


def _planned(change: Change) -> PlannedChange:
    return PlannedChange(
        op=change.action,
        kind=change.kind,
        key=change.key,
        path=change.path,
        fields=[FieldChange(field=to_camel(name), before=change.before.get(name), after=change.after.get(name))
                for name in change.fields],
        summary=change.describe(),
    )


def _refuse_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    seen: dict[str, Any] = {}
    for key, value in pairs:
        if key in seen:
            raise DocumentError([(None, f"key {key[:60]!r} is given twice in one object")])
        seen[key] = value
    return seen


def decode_document(raw: bytes) -> Any:
    """The request body as JSON; DocumentError (422) if it is not."""
    try:
        return json.loads(raw.decode("utf-8"), object_pairs_hook=_refuse_duplicate_keys)
    except UnicodeDecodeError as exc:
        raise DocumentError([(None, f"the body is not UTF-8 (byte {exc.start})")]) from None
    except json.JSONDecodeError as exc:
        raise DocumentError([(None, f"the body is not JSON: line {exc.lineno}, column {exc.colno}: {exc.msg}")]) from None


_DOCUMENT_SCHEMA = {
    "type": "object",
    "description": "The fabric document: top-level lists " + ", ".join(SECTIONS)
    + " (camelCase keys, as examples/seed-fabric.yaml); top-level keys starting with x- are ignored.",
    "properties": {section: {"type": "array", "items": {"type": "object"}} for section in SECTIONS},
    "example": {
        "hostGroups": [{"name": "Virtualization"}],
        "vms": [{"name": "TenantVM01", "vmNetwork": "Fabrikam2", "host": "CON-HyperV6"}],
    },
}

_REFUSALS = {
    401: "no token, or an unknown one",
    403: "not the admin token",
    404: "the document names an object that does not exist (field: where it names it)",
    409: "the fabric refuses a change (in use, exists, no placement, pool exhausted); nothing changed",
    422: "the document is not valid (field: its path), or the fabric refuses a value; nothing changed",
    503: "the database is busy (another writer holds it): nothing changed, retry after Retry-After seconds",
}


def add_fabric_routes(app: FastAPI, fabric: Fabric, auth: Authenticator) -> None:
    """Add `POST /v1/fabric/apply` to the app."""

    @app.post(
        APPLY_PATH,
        response_model=ApplyAnswer,
        tags=["fabric"],
        summary="Make the fabric hold a document, as one transaction (all or nothing)",
        responses={code: {"model": ApplyErrorBody, "description": text} for code, text in _REFUSALS.items()},
        openapi_extra={"requestBody": {"required": True, "content": {"application/json": {"schema": _DOCUMENT_SCHEMA}}}},
    )
    async def apply_fabric(
        request: Request,
        dry_run: bool = Query(default=False, description="plan and trial-compile, change nothing"),
        prune: bool = Query(default=False, description="also delete live objects the document does not state"),
        authorization: str | None = Header(default=None),
    ) -> ApplyAnswer:
        """The changes that make the fabric hold the document (create, update, migrate,
        with prune delete), planned against the fabric and run as ONE transaction. A dry
        run answers exactly what the real run would do. A refusal names the document's
        object (`vms[3] (TenantVM04): ...`) and changes nothing."""
        # The token before the body: an unauthenticated client costs no parsing.
        await run_in_threadpool(auth.require_admin, authorization, "applying a fabric document")
        raw = await request.body()

        def run() -> list[Change]:
            document = read_document(decode_document(raw))
            return apply_document(fabric, document, dry_run=dry_run, prune=prune)

        changes = await run_in_threadpool(run)
        return ApplyAnswer(dry_run=dry_run, prune=prune, applied=not dry_run,
                           changes=[_planned(change) for change in changes])
