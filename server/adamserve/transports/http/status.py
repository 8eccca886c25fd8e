"""The status page and its JSON, and the API's documentation pages, all served offline.

``/`` is the page: a table of the caller's sessions and, for the one picked, charts of
its recent steps, drawn as inline SVG by ``static/status.js`` (no third-party script).
Every file it loads is served from this package, so it works with no network; the
shell is public, its data is not: it reads ``GET /v2/status`` and ``GET
/v2/sessions/{session_id}/history`` with the key a login form keeps in the tab's
sessionStorage, under the same gate and the same tenant rules as the rest of /v2.
``/docs`` (Swagger UI) and ``/redoc`` load their scripts from here too: the copies the
``fastapi-offline`` package ships (without it, each page says what to install).
``docs/status-page.md`` describes the page and the JSON fields.
"""

from __future__ import annotations

import functools
import importlib.util
import math
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any

import numpy as np
from fastapi import APIRouter, Query
from fastapi.openapi.docs import (
    get_redoc_html,
    get_swagger_ui_html,
    get_swagger_ui_oauth2_redirect_html,
)
from pydantic import BaseModel, Field
from pydantic_core import to_json
from starlette.concurrency import run_in_threadpool
from starlette.responses import FileResponse, HTMLResponse, Response

from adamserve.errors import NotFound
from adamserve.service import Caller, OptimizerService, SessionInfo
from adamserve.sessions import history, names
from adamserve.sessions.session import Session
from adamserve.transports.http.routes import _ERRORS, PREFIX, CallerOf, Service

STATIC = Path(__file__).with_name("static")
DEFAULT_FUTURE = 200  # steps of the schedule's future a history carries unless asked

# The page and its files: path -> (file under static/, media type).
PAGE_FILES = {
    "/": ("index.html", "text/html; charset=utf-8"),
    "/status.js": ("status.js", "text/javascript; charset=utf-8"),
    "/status.css": ("status.css", "text/css; charset=utf-8"),
}


def _offline_docs() -> Path | None:
    """The directory of fastapi-offline's copies of swagger-ui and redoc (None: not
    installed). Found, not imported: the server needs its files only."""
    spec = importlib.util.find_spec("fastapi_offline")
    if spec is None or not spec.submodule_search_locations:
        return None
    static = Path(next(iter(spec.submodule_search_locations))) / "static"
    return static if (static / "swagger-ui-bundle.js").is_file() else None


DOCS_STATIC = _offline_docs()
DOCS_FILES = {
    "/docs/swagger-ui-bundle.js": ("swagger-ui-bundle.js", "text/javascript; charset=utf-8"),
    "/docs/swagger-ui.css": ("swagger-ui.css", "text/css; charset=utf-8"),
    "/docs/favicon.png": ("favicon.png", "image/png"),
    "/redoc/redoc.standalone.js": ("redoc.standalone.js", "text/javascript; charset=utf-8"),
}
DOCS_PAGES = ("/docs", "/docs/oauth2-redirect", "/redoc")
# Never behind the key: the page's shell and files, the docs and theirs (no data).
OPEN_PATHS = frozenset({*PAGE_FILES, *DOCS_FILES, *DOCS_PAGES})

router = APIRouter()  # the JSON: behind the key
open_router = APIRouter(include_in_schema=False)  # files and pages: public

# Nothing but this server: the pages may load and connect to it only (the docs' pages
# run an inline script and inline styles; the status page neither).
PAGE_POLICY = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
               "connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'")
DOCS_POLICY = ("default-src 'none'; script-src 'self' 'unsafe-inline'; style-src 'self' "
               "'unsafe-inline'; img-src 'self' data:; connect-src 'self'; worker-src 'self' "
               "blob:; frame-ancestors 'none'; base-uri 'none'")
# ReDoc's sidebar shows a logo from its makers' CDN; ``data:,`` fails at once, with no
# request, and ReDoc then leaves the logo out (its onError)
_REDOC_LOGO = b"https://cdn.redoc.ly/redoc/logo-mini.svg"

# -- files and pages ------------------------------------------------------------------


@functools.cache
def _redoc_script(path: Path) -> bytes:
    return path.read_bytes().replace(_REDOC_LOGO, b"data:,")


def _file_route(path: str, directory: Path | None, name: str, media_type: str) -> None:
    async def serve() -> Response:
        if directory is None or not (directory / name).is_file():
            return HTMLResponse(_missing_docs(), status_code=404)
        # no-cache: revalidated (ETag) each time, so a new server's page is never stale
        headers = {"Cache-Control": "no-cache"}
        if name == "index.html":
            headers["Content-Security-Policy"] = PAGE_POLICY
        if name == "redoc.standalone.js":
            return Response(_redoc_script(directory / name), media_type=media_type,
                            headers=headers)
        return FileResponse(directory / name, media_type=media_type, headers=headers)

    open_router.add_api_route(path, serve, methods=["GET"], name=f"file:{name}")


for _path, (_name, _type) in PAGE_FILES.items():
    _file_route(_path, STATIC, _name, _type)
for _path, (_name, _type) in DOCS_FILES.items():
    _file_route(_path, DOCS_STATIC, _name, _type)


def _missing_docs() -> str:
    return ("<!doctype html><title>adamserve: API docs</title><p>This server has no copy "
            "of the documentation pages' scripts: install the <code>fastapi-offline</code> "
            "package beside it (<code>pip install fastapi-offline</code>). The API's "
            "description is at <a href=\"/openapi.json\">/openapi.json</a>.")


def _docs_page(page: HTMLResponse) -> HTMLResponse:
    page.headers["Content-Security-Policy"] = DOCS_POLICY
    return page


@open_router.get("/docs")
async def swagger_ui() -> Response:
    if DOCS_STATIC is None:
        return HTMLResponse(_missing_docs())
    # validatorUrl None: no badge fetched from the validator's site
    return _docs_page(get_swagger_ui_html(
        openapi_url="/openapi.json", title="adamserve: API docs",
        swagger_js_url="/docs/swagger-ui-bundle.js", swagger_css_url="/docs/swagger-ui.css",
        swagger_favicon_url="/docs/favicon.png", oauth2_redirect_url="/docs/oauth2-redirect",
        swagger_ui_parameters={"validatorUrl": None}))


@open_router.get("/docs/oauth2-redirect")
async def swagger_ui_redirect() -> Response:
    return get_swagger_ui_oauth2_redirect_html()


@open_router.get("/redoc")
async def redoc() -> Response:
    if DOCS_STATIC is None:
        return HTMLResponse(_missing_docs())
    return _docs_page(get_redoc_html(openapi_url="/openapi.json", title="adamserve: API docs",
                                     redoc_js_url="/redoc/redoc.standalone.js",
                                     redoc_favicon_url="/docs/favicon.png",
                                     with_google_fonts=False))


# -- the JSON ---------------------------------------------------------------------------


class RoundNow(BaseModel):
    step: int = Field(description="The step the round is for")
    state: str = Field(description="open, staged or lamb (waiting for a commit)")
    arrived: int = Field(description="Pushes in it so far")
    missing: list[str] = Field(description="Workers of the previous round not in it yet")


class SessionStatus(BaseModel):
    session_id: str = Field(description="As the caller names it (an admin: tenant~id for "
                                        "another tenant's)")
    tenant: str
    algorithm: str
    backend: str
    step: int
    numel: int = Field(description="Parameters (elements of every tensor)")
    state_bytes: int
    bytes_per_parameter: float
    workers: int
    mode: str = Field(description="sync or async")
    round: RoundNow | None = Field(None, description="The round open or staged now")
    last_step_time: str | None = Field(None, description="RFC 3339; absent before a step")
    checkpointed_step: int = Field(description="Step of the last checkpoint; -1: none")
    checkpoint_time: str | None = Field(None, description="RFC 3339; absent without one")


class StatusResponse(BaseModel):
    server_time: str = Field(description="RFC 3339")
    history_capacity: int = Field(description="Entries each session's history keeps")
    sessions: list[SessionStatus]


class HistoryEntry(BaseModel):
    step: int = Field(description="The step it was for (a skipped step or failed round: "
                                  "the one it would have been)")
    time: str = Field(description="When it ended, RFC 3339")
    lr: list[float] = Field(description="Per group (at most 16), the lr the step used")
    grad_norm: float | None = Field(None, description="Global gradient norm, where computed")
    skipped: bool = Field(description="Non-finite gradients: nothing applied")
    nonfinite_tensors: int
    failed: str = Field(description="A round that failed: why; else empty")
    latency_seconds: float | None = Field(None, description="The request's service time "
                                                            "(a round: first push to applied)")
    bytes_in: int = Field(description="Tensor bytes the step's requests carried")
    bytes_out: int = Field(description="Tensor bytes the answers carried")
    contributors: int = Field(description="Pushes a round averaged; 0: not a round")
    missing: list[str] = Field(description="Workers of the previous round absent (at most 32 "
                                           "named)")
    missing_count: int


class Percentiles(BaseModel):
    count: int
    p50: float | None = None
    p90: float | None = None
    p99: float | None = None
    max: float | None = None


class FutureSchedule(BaseModel):
    from_step: int = Field(description="The first step of the series")
    lr: list[list[float]] = Field(description="Per group, the lr of each next step")


class HistoryResponse(BaseModel):
    session_id: str
    step: int = Field(description="The session's step count now")
    capacity: int
    recorded: int = Field(description="Entries ever recorded (the oldest beyond capacity "
                                      "are gone)")
    groups: int
    entries: list[HistoryEntry] = Field(description="Oldest first")
    latency_seconds: Percentiles = Field(description="Over the entries' latencies")
    schedule: FutureSchedule


def _rfc3339(t: float) -> str:
    return datetime.fromtimestamp(t, UTC).isoformat(timespec="milliseconds").replace(
        "+00:00", "Z")


def _json(value: dict[str, Any]) -> Response:
    return Response(to_json(value), media_type="application/json",
                    headers={"Cache-Control": "no-store"})


def _session_of(service: OptimizerService, info: SessionInfo) -> Session | None:
    try:
        return service.store.get(names.qualified(info.tenant, info.id))
    except NotFound:  # deleted since it was listed
        return None


def _round(session: Session) -> dict[str, Any] | None:
    """The current round, read without the session's lock (a view: a step is never
    held up by the page; the dict and set copies are single operations)."""
    r = session.rounds.current
    if r is None:
        return None
    pushed = set(dict(r.pushes))
    return {"step": r.step, "state": r.state.value, "arrived": len(pushed),
            "missing": sorted(session.rounds.members - pushed)[:history.MAX_NAMES]}


def _status_row(info: SessionInfo, session: Session, viewer: str) -> dict[str, Any]:
    row: dict[str, Any] = {
        "session_id": names.shown(session.id, viewer), "tenant": info.tenant,
        "algorithm": info.algorithm, "backend": info.backend, "step": info.step,
        "numel": info.numel, "state_bytes": info.state_bytes,
        "bytes_per_parameter": info.state_bytes / info.numel if info.numel else 0.0,
        "workers": info.workers.count, "mode": info.workers.mode,
        "checkpointed_step": info.checkpointed_step,
    }
    r = _round(session)
    if r is not None:
        row["round"] = r
    last = session.history.last_time()
    if last is not None:
        row["last_step_time"] = _rfc3339(last)
    if info.checkpointed_step >= 0:
        row["checkpoint_time"] = _rfc3339(
            time.time() - (time.monotonic() - session.checkpointed_at))
    return row


def status(service: OptimizerService, caller: Caller) -> dict[str, Any]:
    """A row per session the caller has (the service's listing decides which)."""
    rows = []
    for info in service.list(caller=caller):
        session = _session_of(service, info)
        if session is not None:
            rows.append(_status_row(info, session, caller.tenant))
    return {"server_time": _rfc3339(time.time()), "history_capacity": history.CAPACITY,
            "sessions": rows}


def _entry(e: history.Entry) -> dict[str, Any]:
    out: dict[str, Any] = {
        "step": e.step, "time": _rfc3339(e.time), "lr": list(e.lr), "skipped": e.skipped,
        "nonfinite_tensors": e.nonfinite, "failed": e.failed, "bytes_in": e.bytes_in,
        "bytes_out": e.bytes_out, "contributors": e.contributors, "missing": list(e.missing),
        "missing_count": e.missing_count}
    if e.grad_norm is not None:
        out["grad_norm"] = e.grad_norm
    if e.latency is not None:
        out["latency_seconds"] = e.latency
    return out


def percentiles(values: list[float]) -> dict[str, Any]:
    """p50, p90, p99 and the max of ``values`` (none of them without values)."""
    if not values:
        return {"count": 0}
    p50, p90, p99 = (float(x) for x in np.percentile(values, [50, 90, 99]))
    return {"count": len(values), "p50": p50, "p90": p90, "p99": p99, "max": max(values)}


def session_history(service: OptimizerService, session_id: str, caller: Caller,
                    future: int, last: int | None) -> dict[str, Any]:
    info = service.describe(session_id, caller=caller)  # the caller's sessions only
    session = service.store.get(caller.resolve(session_id))
    entries = session.history.snapshot(last)
    opt = session.opt
    try:
        lr = history.future_lr(opt, future)
    except Exception:  # a schedule this server cannot compute (described as none)
        lr = []
    return {
        "session_id": session_id, "step": info.step, "capacity": session.history.capacity,
        "recorded": session.history.recorded, "groups": len(info.groups),
        "entries": [_entry(e) for e in entries],
        "latency_seconds": percentiles([e.latency for e in entries
                                        if e.latency is not None and math.isfinite(e.latency)]),
        "schedule": {"from_step": info.step + 1, "lr": lr},
    }


@router.get("/v2/status", response_model=StatusResponse, responses=_ERRORS,
            summary="Every session of the caller at a glance (the status page's table)")
async def get_status(service: Service, caller: CallerOf) -> Response:
    return _json(await run_in_threadpool(status, service, caller))


@router.get(PREFIX + "/{session_id}/history", response_model=HistoryResponse,
            responses=_ERRORS, summary="A session's recent steps (its history ring buffer)")
async def get_history(
        session_id: str, service: Service, caller: CallerOf,
        future_steps: Annotated[int, Query(ge=0, le=history.MAX_FUTURE, description=(
            "Steps of the schedule's future to compute, per group"))] = DEFAULT_FUTURE,
        last: Annotated[int | None, Query(ge=0, le=history.CAPACITY, description=(
            "Only the newest this many entries (default: all kept)"))] = None,
) -> Response:
    """The newest entries of the session's history (one per step, skipped step or
    failed round; the last ``capacity`` are kept), latency percentiles over them, and
    each group's lr for the next ``future_steps`` steps of its schedule."""
    return _json(await run_in_threadpool(session_history, service, session_id, caller,
                                         future_steps, last))
