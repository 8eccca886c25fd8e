"""The gRPC wire: ``adamserve_proto.v2.OptimizerService`` over one channel.

The stubs come from the RPC table (:mod:`adamserve_proto.rpc`). A request stream
is its first message, then the payload: each tensor as ``TensorChunk`` messages
of at most 4 MiB in the first message's chunk field, serialised by
:mod:`adamserve_proto.wire` so the tensor bytes are copied once (or the state
blob's pieces in its bytes field). A response stream is gathered back into its
one status message and whole tensors (or the blob); the messages that carry a
chunk are read by hand (:func:`adamserve_proto.wire.read_chunk_message`), so each
chunk's data is copied once, into its tensor's buffer. A ``Step`` whose gradients
are small goes as one ``StepUnary`` message instead (the lowest latency; written
and read the same way), and over the stream when the server says the session is
too large for one reply.

Errors: the status code picks the :mod:`adamserve_client.errors` class, the
google.rpc.ErrorInfo in the status details (``grpc-status-details-bin``) gives
the reason and metadata. Calls that fail with UNAVAILABLE are retried a bounded
number of times with exponential backoff; a call that must not run twice only
when the connection was never made.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

import grpc
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message
from grpc_status import rpc_status

from adamserve_client import errors
from adamserve_client.tensors import DATATYPES
from adamserve_client.transports import _codec, _status
from adamserve_client.transports._tls import TlsOptions, check_scheme
from adamserve_client.transports.base import Blob, Payload, Reply, Wire, WireTensor
from adamserve_client.transports.client import Client
from adamserve_client.transports.small_steps import SmallSteps, unary_request
from adamserve_proto import rpc, wire
from adamserve_proto.v2 import optimizer_pb2 as pb

__all__ = ["GrpcTransport", "GrpcWire"]

T = TypeVar("T")

# The server accepts messages up to 64 MiB and sends at most 4 MiB.
_MAX_MESSAGE = 64 * wire.MiB


def _payload_field(message: Any) -> FieldDescriptor | None:
    """The field of a stream message that carries a payload: its one TensorChunk (not
    repeated), or the bytes ``data`` of a state blob's piece."""
    f: FieldDescriptor
    for f in message.fields:
        if f.message_type is pb.TensorChunk.DESCRIPTOR and not f.is_repeated:
            return f
        if f.type == FieldDescriptor.TYPE_BYTES:
            return f
    return None


# method -> the request stream's payload field (request streams only).
_SENDS = {name: _payload_field(r.request_type.DESCRIPTOR) for name, r in rpc.RPCS.items()
          if r.request_streaming}


def _response_parser(r: rpc.Rpc) -> Callable[[bytes], Any]:
    """An RPC's response deserializer: a large message that carries one chunk is read by
    hand (a :class:`adamserve_proto.wire.ChunkView`), a large StepUnary reply split into
    its status and views of its tensors; anything else is parsed by protobuf (faster for
    small messages: :data:`adamserve_proto.wire.BY_HAND_BYTES`)."""
    parse = r.response_type.FromString
    if r.name == "StepUnary":
        def unary(data: bytes) -> Any:
            split = wire.split_if_large(data, wire.STEP_UNARY_PARAMS)
            if split is None:
                return parse(data)
            rest, chunks = split
            return _UnaryReply(pb.StepUnaryResponse.FromString(rest).status, chunks)

        return unary
    field = _payload_field(r.response_type.DESCRIPTOR)
    if field is None or field.message_type is not pb.TensorChunk.DESCRIPTOR:
        return parse
    chunk_field = field

    def chunks(data: bytes) -> Any:
        view = wire.read_if_large(data, chunk_field)
        return parse(data) if view is None else view

    return chunks


@dataclass(frozen=True)
class _UnaryReply:
    """A StepUnaryResponse read by hand: its status, and its tensors as views."""

    status: pb.StepStatus
    params: list[wire.ChunkView]


def tensor_messages(t: WireTensor, wrap: FieldDescriptor | None = None,
                    max_bytes: int | None = wire.MAX_MESSAGE_BYTES) -> Iterator[bytes]:
    """Serialised ``TensorChunk`` messages (each wrapped in ``wrap``) covering ``t`` (None:
    one message, however large)."""
    item = DATATYPES[t.datatype].itemsize
    _codec.check_sizes([t])
    return wire.chunk_messages(t.name, t.shape, t.datatype, t.data, itemsize=item, wrap=wrap,
                               max_bytes=max_bytes, rows=t.rows)


def _serialize(msg: Any) -> bytes:
    """Request serializer: messages, or bytes serialised by hand (tensor chunks)."""
    if isinstance(msg, bytes):
        return msg
    out: bytes = msg.SerializeToString()
    return out


def _unavailable(exc: BaseException) -> bool:
    return isinstance(exc, grpc.RpcError) and exc.code() == grpc.StatusCode.UNAVAILABLE


# UNAVAILABLE details that mean the call never reached a server.
_NEVER_SENT = ("failed to connect", "connection refused", "dns resolution failed",
               "name resolution", "no route to host")


def _never_sent(exc: BaseException) -> bool:
    """Retry rule for calls that must not run twice (create, step, push): only when the
    connection was never made; an UNAVAILABLE mid-call may follow an applied step."""
    if not _unavailable(exc):
        return False
    details = (exc.details() or "").lower()  # type: ignore[attr-defined]
    return any(marker in details for marker in _NEVER_SENT)


def error_details(exc: Any) -> _status.Details:
    """The ErrorInfo and RetryInfo in a failed call's status details (none: empty)."""
    try:
        status = rpc_status.from_call(exc)
    except (AttributeError, ValueError, TypeError):  # not a call, or details that disagree
        return _status.Details()
    return _status.details(status)


class GrpcWire(Wire):
    """The wire to ``grpc://host:port`` (``grpcs://``: over TLS).

    ``token``: sent as ``authorization: Bearer <token>`` on every call. ``timeout``:
    seconds allowed for each call (None: no deadline). ``retries``: calls made in
    all when the server is UNAVAILABLE (1 disables retrying). ``tls``: the CA and
    client certificate of a ``grpcs://`` URL (None: the environment's,
    :class:`~adamserve_client.transports._tls.TlsOptions`).
    """

    def __init__(self, url: str, token: str | None = None, timeout: float | None = None, *,
                 retries: int = 3, backoff: float = 0.05, tls: TlsOptions | None = None) -> None:
        address = _codec.parse_url(url)
        if address.scheme not in ("grpc", "grpcs"):
            raise ValueError(f"GrpcTransport needs a grpc:// or grpcs:// URL, got {url!r}")
        tls = check_scheme(url, address.scheme, tls)
        self.url = url
        self.timeout = timeout
        self.retries = retries
        self.backoff = backoff
        self._metadata = (("authorization", f"Bearer {token}"),) if token else None
        options = [("grpc.max_receive_message_length", _MAX_MESSAGE),
                   ("grpc.max_send_message_length", _MAX_MESSAGE)]
        if tls is None:
            self._channel = grpc.insecure_channel(address.hostport, options)
        else:
            credentials = grpc.ssl_channel_credentials(tls.ca, tls.key, tls.cert)
            self._channel = grpc.secure_channel(address.hostport, credentials, options)
        self._stubs = {name: getattr(self._channel, r.kind)(
            r.path, request_serializer=_serialize,
            response_deserializer=_response_parser(r)) for name, r in rpc.RPCS.items()}
        self.small = SmallSteps()  # which sessions' steps go as StepUnary

    # -- the seam ---------------------------------------------------------------

    def unary(self, method: str, request: Message, *, idempotent: bool = True) -> Message:
        stub = self._stubs[method]
        response: Message = self._call(lambda: stub(request, **self._kw()), idempotent)
        return response

    def stream(self, method: str, request: Message, payload: Payload = (), *,
               idempotent: bool = True) -> Reply:
        if not isinstance(payload, Blob):
            _codec.check_sizes(payload)  # here, not inside gRPC's request iterator
        if method == "Step" and not isinstance(payload, Blob):
            reply = self._try_step_unary(request, payload, idempotent)
            if reply is not None:
                return reply
        r = rpc.RPCS[method]
        stub = self._stubs[method]

        def run() -> Reply:
            sent = self._requests(method, request, payload) if r.request_streaming else request
            answer = stub(sent, **self._kw())
            return self._gather(answer) if r.response_streaming else Reply(answer)

        return self._call(run, idempotent)

    def close(self) -> None:
        self._channel.close()

    # -- plumbing ---------------------------------------------------------------

    def _kw(self) -> dict[str, Any]:
        return {"timeout": self.timeout, "metadata": self._metadata}

    def _call(self, fn: Callable[[], T], idempotent: bool) -> T:
        """Run one RPC (consuming any response stream inside ``fn``) with retries,
        turning gRPC errors into :mod:`adamserve_client.errors` exceptions."""
        try:
            return _codec.with_retries(fn, _unavailable if idempotent else _never_sent,
                                       attempts=self.retries, backoff=self.backoff)
        except grpc.RpcError as exc:
            raise self._error(exc) from None

    def _error(self, exc: Any) -> errors.AdamserveError:
        code = exc.code()
        details = exc.details() or code.name
        found = error_details(exc)
        if code == grpc.StatusCode.UNAVAILABLE and found.reason is None:
            return _codec.unreachable(self.url, self.retries, details)
        if code == grpc.StatusCode.DEADLINE_EXCEEDED and found.reason is None:
            # our own deadline passed (a server-side wait that timed out says WAIT_TIMEOUT)
            return _codec.timed_out(self.url, self.timeout)
        return errors.error_for(code.name, details, self.url, reason=found.reason,
                                metadata=found.metadata, retry_after=found.retry_after)

    @staticmethod
    def _requests(method: str, first: Message, payload: Payload) -> Iterator[Any]:
        """A request stream: ``first``, then the payload in the method's payload field."""
        yield first
        field = _SENDS[method]
        if isinstance(payload, Blob):
            assert field is not None and field.type == FieldDescriptor.TYPE_BYTES
            yield from wire.blob_messages(payload.data, wrap=field)
            return
        for t in payload:
            yield from tensor_messages(t, field)

    def _gather(self, responses: Iterator[Message | wire.ChunkView]) -> Reply:
        """A response stream as its one message that is not a chunk, the tensors of
        its chunks and the bytes of its blob pieces."""
        head: Message | None = None
        tensors = _codec.ChunkAssembler()
        blob: list[bytes] = []
        for resp in responses:
            if isinstance(resp, wire.ChunkView):
                tensors.add_chunk(resp)
                continue
            for f, value in resp.ListFields():
                if f.message_type is pb.TensorChunk.DESCRIPTOR:
                    tensors.add_chunk(value)
                elif f.type == FieldDescriptor.TYPE_BYTES:
                    blob.append(value)
                else:
                    head = resp
        return Reply(head, tensors.tensors(), bytearray().join(blob))

    def _try_step_unary(self, request: Message, gradients: Any,
                        idempotent: bool) -> Reply | None:
        """A Step as one StepUnary message; None where the session needs the stream."""
        header = self.small.header(request, gradients)
        if header is None:
            return None
        raw: Message | bytes
        if sum(memoryview(t.data).nbytes for t in gradients) < wire.BY_HAND_BYTES:
            raw = unary_request(header, gradients)
        else:  # serialised here: the header, then each gradient whole (a `gradients` entry)
            raw = b"".join([pb.StepUnaryRequest(header=header).SerializeToString(),
                            *(m for t in gradients
                              for m in tensor_messages(t, wire.STEP_UNARY_GRADIENTS, None))])
        stub = self._stubs["StepUnary"]
        return self.small.send(header, lambda: self._call(lambda: stub(raw, **self._kw()),
                                                          idempotent))

    def __repr__(self) -> str:
        return f"GrpcWire({self.url!r})"


class GrpcTransport(Client):
    """The session operations on ``grpc://host:port`` or ``grpcs://`` (a :class:`Client`
    over a :class:`GrpcWire`; the arguments are the wire's)."""

    def __init__(self, url: str, token: str | None = None, timeout: float | None = None, *,
                 retries: int = 3, backoff: float = 0.05, tls: TlsOptions | None = None) -> None:
        super().__init__(GrpcWire(url, token, timeout, retries=retries, backoff=backoff,
                                  tls=tls))

