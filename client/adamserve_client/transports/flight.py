"""The Arrow Flight wire: ``adamserve_proto.v2`` over Flight (docs/data-plane.md).

A step is one ``DoExchange`` (the descriptor's command a ``FlightCommand`` with the
Step stream's first message; the gradients as record batches in
:mod:`adamserve_proto.flight`'s layout, built over the tensors' own memory), or,
when its gradients are small, one ``StepUnary`` action (the lowest latency); a shard's
commit is a ``DoExchange`` too (no batches out, the parameters back); a push,
a create or add-tensors with initial values and a SetParameters are ``DoPut``; a
pull is ``DoGet``; every other RPC is ``DoAction`` with the RPC's name and the
serialised request (its results are the response messages the gRPC service would
stream). The bytes move in Arrow's C++ code, not in Python.

Errors: the ``google.rpc.Status`` in a Flight error's ``extra_info`` gives the
status code, the message and the reason, as over gRPC. Calls that fail with
UNAVAILABLE are retried like the gRPC wire's (a call that must not run twice only
when the connection was never made).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar, cast
from urllib.parse import parse_qs, urlsplit

import pyarrow as pa
import pyarrow.flight as fl
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import DecodeError, Message
from google.rpc import status_pb2

from adamserve_client import errors
from adamserve_client.transports import _codec, _status
from adamserve_client.transports._tls import TlsOptions, check_scheme
from adamserve_client.transports.base import Blob, Payload, Reply, Wire, WireTensor
from adamserve_client.transports.client import Client
from adamserve_client.transports.small_steps import SmallSteps, unary_request
from adamserve_proto import codec, rpc
from adamserve_proto import flight as layout
from adamserve_proto.flight import Row
from adamserve_proto.v2 import optimizer_pb2 as pb

__all__ = ["FlightTransport", "FlightWire"]

T = TypeVar("T")

DEFAULT_FLIGHT_PORT = 8815
# The most streams one step may be split over (the server's bound too).
MAX_STREAMS = 16
# The RPCs that travel as Flight streams, and the FlightCommand field of each.
_COMMANDS = {"Step": "step", "Push": "push", "Pull": "pull", "CreateSession": "create_session",
             "AddTensors": "add_tensors", "SetParameters": "set_parameters",
             "Commit": "commit"}
# google.rpc.Code numbers -> the status names adamserve_client.errors maps
_CODE_NAMES = dict(enumerate((
    "OK", "CANCELLED", "UNKNOWN", "INVALID_ARGUMENT", "DEADLINE_EXCEEDED", "NOT_FOUND",
    "ALREADY_EXISTS", "PERMISSION_DENIED", "RESOURCE_EXHAUSTED", "FAILED_PRECONDITION",
    "ABORTED", "OUT_OF_RANGE", "UNIMPLEMENTED", "INTERNAL", "UNAVAILABLE", "DATA_LOSS",
    "UNAUTHENTICATED")))
_NEVER_SENT = ("failed to connect", "connection refused", "dns resolution failed",
               "name resolution", "no route to host")


def parse_flight_url(url: str) -> tuple[_codec.ServerAddress, int]:
    """``flight://host:port[?streams=N]`` (``flight+tls://``: over TLS): the address (port
    8815 when not given) and the number of streams a large step is split over (1 when
    not given)."""
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme not in ("flight", "flight+tls") or not parts.hostname:
        raise ValueError(f"FlightTransport needs a flight://host:port or flight+tls://host:port "
                         f"URL, got {url!r}")
    if parts.path not in ("", "/"):
        raise ValueError(f"server URL {url!r}: a {scheme}:// URL has no path")
    try:
        port = parts.port or DEFAULT_FLIGHT_PORT
    except ValueError as exc:
        raise ValueError(f"server URL {url!r}: {exc}") from None
    query = parse_qs(parts.query, strict_parsing=bool(parts.query))
    unknown = set(query) - {"streams"}
    if unknown:
        raise ValueError(f"server URL {url!r}: unknown option {sorted(unknown)[0]!r}; "
                         "expected streams")
    raw = query.get("streams", ["1"])[-1]
    if not raw.isdigit() or not 1 <= int(raw) <= MAX_STREAMS:
        raise ValueError(f"server URL {url!r}: streams={raw}: expected 1 to {MAX_STREAMS}")
    return _codec.ServerAddress(scheme, parts.hostname, port), int(raw)


def _status_of(exc: fl.FlightError) -> status_pb2.Status | None:
    info = getattr(exc, "extra_info", None)
    if not info:
        return None
    try:
        return status_pb2.Status.FromString(bytes(info))
    except DecodeError:
        return None


def _message(exc: BaseException) -> str:
    """The message of a Flight error, without the detail Arrow appends."""
    return str(exc).split(". Detail:", 1)[0]


def _unavailable(exc: BaseException) -> bool:
    return isinstance(exc, fl.FlightUnavailableError)


def _never_sent(exc: BaseException) -> bool:
    return _unavailable(exc) and any(m in str(exc).lower() for m in _NEVER_SENT)


@dataclass(frozen=True)
class Part:
    """A contiguous piece of one tensor: ``data`` holds elements ``offset`` onwards."""

    name: str
    shape: tuple[int, ...]
    datatype: str
    data: memoryview
    offset: int
    rows: Any = None  # a row-sparse tensor's row ids (int64 little-endian bytes)


def _split(payload: Sequence[WireTensor], streams: int) -> list[list[Part]]:
    """The tensors cut into ``streams`` parts of about equal bytes, contiguous in flat
    order (fewer parts when the payload is too small to be worth them)."""
    kinds = {t.datatype for t in payload}
    if len(kinds) > 1:
        raise ValueError(f"one Flight stream carries one datatype; got {sorted(kinds)}")
    views = [(t, memoryview(t.data).cast("B")) for t in payload]
    total = sum(v.nbytes for _, v in views)
    streams = max(1, min(streams, total // layout.BATCH_BYTES))
    if streams == 1 or any(t.rows is not None for t in payload):  # row-sparse: one stream
        return [[Part(t.name, t.shape, t.datatype, v, 0, t.rows) for t, v in views]]
    item = codec.itemsize(kinds.pop())
    per = -(-total // (streams * item)) * item  # bytes per part: whole elements
    parts: list[list[Part]] = [[] for _ in range(streams)]
    flat = 0  # bytes of the tensors before this one
    for t, v in views:
        lo, n = 0, v.nbytes
        while lo < n or (n == 0 and lo == 0):
            k = min(streams - 1, (flat + lo) // per)
            end = n if k == streams - 1 else min(n, (k + 1) * per - flat)
            parts[k].append(Part(t.name, t.shape, t.datatype, v[lo:end], lo // item))
            if n == 0:
                break
            lo = end
        flat += n
    return [p for p in parts if p]


def _schema(part: Sequence[Part], datatype: str) -> pa.Schema:
    return layout.schema(datatype, any(p.rows is not None for p in part))


def _batches(part: Sequence[Part], datatype: str) -> Iterator[pa.RecordBatch]:
    return layout.batches(((p.name, p.shape, p.data, p.offset, p.rows) for p in part), datatype,
                          rows=any(p.rows is not None for p in part))


def _assemble(replies: Sequence[tuple[str, Sequence[Row]]]) -> list[WireTensor]:
    """Whole tensors from the rows of one or more reply streams (in stream order)."""
    tensors = _codec.ChunkAssembler()
    for datatype, rows in replies:
        for r in rows:
            if r.rows is not None:
                tensors.add_rows(r.name, r.shape, datatype, r.rows, r.data)
                continue
            # a view of the batch's buffer: the assembler keeps it or copies it once
            tensors.add(r.name, r.shape, datatype, r.offset, cast(bytes, r.data))
    return tensors.tensors()


class FlightWire(Wire):
    """The wire to ``flight://host:port`` (``flight+tls://``: over TLS); arguments as
    :class:`GrpcWire`'s."""

    def __init__(self, url: str, token: str | None = None, timeout: float | None = None, *,
                 retries: int = 3, backoff: float = 0.05, tls: TlsOptions | None = None) -> None:
        address, self.streams = parse_flight_url(url)
        tls = check_scheme(url, address.scheme, tls)
        self.url = url
        self.timeout = timeout
        self.retries = retries
        self.backoff = backoff
        headers = [(b"authorization", f"Bearer {token}".encode())] if token else []
        self._options = fl.FlightCallOptions(timeout=timeout, headers=headers)
        self._client = (fl.FlightClient(f"grpc://{address.hostport}") if tls is None else
                        fl.FlightClient(f"grpc+tls://{address.hostport}", tls_root_certs=tls.ca,
                                        cert_chain=tls.cert, private_key=tls.key))
        self.small = SmallSteps()  # which sessions' steps go as a StepUnary action

    # -- the seam ---------------------------------------------------------------

    def unary(self, method: str, request: Message, *, idempotent: bool = True) -> Message:
        reply = self._call(lambda: self._action(method, request), idempotent)
        if reply.message is None:
            raise _codec.bad_response(f"the {method} action returned no result", self.url)
        return reply.message

    def stream(self, method: str, request: Message, payload: Payload = (), *,
               idempotent: bool = True) -> Reply:
        if not isinstance(payload, Blob):
            _codec.check_sizes(payload)
        if isinstance(payload, Blob):  # ImportState: the whole blob in one message
            blob_request: Any = type(request)()
            blob_request.CopyFrom(request)
            blob_request.data = bytes(payload.data)
            return self._call(lambda: self._action(method, blob_request), idempotent)
        kind = _COMMANDS.get(method)
        if kind is None or (not payload and method in ("CreateSession", "AddTensors")):
            return self._call(lambda: self._action(method, request), idempotent)
        cmd = pb.FlightCommand()
        getattr(cmd, kind).CopyFrom(request)
        command = cmd.SerializeToString()
        if method == "Step":
            small = self._step_unary(request, payload, idempotent)
            if small is not None:
                return small
            parts = _split(payload, self.streams)
            if len(parts) > 1:
                return self._call(lambda: self._parallel(cmd, parts), idempotent)
            return self._call(lambda: self._exchange(command, payload), idempotent)
        if method == "Pull":
            return self._call(lambda: self._get(command), idempotent)
        if method == "Commit":
            return self._call(lambda: self._exchange(command, ()), idempotent)
        response_type = rpc.RPCS[method].response_type
        return self._call(lambda: self._put(command, payload, response_type), idempotent)

    def close(self) -> None:
        self._client.close()

    # -- the verbs --------------------------------------------------------------

    def _step_unary(self, request: Message, gradients: Sequence[WireTensor],
                    idempotent: bool) -> Reply | None:
        """A small step as one StepUnary action; None where it goes as DoExchange."""
        header = self.small.header(request, gradients)
        if header is None:
            return None
        unary = unary_request(header, gradients)
        return self.small.send(header, lambda: self.unary("StepUnary", unary,
                                                          idempotent=idempotent))

    def _action(self, method: str, request: Message) -> Reply:
        """DoAction: the response messages, gathered as the gRPC wire gathers a stream."""
        response_type = rpc.RPCS[method].response_type
        results = self._client.do_action(fl.Action(method, request.SerializeToString()),
                                         self._options)
        head: Message | None = None
        tensors = _codec.ChunkAssembler()
        blob: list[bytes] = []
        for result in results:
            msg = _parse(response_type, result.body.to_pybytes(), self.url)
            payload = False
            for f, value in msg.ListFields():
                if f.message_type is pb.TensorChunk.DESCRIPTOR and not f.is_repeated:
                    tensors.add_chunk(value)
                    payload = True
                elif f.type == FieldDescriptor.TYPE_BYTES:
                    blob.append(value)
                    payload = True
            if not payload:
                head = msg
        return Reply(head, tensors.tensors(), bytearray().join(blob))

    def _parallel(self, cmd: pb.FlightCommand, parts: list[list[Part]]) -> Reply:
        """One step over ``len(parts)`` DoExchange streams at once (``?streams=N``)."""
        token = os.urandom(12).hex()
        commands = []
        for i in range(len(parts)):
            c = pb.FlightCommand()
            c.CopyFrom(cmd)
            c.streams.CopyFrom(pb.FlightStreams(id=token, count=len(parts), index=i))
            commands.append(c.SerializeToString())
        with ThreadPoolExecutor(len(parts), thread_name_prefix="adamserve-flight") as pool:
            replies = list(pool.map(self._exchange_part, commands, parts))
        return Reply(replies[0][0], _assemble([(dt, rows) for _, dt, rows in replies]))

    def _exchange_part(self, command: bytes, part: list[Part]
                       ) -> tuple[Message | None, str, list[Row]]:
        writer, reader = self._client.do_exchange(fl.FlightDescriptor.for_command(command),
                                                  self._options)
        datatype = part[0].datatype if part else "FP32"
        try:
            try:
                writer.begin(_schema(part, datatype))
                for batch in _batches(part, datatype):
                    writer.write_batch(batch)
                writer.done_writing()
            except (fl.FlightError, OSError):  # Arrow raises OSError for a closed call
                pass  # the server answered early (a refusal): its answer below says why
            return self._read(reader, pb.StepResponse)
        finally:
            writer.close()

    def _exchange(self, command: bytes, payload: Sequence[WireTensor]) -> Reply:
        """DoExchange: the gradients out, then the status and the parameters back. The
        server reads the whole request before it answers (the client sends no
        apply_as_received), so writing first and reading after cannot deadlock."""
        head, datatype, rows = self._exchange_part(command, _split(payload, 1)[0])
        return Reply(head, _assemble([(datatype, rows)]))

    def _put(self, command: bytes, payload: Sequence[WireTensor],
             response_type: type[Message]) -> Reply:
        """DoPut: the tensors out, the one PutResult (the response message) back."""
        (part,) = _split(payload, 1)
        datatype = part[0].datatype if part else "FP32"
        writer, meta = self._client.do_put(fl.FlightDescriptor.for_command(command),
                                           _schema(part, datatype), self._options)
        try:
            for batch in _batches(part, datatype):
                writer.write_batch(batch)
            writer.done_writing()
            answer = meta.read()
        finally:
            writer.close()
        if answer is None:
            raise _codec.bad_response("DoPut returned no result", self.url)
        return Reply(_parse(response_type, answer.to_pybytes(), self.url))

    def _get(self, command: bytes) -> Reply:
        reader = self._client.do_get(fl.Ticket(command), self._options)
        return self._gather(reader, None)

    def _gather(self, reader: Any, status_type: type[Message] | None) -> Reply:
        """A stream of metadata (the status) and record batches (whole tensors)."""
        head, datatype, rows = self._read(reader, status_type)
        return Reply(head, _assemble([(datatype, rows)]))

    def _read(self, reader: Any, status_type: type[Message] | None
              ) -> tuple[Message | None, str, list[Row]]:
        """The status (the last metadata message), the datatype and the rows of a
        reply stream."""
        head: Message | None = None
        rows: list[Row] = []
        datatype = ""
        while True:
            try:
                chunk = reader.read_chunk()
            except StopIteration:
                break
            if chunk.app_metadata is not None and status_type is not None:
                head = _parse(status_type, chunk.app_metadata.to_pybytes(), self.url)
            if chunk.data is None:
                continue
            if not datatype:
                try:
                    datatype = layout.datatype_of(chunk.data.schema)
                except ValueError as exc:
                    raise _codec.bad_response(str(exc), self.url) from None
            rows.extend(layout.rows(chunk.data, datatype))
        return head, datatype or "FP32", rows

    # -- plumbing ---------------------------------------------------------------

    def _call(self, fn: Callable[[], T], idempotent: bool) -> T:
        try:
            return _codec.with_retries(fn, _unavailable if idempotent else _never_sent,
                                       attempts=self.retries, backoff=self.backoff)
        except fl.FlightError as exc:
            raise self._error(exc) from None
        except pa.ArrowException as exc:
            raise _codec.bad_response(f"the Flight stream cannot be read ({_message(exc)})",
                                      self.url) from None

    def _error(self, exc: fl.FlightError) -> errors.AdamserveError:
        status = _status_of(exc)
        if status is None:
            if isinstance(exc, fl.FlightUnavailableError):
                return _codec.unreachable(self.url, self.retries, _message(exc))
            if isinstance(exc, fl.FlightTimedOutError):
                return _codec.timed_out(self.url, self.timeout)
            if isinstance(exc, fl.FlightUnauthenticatedError):
                return errors.error_for("UNAUTHENTICATED", _message(exc), self.url)
            return errors.error_for("UNKNOWN", _message(exc), self.url)
        found = _status.details(status)
        code = _CODE_NAMES.get(status.code, "UNKNOWN")
        return errors.error_for(code, status.message, self.url, reason=found.reason,
                                metadata=found.metadata, retry_after=found.retry_after)

    def __repr__(self) -> str:
        return f"FlightWire({self.url!r})"


def _parse(cls: type[Message], data: bytes, url: str) -> Message:
    try:
        return cls.FromString(data)
    except DecodeError:
        raise _codec.bad_response(f"the server's answer is not a {cls.DESCRIPTOR.name}",
                                  url) from None


class FlightTransport(Client):
    """The session operations on ``flight://host:port`` or ``flight+tls://`` (a
    :class:`Client` over a :class:`FlightWire`)."""

    def __init__(self, url: str, token: str | None = None, timeout: float | None = None, *,
                 retries: int = 3, backoff: float = 0.05, tls: TlsOptions | None = None) -> None:
        super().__init__(FlightWire(url, token, timeout, retries=retries, backoff=backoff,
                                    tls=tls))
