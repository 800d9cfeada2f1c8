"""The controller's HTTP API: REST under /v1, the agents' watch stream, /metrics.

Routes and their schemas are listed in controller/API.md. Every refusal is JSON
{"error": ..., "field": ..., "reason": ...}. Who may call a route is declared on the route
(`x-access` in its OpenAPI extra: public, host or admin; admin when absent) and checked,
with the body size limit, by `controller.gate.RequestGate` before any body is read.
Handlers are thin: they call `controller.fabric.Fabric`, which does the validation,
allocation and compilation.
Fabric calls are synchronous (SQLite, CPU); FastAPI runs plain `def` handlers in its
thread pool, so the event loop stays free for the watch streams.

Gateway failover (`controller.gateway_failover`) runs beside the server when asked
(`gateway_failover_after`): it reads which hosts hold a watch stream here, and its moves
are counted in hnv_controller_gateway_failovers_total.

The watch stream: each watcher holds an asyncio.Event registered under its host. When
the fabric bumps a host's generation (in a worker thread) it calls `_wake`, which sets
exactly that host's events through `loop.call_soon_threadsafe`; the watcher wakes, reads
the host's current entry and writes it. No polling, and a burst of bumps coalesces into
the newest state (agents want the newest state, not every intermediate one).

This module owns HTTP concerns (routes, status codes, streaming, metrics exposition);
it must not touch the store or compute fabric rules itself.
"""

import asyncio
import contextlib
import json
import logging
import time
from collections import defaultdict
from collections.abc import AsyncIterator
from typing import Any, Literal

from fastapi import Body, FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from pydantic import BaseModel, ConfigDict, Field

from agent.state import LookupRecord
from agent.text import validation_problems
from agent.watch import STATUS_MAX_ERRORS, STATUS_MAX_TEXT
from controller.api_apply import add_fabric_routes
from controller.auth import OWN_HOST, PUBLIC, Authenticator
from controller.fabric import RETRY_AFTER_BUSY_S, Fabric, HostView, SyncView
from controller.gate import RequestGate
from controller.gateway_failover import FIRST_APPLY_GRACE_S, RECONNECT_GRACE_S, GatewayFailover
from controller.store import StoreBusy
from controller.models import (
    PATH_KEYED,
    STORED_OF,
    SPEC_OF,
    FabricError,
    Kind,
    Lease,
    LeaseKind,
    Vm,
    VirtualSwitch,
    VirtualSwitchSpec,
)

log = logging.getLogger("openhnv.controller.api")



# --- request/response schemas beyond the fabric objects --------------------------------


class ErrorBody(BaseModel):
    error: str
    field: str | None = None
    reason: str


class MigrateRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    host: str = Field(min_length=1, description="the destination host")


class StatusErrorItem(BaseModel):
    model_config = ConfigDict(extra="forbid")
    kind: str = Field(max_length=64)
    object: str = Field(max_length=STATUS_MAX_TEXT)
    errno: int | None = Field(default=None, ge=-(2**31), lt=2**31)
    message: str = Field(max_length=STATUS_MAX_TEXT)


class StatusReport(BaseModel):
    model_config = ConfigDict(extra="forbid")
    generation: int = Field(ge=0, lt=2**63)
    errors: list[StatusErrorItem] = Field(default=[], max_length=STATUS_MAX_ERRORS)
    agent: str = Field(default="", max_length=128)


class StatusResponse(BaseModel):
    host: str
    sync: Literal["InSync", "Pending", "Error"]
    reason: str
    desired_generation: int
    applied_generation: int | None


# Every refusal a route can answer, declared so the published OpenAPI is complete:
# 400 for a body that is not even text, 401/403 from the gate, 404/409/422 from the
# fabric and the request models, 413 from the gate's body limit, 503 while the database
# is busy.
ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorBody} for code in (400, 401, 403, 404, 409, 413, 422, 503)
}
ADMIN_ONLY = {"x-access": "admin"}
OWN_HOST_OR_ADMIN = {"x-access": OWN_HOST}
NO_TOKEN = {"x-access": PUBLIC}
HEARTBEAT_MIN_SECONDS = 0.5


# --- metrics ------------------------------------------------------------------------------


class _FabricCollector:
    """Gauges computed at scrape time from the fabric (no bookkeeping on every write)."""

    def __init__(self, fabric: Fabric, watchers: "_Watchers", failover: GatewayFailover | None = None):
        self.fabric = fabric
        self.watchers = watchers
        self.failover = failover

    def collect(self):
        numbers = self.fabric.metrics_snapshot()
        hosts = GaugeMetricFamily("hnv_controller_hosts", "Hosts by sync state", labels=["sync"])
        for sync in ("InSync", "Pending", "Error"):
            hosts.add_metric([sync], numbers["hosts"].get(sync, 0))
        yield hosts
        pools = GaugeMetricFamily(
            "hnv_controller_pool_addresses", "Addresses of each IP pool", labels=["pool", "state"]
        )
        for pool, (used, free) in sorted(numbers["pools"].items()):
            pools.add_metric([pool, "used"], used)
            pools.add_metric([pool, "free"], free)
        yield pools
        yield GaugeMetricFamily("hnv_controller_vsids_in_use", "VSIDs allocated", value=numbers["vsids"])
        yield GaugeMetricFamily("hnv_controller_vms", "VMs in the fabric", value=numbers["vms"])
        active = GaugeMetricFamily("hnv_controller_gateway_active",
                                   "1 for the gateway service's active host, 0 for its standbys",
                                   labels=["service", "host"])
        for service, (hosts, active_host) in sorted(numbers["gateways"].items()):
            for host in hosts:
                active.add_metric([service, host], 1 if host == active_host else 0)
        yield active
        # Moves this replica made (each replica counts its own: sum them over replicas);
        # every service is listed from 0 so that increase() sees the first move.
        failovers = CounterMetricFamily("hnv_controller_gateway_failovers",
                                        "Automatic moves of a gateway service's active host made by this controller",
                                        labels=["service"])
        made = self.failover.failovers if self.failover is not None else {}
        for service in sorted(numbers["gateways"]):
            failovers.add_metric([service], made.get(service, 0))
        yield failovers
        yield GaugeMetricFamily(
            "hnv_controller_watchers", "Open watch streams", value=self.watchers.count()
        )
        yield GaugeMetricFamily(
            "hnv_controller_database_up", "1 while the store answers a read of its database",
            value=1 if _store_answers(self.fabric.store) else 0,
        )


def _store_answers(store: Any) -> bool:
    try:
        store.check()
    except Exception as exc:  # any failure means "no database" to the scraper
        log.warning("event=database_check_failed reason=%r", f"{type(exc).__name__}: {exc}")
        return False
    return True


class _Watchers:
    """Per-host sets of asyncio.Events; woken from any thread."""

    def __init__(self) -> None:
        self.by_host: dict[str, set[asyncio.Event]] = defaultdict(set)
        self.loop: asyncio.AbstractEventLoop | None = None

    def count(self) -> int:
        # list(): the event loop may add a watcher while a metrics thread counts.
        return sum(len(events) for events in list(self.by_host.values()))

    def wake_threadsafe(self, hosts: list[str]) -> None:
        loop = self.loop
        if loop is None or loop.is_closed():
            return
        loop.call_soon_threadsafe(self._wake, hosts)

    def _wake(self, hosts: list[str]) -> None:
        for host in hosts:
            for event in self.by_host.get(host, ()):
                event.set()


# --- the app --------------------------------------------------------------------------------


def create_app(fabric: Fabric, max_body_bytes: int = 64 * 1024, max_batch_bytes: int = 16 * 1024 * 1024,
               gateway_failover_after: float | None = None,
               gateway_failover_grace: float = RECONNECT_GRACE_S,
               gateway_failover_first_apply_grace: float = FIRST_APPLY_GRACE_S) -> FastAPI:
    """The app; with `gateway_failover_after` (seconds) it runs `GatewayFailover` while it
    serves (started and stopped by its lifespan)."""
    app = FastAPI(
        title="openhnv controller",
        version="0.1.0",
        description="Hyper-V Network Virtualization fabric as System Center VMM models it. "
        "Send 'Authorization: Bearer <token>': the admin token for the fabric; a host token "
        "reads only its own state and writes only its own status (each route's x-access). "
        f"Bodies above {max_body_bytes} bytes ({max_batch_bytes} for /batch and the fabric "
        "apply) are refused with 413.",
    )
    auth = Authenticator(fabric.store)
    watchers = _Watchers()
    failover = None
    if gateway_failover_after:
        # The hosts watching this replica: list() of the keys, read from the failover
        # thread while the event loop adds and removes watchers.
        failover = GatewayFailover(fabric, gateway_failover_after, lambda: list(watchers.by_host),
                                   grace=gateway_failover_grace,
                                   first_apply_grace=gateway_failover_first_apply_grace)
    registry = CollectorRegistry()
    registry.register(_FabricCollector(fabric, watchers, failover))
    pushed = Counter(
        "hnv_controller_generations_pushed", "Host states written to watch streams", registry=registry
    )
    push_latency = Histogram(
        "hnv_controller_push_latency_seconds",
        "From a host's generation bump to the write on its watch stream",
        buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
        registry=registry,
    )
    fabric.add_listener(watchers.wake_threadsafe)
    app.state.fabric = fabric
    app.state.watchers = watchers
    app.state.gateway_failover = failover
    if failover is not None:
        served = app.router.lifespan_context

        @contextlib.asynccontextmanager
        async def lifespan(app_: FastAPI) -> AsyncIterator[Any]:
            failover.start()
            try:
                async with served(app_) as state:
                    yield state
            finally:
                await asyncio.to_thread(failover.stop)

        app.router.lifespan_context = lifespan

    @app.exception_handler(FabricError)
    async def _fabric_error(request: Request, exc: FabricError) -> JSONResponse:
        retry_after = getattr(exc, "retry_after", None)  # Unavailable: the database was busy
        headers = {"Retry-After": str(retry_after)} if retry_after is not None else None
        return JSONResponse(status_code=exc.status, content=exc.body(), headers=headers)

    @app.exception_handler(StoreBusy)
    async def _store_busy(request: Request, exc: StoreBusy) -> JSONResponse:
        # A busy database outside a fabric operation (the fabric maps its own to Unavailable).
        return JSONResponse(
            status_code=503,
            content={"error": f"{request.method} {request.url.path}: the controller's database is busy",
                     "field": None, "reason": str(exc)},
            headers={"Retry-After": str(RETRY_AFTER_BUSY_S)},
        )

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        # Unknown routes and methods get the same error shape as every other refusal.
        reason = str(exc.detail)
        return JSONResponse(
            status_code=exc.status_code,
            content={"error": f"{request.method} {request.url.path}: {reason}", "field": None, "reason": reason},
            headers=getattr(exc, "headers", None),
        )

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        field, reason = validation_problems(exc.errors()[:1])[0]
        return JSONResponse(
            status_code=422,
            content={"error": f"{request.method} {request.url.path}: {field or 'body'}: {reason}",
                     "field": field, "reason": reason},
        )

    # --- unauthenticated -------------------------------------------------------------

    @app.get("/healthz", tags=["meta"], openapi_extra=NO_TOKEN, responses={503: ERRORS[503]})
    def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/metrics", tags=["meta"], response_class=Response, openapi_extra=NO_TOKEN,
             responses={503: ERRORS[503]})
    def metrics() -> Response:
        """Prometheus exposition, unauthenticated and read-only (what scrapers expect)."""
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    # --- generic collections -------------------------------------------------------------

    for kind in Kind:
        _add_collection(app, fabric, kind)
    add_fabric_routes(app, fabric, auth)

    # --- hosts: virtual switch, state, status, lookup records --------------------------

    @app.put("/v1/hosts/{host}/virtual-switch", response_model=VirtualSwitch, tags=["hosts"], responses=ERRORS,
             openapi_extra=ADMIN_ONLY)
    def put_virtual_switch(host: str, body: VirtualSwitchSpec) -> VirtualSwitch:
        return fabric.set_virtual_switch(host, body)

    @app.get("/v1/hosts/{host}/virtual-switch", response_model=VirtualSwitch, tags=["hosts"], responses=ERRORS,
             openapi_extra=ADMIN_ONLY)
    def get_virtual_switch(host: str) -> VirtualSwitch:
        return fabric.get_virtual_switch(host)

    @app.delete("/v1/hosts/{host}/virtual-switch", status_code=204, tags=["hosts"], responses=ERRORS,
                openapi_extra=ADMIN_ONLY)
    def delete_virtual_switch(host: str) -> Response:
        fabric.delete_virtual_switch(host)
        return Response(status_code=204)

    @app.get("/v1/hosts/{host}/lookup-records", response_model=list[LookupRecord], tags=["hosts"],
             responses=ERRORS, openapi_extra=ADMIN_ONLY)
    def lookup_records(host: str) -> list[LookupRecord]:
        return list(fabric.lookup_records(host))

    @app.put("/v1/hosts/{host}/status", response_model=StatusResponse, tags=["agents"], responses=ERRORS,
             openapi_extra=OWN_HOST_OR_ADMIN)
    def put_status(host: str, body: StatusReport) -> StatusResponse:
        view = fabric.report_status(host, body.generation, [e.model_dump() for e in body.errors], body.agent)
        return StatusResponse(**_sync_fields(view))

    @app.get(
        "/v1/hosts/{host}/state",
        tags=["agents"],
        responses={
            **ERRORS,
            200: {
                "description": "The HostState document, or with watch=1 an NDJSON stream of "
                '{"type": "state", "generation", "state"} and {"type": "heartbeat", "generation", "time"}',
                "content": {"application/json": {}, "application/x-ndjson": {}},
            },
        },
        openapi_extra=OWN_HOST_OR_ADMIN,
    )
    async def get_state(
        host: str,
        watch: bool = Query(default=False),
        # Bounded below: a heartbeat every few microseconds would keep a core busy.
        heartbeat: float = Query(default=5.0, ge=HEARTBEAT_MIN_SECONDS, le=3600),
    ) -> Response:
        entry = fabric.host_entry(host)  # raises NotFound
        # The loop that serves the streams; bumps from worker threads are handed to it.
        watchers.loop = asyncio.get_running_loop()
        if not watch:
            return Response(entry.state_json, media_type="application/json")
        return StreamingResponse(
            _watch_stream(fabric, watchers, host, heartbeat, pushed, push_latency),
            media_type="application/x-ndjson",
            headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"},
        )

    # --- leases, migrate ----------------------------------------------------------------

    @app.get("/v1/ip-addresses", response_model=list[Lease], tags=["leases"], responses=ERRORS,
             openapi_extra=ADMIN_ONLY)
    def ip_addresses(
        pool: str | None = None,
        kind: LeaseKind | None = None,
        host: str | None = None,
        vm_network: str | None = None,
    ) -> list[Lease]:
        """Get-SCIPAddress: every lease and what holds it."""
        return fabric.leases(pool=pool, kind=kind, host=host, vm_network=vm_network)

    @app.post("/v1/vms/{vm}/migrate", response_model=Vm, tags=["vms"], responses=ERRORS, openapi_extra=ADMIN_ONLY)
    def migrate(vm: str, body: MigrateRequest) -> Vm:
        return fabric.migrate(vm, body.host)

    # Last, so it sees every route above (and any a later module adds to `app`): who may
    # call it and how large its body may be are checked before the body is read.
    app.add_middleware(RequestGate, routes_of=app, auth=auth, max_body_bytes=max_body_bytes,
                       max_batch_bytes=max_batch_bytes)
    return app


def _sync_fields(view: SyncView) -> dict[str, Any]:
    return {
        "host": view.host,
        "sync": view.sync,
        "reason": view.reason,
        "desired_generation": view.desired_generation,
        "applied_generation": view.applied_generation,
    }


async def _watch_stream(fabric: Fabric, watchers: _Watchers, host: str, heartbeat: float, pushed, push_latency):
    event = asyncio.Event()
    watchers.by_host[host].add(event)
    log.info("event=watch_open host=%s watchers=%d", host, watchers.count())
    sent: int | None = None
    try:
        while True:
            # Clear before reading: a bump landing after the read sets the event again,
            # so no generation is ever missed between the read and the wait.
            event.clear()
            entry = fabric.host_entry_or_none(host)
            if entry is None:
                return  # the host was deleted; the agent's reconnect gets 404
            if entry.generation != sent:
                # One line in pieces: the record fragments are shared with other hosts'
                # documents and are written as they are, never joined into a copy.
                yield b'{"type":"state","generation":%d,"state":' % entry.generation
                for piece in entry.pieces:
                    yield piece
                yield b"}\n"
                if sent is not None:
                    push_latency.observe(max(0.0, time.monotonic() - entry.bumped_at))
                pushed.inc()
                sent = entry.generation
                continue
            try:
                await asyncio.wait_for(event.wait(), heartbeat)
            except asyncio.TimeoutError:
                line = {"type": "heartbeat", "generation": sent, "time": time.time()}
                yield (json.dumps(line) + "\n").encode()
    finally:
        watchers.by_host[host].discard(event)
        if not watchers.by_host[host]:
            watchers.by_host.pop(host, None)
        log.info("event=watch_closed host=%s generation=%s watchers=%d", host, sent, watchers.count())


def _add_collection(app: FastAPI, fabric: Fabric, kind: Kind) -> None:
    """POST/GET on /v1/<kind>, GET/PATCH/DELETE on /v1/<kind>/<key>."""
    spec_model = SPEC_OF[kind]
    stored_model = HostView if kind is Kind.host else STORED_OF[kind]
    collection = f"/v1/{kind.value}"
    # Scoped kinds have keys with '/' (Fabrikam2/Default), so their key is a path.
    item = f"{collection}/{{key:path}}" if kind in PATH_KEYED else f"{collection}/{{key}}"
    label = kind.label
    tags = [kind.value]

    def create(body: spec_model):  # type: ignore[valid-type]
        return fabric.view(kind, fabric.create(kind, body))

    def list_all(request: Request):
        filters = {name: value for name, value in request.query_params.items()}
        return [fabric.view(kind, obj) for obj in fabric.list(kind, filters)]

    def read(key: str):
        return fabric.view(kind, fabric.get(kind, key))

    def patch(key: str, body: dict[str, Any] = Body(..., examples=[{"description": "new text"}])):
        return fabric.view(kind, fabric.patch(kind, key, body))

    def delete(key: str) -> Response:
        fabric.delete(kind, key)
        return Response(status_code=204)

    batch_model = type(
        f"{spec_model.__name__.removesuffix('Spec')}Batch",
        (BaseModel,),
        {"__annotations__": {"items": list[spec_model]}, "model_config": ConfigDict(extra="forbid")},
    )

    def create_batch(body: batch_model):  # type: ignore[valid-type]
        return [fabric.view(kind, obj) for obj in fabric.create_many(kind, list(body.items))]

    list_all.__doc__ = f"List {label}s. Query parameters filter on equal fields ({_FILTER_HELP.get(kind, 'name')})."
    app.add_api_route(collection, create, methods=["POST"], status_code=201, response_model=stored_model,
                      tags=tags, responses=ERRORS, openapi_extra=ADMIN_ONLY, summary=f"Create a {label}")
    app.add_api_route(f"{collection}/batch", create_batch, methods=["POST"], status_code=201,
                      response_model=list[stored_model], tags=tags, responses=ERRORS, openapi_extra=ADMIN_ONLY,
                      summary=f"Create several {label}s as one transaction (all or none)")
    app.add_api_route(collection, list_all, methods=["GET"], response_model=list[stored_model],
                      tags=tags, responses=ERRORS, openapi_extra=ADMIN_ONLY, summary=f"List {label}s")
    app.add_api_route(item, read, methods=["GET"], response_model=stored_model, tags=tags,
                      responses=ERRORS, openapi_extra=ADMIN_ONLY, summary=f"Read a {label}")
    app.add_api_route(item, patch, methods=["PATCH"], response_model=stored_model, tags=tags,
                      responses=ERRORS, openapi_extra=ADMIN_ONLY, summary=f"Change a {label} ({', '.join(sorted(spec_model.patchable))})")
    app.add_api_route(item, delete, methods=["DELETE"], status_code=204, tags=tags, responses=ERRORS, openapi_extra=ADMIN_ONLY,
                      summary=f"Delete a {label} (refused while in use)")


_FILTER_HELP = {
    Kind.vm: "vm_network, vm_subnet, host",
    Kind.vm_subnet: "vm_network",
    Kind.ip_pool: "network_site, vm_network, vm_subnet",
    Kind.host: "host_group, cluster",
    Kind.network_site: "logical_network",
    Kind.vm_network: "logical_network, isolation",
}
