"""The gRPC servicer: ``adamserve_proto.v2.OptimizerService`` over an OptimizerService.

What lives here and nowhere else:

* the status-code table (:data:`STATUS_CODES`) and the one guard every method
  runs under: domain errors become their status with the service's message and,
  in the status details, a google.rpc.ErrorInfo (domain "adamserve", the error's
  reason and metadata); anything else is logged and becomes INTERNAL with a
  generic message;
* checks that only the wire can get wrong (a stream without its first message, a
  first message that comes later, negative or absurd shapes, an unknown datatype,
  a malformed protobuf), answered INVALID_ARGUMENT before the service sees them;
* chunking on the way out: parameters and state blobs leave as messages of at
  most :data:`MAX_SEND_BYTES`, serialised by :mod:`adamserve_proto.wire` from
  memoryview slices, so a tensor's bytes are copied once (into the message).

Messages <-> domain types is :mod:`adamserve.transports.convert`'s, shared with
HTTP. Gradients go in without a detour: the request deserializer reads a message
that carries a chunk by hand (:func:`adamserve_proto.wire.read_chunk_message`), so
each chunk's data reaches the service as a memoryview into the bytes gRPC
delivered, as it arrives, and the service decodes it straight into the session's
gradient buffer (``Step`` feeds ``service.step`` a generator over the request
stream). StepUnary's large requests and replies are read and written by hand too.
Small messages (under :data:`adamserve_proto.wire.BY_HAND_BYTES`, where protobuf's C
code is the faster), the other messages, and any the hand reader leaves alone, go
through protobuf.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any, NoReturn, TypeVar, cast

import grpc
from google.protobuf import any_pb2
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import DecodeError, Message
from google.rpc.error_details_pb2 import ErrorInfo, RetryInfo
from google.rpc.status_pb2 import Status
from grpc_status import rpc_status

from adamserve import errors, metrics
from adamserve.engine.dtypes import itemsize
from adamserve.service import Access, Caller, OptimizerService, StepResult, TensorChunk
from adamserve.transports import convert
from adamserve.transports.grpc.identity import caller_of
from adamserve.transports.grpc.shared_memory import SharedMemoryMethods
from adamserve.transports.state_codec import decode_state, encode_state
from adamserve_proto import rpc, wire
from adamserve_proto.v2 import optimizer_pb2 as pb

log = logging.getLogger("adamserve.transports.grpc")
refused_log = logging.getLogger("adamserve.refused")  # refusals: reason and message

SERVICE_NAME = rpc.SERVICE_NAME
TRANSPORT = "grpc"
# google.rpc.ErrorInfo.domain of every error the service gives.
ERROR_DOMAIN = "adamserve"

MiB = 1 << 20
# The largest message the server sends: every gRPC client accepts 4 MiB by default.
MAX_SEND_BYTES = wire.MAX_MESSAGE_BYTES
# The largest message the server accepts (clients are asked to send a few MiB).
MAX_RECEIVE_BYTES = 64 * MiB

_BYTES_IN = metrics.BYTES_IN.labels(TRANSPORT)
_BYTES_OUT = metrics.BYTES_OUT.labels(TRANSPORT)

# The one table from domain errors to gRPC status codes.
STATUS_CODES: dict[type[errors.ServiceError], grpc.StatusCode] = {
    errors.InvalidArgument: grpc.StatusCode.INVALID_ARGUMENT,
    errors.NotFound: grpc.StatusCode.NOT_FOUND,
    errors.AlreadyExists: grpc.StatusCode.ALREADY_EXISTS,
    errors.FailedPrecondition: grpc.StatusCode.FAILED_PRECONDITION,
    errors.ResourceExhausted: grpc.StatusCode.RESOURCE_EXHAUSTED,
    errors.Unauthenticated: grpc.StatusCode.UNAUTHENTICATED,
    errors.PermissionDenied: grpc.StatusCode.PERMISSION_DENIED,
    errors.Unavailable: grpc.StatusCode.UNAVAILABLE,
    errors.Aborted: grpc.StatusCode.ABORTED,
    errors.DeadlineExceeded: grpc.StatusCode.DEADLINE_EXCEEDED,
}
INTERNAL_MESSAGE = "internal error; the server log has the details"


def status_of(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    """The gRPC status code and message for an exception raised by a request."""
    for cls in type(exc).__mro__:
        if cls in STATUS_CODES:
            return STATUS_CODES[cls], str(exc)
    return grpc.StatusCode.INTERNAL, INTERNAL_MESSAGE


def status_message(code: grpc.StatusCode, message: str, reason: str,
                   metadata: dict[str, str] | None = None,
                   retry_after: float | None = None) -> Status:
    """The google.rpc.Status every wire sends: one ErrorInfo, and a RetryInfo when the
    same request may succeed after ``retry_after`` seconds."""
    info = any_pb2.Any()
    info.Pack(ErrorInfo(reason=reason, domain=ERROR_DOMAIN, metadata=metadata or {}))
    details = [info]
    if retry_after is not None:
        retry = RetryInfo()
        retry.retry_delay.FromNanoseconds(int(max(retry_after, 0.0) * 1e9))
        details.append(any_pb2.Any())
        details[-1].Pack(retry)
    return Status(code=code.value[0], message=message, details=details)


def error_message(exc: BaseException) -> Status:
    """The google.rpc.Status an exception raised by a request answers with (generic
    for anything that is not a domain error)."""
    code, message = status_of(exc)
    if isinstance(exc, errors.ServiceError) and code is not grpc.StatusCode.INTERNAL:
        return status_message(code, message, exc.reason, exc.metadata, exc.retry_after)
    return status_message(grpc.StatusCode.INTERNAL, INTERNAL_MESSAGE, "INTERNAL")


def rich_status(code: grpc.StatusCode, message: str, reason: str,
                metadata: dict[str, str] | None = None) -> grpc.Status:
    """A status whose details (grpc-status-details-bin) hold one ErrorInfo."""
    status: grpc.Status = rpc_status.to_status(status_message(code, message, reason, metadata))
    return status


def error_status(exc: BaseException) -> grpc.Status:
    """The status an exception raised by a request answers with."""
    status: grpc.Status = rpc_status.to_status(error_message(exc))
    return status


# ---------------------------------------------------------------------------
# The guard every method runs under

Context = grpc.ServicerContext
# A response: a message, or bytes the servicer serialised itself (tensor chunks).
Response = Message | bytes
UnaryBehavior = Callable[[Any, Context], Response]
StreamBehavior = Callable[[Any, Context], Iterator[Response]]


def _fail(context: Context, method: str, exc: Exception) -> NoReturn:
    """Abort the call with ``exc``'s status (abort raises)."""
    if isinstance(exc, grpc.RpcError) or not context.is_active():
        # The client cancelled or its deadline passed: nobody is left to answer. Abort
        # anyway: a unary handler that returned None would be logged as a
        # serialisation failure.
        metrics.REQUESTS.labels(TRANSPORT, method, "CANCELLED").inc()
        log.debug("%s: call ended by the client (%r)", method, exc)
        context.abort(grpc.StatusCode.CANCELLED, "the call ended before its answer")
    status = error_status(exc)
    if status.code is grpc.StatusCode.INTERNAL:
        log.error("%s failed", method, exc_info=exc)
    else:  # a refusal: its reason and message, never the payload
        refused_log.info("grpc %s %s %s: %s", method, status.code.name,
                         getattr(exc, "reason", "-"), exc)
    metrics.REQUESTS.labels(TRANSPORT, method, status.code.name).inc()
    context.abort_with_status(status)  # raises


def _guard_unary(method: str, fn: UnaryBehavior) -> UnaryBehavior:
    ok = metrics.REQUESTS.labels(TRANSPORT, method, "OK")  # looked up once, not per call

    def run(request: Any, context: Context) -> Response:
        try:
            out = fn(request, context)
        except Exception as exc:
            _fail(context, method, exc)
        ok.inc()
        return out

    return run


def _guard_stream(method: str, fn: StreamBehavior) -> StreamBehavior:
    ok = metrics.REQUESTS.labels(TRANSPORT, method, "OK")

    def run(request: Any, context: Context) -> Iterator[Response]:
        try:
            yield from fn(request, context)
        except Exception as exc:
            _fail(context, method, exc)
        ok.inc()

    return run


# ---------------------------------------------------------------------------
# Incoming messages

@dataclass(frozen=True)
class Malformed:
    """What the deserializer returns for bytes that are not the expected message.

    gRPC answers a deserializer that raises with INTERNAL; a client's bad bytes
    deserve INVALID_ARGUMENT, so the handler raises that when it meets one.
    """

    message: str
    reason: str


M = TypeVar("M", bound=Message)
# A client stream: messages, chunks read by hand (the stream's chunk field), or bytes
# that did not parse.
Incoming = Iterator[M | wire.ChunkView | Malformed]
Parse = Callable[[bytes], Any]


def _parser(cls: type[Message]) -> Callable[[bytes], Message | Malformed]:
    name = cls.DESCRIPTOR.full_name

    def parse(data: bytes) -> Message | Malformed:
        try:
            return cls.FromString(data)
        except DecodeError as exc:
            return Malformed(name, str(exc) or "cannot parse")

    return parse


def _chunk_parser(cls: type[Message], field: FieldDescriptor) -> Parse:
    """A client stream's messages: a large one carrying a chunk in ``field`` is read by
    hand (its data a view), any other by protobuf."""
    parse = _parser(cls)

    def run(data: bytes) -> Message | wire.ChunkView | Malformed:
        chunk = wire.read_if_large(data, field)
        return parse(data) if chunk is None else chunk

    return run


@dataclass(frozen=True)
class UnaryStep:
    """A StepUnaryRequest read by hand: the header by protobuf, the gradients as views."""

    header: pb.StepHeader
    gradients: list[wire.ChunkView]


def _step_unary_parser() -> Parse:
    """StepUnary's requests: a large one split by hand (the header left to protobuf), a
    small one parsed by protobuf."""
    parse = _parser(pb.StepUnaryRequest)

    def run(data: bytes) -> Message | UnaryStep | Malformed:
        split = wire.split_if_large(data, wire.STEP_UNARY_GRADIENTS)
        if split is None:
            return parse(data)
        rest, chunks = split
        head = parse(rest)
        if isinstance(head, Malformed):
            return head
        return UnaryStep(cast(pb.StepUnaryRequest, head).header, chunks)

    return run


def _request_parser(row: rpc.Rpc) -> Parse:
    """The request deserializer of an RPC: by hand where its requests carry chunks."""
    if row.name == "StepUnary":
        return _step_unary_parser()
    chunk_fields = [f for f in row.request_type.DESCRIPTOR.fields
                    if f.message_type is pb.TensorChunk.DESCRIPTOR and not f.is_repeated]
    if row.request_streaming and chunk_fields:
        return _chunk_parser(row.request_type, chunk_fields[0])
    return _parser(row.request_type)


def _ok(msg: M | Malformed) -> M:
    if isinstance(msg, Malformed):
        raise errors.InvalidArgument(f"malformed {msg.message} message: {msg.reason}")
    return msg


def _messages(requests: Iterator[M | Malformed]) -> Iterator[M]:
    for msg in requests:
        yield _ok(msg)


_datatype = convert.datatype
_session_id = convert.session_id


def _chunk(msg: pb.TensorChunk | wire.ChunkView) -> TensorChunk:
    """A wire chunk as the service's TensorChunk; ``data`` is passed on as is (a view
    into the received message where it was read by hand)."""
    what = f"tensor {errors.shown(msg.name)}"
    _datatype(msg.datatype or "FP32", what)
    if msg.offset < 0:
        raise errors.InvalidArgument(f"{what}: negative chunk offset {msg.offset}")
    shape = convert.check_shape(msg.shape, what)
    data = msg.data
    _BYTES_IN.inc(len(data))
    return TensorChunk(msg.name, shape, msg.datatype or "FP32", data, msg.offset,
                       msg.rows if msg.row_sparse else None)


C = TypeVar("C", bound=Message)


def _chunks(requests: Incoming[C], field: str, what: str) -> Iterator[TensorChunk]:
    """The tensor chunks of a stream whose first message has been read already."""
    for msg in requests:
        if isinstance(msg, wire.ChunkView):
            yield _chunk(msg)
            continue
        kind = _ok(msg).WhichOneof("kind")
        if kind == field:
            yield _chunk(getattr(msg, field))
        elif kind is None:
            raise errors.InvalidArgument(f"{what}: a message carries no `{field}` chunk")
        else:
            raise errors.InvalidArgument(
                f"{what}: `{kind}` may only be sent in the first message; later ones carry "
                f"`{field}` chunks")


def _split(requests: Incoming[C], first: str, chunks: str,
           what: str) -> tuple[C, Iterator[TensorChunk]]:
    """A client stream as its first message, which must carry ``first``, and the chunks
    (in ``chunks``) of the messages after it."""
    msg = next(requests, None)
    if msg is None:
        raise errors.InvalidArgument(f"{what}: empty stream; the first message must carry "
                                     f"`{first}`")
    kind = chunks if isinstance(msg, wire.ChunkView) else _ok(msg).WhichOneof("kind")
    if kind != first:
        raise errors.InvalidArgument(
            f"{what}: the first message must carry `{first}`, got "
            f"{'an empty message' if kind is None else f'`{kind}`'}")
    return cast(C, msg), _chunks(requests, chunks, what)


def _remaining(context: Context) -> float | None:
    """Seconds left before the call's deadline (None: none); past it already: 0."""
    left = context.time_remaining()
    return None if left is None or not math.isfinite(left) else max(0.0, float(left))


# ---------------------------------------------------------------------------
# Outgoing messages


def chunk_messages(chunk: TensorChunk, wrap: FieldDescriptor,
                   max_bytes: int | None = MAX_SEND_BYTES) -> Iterator[bytes]:
    """``chunk`` as serialised messages of at most ``max_bytes`` that carry it in the
    TensorChunk field ``wrap`` (:data:`adamserve_proto.wire.STEP_PARAM`, ...); None:
    one message, whatever its size."""
    _BYTES_OUT.inc(len(chunk.data))
    return wire.chunk_messages(chunk.name, chunk.shape, chunk.datatype, chunk.data,
                               itemsize=itemsize(chunk.datatype), offset=chunk.offset,
                               wrap=wrap, max_bytes=max_bytes, rows=chunk.rows)


def _serialize(msg: Response) -> bytes:
    """Response serializer: messages, or bytes the servicer serialised itself."""
    return msg if isinstance(msg, bytes) else msg.SerializeToString()


def _params(result: StepResult, wrap: FieldDescriptor) -> Iterator[bytes]:
    for chunk in result.params:
        yield from chunk_messages(chunk, wrap)


# ---------------------------------------------------------------------------
# The servicer


class OptimizerServicer(SharedMemoryMethods):
    """Implements ``adamserve_proto.v2.OptimizerService`` over an :class:`OptimizerService`.

    One method per RPC of :data:`adamserve_proto.rpc.RPCS`, under its name.
    """

    def __init__(self, service: OptimizerService, access: Access | None = None) -> None:
        self.service = service
        self.access = access or Access.open()

    def caller(self, context: Context) -> Caller:
        """Who the call runs as: the Flight server's calls carry the caller it
        authenticated; a gRPC call's key (or certificate) says it."""
        bound = getattr(context, "caller", None)
        if isinstance(bound, Caller):
            return bound
        return caller_of(self.access, context)

    # -- sessions ------------------------------------------------------------

    def CreateSession(self, requests: Incoming[pb.CreateSessionRequest],
                      context: Context) -> pb.CreateSessionResponse:
        first, initial = _split(requests, "spec", "initial", "CreateSession")
        spec = first.spec
        config = convert.session_config(spec)
        info = self.service.create(_session_id(spec.session_id, "spec.session_id"), config,
                                   initial, caller=self.caller(context))
        return pb.CreateSessionResponse(session=convert.session_message(info))

    def AddTensors(self, requests: Incoming[pb.AddTensorsRequest],
                   context: Context) -> pb.AddTensorsResponse:
        first, initial = _split(requests, "spec", "initial", "AddTensors")
        spec = first.spec
        session_id = _session_id(spec.session_id, "spec.session_id")
        tensors = convert.tensor_specs(spec.tensors)
        group = (convert.group_dict(spec.new_group, "new_group")
                 if spec.HasField("new_group") else None)
        info = self.service.add_tensors(session_id, tensors, group, initial,
                                        caller=self.caller(context))
        return pb.AddTensorsResponse(session=convert.session_message(info))

    def ListSessions(self, request: pb.ListSessionsRequest,
                     context: Context) -> pb.ListSessionsResponse:
        infos, token = convert.page(self.service.list(caller=self.caller(context)),
                                    request.page_size, request.page_token)
        return pb.ListSessionsResponse(sessions=[convert.session_message(i) for i in infos],
                                       next_page_token=token)

    def GetSession(self, request: pb.GetSessionRequest,
                   context: Context) -> pb.GetSessionResponse:
        info = self.service.describe(_session_id(request.session_id), caller=self.caller(context))
        return pb.GetSessionResponse(session=convert.session_message(info))

    def DeleteSession(self, request: pb.DeleteSessionRequest,
                      context: Context) -> pb.DeleteSessionResponse:
        self.service.delete(_session_id(request.session_id), caller=self.caller(context))
        return pb.DeleteSessionResponse()

    # -- steps ---------------------------------------------------------------

    def _step(self, header: pb.StepHeader, grads: Iterator[TensorChunk], push: bool,
              context: Context) -> StepResult:
        return convert.run_step(self.service, header, grads, push=push,
                                wait=_remaining(context), caller=self.caller(context))

    def Step(self, requests: Incoming[pb.StepRequest],
             context: Context) -> Iterator[Response]:
        first, grads = _split(requests, "header", "chunk", "Step")
        header = first.header
        if header.apply_as_received:
            call = convert.step_call(header, push=False)
            for item in self.service.step_stream(call.session_id, grads,
                                                 return_datatype=call.return_datatype,
                                                 push_id=call.push_id, caller=self.caller(context)):
                if isinstance(item, StepResult):
                    yield pb.StepResponse(status=convert.step_status(item))
                else:
                    yield from chunk_messages(item, wire.STEP_PARAM)
            return
        result = self._step(header, grads, push=False, context=context)
        yield pb.StepResponse(status=convert.step_status(result))
        yield from _params(result, wire.STEP_PARAM)

    def StepUnary(self, request: pb.StepUnaryRequest | UnaryStep,
                  context: Context) -> Response:
        header = request.header
        session_id = _session_id(header.session_id, "header.session_id")
        rtype = _datatype(header.return_datatype or "FP32", "header.return_datatype")
        info = self.service.describe(session_id, caller=self.caller(context))
        # the reply's exact size bound: data plus each TensorChunk's framing (of a
        # tensor returned as the rows sent, those rows and their indices)
        sent_rows: dict[str, int] = {}
        if header.return_rows:
            for c in request.gradients:
                if c.row_sparse:
                    sent_rows[c.name] = sent_rows.get(c.name, 0) + len(c.rows) // 8
        out_bytes = 64 + sum(
            (math.prod(t.shape) if t.name not in sent_rows or not t.shape else
             sent_rows[t.name] * (math.prod(t.shape[1:]) + 8 // itemsize(rtype) + 1))
            * itemsize(rtype) + len(t.name.encode()) + 11 * len(t.shape) + 48
            for t in info.tensors)
        if out_bytes > MAX_SEND_BYTES:
            raise errors.InvalidArgument(
                f"StepUnary: the parameters ({out_bytes} bytes as {rtype}) do not fit one "
                f"{MAX_SEND_BYTES}-byte message; use the Step stream",
                reason="UNARY_TOO_LARGE", metadata={"session_id": session_id})
        result = self._step(header, (_chunk(c) for c in request.gradients), push=False,
                            context=context)
        status = convert.step_status(result)
        size = sum(len(c.data) for c in result.params)
        if size < wire.BY_HAND_BYTES:
            _BYTES_OUT.inc(size)
            return pb.StepUnaryResponse(status=status, params=[
                pb.TensorChunk(name=c.name, shape=c.shape, datatype=c.datatype,
                               offset=c.offset, data=bytes(c.data), row_sparse=c.rows is not None,
                               rows=bytes(c.rows or b"")) for c in result.params])
        # serialised here: each tensor whole, one entry of the repeated `params`
        return b"".join([pb.StepUnaryResponse(status=status).SerializeToString(),
                         *(m for c in result.params
                           for m in chunk_messages(c, wire.STEP_UNARY_PARAMS, None))])

    def Push(self, requests: Incoming[pb.PushRequest], context: Context) -> pb.PushResponse:
        first, grads = _split(requests, "header", "chunk", "Push")
        result = self._step(first.header, grads, push=True, context=context)
        return pb.PushResponse(status=convert.step_status(result))

    def Pull(self, request: pb.PullRequest, context: Context) -> Iterator[Response]:
        datatype = _datatype(request.datatype or "FP32", "datatype")
        timeout = (convert.seconds(request.timeout, "timeout")
                   if request.HasField("timeout") else _remaining(context))
        # cast: OptimizerService.list shadows the builtin in its class body's annotations.
        chunks = cast(Iterable[TensorChunk], self.service.pull(
            _session_id(request.session_id), list(request.names) or None, datatype,
            min_step=request.min_step, timeout=timeout,
            rows=[(r.name, r.rows) for r in request.rows], caller=self.caller(context)))
        for chunk in chunks:
            yield from chunk_messages(chunk, wire.PULL_CHUNK)

    def Commit(self, request: pb.CommitRequest, context: Context) -> Iterator[Response]:
        result = convert.run_commit(self.service, request, caller=self.caller(context))
        yield pb.CommitResponse(status=convert.step_status(result))
        yield from _params(result, wire.COMMIT_PARAM)

    def SetWorkers(self, request: pb.SetWorkersRequest,
                   context: Context) -> pb.SetWorkersResponse:
        info = self.service.set_workers(_session_id(request.session_id), request.count,
                                        caller=self.caller(context))
        return pb.SetWorkersResponse(session=convert.session_message(info))

    # -- parameters, hyperparameters, schedule -------------------------------

    def SetParameters(self, requests: Incoming[pb.SetParametersRequest],
                      context: Context) -> pb.SetParametersResponse:
        first, values = _split(requests, "session_id", "value", "SetParameters")
        session_id = _session_id(first.session_id)
        info = self.service.set_parameters(session_id, values, caller=self.caller(context))
        return pb.SetParametersResponse(session=convert.session_message(info))

    def SetHyperparameters(self, request: pb.SetHyperparametersRequest,
                           context: Context) -> pb.SetHyperparametersResponse:
        changes = convert.group_dict(request.changes, "changes")
        info = self.service.set_hyperparameters(_session_id(request.session_id),
                                                request.group, changes, caller=self.caller(context))
        return pb.SetHyperparametersResponse(session=convert.session_message(info))

    def SetSchedule(self, request: pb.SetScheduleRequest,
                    context: Context) -> pb.SetScheduleResponse:
        schedule = (convert.schedule_dict(request.schedule)
                    if request.HasField("schedule") else None)
        info = self.service.set_schedule(_session_id(request.session_id), schedule,
                                         caller=self.caller(context))
        return pb.SetScheduleResponse(session=convert.session_message(info))

    # -- state and checkpoints -----------------------------------------------

    def ExportState(self, request: pb.ExportStateRequest,
                    context: Context) -> Iterator[Response]:
        state = self.service.export_state(_session_id(request.session_id),
                                          caller=self.caller(context),
                                          native=convert.native_format(request.format))
        blob = encode_state(state)
        _BYTES_OUT.inc(len(blob))
        yield from wire.blob_messages(blob, wire.EXPORT_DATA)

    def ImportState(self, requests: Iterator[pb.ImportStateRequest | Malformed],
                    context: Context) -> pb.ImportStateResponse:
        first = next(requests, None)
        if first is None:
            raise errors.InvalidArgument("ImportState: empty stream; the first message must "
                                         "carry session_id")
        head = _ok(first)
        session_id = _session_id(head.session_id)
        caller = self.caller(context)
        caller.require_write("ImportState", session_id)  # before buffering the blob
        limit = convert.import_limit(
            self.service.describe(session_id, caller=caller).state_bytes)
        with contextlib.ExitStack() as held:  # the blob's bytes count against the caps
            held.enter_context(self.service.holding(session_id, len(head.data), caller=caller))
            parts = [head.data]
            total = len(head.data)
            for msg in _messages(requests):
                if msg.session_id and msg.session_id != session_id:
                    raise errors.InvalidArgument(
                        f"ImportState: session_id {errors.shown(msg.session_id)} differs from "
                        f"the first message's {session_id!r}")
                total += len(msg.data)
                if total > limit:
                    raise errors.ResourceExhausted(
                        f"ImportState: the state blob exceeds {limit} bytes, more than any "
                        f"state_dict of session {session_id!r} needs")
                held.enter_context(self.service.holding(session_id, len(msg.data),
                                                        caller=caller))
                parts.append(msg.data)
            _BYTES_IN.inc(total)
            try:
                state = decode_state(b"".join(parts))
            except (ValueError, TypeError, KeyError, AttributeError) as exc:
                # decode_state raises ValueError; the others come from odd but valid JSON.
                raise errors.InvalidArgument(f"ImportState: {exc}") from None
            del parts
            info = self.service.import_state(session_id, state, caller=caller)
        return pb.ImportStateResponse(session=convert.session_message(info))

    def Checkpoint(self, request: pb.CheckpointRequest,
                   context: Context) -> pb.CheckpointResponse:
        info = self.service.checkpoint(_session_id(request.session_id), caller=self.caller(context))
        return pb.CheckpointResponse(checkpoint=convert.checkpoint_message(info))

    def ListCheckpoints(self, request: pb.ListCheckpointsRequest,
                        context: Context) -> pb.ListCheckpointsResponse:
        return pb.ListCheckpointsResponse(
            steps=self.service.list_checkpoints(_session_id(request.session_id),
                                                caller=self.caller(context)))

    def RestoreCheckpoint(self, request: pb.RestoreCheckpointRequest,
                          context: Context) -> pb.RestoreCheckpointResponse:
        info = self.service.restore_checkpoint(_session_id(request.session_id), request.step,
                                               caller=self.caller(context))
        return pb.RestoreCheckpointResponse(session=convert.session_message(info))


# ---------------------------------------------------------------------------
# Registration

# gRPC's handler factory for each kind of RPC (rpc.Rpc.kind).
METHOD_KINDS: dict[rpc.Kind, Callable[..., grpc.RpcMethodHandler[Any, Any]]] = {
    "unary_unary": grpc.unary_unary_rpc_method_handler,
    "unary_stream": grpc.unary_stream_rpc_method_handler,
    "stream_unary": grpc.stream_unary_rpc_method_handler,
    "stream_stream": grpc.stream_stream_rpc_method_handler,
}


def _unary_request(fn: Callable[[Any, Context], Any]) -> Callable[[Any, Context], Any]:
    def run(request: Any, context: Context) -> Any:
        return fn(_ok(request), context)

    return run


def method_handlers(service: OptimizerService | OptimizerServicer
                    ) -> dict[str, grpc.RpcMethodHandler[Any, Any]]:
    """gRPC method handlers for every RPC of :data:`adamserve_proto.rpc.RPCS`, each under
    the error guard.

    Built here rather than by ``optimizer_pb2_grpc.add_OptimizerServiceServicer_to_server``
    for two reasons: a request that does not parse must be INVALID_ARGUMENT (the
    generated deserializer makes it INTERNAL), and responses may be pre-serialised
    bytes (see :func:`chunk_messages`).
    """
    impl = service if isinstance(service, OptimizerServicer) else OptimizerServicer(service)
    handlers: dict[str, grpc.RpcMethodHandler[Any, Any]] = {}
    for name, row in rpc.RPCS.items():
        fn: Callable[[Any, Context], Any] = getattr(impl, name)
        if not row.request_streaming:
            fn = _unary_request(fn)
        behavior = _guard_stream(name, fn) if row.response_streaming else _guard_unary(name, fn)
        handlers[name] = METHOD_KINDS[row.kind](
            behavior, request_deserializer=_request_parser(row),
            response_serializer=_serialize)
    return handlers


def add_to_server(service: OptimizerService, server: grpc.Server,
                  access: Access | None = None) -> None:
    """Register the OptimizerService on ``server``; its calls run as the caller
    ``access`` names (None: no authentication)."""
    handlers = method_handlers(OptimizerServicer(service, access))
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(SERVICE_NAME, handlers),))
    server.add_registered_method_handlers(SERVICE_NAME, handlers)
