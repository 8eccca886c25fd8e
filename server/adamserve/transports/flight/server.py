"""The Arrow Flight data plane: the OptimizerService over Flight (docs/data-plane.md).

The contract is the v2 one, carried by Flight's four verbs:

* ``DoExchange``: a step. The descriptor's command is a ``FlightCommand`` whose
  ``step`` is the Step stream's first message (its header); the client's record
  batches carry the gradients (:mod:`adamserve_proto.flight`'s layout); the answer
  is one metadata message, a serialised ``StepResponse`` with the status, then the
  parameters as record batches. With ``apply_as_received`` the parameters of each
  batch go back as soon as it is applied (full duplex) and the status comes last.
* ``DoPut``: a push (``FlightCommand.push``), a create or an add-tensors with
  initial values, or parameter values (``set_parameters``): the batches carry the
  tensors; the one ``PutResult`` is the serialised response message of that RPC.
* ``DoGet``: a pull; the ticket is a ``FlightCommand`` with ``pull``.
* ``DoExchange`` with ``FlightCommand.commit``: a shard's commit (no batches in;
  answered as a step).
* ``DoAction``: every other operation (and any RPC whose request is one message),
  its type the RPC's name and its body the serialised request message; each
  result is one serialised response message, as the gRPC service would stream them. These go through the gRPC servicer's own
  methods (:class:`~adamserve.transports.grpc.servicer.OptimizerServicer`), so the
  two wires cannot drift.

Gradients are decoded from the Arrow buffers straight into the session's buffer
(each row's values reach the service as a memoryview of the received buffer);
parameters leave as views of the step's encoded values (the copy taken under
the session's lock, so a later step cannot change them mid-send).

Errors: a Flight error whose ``extra_info`` (``grpc-status-details-bin`` on the
wire) is a ``google.rpc.Status`` with the gRPC status code, the message and one
``google.rpc.ErrorInfo`` (domain "adamserve", the reason and metadata), exactly
what the gRPC service sends in its details. The Flight error class follows the
code where Flight has one (UNAUTHENTICATED, DEADLINE_EXCEEDED, UNAVAILABLE,
INTERNAL); every other code is a ``FlightServerError``.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, cast

import grpc
import pyarrow as pa
import pyarrow.flight as fl
from google.protobuf.message import DecodeError, Message

from adamserve import errors, metrics
from adamserve.service import Access, Caller, OptimizerService, StepResult, TensorChunk
from adamserve.transports import convert
from adamserve.transports.flight import streams
from adamserve.transports.grpc.servicer import (
    MAX_RECEIVE_BYTES,
    OptimizerServicer,
    error_message,
    status_of,
)
from adamserve.transports.tls import TlsFiles, flight_options
from adamserve_proto import flight as layout
from adamserve_proto import rpc
from adamserve_proto.v2 import optimizer_pb2 as pb

log = logging.getLogger("adamserve.transports.flight")

TRANSPORT = "flight"
# DoAction runs every RPC with its request as one message: a request stream's first
# message alone (an ImportStateRequest with the whole blob; a CreateSession with no
# initial values; a Step whose gradients are in shared memory).
ACTIONS = frozenset(rpc.RPCS)
# FlightCommand kind -> the RPC it stands for.
COMMANDS = {"step": "Step", "push": "Push", "pull": "Pull", "create_session": "CreateSession",
            "add_tensors": "AddTensors", "set_parameters": "SetParameters", "commit": "Commit"}

_FLIGHT_ERRORS: dict[grpc.StatusCode, type[fl.FlightError]] = {
    grpc.StatusCode.UNAUTHENTICATED: fl.FlightUnauthenticatedError,
    grpc.StatusCode.PERMISSION_DENIED: fl.FlightUnauthorizedError,
    grpc.StatusCode.DEADLINE_EXCEEDED: fl.FlightTimedOutError,
    grpc.StatusCode.UNAVAILABLE: fl.FlightUnavailableError,
    grpc.StatusCode.INTERNAL: fl.FlightInternalError,
}


_CODES = {c.value[0]: c for c in grpc.StatusCode}


def flight_error(exc: BaseException) -> fl.FlightError:
    """The Flight error a request that raised ``exc`` answers with: the gRPC wire's
    google.rpc.Status in ``extra_info``."""
    status = error_message(exc)
    cls = _FLIGHT_ERRORS.get(_CODES.get(status.code, grpc.StatusCode.UNKNOWN),
                             fl.FlightServerError)
    return cls(status.message, extra_info=status.SerializeToString())


@dataclass
class _Label:
    method: str


class _Call:
    """The part of a gRPC ServicerContext the servicer's methods read: Flight gives a
    handler no deadline, so waits are bounded by the service's own limits; the caller
    is the one the call's middleware admitted."""

    def __init__(self, caller: Caller) -> None:
        self.caller = caller

    def time_remaining(self) -> float | None:
        return None

    def is_active(self) -> bool:
        return True


def _parse(cls: type[Message], data: bytes, what: str) -> Any:
    try:
        return cls.FromString(data)
    except DecodeError as exc:
        raise errors.InvalidArgument(
            f"{what}: not a {cls.DESCRIPTOR.full_name} message ({exc or 'cannot parse'})"
        ) from None


def _command(data: bytes, what: str, *kinds: str) -> tuple[str, Any, pb.FlightCommand]:
    """The FlightCommand in ``data``: its kind (one of ``kinds``), request, and itself."""
    cmd = _parse(pb.FlightCommand, data, what)
    kind = cmd.WhichOneof("kind")
    if kind not in kinds:
        raise errors.InvalidArgument(
            f"{what}: the FlightCommand carries {f'`{kind}`' if kind else 'nothing'}; "
            f"expected {' or '.join(f'`{k}`' for k in kinds)}")
    return kind, getattr(cmd, kind), cmd


def _header(first: Any, what: str) -> pb.StepHeader:
    """The header of a Step or Push stream's first message."""
    if first.WhichOneof("kind") != "header":
        raise errors.InvalidArgument(f"{what}: the command's request must carry `header`")
    return cast(pb.StepHeader, first.header)


def _chunks(reader: Any, what: str) -> Iterator[TensorChunk]:
    """The tensor chunks in the record batches a client sends."""
    datatype = ""
    for batch in _batches(reader, what):
        if not datatype:
            try:
                datatype = layout.datatype_of(batch.schema)
            except ValueError as exc:
                raise errors.InvalidArgument(f"{what}: {exc}") from None
        try:
            for row in layout.rows(batch, datatype):
                shape = convert.check_shape(row.shape, f"tensor {errors.shown(row.name)}")
                if row.offset < 0:
                    raise errors.InvalidArgument(
                        f"tensor {row.name!r}: negative chunk offset {row.offset}")
                metrics.BYTES_IN.labels(TRANSPORT).inc(row.data.nbytes)
                yield TensorChunk(row.name, shape, datatype, row.data, row.offset, row.rows)
        except ValueError as exc:
            raise errors.InvalidArgument(f"{what}: {exc}") from None


def _batches(reader: Any, what: str) -> Iterator[pa.RecordBatch]:
    """The record batches of a client's stream (metadata-only messages skipped); a
    stream that breaks off or does not parse is InvalidArgument."""
    while True:
        try:
            chunk = reader.read_chunk()
        except StopIteration:
            return
        except fl.FlightCancelledError:
            raise
        except (pa.ArrowException, OSError) as exc:
            raise errors.InvalidArgument(
                f"{what}: the record batch stream cannot be read ({_first_line(exc)})"
            ) from None
        if chunk.data is not None:
            yield chunk.data


def _dense(chunks: Iterable[TensorChunk]) -> Iterator[TensorChunk]:
    """The chunks of one stream of a step sent over several: row-sparse ones are
    refused (a row-sparse step is small: it goes over one stream)."""
    for c in chunks:
        if c.rows is not None:
            raise errors.InvalidArgument(
                f"tensor {errors.shown(c.name)}: row-sparse gradients go over one stream, "
                "not a step split over several (?streams=N)")
        yield c


def _first_line(exc: BaseException) -> str:
    """An Arrow error's message without the traceback Arrow appends."""
    return str(exc).split(". Detail:", 1)[0].splitlines()[0] if str(exc) else type(exc).__name__


def _with_rows(params: Sequence[TensorChunk]) -> bool:
    """Whether the answer's stream needs the rows column (row-sparse parameters)."""
    return any(c.rows is not None for c in params)


def _tensor_batches(params: Sequence[TensorChunk], datatype: str) -> Iterator[pa.RecordBatch]:
    """Parameters as record batches, each row a view of the chunk's bytes. A DoGet's
    stream runs after its handler returned: a failure here is answered INTERNAL, never
    with Python's traceback."""
    rows = _with_rows(params)
    try:
        for c in params:
            metrics.BYTES_OUT.labels(TRANSPORT).inc(len(c.data))
            yield from layout.batches([(c.name, c.shape, c.data, c.offset, c.rows)], datatype,
                                      rows=rows)
    except Exception as exc:
        log.error("sending parameters failed", exc_info=exc)
        raise flight_error(exc) from None


def _write_params(writer: Any, params: Sequence[TensorChunk], datatype: str) -> None:
    for batch in _tensor_batches(params, datatype):
        writer.write_batch(batch)


def _buffer(msg: Message | bytes) -> pa.Buffer:
    return pa.py_buffer(msg if isinstance(msg, bytes) else msg.SerializeToString())


class _Admitted(fl.ServerMiddleware):  # type: ignore[misc]
    """A call's caller, counted in flight until the call completes."""

    def __init__(self, access: Access, caller: Caller) -> None:
        super().__init__()
        self.access = access
        self.caller = caller

    def call_completed(self, exception: BaseException | None) -> None:
        self.access.leave(self.caller)


class Admission(fl.ServerMiddlewareFactory):  # type: ignore[misc]
    """Every call's caller from its header ``authorization: Bearer <key>`` (as the gRPC
    and HTTP services read it), before its handler runs: UNAUTHENTICATED without a
    known key, RATE_LIMITED / TOO_MANY_STREAMS past the tenant's quotas."""

    def __init__(self, access: Access) -> None:
        super().__init__()
        self.access = access

    def start_call(self, info: Any, headers: dict[str, list[str | bytes]]) -> _Admitted:
        values = headers.get("authorization") or ()
        try:
            caller = self.access.authenticate(next(iter(values), None))
            if caller is None:
                raise errors.Unauthenticated(
                    "missing or wrong API key (token): send header 'authorization: "
                    "Bearer <key>'")
            self.access.admit(caller)
            self.access.enter(caller)
        except errors.ServiceError as exc:
            metrics.REQUESTS.labels(TRANSPORT, str(info.method),
                                    status_of(exc)[0].name).inc()
            raise flight_error(exc) from None
        return _Admitted(self.access, caller)


class FlightService(fl.FlightServerBase):  # type: ignore[misc]
    """``service`` over Arrow Flight at ``location`` (``grpc://host:port``, or
    ``grpc+tls://host:port`` with ``tls``; port 0 picks a free one: see :attr:`port`)."""

    def __init__(self, service: OptimizerService, location: str,
                 token: str | None = None, stream_wait: float = streams.STREAM_WAIT, *,
                 tls: TlsFiles | None = None, access: Access | None = None) -> None:
        self.access = access or Access.single(token)
        super().__init__(location, middleware={"access": Admission(self.access)},
                         **(flight_options(tls) if tls is not None else {}))
        self.service = service
        self.servicer = OptimizerServicer(service, self.access)
        self.gathers = streams.Gathers(stream_wait)

    # -- the guard --------------------------------------------------------------

    @contextlib.contextmanager
    def _guard(self, method: str) -> Iterator[_Label]:
        """Domain errors as Flight errors with the status details; anything else is
        logged and answered INTERNAL. The label names the RPC once it is known."""
        label = _Label(method)
        try:
            yield label
        except fl.FlightError:
            metrics.REQUESTS.labels(TRANSPORT, label.method, "CANCELLED").inc()
            raise
        except Exception as exc:
            failure = flight_error(exc)
            if isinstance(failure, fl.FlightInternalError):
                log.error("%s failed", label.method, exc_info=exc)
            code = status_of(exc)[0] if isinstance(exc, errors.ServiceError) else None
            metrics.REQUESTS.labels(TRANSPORT, label.method,
                                    code.name if code else "INTERNAL").inc()
            raise failure from None
        metrics.REQUESTS.labels(TRANSPORT, label.method, "OK").inc()

    @staticmethod
    def _caller(context: Any) -> Caller:
        admitted = context.get_middleware("access")
        assert isinstance(admitted, _Admitted)  # every call passes Admission first
        return admitted.caller

    # -- the four verbs -----------------------------------------------------------

    def do_exchange(self, context: Any, descriptor: fl.FlightDescriptor, reader: Any,
                    writer: Any) -> None:
        with self._guard("Step") as label:
            caller = self._caller(context)
            kind, first, cmd = _command(descriptor.command or b"", "DoExchange", "step",
                                        "commit")
            if kind == "commit":
                label.method = "Commit"
                for _ in _chunks(reader, "Commit"):  # read to the end: nothing is expected
                    raise errors.InvalidArgument("Commit: the stream carries no tensors")
                result = convert.run_commit(self.service, first, caller=caller)
                self._answer(writer, result, result.params, first.return_datatype)
                return
            header = _header(first, "Step")
            grads = _chunks(reader, "Step")
            if header.apply_as_received:
                if cmd.HasField("streams"):
                    raise errors.InvalidArgument("apply_as_received: a full-duplex step goes "
                                                 "over one stream, not several")
                self._duplex(header, grads, writer, caller)
                return
            if cmd.HasField("streams"):
                result, params = self._parallel(header, cmd.streams, grads, caller)
            else:
                result = convert.run_step(self.service, header, grads, push=False, wait=None,
                                          caller=caller)
                params = result.params
            self._answer(writer, result, params, header.return_datatype)

    @staticmethod
    def _answer(writer: Any, result: StepResult, params: list[TensorChunk],
                datatype: str) -> None:
        """A step's (or commit's) answer: the status as metadata, then the parameters."""
        writer.write_metadata(_buffer(pb.StepResponse(status=convert.step_status(result))))
        if params:
            writer.begin(layout.schema(datatype or "FP32", _with_rows(params)))
            _write_params(writer, params, datatype or "FP32")

    def _parallel(self, header: pb.StepHeader, spec: pb.FlightStreams,
                  grads: Iterator[TensorChunk], caller: Caller
                  ) -> tuple[StepResult, list[TensorChunk]]:
        """One stream of a step sent over several (:mod:`.streams`): the step's result
        and the parameters of this stream's rows."""
        session_id = convert.session_id(header.session_id, "header.session_id")
        info = self.service.describe(session_id, caller=caller)
        limit = info.numel * 8  # no datatype is wider than FP64
        caller.require_write("Step", session_id)  # every stream, not only stream 0
        session_id = caller.resolve(session_id)  # one tenant's streams never meet another's
        g = self.gathers.join(session_id, spec.id, spec.count, spec.index,
                              header.SerializeToString(deterministic=True), limit,
                              functools.partial(self.service.store.reserved, session_id))
        rows: list[streams.Row] = []
        grads = _dense(grads)
        if spec.index > 0:
            try:
                streams.hand_over(g, spec.index, grads, rows)
                result = g.outcome()
            except BaseException:
                self.gathers.close(session_id, spec.id)  # stream 0 may never come
                raise
            return result, streams.share(result.params, rows)

        def merged() -> Iterator[TensorChunk]:
            yield from streams.recorded(grads, rows)
            for i in range(1, g.count):
                yield from g.rows_of(i)

        try:
            result = convert.run_step(self.service, header, merged(), push=False, wait=None,
                                      caller=caller)
        except BaseException as exc:
            g.finish(None, exc)
            raise
        finally:
            self.gathers.close(session_id, spec.id)
        g.finish(result, None)
        return result, streams.share(result.params, rows)

    def _duplex(self, header: pb.StepHeader, grads: Iterator[TensorChunk], writer: Any,
                caller: Caller) -> None:
        call = convert.step_call(header, push=False)
        datatype = call.return_datatype or "FP32"
        begun = False
        for item in self.service.step_stream(call.session_id, grads, return_datatype=datatype,
                                             push_id=call.push_id, caller=caller):
            if isinstance(item, StepResult):
                writer.write_metadata(_buffer(pb.StepResponse(
                    status=convert.step_status(item))))
                continue
            if not begun:
                writer.begin(layout.schema(datatype))
                begun = True
            _write_params(writer, [item], datatype)

    def do_put(self, context: Any, descriptor: fl.FlightDescriptor, reader: Any,
               writer: Any) -> None:
        with self._guard("DoPut") as label:
            kind, first, _ = _command(descriptor.command or b"", "DoPut", "push",
                                   "create_session", "add_tensors", "set_parameters")
            label.method = COMMANDS[kind]
            response = self._put(kind, first, _chunks(reader, label.method),
                                 self._caller(context))
            writer.write(_buffer(response))

    def _put(self, kind: str, first: Any, chunks: Iterator[TensorChunk],
             caller: Caller) -> Message:
        service = self.service
        if kind == "push":
            result = convert.run_step(service, _header(first, "Push"), chunks, push=True,
                                      wait=None, caller=caller)
            return pb.PushResponse(status=convert.step_status(result))
        if kind == "create_session":
            spec = _spec(first, "CreateSession")
            info = service.create(convert.session_id(spec.session_id, "spec.session_id"),
                                  convert.session_config(spec), chunks, caller=caller)
            return pb.CreateSessionResponse(session=convert.session_message(info))
        if kind == "add_tensors":
            spec = _spec(first, "AddTensors")
            group = (convert.group_dict(spec.new_group, "new_group")
                     if spec.HasField("new_group") else None)
            info = service.add_tensors(convert.session_id(spec.session_id, "spec.session_id"),
                                       convert.tensor_specs(spec.tensors), group, chunks,
                                       caller=caller)
            return pb.AddTensorsResponse(session=convert.session_message(info))
        if first.WhichOneof("kind") != "session_id":
            raise errors.InvalidArgument("SetParameters: the command's request must carry "
                                         "`session_id`")
        info = service.set_parameters(convert.session_id(first.session_id), chunks, caller=caller)
        return pb.SetParametersResponse(session=convert.session_message(info))

    def do_get(self, context: Any, ticket: fl.Ticket) -> fl.GeneratorStream:
        with self._guard("Pull"):
            caller = self._caller(context)
            _, request, _ = _command(ticket.ticket or b"", "DoGet", "pull")
            datatype = convert.datatype(request.datatype, "datatype")
            timeout = (convert.seconds(request.timeout, "timeout")
                       if request.HasField("timeout") else None)
            params = self.service.pull(convert.session_id(request.session_id),
                                       list(request.names) or None, datatype,
                                       min_step=request.min_step, timeout=timeout,
                                       rows=[(r.name, r.rows) for r in request.rows],
                                       caller=caller)
            return fl.GeneratorStream(layout.schema(datatype, _with_rows(params)),
                                      _tensor_batches(params, datatype))

    def do_action(self, context: Any, action: fl.Action) -> Iterator[fl.Result]:
        method = action.type
        with self._guard(method if method in rpc.RPCS else "DoAction"):
            if method not in ACTIONS:
                raise errors.InvalidArgument(
                    f"DoAction: unknown action {errors.shown(method)}; expected one of "
                    f"{', '.join(sorted(ACTIONS))}")
            row = rpc.RPCS[method]
            size = action.body.size if action.body is not None else 0
            if size > MAX_RECEIVE_BYTES:  # refused before it is copied out of Arrow's buffer
                raise errors.ResourceExhausted(
                    f"{method}: a {size}-byte action body; at most {MAX_RECEIVE_BYTES} (send "
                    "tensors as record batches: DoPut, DoExchange)")
            body = action.body.to_pybytes() if action.body is not None else b""
            request = _parse(row.request_type, body, method)
            fn: Callable[[Any, Any], Any] = getattr(self.servicer, method)
            answer = fn(iter([request]) if row.request_streaming else request,
                        _Call(self._caller(context)))
            # run the whole operation here, under the guard, before the first result
            results = list(answer) if row.response_streaming else [answer]
        return iter([fl.Result(_buffer(r)) for r in results])

    def list_actions(self, context: Any) -> list[tuple[str, str]]:
        return [(name, f"adamserve_proto.v2.OptimizerService/{name}: the body is a "
                       f"{rpc.RPCS[name].request_type.DESCRIPTOR.name}")
                for name in sorted(ACTIONS)]


def _spec(first: Any, what: str) -> Any:
    if first.WhichOneof("kind") != "spec":
        raise errors.InvalidArgument(f"{what}: the command's request must carry `spec`")
    return first.spec


class FlightServerThread:
    """A :class:`FlightService` served by a thread; ``stop`` shuts it down."""

    def __init__(self, service: OptimizerService, host: str = "127.0.0.1", port: int = 0,
                 token: str | None = None, stream_wait: float = streams.STREAM_WAIT, *,
                 tls: TlsFiles | None = None, access: Access | None = None) -> None:
        access = access or Access.single(token)
        bracketed = f"[{host}]" if ":" in host else host
        scheme = "grpc+tls" if tls is not None else "grpc"
        try:
            self.server = FlightService(service, f"{scheme}://{bracketed}:{port}", None,
                                        stream_wait, tls=tls, access=access)
        except pa.ArrowException as exc:
            raise OSError(f"Flight: cannot listen on {bracketed}:{port} "
                          f"({_first_line(exc)})") from None
        self.port: int = self.server.port
        self.url = f"{'flight+tls' if tls else 'flight'}://{bracketed}:{self.port}"
        self._thread = threading.Thread(target=self.server.serve, name="adamserve-flight",
                                        daemon=True)

    def start(self) -> int:
        self._thread.start()
        log.info("Flight listening on %s", self.url)
        return self.port

    def stop(self, grace: float = 5.0) -> None:
        """Stop taking calls; wait ``grace`` seconds for those under way (Flight's
        shutdown waits for every open call, and a client may hold one open forever:
        the server's own shutdown, its checkpoints, must not wait on it)."""
        done = threading.Thread(target=self.server.shutdown, name="adamserve-flight-stop",
                                daemon=True)
        done.start()
        done.join(grace)
        if done.is_alive():
            log.warning("Flight: calls still open %.0f s after shutdown began; not waiting "
                        "for them", grace)
            return
        self._thread.join(grace)
