"""Routes: thin async handlers over :class:`~adamserve.service.OptimizerService`.

Each handler parses its body (here or in :mod:`.binary`), runs the service call in
the thread pool (the service blocks: session locks and kernels) and converts the
domain result to a wire model. Errors are raised, never returned; :mod:`.errors`
maps them.
"""

from __future__ import annotations

from collections.abc import Callable
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
from adamserve.errors import InvalidArgument
from adamserve.service import OptimizerService, PushId, SessionInfo, StepResult, TensorChunk
from adamserve.transports import convert
from adamserve.transports.http import binary
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
    ParametersRequest,
    PullRequest,
    PullResponse,
    PushRequest,
    RestoreCheckpointRequest,
    Session,
    SetHyperparametersRequest,
    SetScheduleRequest,
    SetWorkersRequest,
    StepRequest,
    StepResponse,
)
from adamserve.transports.state_codec import decode_state, encode_state
from adamserve_proto.v2 import optimizer_pb2 as pb

T = TypeVar("T")
M = TypeVar("M", bound=BaseModel)
P = TypeVar("P", bound=Message)

PREFIX = "/v2/sessions"

# Models only referenced from openapi_extra; the app adds them to the components.
RAW_BODY_MODELS: tuple[type[BaseModel], ...] = (
    CreateSessionRequest, AddTensorsRequest, StepRequest, PushRequest, PullRequest,
    ParametersRequest)

_ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorBody, "description": text} for code, text in (
        (400, "Invalid argument: the message names the field or tensor and what was expected"),
        (401, "Missing or wrong bearer token"),
        (404, "No such session (or checkpoint)"),
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


router = APIRouter()  # /v2: guarded by the token when there is one
open_router = APIRouter()  # health probes, never guarded


async def get_service(request: Request) -> OptimizerService:
    # async: FastAPI runs a plain-def dependency in the thread pool, a trip per request
    return cast(OptimizerService, request.app.state.service)


Service = Annotated[OptimizerService, Depends(get_service)]


async def _call(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """Run blocking work (service calls, big JSON parsing) off the event loop."""
    return await run_in_threadpool(fn, *args, **kwargs)


async def _read(request: Request, model: type[M]) -> tuple[M, memoryview | None]:
    """The request's model and binary payload (see :func:`binary.parse_body`)."""
    raw = await request.body()
    limit = cast(int, request.app.state.max_json_bytes)
    return await _call(binary.parse_body, model, request.headers, raw, limit)


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


def _gradients(tensors: list[Any], payload: memoryview | None) -> list[TensorChunk]:
    chunks = binary.tensor_chunks(tensors, payload)
    if not chunks:
        # checked here too: the service counts a zero-size tensor as always present,
        # so it would take a step for a request that sends nothing
        raise InvalidArgument("the step request carries no gradient tensors")
    _count_in(chunks)
    return chunks


def _count_in(chunks: list[TensorChunk]) -> None:
    metrics.BYTES_IN.labels("http").inc(sum(len(c.data) for c in chunks))


def _tensors_response(request: Request, result: dict[str, Any], chunks: list[TensorChunk],
                      binary_output: bool) -> Response:
    metrics.BYTES_OUT.labels("http").inc(sum(len(c.data) for c in chunks))
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
async def create_session(request: Request, service: Service) -> Response:
    body, payload = await _read(request, CreateSessionRequest)
    chunks = await _call(binary.tensor_chunks, body.initial, payload)
    spec = _message(body, pb.SessionSpec(), exclude={"initial"})
    config = convert.session_config(spec)
    _count_in(chunks)
    info = await _call(service.create, body.session_id, config, chunks)
    return _session(info, status=201)


@router.post(PREFIX + "/{session_id}/tensors", response_model=Session,
             responses=_ERRORS, openapi_extra=_tensor_body(AddTensorsRequest),
             summary="Add tensors (optionally a new parameter group) to a session")
async def add_tensors(session_id: str, request: Request, service: Service) -> Response:
    """Grow a live session, as torch.optim's add_param_group: the new tensors' step
    counts start at 0; the other tensors, their state and the session's checkpoints
    are kept. A refused request changes nothing."""
    body, payload = await _read(request, AddTensorsRequest)
    chunks = await _call(binary.tensor_chunks, body.initial, payload)
    spec = _message(body, pb.AddTensorsSpec(), exclude={"initial"}, session_id=session_id)
    tensors = convert.tensor_specs(spec.tensors)
    group = (convert.group_dict(spec.new_group, "new_group")
             if spec.HasField("new_group") else None)
    _count_in(chunks)
    info = await _call(service.add_tensors, session_id, tensors, group, chunks)
    return _session(info)


@router.get(PREFIX, response_model=ListSessionsResponse, responses=_ERRORS,
            summary="List sessions, ordered by id, a page at a time")
async def list_sessions(
        service: Service,
        page_size: Annotated[int, Query(ge=0, le=2**31 - 1, description=(
            f"Sessions per page, at most {convert.MAX_PAGE_SIZE}; 0: "
            f"{convert.DEFAULT_PAGE_SIZE}"))] = 0,
        page_token: Annotated[str, Query(max_length=1024, description=(
            "The previous page's next_page_token; empty for the first page"))] = "",
) -> Response:
    infos, token = convert.page(await _call(service.list), page_size, page_token)
    return _proto_json(pb.ListSessionsResponse(
        sessions=[convert.session_message(i) for i in infos], next_page_token=token))


@router.get(PREFIX + "/{session_id}", response_model=Session, responses=_ERRORS,
            summary="Describe a session")
async def get_session(session_id: str, service: Service) -> Response:
    return _session(await _call(service.describe, session_id))


@router.delete(PREFIX + "/{session_id}", status_code=204, responses=_ERRORS,
               summary="Delete a session and its checkpoints")
async def delete_session(session_id: str, service: Service) -> Response:
    await _call(service.delete, session_id)
    return Response(status_code=204)


# -- steps -------------------------------------------------------------------


@router.post(PREFIX + "/{session_id}/step", response_model=StepResponse,
             responses=_binary_ok(StepResponse, "The step's outcome and updated parameters."),
             openapi_extra=_tensor_body(StepRequest), summary="Apply one step, return params")
async def step(session_id: str, request: Request, service: Service) -> Response:
    raw = await request.body()
    # one trip to the thread pool for the whole step: each trip costs ~0.1-0.2 ms
    return await _call(_step, service, session_id, request, raw, push=False)


def _step(service: OptimizerService, session_id: str, request: Request, raw: bytes,
          push: bool) -> Response:
    limit = cast(int, request.app.state.max_json_bytes)
    body: StepRequest | PushRequest
    rtype: str | None = None
    if push:
        body, payload = binary.parse_body(PushRequest, request.headers, raw, limit)
    else:
        step_body, payload = binary.parse_body(StepRequest, request.headers, raw, limit)
        body, rtype = step_body, step_body.return_datatype
        if rtype not in WIRE_DTYPES:
            raise InvalidArgument(f"return_datatype {rtype!r}: expected one of "
                                  f"{', '.join(WIRE_DTYPES)}")
    chunks = _gradients(body.gradients, payload)
    r = service.step(session_id, chunks, return_datatype=rtype, require_all=body.require_all,
                     push_id=_push_id(body), base_step=body.base_step)
    out = _step_out(r)
    if isinstance(body, PushRequest):
        return _json(out)
    return _tensors_response(request, out, r.params, body.binary_output)


@router.post(PREFIX + "/{session_id}/push", response_model=StepResponse, responses=_ERRORS,
             openapi_extra=_tensor_body(PushRequest),
             summary="Apply one step, return no params")
async def push(session_id: str, request: Request, service: Service) -> Response:
    raw = await request.body()
    return await _call(_step, service, session_id, request, raw, push=True)


@router.post(PREFIX + "/{session_id}/commit", response_model=StepResponse,
             responses=_binary_ok(StepResponse, "The step's outcome and updated parameters."),
             summary="Apply a shard's staged step with sums over every shard")
async def commit(session_id: str, body: CommitRequest, request: Request,
                 service: Service) -> Response:
    """The second phase of a sharded step (sessions created with workers.exchange): see
    the proto's Commit."""
    rtype = None if body.skip_params else body.return_datatype
    if rtype is not None and rtype not in WIRE_DTYPES:
        raise InvalidArgument(f"return_datatype {rtype!r}: expected one of "
                              f"{', '.join(WIRE_DTYPES)}")
    r = await _call(service.commit, session_id, body.step, body.tensor_sumsq, body.total_sumsq,
                    param_sumsq=body.param_sumsq, update_sumsq=body.update_sumsq,
                    round_id=body.round_id, return_datatype=rtype)
    return await _call(_tensors_response, request, _step_out(r), r.params, body.binary_output)


@router.put(PREFIX + "/{session_id}/workers", response_model=Session, responses=_ERRORS,
            summary="Change the number of workers of a live session")
async def set_workers(session_id: str, body: SetWorkersRequest, service: Service) -> Response:
    return _session(await _call(service.set_workers, session_id, body.count))


@router.get(PREFIX + "/{session_id}/checkpoints", response_model=ListCheckpointsResponse,
            responses=_ERRORS, summary="Steps of the session's complete checkpoints")
async def list_checkpoints(session_id: str, service: Service) -> Response:
    steps = await _call(service.list_checkpoints, session_id)
    return _proto_json(pb.ListCheckpointsResponse(steps=steps))


@router.post(PREFIX + "/{session_id}/restore", response_model=Session, responses=_ERRORS,
             summary="Roll the session back to its checkpoint of a step")
async def restore_checkpoint(session_id: str, body: RestoreCheckpointRequest,
                             service: Service) -> Response:
    return _session(await _call(service.restore_checkpoint, session_id, body.step))


def _push_id(body: StepRequest | PushRequest) -> PushId | None:
    if body.worker_id is None and body.sequence is None:
        return None
    if body.worker_id is None or body.sequence is None:
        raise InvalidArgument("worker_id and sequence go together: send both or neither")
    return PushId(body.worker_id, body.sequence)


@router.post(PREFIX + "/{session_id}/pull", response_model=PullResponse,
             responses=_binary_ok(PullResponse, "The session's current parameters."),
             openapi_extra=_tensor_body(PullRequest, required=False),
             summary="Read parameters")
async def pull(session_id: str, request: Request, service: Service) -> Response:
    body, _ = await _read(request, PullRequest)
    msg = _message(body, pb.PullRequest(), exclude={"binary_output"}, session_id=session_id)
    timeout = convert.seconds(msg.timeout, "timeout") if msg.HasField("timeout") else None
    chunks = await _call(service.pull, session_id, list(msg.names) or None, body.datatype,
                         min_step=msg.min_step, timeout=timeout)
    return await _call(_tensors_response, request, {}, chunks, body.binary_output)


@router.put(PREFIX + "/{session_id}/params", response_model=Session, responses=_ERRORS,
            openapi_extra=_tensor_body(ParametersRequest), summary="Overwrite parameters")
async def set_parameters(session_id: str, request: Request, service: Service) -> Response:
    """Overwrite the values of some tensors, as torch's in-place changes of parameters
    between steps (loading weights, clamping): the optimizer state and step count are
    kept. While a round of pushes is open, values equal to the session's are accepted
    and change nothing; others get 409. A refused request changes nothing."""
    body, payload = await _read(request, ParametersRequest)
    chunks = await _call(binary.tensor_chunks, body.values, payload)
    _count_in(chunks)
    return _session(await _call(service.set_parameters, session_id, chunks))


# -- hyperparameters, schedule, state -----------------------------------------


@router.patch(PREFIX + "/{session_id}/hyperparameters", response_model=Session,
              responses=_ERRORS, summary="Change one group's hyperparameters")
async def set_hyperparameters(session_id: str, body: SetHyperparametersRequest,
                              service: Service) -> Response:
    msg = _message(body, pb.SetHyperparametersRequest(), session_id=session_id)
    changes = convert.group_dict(msg.changes, "changes")
    return _session(await _call(service.set_hyperparameters, session_id, msg.group, changes))


@router.put(PREFIX + "/{session_id}/schedule", response_model=Session,
            responses=_ERRORS, summary="Set or remove the learning-rate schedule")
async def set_schedule(session_id: str, body: SetScheduleRequest, service: Service) -> Response:
    msg = _message(body, pb.SetScheduleRequest(), session_id=session_id)
    schedule = convert.schedule_dict(msg.schedule) if msg.HasField("schedule") else None
    return _session(await _call(service.set_schedule, session_id, schedule))


_STATE_DOC = ("The torch-format state_dict as one safetensors file: tensors "
              "`state.<index>.<slot>`, metadata `adamserve: state_dict/1` and `json` "
              "(param_groups and per-parameter scalars).")


@router.get(PREFIX + "/{session_id}/state", response_class=Response, summary="Export state",
            responses={**_ERRORS, 200: {"description": _STATE_DOC, "content": {
                binary.OCTET_STREAM: {"schema": {"type": "string", "format": "binary"}}}}})
async def export_state(session_id: str, service: Service) -> Response:
    sd = await _call(service.export_state, session_id)
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
async def import_state(session_id: str, request: Request, service: Service) -> Response:
    blob = await request.body()
    metrics.BYTES_IN.labels("http").inc(len(blob))
    await _call(service.describe, session_id)  # 404 before parsing a large blob
    state = await _call(_decode_state, blob)
    return _session(await _call(service.import_state, session_id, state))


@router.post(PREFIX + "/{session_id}/checkpoint", response_model=CheckpointInfo,
             responses=_ERRORS, summary="Write a durable checkpoint now")
async def checkpoint(session_id: str, service: Service) -> Response:
    info = await _call(service.checkpoint, session_id)
    return _proto_json(convert.checkpoint_message(info))


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
