"""The HTTP wire: the server's ``/v2`` API over one httpx connection pool.

Each RPC is one route (:data:`ROUTES`); its request message travels as the
proto's JSON (field names, enums by name, Durations as ``"30s"``, 64-bit integers
as numbers), less the fields the path carries (the session id). Tensors travel in
the binary layout (the Triton / Open Inference Protocol binary-data extension): a
JSON header whose length is in ``Adamserve-Header-Length``, its tensor entries
giving ``parameters.binary_data_size``, then the raw tensor bytes back to back;
steps, commits and pulls ask for binary output the same way. The state blob is
the body itself. Answers are read back into the RPC's response message.

A binary body is never joined: it goes out as the JSON header and views of the
tensors' own buffers, :data:`PART` bytes each, under its Content-Length. The
tensors of an answer are views of its body.

Errors: the body ``{"error", "code", "reason", "metadata"}`` becomes its
:mod:`adamserve_client.errors` exception with the server's message and reason.
Requests that could not connect (or got 503) are retried a bounded number of times.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import httpx
import numpy as np
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message

from adamserve_client import errors
from adamserve_client.tensors import encode
from adamserve_client.transports import _codec
from adamserve_client.transports._tls import TlsOptions, check_scheme
from adamserve_client.transports.base import Blob, Payload, Reply, Wire, WireTensor
from adamserve_client.transports.client import Client
from adamserve_proto import convert, rpc
from adamserve_proto.v2 import optimizer_pb2 as pb

__all__ = ["ROUTES", "HttpTransport", "HttpWire", "Route"]

HEADER_LENGTH = "Adamserve-Header-Length"
OCTET_STREAM = "application/octet-stream"
# Bytes per part of a request body: httpcore copies each part once (and what a socket
# send leaves of it again), so parts this size keep both copies small.
PART = 1 << 20
SMALL_BODY = 64 << 10  # a body this small goes out as one part
# Statuses when the error body carries no code.
_STATUS_CODES = {400: "invalid_argument", 401: "unauthenticated", 403: "permission_denied",
                 404: "not_found", 408: "deadline_exceeded", 409: "failed_precondition",
                 413: "resource_exhausted", 429: "resource_exhausted", 503: "unavailable",
                 504: "deadline_exceeded"}


@dataclass(frozen=True)
class Route:
    """Where an RPC goes: ``verb path``, the path's ``{field}``s filled from the request
    (and left out of its body); ``tensors``: the body's key for the request's tensors;
    ``binary_output``: the route returns tensors; ``defaults``: the body writes fields
    at their default values too (a step's header leaves them out: there "" and 0 mean
    "not given", which the JSON says by absence); ``body``: the request's field whose
    message is the body (else the request, or the member of its ``kind``)."""

    verb: str
    path: str
    tensors: str = ""
    binary_output: bool = False
    defaults: bool = True
    body: str = ""

    @functools.cached_property
    def fields(self) -> tuple[str, ...]:
        """The request fields the path carries."""
        return tuple(part[1:-1] for part in self.path.split("/") if part.startswith("{"))


_S = "/v2/sessions/{session_id}"
_SHM = "/v2/shared-memory"
ROUTES: Mapping[str, Route] = {
    "CreateSession": Route("POST", "/v2/sessions", tensors="initial"),
    "AddTensors": Route("POST", _S + "/tensors", tensors="initial"),
    "ListSessions": Route("GET", "/v2/sessions"),
    "GetSession": Route("GET", _S),
    "DeleteSession": Route("DELETE", _S),
    "Step": Route("POST", _S + "/step", tensors="gradients", binary_output=True,
                  defaults=False),
    "Push": Route("POST", _S + "/push", tensors="gradients", defaults=False),
    "Commit": Route("POST", _S + "/commit", binary_output=True),
    "Pull": Route("POST", _S + "/pull", binary_output=True),
    "SetParameters": Route("PUT", _S + "/params", tensors="values"),
    "SetHyperparameters": Route("PATCH", _S + "/hyperparameters"),
    "SetSchedule": Route("PUT", _S + "/schedule"),
    "SetWorkers": Route("PUT", _S + "/workers"),
    "ExportState": Route("GET", _S + "/state"),
    "ImportState": Route("PUT", _S + "/state"),
    "Checkpoint": Route("POST", _S + "/checkpoint"),
    "ListCheckpoints": Route("GET", _S + "/checkpoints"),
    "RestoreCheckpoint": Route("POST", _S + "/restore"),
    "RegisterSharedMemory": Route("POST", _SHM, body="region"),
    "UnregisterSharedMemory": Route("DELETE", _SHM + "/{name}"),
    "ListSharedMemory": Route("GET", _SHM),
}

def _body_of(request: Message, route: Route) -> Message | None:
    """The message a route's JSON body holds: the route's ``body`` field, a stream's
    first message's member (the spec or header it carries), else the request itself;
    None for a bare session id."""
    if route.body:
        value: Any = getattr(request, route.body)
        return value if isinstance(value, Message) else None
    oneof = request.DESCRIPTOR.oneofs_by_name.get("kind")
    if oneof is None:
        return request
    member = request.WhichOneof("kind")
    value = getattr(request, member) if member else None
    return value if isinstance(value, Message) else None


@functools.cache
def _wrapped(method: str) -> str | None:
    """The field of the RPC's response the route's JSON answer fills when the RPC wraps
    it (``session`` of a GetSessionResponse, ``status`` of a StepResponse); None when
    the answer is the response itself."""
    fields = [f for f in rpc.RPCS[method].response_type.DESCRIPTOR.fields
              if f.message_type is not pb.TensorChunk.DESCRIPTOR
              and f.type != FieldDescriptor.TYPE_BYTES]
    if len(fields) == 1 and fields[0].message_type is not None and not fields[0].is_repeated:
        return str(fields[0].name)
    return None


def _entry(t: WireTensor) -> dict[str, Any]:
    entry = {"name": t.name, "shape": list(t.shape), "datatype": t.datatype,
             "parameters": {"binary_data_size": memoryview(t.data).nbytes}}
    if t.rows is not None:
        entry["rows"] = _row_list(t.rows)
    return entry


def _row_list(rows: Any) -> list[int]:
    """Row indices (int64 little-endian bytes) as the JSON numbers the HTTP API takes."""
    out: list[int] = np.frombuffer(rows, dtype="<i8").tolist()
    return out


def _rows_of(p: Mapping[str, Any]) -> bytes | None:
    rows = p.get("rows")
    return None if rows is None else np.asarray(rows, dtype="<i8").tobytes()


def _parts(text: bytes, tensors: Sequence[WireTensor]) -> list[bytes | memoryview]:
    """A binary body: the JSON header, then views of the tensors' bytes, PART at most."""
    parts: list[bytes | memoryview] = [text]
    for t in tensors:
        view = memoryview(t.data).cast("B")
        parts.extend(view[i:i + PART] for i in range(0, len(view), PART))
    if sum(len(p) for p in parts) <= SMALL_BODY:
        return [b"".join(parts)]
    return parts


def _tensors_out(response: httpx.Response) -> tuple[dict[str, Any], list[WireTensor]]:
    """The JSON part and the tensors (``params``) of an answer, binary or JSON."""
    content = response.content
    n = response.headers.get(HEADER_LENGTH)
    if n is None:
        body = json.loads(content) if content else {}
        return body, [WireTensor(p["name"], tuple(p["shape"]), p["datatype"],
                                 encode(np.asarray(p.get("data") or [], dtype=np.float64),
                                        p["datatype"]), _rows_of(p))
                      for p in body.pop("params", [])]
    view = memoryview(content)
    pos = int(n)
    body = json.loads(bytes(view[:pos]))
    params = []
    for p in body.pop("params", []):
        size = int(p["parameters"]["binary_data_size"])
        if pos + size > len(view):
            raise _codec.bad_response("binary response: tensor data past the end of the body")
        params.append(WireTensor(p["name"], tuple(int(d) for d in p["shape"]), p["datatype"],
                                 view[pos:pos + size], _rows_of(p)))
        pos += size
    return body, params


class _Busy(Exception):
    """A 503 answer: retried like a refused connection."""

    def __init__(self, response: httpx.Response) -> None:
        self.response = response


def _retryable(exc: BaseException) -> bool:
    # Only failures where the request surely did not reach the application.
    return isinstance(exc, httpx.ConnectError | httpx.ConnectTimeout | _Busy)


def _not_connected(exc: BaseException) -> bool:
    return isinstance(exc, httpx.ConnectError | httpx.ConnectTimeout)


class HttpWire(Wire):
    """The wire to ``http://host:port`` (or ``https://``).

    ``token``: sent as ``Authorization: Bearer <token>``. ``timeout``: seconds
    allowed for each request (None: none, but connecting gives up after 10 s).
    ``retries``: requests made in all while the server cannot be reached. ``tls``: the
    CA and client certificate of an ``https://`` URL (None: the environment's,
    :class:`~adamserve_client.transports._tls.TlsOptions`).
    """

    def __init__(self, url: str, token: str | None = None, timeout: float | None = None, *,
                 retries: int = 3, backoff: float = 0.05, tls: TlsOptions | None = None) -> None:
        address = _codec.parse_url(url)
        if address.scheme not in ("http", "https"):
            raise ValueError(f"HttpTransport needs an http:// or https:// URL, got {url!r}")
        tls = check_scheme(url, address.scheme, tls)
        self.url = url
        self.timeout = timeout
        self.retries = retries
        self.backoff = backoff
        headers = {"authorization": f"Bearer {token}"} if token else {}
        self._client = httpx.Client(
            base_url=url.rstrip("/"), headers=headers,
            timeout=httpx.Timeout(timeout, connect=timeout if timeout is not None else 10.0),
            verify=tls.ssl_context() if tls is not None else True)

    # -- the seam ---------------------------------------------------------------

    def unary(self, method: str, request: Message, *, idempotent: bool = True) -> Message:
        reply = self.stream(method, request, idempotent=idempotent)
        if reply.message is None:
            raise _codec.bad_response(f"the {method} answer is empty", self.url)
        return reply.message

    def stream(self, method: str, request: Message, payload: Payload = (), *,
               idempotent: bool = True) -> Reply:
        route = ROUTES[method]
        path, kwargs = self._http_request(route, request, payload)
        return self._reply(method, self._request(route.verb, path, idempotent, **kwargs))

    def close(self) -> None:
        self._client.close()

    # -- plumbing ---------------------------------------------------------------

    @staticmethod
    def _http_request(route: Route, request: Message, payload: Payload
                      ) -> tuple[str, dict[str, Any]]:
        """The path and httpx arguments of ``request`` on ``route``."""
        body_msg = _body_of(request, route)
        body = (convert.message_json(body_msg, defaults=route.defaults)
                if body_msg is not None else {})
        if isinstance(request, pb.PullRequest) and request.rows:  # numbers, not base64
            body["rows"] = [{"name": r.name, "rows": _row_list(r.rows)} for r in request.rows]
        values = {}
        for field in route.fields:
            value = body.pop(field, None) or getattr(request, field, "")
            values[field] = quote(str(value), safe="")
        path = route.path.format(**values)
        kwargs: dict[str, Any] = {}
        if isinstance(payload, Blob):
            kwargs = {"content": payload.data, "headers": {"content-type": OCTET_STREAM}}
        elif route.verb == "GET":
            kwargs = {"params": body} if body else {}
        elif route.verb != "DELETE":
            if route.binary_output:
                body["binary_output"] = True
            if route.tensors:
                body[route.tensors] = [_entry(t) for t in payload]
            # JSON has no NaN: a non-finite number (a commit's sum over a NaN gradient)
            # goes as the literal NaN / Infinity, which the server's parser accepts
            text = json.dumps(body, separators=(",", ":")).encode()
            if route.tensors:
                parts = _parts(text, payload)
                kwargs = {"content": parts[0] if len(parts) == 1 else parts,
                          "headers": {"content-type": OCTET_STREAM,
                                      "content-length": str(sum(len(p) for p in parts)),
                                      HEADER_LENGTH: str(len(text))}}
            else:
                kwargs = {"content": text, "headers": {"content-type": "application/json"}}
        return path, kwargs

    def _reply(self, method: str, r: httpx.Response) -> Reply:
        response_type = rpc.RPCS[method].response_type
        if method == "ExportState":
            return Reply(None, blob=r.content)
        body, tensors = _tensors_out(r)
        if method == "Pull":
            return Reply(None, tensors)
        wrap = _wrapped(method)
        out = response_type()
        try:
            convert.parse_json(body, getattr(out, wrap) if wrap else out,
                               f"the {method} answer does not parse", ignore_unknown=True)
        except ValueError as exc:
            raise _codec.bad_response(str(exc), self.url) from None
        return Reply(out, tensors)

    def _request(self, method: str, path: str, idempotent: bool = True,
                 **kwargs: Any) -> httpx.Response:
        # a 503 may come from a proxy after the server took the request: only a call
        # that may run twice is retried on it; a refused connection is always retried
        retryable = _retryable if idempotent else _not_connected

        def run() -> httpx.Response:
            r = self._client.request(method, path, **kwargs)
            if r.status_code == 503:
                raise _Busy(r)
            return r

        try:
            r = _codec.with_retries(run, retryable, attempts=self.retries,
                                    backoff=self.backoff)
        except _Busy as busy:
            r = busy.response
        except httpx.TimeoutException as exc:
            raise _codec.timed_out(self.url, self.timeout, str(exc)) from None
        except httpx.TransportError as exc:
            raise _codec.unreachable(self.url, self.retries,
                                     str(exc) or type(exc).__name__) from None
        if r.status_code >= 400:
            raise self._error(r)
        return r

    def _error(self, r: httpx.Response) -> errors.AdamserveError:
        code = _STATUS_CODES.get(r.status_code, "internal")
        message = r.text or r.reason_phrase
        reason: str | None = None
        metadata: dict[str, str] = {}
        try:
            body = r.json()
        except ValueError:
            body = None
        if isinstance(body, dict):
            code = str(body.get("code") or code)
            message = str(body.get("error") or body.get("detail") or message)
            reason = str(body["reason"]) if body.get("reason") else None
            if isinstance(body.get("metadata"), dict):
                metadata = {str(k): str(v) for k, v in body["metadata"].items()}
        if code == "unavailable":
            message = f"adamserve server at {self.url} is unavailable: {message}"
        after = r.headers.get("retry-after", "")
        return errors.error_for(code, message, self.url, reason=reason, metadata=metadata,
                                retry_after=float(after) if after.isdigit() else None)

    def __repr__(self) -> str:
        return f"HttpWire({self.url!r})"


class HttpTransport(Client):
    """The session operations on ``http://host:port`` (a :class:`Client` over an
    :class:`HttpWire`; the arguments are the wire's)."""

    def __init__(self, url: str, token: str | None = None, timeout: float | None = None, *,
                 retries: int = 3, backoff: float = 0.05, tls: TlsOptions | None = None) -> None:
        super().__init__(HttpWire(url, token, timeout, retries=retries, backoff=backoff,
                                  tls=tls))
