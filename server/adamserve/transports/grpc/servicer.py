# grpcio ships no type information; its names are Any here (types-grpcio would type them).
# mypy: disable-error-code="import-untyped"
"""The gRPC servicer: protobuf messages <-> OptimizerService calls, errors -> status codes.

What lives here and nowhere else:

* the status-code table (:data:`STATUS_CODES`) and the one guard every method
  runs under: domain errors become their status with the service's message;
  anything else is logged and becomes INTERNAL with a generic message;
* checks that only the wire can get wrong (a stream without its header, a
  header that is not first, negative or absurd shapes, an unknown datatype,
  malformed JSON or protobuf), answered INVALID_ARGUMENT before the service sees them;
* chunking on the way out: parameters and state blobs leave as messages of at
  most :data:`MAX_SEND_BYTES`, serialised by hand from memoryview slices so a
  tensor's bytes are copied once (into the message), not three times through
  protobuf objects.

Gradients go the other way without a detour: each incoming chunk's ``bytes`` is
handed to the service as it arrives, and the service decodes it straight into the
session's gradient buffer (``Step`` feeds ``service.step`` a generator over the
request stream).
"""

from __future__ import annotations

import itertools
import json
import logging
import math
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, cast

import grpc
from google.protobuf.message import DecodeError

from adamserve import errors, metrics
from adamserve.engine.dtypes import WIRE_DTYPES
from adamserve.engine.optimizer import TensorSpec
from adamserve.service import OptimizerService, PushId, SessionInfo, StepResult, TensorChunk
from adamserve.sessions.rounds import WorkersConfig
from adamserve.sessions.session import MAX_ELEMENTS, MAX_RANK, SessionConfig
from adamserve.transports.state_codec import decode_state, encode_state
from adamserve_proto.v1 import optimizer_pb2 as pb

log = logging.getLogger("adamserve.transports.grpc")

SERVICE_NAME = "adamserve.v1.Optimizer"
TRANSPORT = "grpc"

MiB = 1 << 20
# The largest message the server sends: every gRPC client accepts 4 MiB by default.
MAX_SEND_BYTES = 4 * MiB
# The largest message the server accepts (clients are asked to send a few MiB).
MAX_RECEIVE_BYTES = 64 * MiB
# Room left in each outgoing message for everything but the tensor bytes.
_HEAD_ROOM = 1024
MAX_DIMS = MAX_RANK  # bounds on declared shapes: one rule for both transports
# An imported state blob may be this much larger than the session's state.
_IMPORT_SLACK_BYTES = 64 * MiB

# The one table from domain errors to gRPC status codes.
STATUS_CODES: dict[type[errors.ServiceError], grpc.StatusCode] = {
    errors.InvalidArgument: grpc.StatusCode.INVALID_ARGUMENT,
    errors.NotFound: grpc.StatusCode.NOT_FOUND,
    errors.AlreadyExists: grpc.StatusCode.ALREADY_EXISTS,
    errors.FailedPrecondition: grpc.StatusCode.FAILED_PRECONDITION,
    errors.ResourceExhausted: grpc.StatusCode.RESOURCE_EXHAUSTED,
    errors.Unauthenticated: grpc.StatusCode.UNAUTHENTICATED,
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


# ---------------------------------------------------------------------------
# The guard every method runs under

Handler = Callable[[Any, Any], Any]


def _fail(context: Any, method: str, exc: Exception) -> None:
    """Abort the call with ``exc``'s status; returns only when the client is gone."""
    if isinstance(exc, grpc.RpcError) or not context.is_active():
        # The client cancelled or its deadline passed: nobody is left to answer. Abort
        # anyway: a unary handler that returned None would be logged as a
        # serialisation failure.
        metrics.REQUESTS.labels(TRANSPORT, method, "CANCELLED").inc()
        log.debug("%s: call ended by the client (%r)", method, exc)
        context.abort(grpc.StatusCode.CANCELLED, "the call ended before its answer")
    code, message = status_of(exc)
    if code is grpc.StatusCode.INTERNAL:
        log.error("%s failed", method, exc_info=exc)
    metrics.REQUESTS.labels(TRANSPORT, method, code.name).inc()
    context.abort(code, message)  # raises


def _guard_unary(method: str, fn: Handler) -> Handler:
    def run(request: Any, context: Any) -> Any:
        try:
            out = fn(request, context)
        except Exception as exc:
            _fail(context, method, exc)
            return None
        metrics.REQUESTS.labels(TRANSPORT, method, "OK").inc()
        return out

    return run


def _guard_stream(method: str, fn: Callable[[Any, Any], Iterator[Any]]) -> Handler:
    def run(request: Any, context: Any) -> Iterator[Any]:
        try:
            yield from fn(request, context)
        except Exception as exc:
            _fail(context, method, exc)
            return
        metrics.REQUESTS.labels(TRANSPORT, method, "OK").inc()

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


def _parser(cls: Any) -> Callable[[bytes], Any]:
    name = cls.DESCRIPTOR.full_name

    def parse(data: bytes) -> Any:
        try:
            return cls.FromString(data)
        except DecodeError as exc:
            return Malformed(name, str(exc) or "cannot parse")

    return parse


def _ok(msg: Any) -> Any:
    if isinstance(msg, Malformed):
        raise errors.InvalidArgument(f"malformed {msg.message} message: {msg.reason}")
    return msg


def _messages(requests: Iterator[Any]) -> Iterator[Any]:
    for msg in requests:
        yield _ok(msg)


def _datatype(value: str, field: str) -> str:
    if value not in WIRE_DTYPES:
        raise errors.InvalidArgument(
            f"{field}: unknown datatype {value!r}; expected one of {', '.join(WIRE_DTYPES)}")
    return value


def _shape(shape: Any, what: str) -> tuple[int, ...]:
    dims = tuple(int(d) for d in shape)
    if len(dims) > MAX_DIMS:
        raise errors.InvalidArgument(f"{what}: {len(dims)} dimensions; at most {MAX_DIMS}")
    if any(d < 0 for d in dims):
        raise errors.InvalidArgument(f"{what}: shape {list(dims)} has a negative dimension")
    if math.prod(dims) > MAX_ELEMENTS:
        raise errors.InvalidArgument(
            f"{what}: shape {list(dims)} has {math.prod(dims)} elements; a tensor may hold at "
            f"most 2^48")
    return dims


def _chunk(msg: Any) -> TensorChunk:
    """A wire chunk as the service's TensorChunk; ``data`` is passed on as is."""
    what = f"tensor {msg.name!r}"
    _datatype(msg.datatype, what)
    if msg.offset < 0:
        raise errors.InvalidArgument(f"{what}: negative chunk offset {msg.offset}")
    shape = _shape(msg.shape, what)
    data = msg.data
    metrics.BYTES_IN.labels(TRANSPORT).inc(len(data))
    return TensorChunk(msg.name, shape, msg.datatype, data, msg.offset)


def _chunks(requests: Iterator[Any], field: str, what: str) -> Iterator[TensorChunk]:
    """The tensor chunks of a stream whose first message has been read already."""
    for msg in _messages(requests):
        kind = msg.WhichOneof("kind")
        if kind == field:
            yield _chunk(getattr(msg, field))
        elif kind is None:
            raise errors.InvalidArgument(f"{what}: a message carries no `{field}` chunk")
        else:
            raise errors.InvalidArgument(
                f"{what}: `{kind}` may only be sent in the first message; later ones carry "
                f"`{field}` chunks")


def _first(requests: Iterator[Any], field: str, what: str) -> Any:
    """The first message's ``field`` (the stream's header)."""
    msg = next(requests, None)
    if msg is None:
        raise errors.InvalidArgument(f"{what}: empty stream; the first message must carry "
                                     f"`{field}`")
    kind = _ok(msg).WhichOneof("kind")
    if kind != field:
        raise errors.InvalidArgument(
            f"{what}: the first message must carry `{field}`, got "
            f"{'an empty message' if kind is None else f'`{kind}`'}")
    return getattr(msg, field)


def _remaining(context: Any) -> float | None:
    """Seconds left before the call's deadline (None: none); past it already: 0."""
    left = context.time_remaining()
    return None if left is None or not math.isfinite(left) else max(0.0, float(left))


def _base_step(header: Any) -> int | None:
    return int(header.base_step) if header.HasField("base_step") else None


def _session_id(value: str, field: str = "session_id") -> str:
    if not value:
        raise errors.InvalidArgument(f"{field} is empty")
    return value


def _group(msg: Any, field: str) -> dict[str, Any]:
    values = {str(k): float(v) for k, v in msg.values.items()}
    flags = {str(k): bool(v) for k, v in msg.flags.items()}
    both = sorted(set(values) & set(flags))
    if both:
        raise errors.InvalidArgument(
            f"{field}: {', '.join(both)} given both as a value and as a flag")
    return {**values, **flags}


def _json_object(text: str, field: str) -> dict[str, Any] | None:
    if not text:
        return None
    try:
        value = json.loads(text)
    except (ValueError, RecursionError) as exc:  # RecursionError: absurdly deep nesting
        raise errors.InvalidArgument(f"{field}: not valid JSON ({exc})") from None
    if not isinstance(value, dict):
        raise errors.InvalidArgument(f"{field}: expected a JSON object, got "
                                     f"{type(value).__name__}")
    return value


def tensor_specs(msgs: Iterable[Any]) -> tuple[TensorSpec, ...]:
    """TensorSpec messages as the service's TensorSpecs (shape bounds checked)."""
    tensors = []
    total = 0
    for i, t in enumerate(msgs):
        what = f"tensor {t.name!r}" if t.name else f"tensors[{i}]"
        shape = _shape(t.shape, what)
        total += math.prod(shape)
        tensors.append(TensorSpec(t.name, shape, int(t.group)))
    if total > MAX_ELEMENTS:
        raise errors.InvalidArgument(f"the tensors hold {total} elements; at most 2^48")
    return tuple(tensors)


def session_config(spec: Any) -> SessionConfig:
    """A SessionSpec message as the service's SessionConfig (wire-level checks only)."""
    tensors = tensor_specs(spec.tensors)
    groups = tuple(_group(g, f"groups[{i}]") for i, g in enumerate(spec.groups)) or ({},)
    return SessionConfig(
        algorithm=spec.algorithm,
        tensors=tensors,
        groups=groups,
        dtype=spec.dtype or "float32",
        schedule=_json_object(spec.schedule_json, "schedule_json"),
        max_grad_norm=spec.max_grad_norm if spec.HasField("max_grad_norm") else None,
        clip_per_tensor=spec.clip_per_tensor,
        skip_nonfinite=spec.skip_nonfinite if spec.HasField("skip_nonfinite") else True,
        workers=workers_config(spec.workers) if spec.HasField("workers") else WorkersConfig(),
        labels=dict(spec.labels),
    )


def workers_config(msg: Any) -> WorkersConfig:
    return WorkersConfig(
        count=msg.count or 1, mode=msg.mode or "sync",
        straggler_timeout=msg.straggler_timeout,
        straggler_policy=msg.straggler_policy or "fail",
        max_staleness=msg.max_staleness if msg.HasField("max_staleness") else None,
        scale_lr_by_staleness=msg.scale_lr_by_staleness, exchange=msg.exchange)


def workers_message(w: WorkersConfig) -> Any:
    msg = pb.Workers(count=w.count, mode=w.mode, straggler_timeout=w.straggler_timeout,
                     straggler_policy=w.straggler_policy,
                     scale_lr_by_staleness=w.scale_lr_by_staleness, exchange=w.exchange)
    if w.max_staleness is not None:
        msg.max_staleness = w.max_staleness
    return msg


# ---------------------------------------------------------------------------
# Outgoing messages

def _varint(n: int) -> bytes:
    n &= (1 << 64) - 1  # int64 two's complement, as protobuf encodes negative int64
    out = bytearray()
    while n > 0x7F:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def _field(number: int, payload: bytes) -> bytes:
    """A length-delimited field (wire type 2) whose payload is short."""
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def _chunk_head(name: bytes, shape: tuple[int, ...], datatype: bytes, offset: int) -> bytes:
    """TensorChunk fields 1-4 as protobuf serialises them (defaults left out)."""
    head = b""
    if name:
        head += _field(1, name)
    if shape:
        head += _field(2, b"".join(_varint(d) for d in shape))
    if datatype:
        head += _field(3, datatype)
    if offset:
        head += _varint(4 << 3) + _varint(offset)
    return head


def chunk_messages(chunk: TensorChunk, wrap_field: int | None = None,
                   max_bytes: int = MAX_SEND_BYTES) -> Iterator[bytes]:
    """Serialised TensorChunk messages of at most ``max_bytes``, covering ``chunk``.

    ``wrap_field`` nests each one as that field of an enclosing message (a
    StepResponse's ``param``). The bytes are what ``SerializeToString`` writes for
    the same message; the tensor's bytes are sliced as memoryviews and copied
    once, into the message.
    """
    itemsize = WIRE_DTYPES[chunk.datatype].itemsize
    name = chunk.name.encode()
    datatype = chunk.datatype.encode()
    view = memoryview(chunk.data).cast("B")
    room = max_bytes - _HEAD_ROOM - len(name) - 11 * len(chunk.shape)
    step = max(1, room // itemsize) * itemsize
    starts = range(0, len(view), step) if len(view) else range(1)
    for start in starts:
        piece = view[start:start + step]
        head = _chunk_head(name, chunk.shape, datatype, chunk.offset + start // itemsize)
        if len(piece):
            head += _varint(5 << 3 | 2) + _varint(len(piece))
        size = len(head) + len(piece)
        prefix = b"" if wrap_field is None else _varint(wrap_field << 3 | 2) + _varint(size)
        metrics.BYTES_OUT.labels(TRANSPORT).inc(len(piece))
        yield b"".join((prefix, head, piece))


def blob_messages(blob: bytes | memoryview, max_bytes: int = MAX_SEND_BYTES) -> Iterator[bytes]:
    """Serialised StateChunk messages of at most ``max_bytes``, covering ``blob``."""
    view = memoryview(blob).cast("B")
    step = max_bytes - _HEAD_ROOM
    for start in range(0, len(view), step):
        piece = view[start:start + step]
        metrics.BYTES_OUT.labels(TRANSPORT).inc(len(piece))
        yield b"".join((_varint(1 << 3 | 2), _varint(len(piece)), piece))


def _serialize(msg: Any) -> bytes:
    """Response serializer: messages, or bytes the servicer serialised itself."""
    if isinstance(msg, bytes):
        return msg
    out: bytes = msg.SerializeToString()
    return out


def _group_message(group: Mapping[str, Any]) -> Any:
    msg = pb.Group()
    for key, value in group.items():
        if key == "betas":
            msg.values["beta1"] = float(value[0])
            msg.values["beta2"] = float(value[1])
        elif isinstance(value, bool):
            msg.flags[key] = value
        else:
            msg.values[key] = float(value)
    return msg


def session_info(info: SessionInfo) -> Any:
    msg = pb.SessionInfo(
        session_id=info.id,
        algorithm=info.algorithm,
        dtype=info.dtype,
        step=info.step,
        tensors=[pb.TensorSpec(name=t.name, shape=list(t.shape), group=t.group)
                 for t in info.tensors],
        groups=[_group_message(g) for g in info.groups],
        lr=list(info.lr),
        schedule_json=json.dumps(info.schedule) if info.schedule is not None else "",
        clip_per_tensor=info.clip_per_tensor,
        skip_nonfinite=info.skip_nonfinite,
        state_bytes=info.state_bytes,
        checkpointed_step=info.checkpointed_step,
        backend=info.backend,
        workers=workers_message(info.workers),
        labels=info.labels,
    )
    if info.max_grad_norm is not None:
        msg.max_grad_norm = info.max_grad_norm
    return msg


def _step_status(result: StepResult) -> Any:
    msg = pb.StepStatus(step=result.step, skipped=result.skipped,
                        nonfinite=list(result.nonfinite), duplicate=result.duplicate,
                        staleness=result.staleness, pending=result.pending,
                        contributors=result.contributors,
                        missing_workers=list(result.missing),
                        grad_sumsq=list(result.grad_sumsq),
                        param_sumsq=list(result.param_sumsq),
                        update_sumsq=list(result.update_sumsq), round=result.round)
    if result.grad_norm is not None:
        msg.grad_norm = result.grad_norm
    return msg


# ---------------------------------------------------------------------------
# The servicer

_STEP_PARAM_FIELD = pb.StepResponse.DESCRIPTOR.fields_by_name["param"].number


class OptimizerServicer:
    """Implements ``adamserve.v1.Optimizer`` over an :class:`OptimizerService`."""

    def __init__(self, service: OptimizerService) -> None:
        self.service = service

    def CreateSession(self, requests: Iterator[Any], context: Any) -> Any:
        spec = _first(requests, "spec", "CreateSession")
        config = session_config(spec)
        initial = _chunks(requests, "initial", "CreateSession")
        return session_info(self.service.create(_session_id(spec.session_id, "spec.session_id"),
                                                config, initial))

    def AddTensors(self, requests: Iterator[Any], context: Any) -> Any:
        spec = _first(requests, "spec", "AddTensors")
        session_id = _session_id(spec.session_id, "spec.session_id")
        tensors = tensor_specs(spec.tensors)
        group = _group(spec.new_group, "new_group") if spec.HasField("new_group") else None
        initial = _chunks(requests, "initial", "AddTensors")
        return session_info(self.service.add_tensors(session_id, tensors, group, initial))

    def SetParameters(self, requests: Iterator[Any], context: Any) -> Any:
        session_id = _session_id(_first(requests, "session_id", "SetParameters"))
        values = _chunks(requests, "value", "SetParameters")
        return session_info(self.service.set_parameters(session_id, values))

    @staticmethod
    def _push_id(header: Any) -> PushId | None:
        if not header.sequence and not header.worker_id:
            return None
        return PushId(header.worker_id, int(header.sequence))

    def _step(self, requests: Iterator[Any], method: str, push: bool,
              context: Any) -> StepResult:
        header = _first(requests, "header", method)
        session_id = _session_id(header.session_id, "header.session_id")
        rtype = None if push else _datatype(header.return_datatype or "FP32",
                                            "header.return_datatype")
        grads = _chunks(requests, "chunk", method)
        return self.service.step(session_id, grads, return_datatype=rtype,
                                 require_all=header.require_all,
                                 push_id=self._push_id(header), base_step=_base_step(header),
                                 wait=_remaining(context))

    def Step(self, requests: Iterator[Any], context: Any) -> Iterator[Any]:
        header = _first(requests, "header", "Step")
        if header.apply_as_received:
            rtype = _datatype(header.return_datatype or "FP32", "header.return_datatype")
            for item in self.service.step_stream(
                    _session_id(header.session_id, "header.session_id"),
                    _chunks(requests, "chunk", "Step"), return_datatype=rtype,
                    push_id=self._push_id(header)):
                if isinstance(item, StepResult):
                    yield pb.StepResponse(status=_step_status(item))
                else:
                    yield from chunk_messages(item, wrap_field=_STEP_PARAM_FIELD)
            return
        result = self._step(itertools.chain([pb.StepRequest(header=header)], requests),
                            "Step", push=False, context=context)
        yield pb.StepResponse(status=_step_status(result))
        for chunk in result.params:
            yield from chunk_messages(chunk, wrap_field=_STEP_PARAM_FIELD)

    def StepUnary(self, request: Any, context: Any) -> Any:
        header = request.header
        session_id = _session_id(header.session_id, "header.session_id")
        rtype = _datatype(header.return_datatype or "FP32", "header.return_datatype")
        info = self.service.describe(session_id)
        # the reply's exact size bound: data plus each TensorChunk's framing
        out_bytes = 64 + sum(t.numel * WIRE_DTYPES[rtype].itemsize + len(t.name.encode())
                             + 11 * len(t.shape) + 48 for t in info.tensors)
        if out_bytes > MAX_SEND_BYTES:
            raise errors.InvalidArgument(
                f"StepUnary: the parameters ({out_bytes} bytes as {rtype}) do not fit one "
                f"{MAX_SEND_BYTES}-byte message; use the Step stream")
        result = self.service.step(session_id, (_chunk(c) for c in request.gradients),
                                   return_datatype=rtype, require_all=header.require_all,
                                   push_id=self._push_id(header), base_step=_base_step(header),
                                   wait=_remaining(context))
        return pb.StepUnaryResponse(
            status=_step_status(result),
            params=[pb.TensorChunk(name=c.name, shape=list(c.shape), datatype=c.datatype,
                                   data=bytes(c.data)) for c in result.params])

    def Push(self, requests: Iterator[Any], context: Any) -> Any:
        return _step_status(self._step(requests, "Push", push=True, context=context))

    def Pull(self, request: Any, context: Any) -> Iterator[Any]:
        datatype = _datatype(request.datatype or "FP32", "datatype")
        # cast: OptimizerService.list shadows the builtin in its class body's annotations.
        timeout = request.timeout or _remaining(context)
        chunks = cast(Iterable[TensorChunk], self.service.pull(
            _session_id(request.session_id), list(request.names) or None, datatype,
            min_step=request.min_step, timeout=timeout))
        for chunk in chunks:
            yield from chunk_messages(chunk)

    def SetHyperparameters(self, request: Any, context: Any) -> Any:
        changes = _group(request.changes, "changes")
        return session_info(self.service.set_hyperparameters(
            _session_id(request.session_id), request.group, changes))

    def SetSchedule(self, request: Any, context: Any) -> Any:
        schedule = _json_object(request.schedule_json, "schedule_json")
        return session_info(self.service.set_schedule(_session_id(request.session_id),
                                                      schedule))

    def ExportState(self, request: Any, context: Any) -> Iterator[Any]:
        state = self.service.export_state(_session_id(request.session_id))
        yield from blob_messages(encode_state(state))

    def ImportState(self, requests: Iterator[Any], context: Any) -> Any:
        first = next(requests, None)
        if first is None:
            raise errors.InvalidArgument("ImportState: empty stream; the first message must "
                                         "carry session_id")
        first = _ok(first)
        session_id = _session_id(first.session_id)
        # A state_dict holds the slots only; allow float64 slots for a float32 session
        # and generous metadata, and refuse to buffer more than that.
        limit = 2 * self.service.describe(session_id).state_bytes + _IMPORT_SLACK_BYTES
        parts = [first.data]
        total = len(first.data)
        for msg in _messages(requests):
            if msg.session_id and msg.session_id != session_id:
                raise errors.InvalidArgument(
                    f"ImportState: session_id {msg.session_id!r} differs from the first "
                    f"message's {session_id!r}")
            total += len(msg.data)
            if total > limit:
                raise errors.ResourceExhausted(
                    f"ImportState: the state blob exceeds {limit} bytes, more than any "
                    f"state_dict of session {session_id!r} needs")
            parts.append(msg.data)
        metrics.BYTES_IN.labels(TRANSPORT).inc(total)
        try:
            state = decode_state(b"".join(parts))
        except (ValueError, TypeError, KeyError, AttributeError) as exc:
            # decode_state raises ValueError; the others come from odd but valid JSON.
            raise errors.InvalidArgument(f"ImportState: {exc}") from None
        return session_info(self.service.import_state(session_id, state))

    def Checkpoint(self, request: Any, context: Any) -> Any:
        info = self.service.checkpoint(_session_id(request.session_id))
        return pb.CheckpointInfo(session_id=info.session_id, step=info.step, path=info.path,
                                 bytes=info.bytes)

    def ListSessions(self, request: Any, context: Any) -> Any:
        return pb.ListSessionsResponse(sessions=[session_info(i) for i in self.service.list()])

    def DescribeSession(self, request: Any, context: Any) -> Any:
        return session_info(self.service.describe(_session_id(request.session_id)))

    def DeleteSession(self, request: Any, context: Any) -> Any:
        self.service.delete(_session_id(request.session_id))
        return pb.DeleteSessionResponse()

    def Commit(self, request: Any, context: Any) -> Iterator[Any]:
        rtype = (None if request.return_datatype == "NONE"
                 else _datatype(request.return_datatype or "FP32", "return_datatype"))
        result = self.service.commit(
            _session_id(request.session_id), request.step, list(request.tensor_sumsq),
            request.total_sumsq, param_sumsq=list(request.param_sumsq),
            update_sumsq=list(request.update_sumsq), round_id=request.round,
            return_datatype=rtype)
        yield pb.StepResponse(status=_step_status(result))
        for chunk in result.params:
            yield from chunk_messages(chunk, wrap_field=_STEP_PARAM_FIELD)

    def SetWorkers(self, request: Any, context: Any) -> Any:
        return session_info(self.service.set_workers(_session_id(request.session_id),
                                                     request.count))

    def ListCheckpoints(self, request: Any, context: Any) -> Any:
        return pb.ListCheckpointsResponse(
            steps=self.service.list_checkpoints(_session_id(request.session_id)))

    def RestoreCheckpoint(self, request: Any, context: Any) -> Any:
        return session_info(self.service.restore_checkpoint(_session_id(request.session_id),
                                                            request.step))


# method name -> (request streaming, response streaming, request type)
_METHODS: dict[str, tuple[bool, bool, Any]] = {
    "CreateSession": (True, False, pb.CreateSessionRequest),
    "AddTensors": (True, False, pb.AddTensorsRequest),
    "Step": (True, True, pb.StepRequest),
    "StepUnary": (False, False, pb.StepUnaryRequest),
    "Push": (True, False, pb.StepRequest),
    "Pull": (False, True, pb.PullRequest),
    "SetParameters": (True, False, pb.SetParametersRequest),
    "SetHyperparameters": (False, False, pb.SetHyperparametersRequest),
    "SetSchedule": (False, False, pb.SetScheduleRequest),
    "ExportState": (False, True, pb.ExportStateRequest),
    "ImportState": (True, False, pb.ImportStateRequest),
    "Checkpoint": (False, False, pb.CheckpointRequest),
    "ListSessions": (False, False, pb.ListSessionsRequest),
    "DescribeSession": (False, False, pb.DescribeSessionRequest),
    "DeleteSession": (False, False, pb.DeleteSessionRequest),
    "Commit": (False, True, pb.CommitRequest),
    "SetWorkers": (False, False, pb.SetWorkersRequest),
    "ListCheckpoints": (False, False, pb.ListCheckpointsRequest),
    "RestoreCheckpoint": (False, False, pb.RestoreCheckpointRequest),
}


# gRPC's handler factory for each (request streaming, response streaming) pair.
METHOD_KINDS: dict[tuple[bool, bool], Callable[..., Any]] = {
    (False, False): grpc.unary_unary_rpc_method_handler,
    (False, True): grpc.unary_stream_rpc_method_handler,
    (True, False): grpc.stream_unary_rpc_method_handler,
    (True, True): grpc.stream_stream_rpc_method_handler,
}


def method_handlers(servicer: OptimizerService | OptimizerServicer) -> dict[str, Any]:
    """gRPC method handlers for every Optimizer RPC, each under the error guard.

    Built here rather than by ``optimizer_pb2_grpc.add_OptimizerServicer_to_server``
    for two reasons: a request that does not parse must be INVALID_ARGUMENT (the
    generated deserializer makes it INTERNAL), and responses may be pre-serialised
    bytes (see :func:`chunk_messages`).
    """
    impl = servicer if isinstance(servicer, OptimizerServicer) else OptimizerServicer(servicer)
    handlers: dict[str, Any] = {}
    for name, (req_stream, resp_stream, req_type) in _METHODS.items():
        fn: Handler = getattr(impl, name)
        if not req_stream:
            fn = _unary_request(fn)
        behavior = _guard_stream(name, fn) if resp_stream else _guard_unary(name, fn)
        factory = METHOD_KINDS[(req_stream, resp_stream)]
        handlers[name] = factory(behavior, request_deserializer=_parser(req_type),
                                 response_serializer=_serialize)
    return handlers


def _unary_request(fn: Handler) -> Handler:
    def run(request: Any, context: Any) -> Any:
        return fn(_ok(request), context)

    return run


def add_to_server(service: OptimizerService, server: Any) -> None:
    """Register the Optimizer service on ``server``."""
    handlers = method_handlers(service)
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(SERVICE_NAME, handlers),))
    if hasattr(server, "add_registered_method_handlers"):
        server.add_registered_method_handlers(SERVICE_NAME, handlers)
