"""Routes: thin async handlers over :class:`~adamserve.service.OptimizerService`.

Each handler makes one trip to the thread pool (the service blocks: session locks and
kernels; a trip costs ~0.1 ms) where it parses its body, calls the service and
converts the domain result to a wire model. A body with tensors is read on the
event loop only up to its JSON part (:mod:`.body`); the service reads the tensors'
bytes as it decodes them (:mod:`.binary`), after it has looked the session up.
Errors are raised, never returned; :mod:`.errors` maps them.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator, Sequence
from typing import Annotated, Any, TypeVar, cast

from fastapi import APIRouter, Depends, Query, Request, Response
from google.protobuf.message import Message
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel, ValidationError
from pydantic_core import to_json
from starlette.concurrency import run_in_threadpool
from starlette.responses import JSONResponse

from adamserve import metrics
from adamserve.engine.dtypes import WIRE_DTYPES
from adamserve.errors import InvalidArgument, Unauthenticated, shown
from adamserve.service import Caller, OptimizerService, SessionInfo, StepResult, TensorChunk
from adamserve.transports import convert
from adamserve.transports.http import binary
from adamserve.transports.http.body import Body, open_body, read_blob
from adamserve.transports.http.errors import describe_validation
from adamserve.transports.http.schemas import (
    AddTensorsRequest,
    CheckpointInfo,
    CommitRequest,
    CreateSessionRequest,
    ErrorBody,
    Health,
    ListCheckpointsResponse,
    ListSessionsResponse,
    ListSharedMemoryResponse,
    ParametersRequest,
    PullRequest,
    PullResponse,
    PushRequest,
    RestoreCheckpointRequest,
    Session,
    SetHyperparametersRequest,
    SetScheduleRequest,
    SetWorkersRequest,
    SharedMemoryRef,
    SharedMemoryRegion,
    StateFormat,
    StepRequest,
    StepResponse,
    TensorIn,
)
from adamserve.transports.state_codec import decode_state, encode_state
from adamserve_proto.v2 import optimizer_pb2 as pb

T = TypeVar("T")
P = TypeVar("P", bound=Message)

PREFIX = "/v2/sessions"
SHM_PREFIX = "/v2/shared-memory"

# Models only referenced from openapi_extra; the app adds them to the components.
RAW_BODY_MODELS: tuple[type[BaseModel], ...] = (
    CreateSessionRequest, AddTensorsRequest, StepRequest, PushRequest, PullRequest,
    ParametersRequest)

_ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorBody, "description": text} for code, text in (
        (400, "Invalid argument: the message names the field or tensor and what was expected"),
        (401, "Missing or wrong bearer token"),
        (404, "No such session, checkpoint or shared-memory region"),
        (408, "A pull that waited for a step ran out of time"),
        (409, "Already exists / failed precondition / a synchronous round failed (aborted): "
              "the body's reason says which"),
        (413, "Body, state or memory limit exceeded"),
    )
}


def _tensor_body(model: type[BaseModel], *, required: bool = True) -> dict[str, Any]:
    """openapi_extra for a route whose body is JSON or the binary layout."""
    ref = {"$ref": f"#/components/schemas/{model.__name__}"}
    return {
        "parameters": [
            {"name": binary.HEADER_LENGTH, "in": "header", "required": False,
             "description": "Length of the JSON part of a binary body",
             "schema": {"type": "integer", "minimum": 0}},
        ],
        "requestBody": {
            "required": required,
            "content": {
                "application/json": {"schema": ref},
                binary.OCTET_STREAM: {
                    "schema": {"type": "string", "format": "binary",
                               "description": binary.BINARY_LAYOUT}},
            },
            "description": binary.BINARY_LAYOUT,
        },
    }


def _binary_ok(model: type[BaseModel], text: str) -> dict[int | str, dict[str, Any]]:
    return {**_ERRORS, 200: {
        "model": model, "description": text + " " + binary.BINARY_OUTPUT,
        "content": {binary.OCTET_STREAM: {"schema": {"type": "string", "format": "binary"}}},
    }}


# Endpoints the app's gate calls itself, bypassing FastAPI's routing and dependency
# solving (see app._Gate): the small-step hot path. Each takes its path parameters,
# ``request`` and ``service`` by name.
DIRECT = frozenset({"step", "push"})

# Every route that reads a body, and the call a read-only key may not make (None: any
# key may): the gate refuses a request the caller's role or sessions would refuse (403,
# 404) before a byte of its body is read, and counts the body in the server's budget.
BODY_ROUTES: dict[str, str | None] = {
    "create_session": "CreateSession", "add_tensors": "AddTensors", "step": "Step",
    "push": "Step", "commit": "Commit", "set_workers": "SetWorkers",
    "restore_checkpoint": "RestoreCheckpoint", "pull": None,
    "set_parameters": "SetParameters", "set_hyperparameters": "SetHyperparameters",
    "set_schedule": "SetSchedule", "import_state": "ImportState",
    "register_shared_memory": "RegisterSharedMemory",
}

router = APIRouter()  # /v2: guarded by the token when there is one
open_router = APIRouter()  # health probes, never guarded


async def get_service(request: Request) -> OptimizerService:
    # async: FastAPI runs a plain-def dependency in the thread pool, a trip per request
    return cast(OptimizerService, request.app.state.service)


Service = Annotated[OptimizerService, Depends(get_service)]


async def get_caller(request: Request) -> Caller:
    """The caller the gate admitted (it authenticates every /v2 request first)."""
    caller = request.scope.get("state", {}).get("caller")
    if not isinstance(caller, Caller):  # a route the gate did not see: refuse, never guess
        raise Unauthenticated("missing or wrong API key (token): send Authorization: "
                              "Bearer <key>")
    return caller


CallerOf = Annotated[Caller, Depends(get_caller)]


async def _call(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """Run blocking work (service calls, big JSON parsing) off the event loop."""
    return await run_in_threadpool(fn, *args, **kwargs)


async def _body(request: Request) -> Body:
    """The request's JSON part, the rest unread (see :mod:`.body`)."""
    state = request.app.state
    return await open_body(request, cast(int, state.max_json_bytes),
                           cast(float, state.body_idle_timeout))


def _tensors(body: Body, tensors: Sequence[TensorIn]) -> Iterator[TensorChunk]:
    """The request's tensors, checked now, their bytes read as the service asks."""
    return binary.chunks(binary.plan(tensors, body.binary, body.payload.length), body.payload)


def _message(body: BaseModel, message: P, *, exclude: set[str] | None = None, **fields: Any
             ) -> P:
    """``body`` (less ``exclude``, the HTTP-only fields) as the proto message it mirrors,
    with ``fields`` (the path's session_id) set; json_format reads it as gRPC's bytes are
    read, enums by name and durations as strings."""
    data = body.model_dump(exclude=exclude, exclude_none=True)
    convert.parse_json({**data, **fields}, message, type(body).__name__)
    return message


def _json(value: dict[str, Any], status: int = 200) -> Response:
    return Response(to_json(value, inf_nan_mode="constants"), status_code=status,
                    media_type="application/json")


def _proto_json(msg: Message, status: int = 200) -> Response:
    return _json(convert.message_json(msg), status)


def _session(info: SessionInfo, status: int = 200) -> Response:
    return _proto_json(convert.session_message(info), status)


def _tensors_response(request: Request, result: dict[str, Any], chunks: list[TensorChunk],
                      binary_output: bool) -> Response:
    metrics.BYTES_OUT.labels("http").inc(sum(memoryview(c.data).nbytes for c in chunks))
    if binary.wants_binary(request.headers, binary_output):
        result["params"] = binary.tensors_json(chunks, binary=True)
        return binary.BinaryResponse(to_json(result, inf_nan_mode="constants"),
                                     [c.data for c in chunks])
    result["params"] = binary.tensors_json(chunks, binary=False)
    return _json(result)


def _step_out(r: StepResult) -> dict[str, Any]:
    return convert.message_json(convert.step_status(r))


# -- sessions ----------------------------------------------------------------


@router.post(PREFIX, status_code=201, response_model=Session, responses=_ERRORS,
             openapi_extra=_tensor_body(CreateSessionRequest), summary="Create a session")
async def create_session(request: Request, service: Service, caller: CallerOf) -> Response:
    return await _call(_create, service, await _body(request), caller=caller)


def _create(service: OptimizerService, body: Body, *, caller: Caller) -> Response:
    try:
        req = binary.parse_json(CreateSessionRequest, body.json)
        initial = _tensors(body, req.initial)
        config = convert.session_config(_message(req, pb.SessionSpec(), exclude={"initial"}))
        info = service.create(req.session_id, config, initial, caller=caller)
    finally:
        body.payload.close()
    return _session(info, status=201)


@router.post(PREFIX + "/{session_id}/tensors", response_model=Session,
             responses=_ERRORS, openapi_extra=_tensor_body(AddTensorsRequest),
             summary="Add tensors (optionally a new parameter group) to a session")
async def add_tensors(session_id: str, request: Request, service: Service, caller: CallerOf) -> Response:
    """Grow a live session, as torch.optim's add_param_group: the new tensors' step
    counts start at 0; the other tensors, their state and the session's checkpoints
    are kept. A refused request changes nothing."""
    return await _call(_add_tensors, service, session_id, await _body(request), caller=caller)


def _add_tensors(service: OptimizerService, session_id: str, body: Body, *, caller: Caller) -> Response:
    try:
        req = binary.parse_json(AddTensorsRequest, body.json)
        initial = _tensors(body, req.initial)
        spec = _message(req, pb.AddTensorsSpec(), exclude={"initial"}, session_id=session_id)
        tensors = convert.tensor_specs(spec.tensors)
        group = (convert.group_dict(spec.new_group, "new_group")
                 if spec.HasField("new_group") else None)
        info = service.add_tensors(session_id, tensors, group, initial, caller=caller)
    finally:
        body.payload.close()
    return _session(info)


@router.get(PREFIX, response_model=ListSessionsResponse, responses=_ERRORS,
            summary="List sessions, ordered by id, a page at a time")
async def list_sessions(
        service: Service, caller: CallerOf,
        page_size: Annotated[int, Query(ge=0, le=2**31 - 1, description=(
            f"Sessions per page, at most {convert.MAX_PAGE_SIZE}; 0: "
            f"{convert.DEFAULT_PAGE_SIZE}"))] = 0,
        page_token: Annotated[str, Query(max_length=1024, description=(
            "The previous page's next_page_token; empty for the first page"))] = "",
) -> Response:
    infos, token = convert.page(await _call(service.list, caller=caller), page_size, page_token)
    return _proto_json(pb.ListSessionsResponse(
        sessions=[convert.session_message(i) for i in infos], next_page_token=token))


@router.get(PREFIX + "/{session_id}", response_model=Session, responses=_ERRORS,
            summary="Describe a session")
async def get_session(session_id: str, service: Service, caller: CallerOf) -> Response:
    return _session(await _call(service.describe, session_id, caller=caller))


@router.delete(PREFIX + "/{session_id}", status_code=204, responses=_ERRORS,
               summary="Delete a session and its checkpoints")
async def delete_session(session_id: str, service: Service, caller: CallerOf) -> Response:
    await _call(service.delete, session_id, caller=caller)
    return Response(status_code=204)


# -- steps -------------------------------------------------------------------


@router.post(PREFIX + "/{session_id}/step", response_model=StepResponse,
             responses=_binary_ok(StepResponse, "The step's outcome and updated parameters."),
             openapi_extra=_tensor_body(StepRequest), summary="Apply one step, return params")
async def step(session_id: str, request: Request, service: Service, caller: CallerOf) -> Response:
    # one trip to the thread pool for the whole step: each trip costs ~0.1-0.2 ms
    return await _call(_step, service, session_id, request, await _body(request), push=False, caller=caller)


@router.post(PREFIX + "/{session_id}/push", response_model=StepResponse, responses=_ERRORS,
             openapi_extra=_tensor_body(PushRequest),
             summary="Apply one step, return no params")
async def push(session_id: str, request: Request, service: Service, caller: CallerOf) -> Response:
    return await _call(_step, service, session_id, request, await _body(request), push=True, caller=caller)


def _step(service: OptimizerService, session_id: str, request: Request, body: Body,
          push: bool, *, caller: Caller) -> Response:
    try:
        req: StepRequest | PushRequest = (binary.parse_json(PushRequest, body.json) if push
                                          else binary.parse_json(StepRequest, body.json))
        header = _step_header(req, session_id)
        if not req.gradients and req.gradients_region is None:
            # the service counts a zero-size tensor as always present, so it would take
            # a step for a request that sends nothing
            raise InvalidArgument("the step request carries no gradient tensors")
        grads = _tensors(body, req.gradients)
        r = convert.run_step(service, header, grads, push=push, wait=None, caller=caller)
    finally:
        body.payload.close()
    out = _step_out(r)
    if isinstance(req, PushRequest):
        return _json(out)
    return _tensors_response(request, out, r.params, req.binary_output)


def _step_header(req: StepRequest | PushRequest, session_id: str) -> pb.StepHeader:
    """The body as the proto's StepHeader, which every transport's step goes through."""
    if (req.worker_id is None) != (req.sequence is None):
        raise InvalidArgument("worker_id and sequence go together: send both or neither")
    header = pb.StepHeader(session_id=session_id, require_all=req.require_all,
                           worker_id=req.worker_id or "", sequence=req.sequence or 0,
                           gradients_datatype=req.gradients_datatype)
    if isinstance(req, StepRequest):
        if req.return_datatype not in WIRE_DTYPES:
            raise InvalidArgument(f"return_datatype {shown(req.return_datatype)}: expected one of "
                                  f"{', '.join(WIRE_DTYPES)}")
        header.return_datatype = req.return_datatype
        header.return_rows = req.return_rows
        _region(header.params_region, req.params_region)
    if req.base_step is not None:
        header.base_step = req.base_step
    _region(header.gradients_region, req.gradients_region)
    return header


def _region(msg: pb.SharedMemoryRef, ref: SharedMemoryRef | None) -> None:
    if ref is not None:
        msg.region, msg.offset, msg.byte_size = ref.region, ref.offset, ref.byte_size


@router.post(PREFIX + "/{session_id}/commit", response_model=StepResponse,
             responses=_binary_ok(StepResponse, "The step's outcome and updated parameters."),
             summary="Apply a shard's staged step with sums over every shard")
async def commit(session_id: str, body: CommitRequest, request: Request,
                 service: Service, caller: CallerOf) -> Response:
    """The second phase of a sharded step (sessions created with workers.exchange): see
    the proto's Commit."""
    rtype = None if body.skip_params else body.return_datatype
    if rtype is not None and rtype not in WIRE_DTYPES:
        raise InvalidArgument(f"return_datatype {shown(rtype)}: expected one of "
                              f"{', '.join(WIRE_DTYPES)}")
    return await _call(_commit, service, session_id, request, body, rtype, caller=caller)


def _commit(service: OptimizerService, session_id: str, request: Request, body: CommitRequest,
            rtype: str | None, *, caller: Caller) -> Response:
    r = service.commit(session_id, body.step, body.tensor_sumsq, body.total_sumsq,
                       param_sumsq=body.param_sumsq, update_sumsq=body.update_sumsq,
                       round_id=body.round_id, return_datatype=rtype, caller=caller)
    return _tensors_response(request, _step_out(r), r.params, body.binary_output)


@router.put(PREFIX + "/{session_id}/workers", response_model=Session, responses=_ERRORS,
            summary="Change the number of workers of a live session")
async def set_workers(session_id: str, body: SetWorkersRequest, service: Service, caller: CallerOf) -> Response:
    return _session(await _call(service.set_workers, session_id, body.count, caller=caller))


@router.get(PREFIX + "/{session_id}/checkpoints", response_model=ListCheckpointsResponse,
            responses=_ERRORS, summary="Steps of the session's complete checkpoints")
async def list_checkpoints(session_id: str, service: Service, caller: CallerOf) -> Response:
    steps = await _call(service.list_checkpoints, session_id, caller=caller)
    return _proto_json(pb.ListCheckpointsResponse(steps=steps))


@router.post(PREFIX + "/{session_id}/restore", response_model=Session, responses=_ERRORS,
             summary="Roll the session back to its checkpoint of a step")
async def restore_checkpoint(session_id: str, body: RestoreCheckpointRequest,
                             service: Service, caller: CallerOf) -> Response:
    return _session(await _call(service.restore_checkpoint, session_id, body.step, caller=caller))


@router.post(PREFIX + "/{session_id}/pull", response_model=PullResponse,
             responses=_binary_ok(PullResponse, "The session's current parameters."),
             openapi_extra=_tensor_body(PullRequest, required=False),
             summary="Read parameters")
async def pull(session_id: str, request: Request, service: Service, caller: CallerOf) -> Response:
    return await _call(_pull, service, session_id, request, await _body(request), caller=caller)


def _pull(service: OptimizerService, session_id: str, request: Request, body: Body, *, caller: Caller) -> Response:
    req = binary.parse_json(PullRequest, body.json)
    msg = _message(req, pb.PullRequest(), exclude={"binary_output", "rows"},
                   session_id=session_id)
    timeout = convert.seconds(msg.timeout, "timeout") if msg.HasField("timeout") else None
    rows = [(r.name, binary.row_bytes(r.rows)) for r in req.rows]
    chunks = service.pull(session_id, list(msg.names) or None, req.datatype,
                          min_step=msg.min_step, timeout=timeout, rows=rows, caller=caller)
    return _tensors_response(request, {}, chunks, req.binary_output)


@router.put(PREFIX + "/{session_id}/params", response_model=Session, responses=_ERRORS,
            openapi_extra=_tensor_body(ParametersRequest), summary="Overwrite parameters")
async def set_parameters(session_id: str, request: Request, service: Service, caller: CallerOf) -> Response:
    """Overwrite the values of some tensors, as torch's in-place changes of parameters
    between steps (loading weights, clamping): the optimizer state and step count are
    kept. While a round of pushes is open, values equal to the session's are accepted
    and change nothing; others get 409. A refused request changes nothing."""
    return await _call(_set_parameters, service, session_id, await _body(request), caller=caller)


def _set_parameters(service: OptimizerService, session_id: str, body: Body, *, caller: Caller) -> Response:
    try:
        req = binary.parse_json(ParametersRequest, body.json)
        info = service.set_parameters(session_id, _tensors(body, req.values), caller=caller)
    finally:
        body.payload.close()
    return _session(info)


# -- hyperparameters, schedule, state -----------------------------------------


@router.patch(PREFIX + "/{session_id}/hyperparameters", response_model=Session,
              responses=_ERRORS, summary="Change one group's hyperparameters")
async def set_hyperparameters(session_id: str, body: SetHyperparametersRequest,
                              service: Service, caller: CallerOf) -> Response:
    msg = _message(body, pb.SetHyperparametersRequest(), session_id=session_id)
    changes = convert.group_dict(msg.changes, "changes")
    return _session(await _call(service.set_hyperparameters, session_id, msg.group, changes, caller=caller))


@router.put(PREFIX + "/{session_id}/schedule", response_model=Session,
            responses=_ERRORS, summary="Set or remove the learning-rate schedule")
async def set_schedule(session_id: str, body: SetScheduleRequest, service: Service, caller: CallerOf) -> Response:
    msg = _message(body, pb.SetScheduleRequest(), session_id=session_id)
    schedule = convert.schedule_dict(msg.schedule) if msg.HasField("schedule") else None
    return _session(await _call(service.set_schedule, session_id, schedule, caller=caller))


_STATE_DOC = ("The torch-format state_dict as one safetensors file: tensors "
              "`state.<index>.<slot>`, metadata `adamserve: state_dict/1` and `json` "
              "(param_groups and per-parameter scalars).")


@router.get(PREFIX + "/{session_id}/state", response_class=Response, summary="Export state",
            responses={**_ERRORS, 200: {"description": _STATE_DOC, "content": {
                binary.OCTET_STREAM: {"schema": {"type": "string", "format": "binary"}}}}})
async def export_state(session_id: str, service: Service, caller: CallerOf,
                       format: Annotated[StateFormat, Query()] = "STATE_FORMAT_UNSPECIFIED",
                       ) -> Response:
    sd = await _call(service.export_state, session_id, caller=caller,
                     native=convert.native_format(format))
    blob = await _call(encode_state, sd)
    metrics.BYTES_OUT.labels("http").inc(len(blob))
    return Response(blob, media_type=binary.OCTET_STREAM)


class _GroupShape(BaseModel):
    """What import_state indexes without checking: params and param_names."""

    params: list[int]
    param_names: list[str] | None = None


def _check_state(state: dict[str, Any]) -> None:
    groups = state.get("param_groups")
    if not isinstance(groups, list):
        raise InvalidArgument("state blob: param_groups must be a list")
    for g, group in enumerate(groups):
        if not isinstance(group, dict):
            raise InvalidArgument(f"state blob: param_groups[{g}] must be an object")
        try:
            shape = _GroupShape.model_validate(
                {"params": group.get("params", []), "param_names": group.get("param_names")})
        except ValidationError as exc:
            raise InvalidArgument(f"state blob: param_groups[{g}]: "
                                  f"{describe_validation(exc.errors(include_url=False))}"
                                  ) from None
        if shape.param_names is not None and len(shape.param_names) != len(shape.params):
            raise InvalidArgument(
                f"state blob: param_groups[{g}] has {len(shape.params)} params but "
                f"{len(shape.param_names)} param_names")


def _decode_state(blob: bytes) -> dict[str, Any]:
    try:
        state = decode_state(blob)
    except (ValueError, TypeError, KeyError, AttributeError, IndexError) as exc:
        # decode_state raises ValueError for what it checks; the rest are blob
        # shapes it does not check (a list where an object belongs, ...)
        msg = str(exc) if isinstance(exc, ValueError) else f"state blob: malformed ({exc!r})"
        raise InvalidArgument(msg) from None
    _check_state(state)
    return state


@router.put(PREFIX + "/{session_id}/state", response_model=Session, responses=_ERRORS,
            summary="Import state",
            openapi_extra={"requestBody": {"required": True, "description": _STATE_DOC,
                                           "content": {binary.OCTET_STREAM: {"schema": {
                                               "type": "string", "format": "binary"}}}}})
async def import_state(session_id: str, request: Request, service: Service, caller: CallerOf) -> Response:
    caller.require_write("ImportState", session_id)  # 403 and 404 before reading a blob
    info = await _call(service.describe, session_id, caller=caller)
    with contextlib.ExitStack() as held:  # the blob's bytes count against the caps
        blob = await read_blob(
            request, convert.import_limit(info.state_bytes), request.app.state.body_idle_timeout,
            functools.partial(service.holding, session_id, caller=caller), held)
        metrics.BYTES_IN.labels("http").inc(len(blob))
        state = await _call(_decode_state, blob)
        del blob
        return _session(await _call(service.import_state, session_id, state, caller=caller))


@router.post(PREFIX + "/{session_id}/checkpoint", response_model=CheckpointInfo,
             responses=_ERRORS, summary="Write a durable checkpoint now")
async def checkpoint(session_id: str, service: Service, caller: CallerOf) -> Response:
    info = await _call(service.checkpoint, session_id, caller=caller)
    return _proto_json(convert.checkpoint_message(info))


# -- same-host shared memory ----------------------------------------------------------
# Each the service's call of that name, for the one tenant there is (as over gRPC); a
# server started without --allow-shared-memory answers 409 (SHARED_MEMORY_DISABLED).


@router.post(SHM_PREFIX, status_code=201, response_model=SharedMemoryRegion,
             responses=_ERRORS, summary="Register a shared-memory region")
async def register_shared_memory(body: SharedMemoryRegion, service: Service, caller: CallerOf) -> Response:
    """Map ``byte_size`` bytes of the POSIX shared-memory object ``key`` (under /dev/shm on
    the server's host: a regular file of the server's user) as the region ``name``, for
    steps to name in ``gradients_region`` and ``params_region``. The same registration
    again returns the region; another one under a taken name is 409
    (SHARED_MEMORY_EXISTS)."""
    info = await _call(service.register_shared_memory, body.name, body.key, body.byte_size, caller=caller)
    return _proto_json(convert.region_message(info), status=201)


@router.delete(SHM_PREFIX + "/{name}", status_code=204, responses=_ERRORS,
               summary="Unregister a shared-memory region")
async def unregister_shared_memory(name: str, service: Service, caller: CallerOf) -> Response:
    """A step using the region finishes first; later steps naming it get 404
    (SHARED_MEMORY_NOT_FOUND)."""
    await _call(service.unregister_shared_memory, name, caller=caller)
    return Response(status_code=204)


@router.get(SHM_PREFIX, response_model=ListSharedMemoryResponse, responses=_ERRORS,
            summary="The registered shared-memory regions, ordered by name")
async def list_shared_memory(service: Service, caller: CallerOf) -> Response:
    infos = await _call(service.list_shared_memory, caller=caller)
    return _proto_json(pb.ListSharedMemoryResponse(
        regions=[convert.region_message(i) for i in infos]))


# -- operations ----------------------------------------------------------------


@router.get("/metrics", response_class=Response, summary="Prometheus metrics",
            responses={200: {"content": {CONTENT_TYPE_LATEST: {"schema": {"type": "string"}}}}})
async def prometheus_metrics() -> Response:
    return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)


@open_router.get("/healthz", response_model=Health, summary="Liveness")
async def healthz() -> Health:
    return Health(status="ok")


@open_router.get("/readyz", response_model=Health, summary="Readiness",
                 responses={503: {"model": Health, "description": "Not ready yet"}})
async def readyz(service: Service) -> Response:
    if service.ready:
        return JSONResponse({"status": "ready"})
    return JSONResponse({"status": "starting"}, status_code=503)
