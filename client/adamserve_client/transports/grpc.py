# grpcio ships no type information; its names are Any here.
# mypy: disable-error-code="import-untyped"
"""The gRPC transport: ``adamserve.v1.Optimizer`` over one channel.

A step is one bidirectional ``Step`` stream: a header, then each gradient as
chunk messages of at most 4 MiB (serialised by hand so the tensor bytes are
copied once), then half-close; the server answers with a status and the
parameters' chunks. Calls that fail with UNAVAILABLE are retried a bounded
number of times with exponential backoff; every other status becomes its
:mod:`adamserve_client.errors` exception with the server's message.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, TypeVar

import grpc

from adamserve_client import errors
from adamserve_client.transports import _codec
from adamserve_client.transports.base import (
    CheckpointInfo,
    HyperValue,
    Sender,
    SessionInfo,
    SessionSpec,
    StateDict,
    StepResult,
    TensorSpec,
    Transport,
    WireTensor,
    Workers,
)
from adamserve_proto.v1 import optimizer_pb2 as pb

__all__ = ["GrpcTransport"]

T = TypeVar("T")

SERVICE = "adamserve.v1.Optimizer"
# The server accepts messages up to 64 MiB and sends at most 4 MiB.
_MAX_MESSAGE = 64 * _codec.MiB
_STEP_CHUNK_FIELD = pb.StepRequest.DESCRIPTOR.fields_by_name["chunk"].number
_CREATE_INITIAL_FIELD = pb.CreateSessionRequest.DESCRIPTOR.fields_by_name["initial"].number
_ADD_INITIAL_FIELD = pb.AddTensorsRequest.DESCRIPTOR.fields_by_name["initial"].number
_SET_VALUE_FIELD = pb.SetParametersRequest.DESCRIPTOR.fields_by_name["value"].number
# Steps whose gradients fit in this many bytes go as one StepUnary message.
_UNARY_BYTES = 1 * _codec.MiB


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


def _group_message(group: Mapping[str, HyperValue]) -> Any:
    values, flags = _codec.split_betas(group)
    return pb.Group(values=values, flags=flags)


def _tensor_specs(tensors: Sequence[TensorSpec]) -> list[Any]:
    return [pb.TensorSpec(name=t.name, shape=list(t.shape), group=t.group) for t in tensors]


def _session_info(msg: Any) -> SessionInfo:
    return SessionInfo(
        session_id=msg.session_id,
        algorithm=msg.algorithm,
        dtype=msg.dtype,
        step=int(msg.step),
        tensors=tuple(TensorSpec(t.name, tuple(int(d) for d in t.shape), int(t.group))
                      for t in msg.tensors),
        groups=tuple(_codec.join_betas(dict(g.values), dict(g.flags)) for g in msg.groups),
        lr=tuple(float(x) for x in msg.lr),
        schedule=json.loads(msg.schedule_json) if msg.schedule_json else None,
        max_grad_norm=msg.max_grad_norm if msg.HasField("max_grad_norm") else None,
        clip_per_tensor=bool(msg.clip_per_tensor),
        skip_nonfinite=bool(msg.skip_nonfinite),
        state_bytes=int(msg.state_bytes),
        checkpointed_step=int(msg.checkpointed_step),
        backend=msg.backend,
        workers=_workers(msg.workers) if msg.HasField("workers") else Workers(),
        labels=dict(msg.labels),
    )


def _workers(msg: Any) -> Workers:
    return Workers(count=int(msg.count) or 1, mode=msg.mode or "sync",
                   straggler_timeout=float(msg.straggler_timeout),
                   straggler_policy=msg.straggler_policy or "fail",
                   max_staleness=int(msg.max_staleness) if msg.HasField("max_staleness")
                   else None,
                   scale_lr_by_staleness=bool(msg.scale_lr_by_staleness),
                   exchange=bool(msg.exchange))


def _workers_message(w: Workers) -> Any:
    msg = pb.Workers(count=w.count, mode=w.mode, straggler_timeout=w.straggler_timeout,
                     straggler_policy=w.straggler_policy,
                     scale_lr_by_staleness=w.scale_lr_by_staleness, exchange=w.exchange)
    if w.max_staleness is not None:
        msg.max_staleness = w.max_staleness
    return msg


def _step_result(status: Any, params: Sequence[WireTensor] = ()) -> StepResult:
    return StepResult(
        step=int(status.step), skipped=bool(status.skipped),
        grad_norm=status.grad_norm if status.HasField("grad_norm") else None,
        nonfinite=tuple(status.nonfinite), params=tuple(params),
        duplicate=bool(status.duplicate), staleness=int(status.staleness),
        pending=bool(status.pending), contributors=int(status.contributors),
        missing=tuple(status.missing_workers), grad_sumsq=tuple(status.grad_sumsq),
        param_sumsq=tuple(status.param_sumsq), update_sumsq=tuple(status.update_sumsq),
        round=int(status.round))


class GrpcTransport(Transport):
    """A transport to ``grpc://host:port``.

    ``token``: sent as ``authorization: Bearer <token>`` on every call. ``timeout``:
    seconds allowed for each call (None: no deadline). ``retries``: calls made in
    all when the server is UNAVAILABLE (1 disables retrying).
    """

    def __init__(self, url: str, token: str | None = None, timeout: float | None = None, *,
                 retries: int = 3, backoff: float = 0.05) -> None:
        address = _codec.parse_url(url)
        if address.scheme != "grpc":
            raise ValueError(f"GrpcTransport needs a grpc:// URL, got {url!r}")
        self.url = url
        self.timeout = timeout
        self.retries = retries
        self.backoff = backoff
        self._metadata = (("authorization", f"Bearer {token}"),) if token else None
        self._channel = grpc.insecure_channel(address.hostport, options=[
            ("grpc.max_receive_message_length", _MAX_MESSAGE),
            ("grpc.max_send_message_length", _MAX_MESSAGE),
        ])
        ch = self._channel

        def method(kind: str, name: str, response: Any) -> Any:
            factory = getattr(ch, kind)
            return factory(f"/{SERVICE}/{name}", request_serializer=_serialize,
                           response_deserializer=response.FromString)

        self._create = method("stream_unary", "CreateSession", pb.SessionInfo)
        self._add_tensors = method("stream_unary", "AddTensors", pb.SessionInfo)
        self._step = method("stream_stream", "Step", pb.StepResponse)
        self._step_unary = method("unary_unary", "StepUnary", pb.StepUnaryResponse)
        # sessions too large for StepUnary (or a server without it): use the stream
        self._stream_only: set[str] = set()
        self._push = method("stream_unary", "Push", pb.StepStatus)
        self._pull = method("unary_stream", "Pull", pb.TensorChunk)
        self._set_params = method("stream_unary", "SetParameters", pb.SessionInfo)
        self._set_hyper = method("unary_unary", "SetHyperparameters", pb.SessionInfo)
        self._set_schedule = method("unary_unary", "SetSchedule", pb.SessionInfo)
        self._export = method("unary_stream", "ExportState", pb.StateChunk)
        self._import = method("stream_unary", "ImportState", pb.SessionInfo)
        self._checkpoint = method("unary_unary", "Checkpoint", pb.CheckpointInfo)
        self._list = method("unary_unary", "ListSessions", pb.ListSessionsResponse)
        self._describe = method("unary_unary", "DescribeSession", pb.SessionInfo)
        self._delete = method("unary_unary", "DeleteSession", pb.DeleteSessionResponse)
        self._commit = method("unary_stream", "Commit", pb.StepResponse)
        self._set_workers = method("unary_unary", "SetWorkers", pb.SessionInfo)
        self._list_ckpts = method("unary_unary", "ListCheckpoints", pb.ListCheckpointsResponse)
        self._restore = method("unary_unary", "RestoreCheckpoint", pb.SessionInfo)

    # -- plumbing --------------------------------------------------------------

    def _call(self, fn: Callable[[], T], *, once: bool = False) -> T:
        """Run one RPC (consuming any response stream inside ``fn``) with retries,
        turning gRPC errors into :mod:`adamserve_client.errors` exceptions. ``once``:
        the call changes state and must not be applied twice (see ``_never_sent``)."""
        try:
            return _codec.with_retries(fn, _never_sent if once else _unavailable,
                                       attempts=self.retries, backoff=self.backoff)
        except grpc.RpcError as exc:
            raise self._error(exc) from None

    def _error(self, exc: Any) -> errors.AdamserveError:
        code = exc.code()
        details = exc.details() or code.name
        if code == grpc.StatusCode.UNAVAILABLE:
            return errors.Unavailable(
                f"cannot reach the adamserve server at {self.url} ({self.retries} attempts): "
                f"{details}", url=self.url)
        if code == grpc.StatusCode.DEADLINE_EXCEEDED and details in ("Deadline Exceeded",
                                                                    code.name):
            # our own deadline passed (a server-side wait that timed out has its message)
            return errors.DeadlineExceeded(
                f"{self.url}: no answer within the timeout of {self.timeout} s", url=self.url)
        return errors.error_for(code.name, details, self.url)

    def _kw(self) -> dict[str, Any]:
        return {"timeout": self.timeout, "metadata": self._metadata}

    # -- sessions ---------------------------------------------------------------

    def create_session(self, spec: SessionSpec,
                       initial: Sequence[WireTensor] = ()) -> SessionInfo:
        msg = pb.SessionSpec(
            session_id=spec.session_id, algorithm=spec.algorithm,
            groups=[_group_message(g) for g in spec.groups],
            tensors=_tensor_specs(spec.tensors),
            dtype=spec.dtype,
            schedule_json=json.dumps(dict(spec.schedule)) if spec.schedule is not None else "",
            clip_per_tensor=spec.clip_per_tensor, skip_nonfinite=spec.skip_nonfinite,
            workers=_workers_message(spec.workers), labels=dict(spec.labels))
        if spec.max_grad_norm is not None:
            msg.max_grad_norm = spec.max_grad_norm
        first = pb.CreateSessionRequest(spec=msg)

        def requests() -> Iterator[Any]:
            yield first
            for t in initial:
                yield from _codec.chunk_messages(t, _CREATE_INITIAL_FIELD)

        return _session_info(self._call(lambda: self._create(requests(), **self._kw()),
                                        once=True))

    def add_tensors(self, session_id: str, tensors: Sequence[TensorSpec],
                    group: Mapping[str, HyperValue] | None = None,
                    initial: Sequence[WireTensor] = ()) -> SessionInfo:
        msg = pb.AddTensorsSpec(session_id=session_id, tensors=_tensor_specs(tensors))
        if group is not None:
            msg.new_group.CopyFrom(_group_message(group))
        first = pb.AddTensorsRequest(spec=msg)

        def requests() -> Iterator[Any]:
            yield first
            for t in initial:
                yield from _codec.chunk_messages(t, _ADD_INITIAL_FIELD)

        return _session_info(self._call(lambda: self._add_tensors(requests(), **self._kw()),
                                        once=True))

    def set_parameters(self, session_id: str, values: Sequence[WireTensor]) -> SessionInfo:
        def requests() -> Iterator[Any]:
            yield pb.SetParametersRequest(session_id=session_id)
            for t in values:
                yield from _codec.chunk_messages(t, _SET_VALUE_FIELD)

        # repeating it writes the same values: safe to retry
        return _session_info(self._call(lambda: self._set_params(requests(), **self._kw())))

    def describe(self, session_id: str) -> SessionInfo:
        req = pb.DescribeSessionRequest(session_id=session_id)
        return _session_info(self._call(lambda: self._describe(req, **self._kw())))

    def list_sessions(self) -> list[SessionInfo]:
        resp = self._call(lambda: self._list(pb.ListSessionsRequest(), **self._kw()))
        return [_session_info(s) for s in resp.sessions]

    def delete_session(self, session_id: str) -> None:
        req = pb.DeleteSessionRequest(session_id=session_id)
        self._call(lambda: self._delete(req, **self._kw()))

    # -- steps ------------------------------------------------------------------

    @staticmethod
    def _header(session_id: str, return_datatype: str, require_all: bool,
                sender: Sender | None, base_step: int | None) -> Any:
        header = pb.StepHeader(session_id=session_id, return_datatype=return_datatype,
                               require_all=require_all)
        if sender is not None:
            header.worker_id, header.sequence = sender.worker, sender.sequence
        if base_step is not None:
            header.base_step = base_step
        return header

    def _step_requests(self, session_id: str, gradients: Sequence[WireTensor],
                       return_datatype: str, require_all: bool,
                       sender: Sender | None, base_step: int | None
                       ) -> Callable[[], Iterator[Any]]:
        header = pb.StepRequest(header=self._header(
            session_id, return_datatype, require_all, sender, base_step)).SerializeToString()

        def requests() -> Iterator[bytes]:
            yield header
            for t in gradients:
                yield from _codec.chunk_messages(t, _STEP_CHUNK_FIELD)

        return requests

    def step(self, session_id: str, gradients: Sequence[WireTensor], *,
             return_datatype: str = "FP32", require_all: bool = False,
             sender: Sender | None = None, base_step: int | None = None) -> StepResult:
        small = sum(memoryview(t.data).nbytes for t in gradients) <= _UNARY_BYTES
        if small and session_id not in self._stream_only:
            result = self._try_step_unary(session_id, gradients, return_datatype, require_all,
                                          sender, base_step)
            if result is not None:
                return result
        requests = self._step_requests(session_id, gradients, return_datatype, require_all,
                                       sender, base_step)

        return self._call(lambda: self._step_responses(self._step(requests(), **self._kw()),
                                                      "Step"), once=sender is None)

    def _step_responses(self, responses: Iterator[Any], method: str) -> StepResult:
        """A StepResponse stream (status, then parameter chunks) as one StepResult."""
        status = None
        params = _codec.ChunkAssembler()
        for resp in responses:
            if resp.WhichOneof("kind") == "param":
                p = resp.param
                params.add(p.name, p.shape, p.datatype, p.offset, p.data)
            else:
                status = resp.status
        if status is None:
            raise errors.ServerError(f"{self.url}: the {method} stream ended without a status",
                                     url=self.url)
        return _step_result(status, params.tensors())

    def _try_step_unary(self, session_id: str, gradients: Sequence[WireTensor],
                        return_datatype: str, require_all: bool,
                        sender: Sender | None, base_step: int | None) -> StepResult | None:
        """One-message step (lowest latency); None where the session needs the stream.

        The server refuses a session whose parameters do not fit one message before
        touching it, so falling back to the stream is safe.
        """
        req = pb.StepUnaryRequest(
            header=self._header(session_id, return_datatype, require_all, sender, base_step),
            gradients=[pb.TensorChunk(name=t.name, shape=list(t.shape), datatype=t.datatype,
                                      data=bytes(t.data)) for t in gradients])
        try:
            resp = _codec.with_retries(lambda: self._step_unary(req, **self._kw()),
                                       _never_sent if sender is None else _unavailable,
                                       attempts=self.retries,
                                       backoff=self.backoff)
        except grpc.RpcError as exc:
            code = exc.code()
            if code == grpc.StatusCode.UNIMPLEMENTED or (
                    code == grpc.StatusCode.INVALID_ARGUMENT
                    and "use the Step stream" in (exc.details() or "")):
                self._stream_only.add(session_id)
                return None
            raise self._error(exc) from None
        params = [WireTensor(p.name, tuple(p.shape), p.datatype, p.data) for p in resp.params]
        return _step_result(resp.status, params)

    def push(self, session_id: str, gradients: Sequence[WireTensor], *,
             require_all: bool = False, sender: Sender | None = None,
             base_step: int | None = None) -> StepResult:
        requests = self._step_requests(session_id, gradients, "FP32", require_all, sender,
                                       base_step)
        return _step_result(self._call(lambda: self._push(requests(), **self._kw()),
                                       once=sender is None))

    def pull(self, session_id: str, names: Sequence[str] | None = None,
             datatype: str = "FP32", *, min_step: int = 0,
             wait: float | None = None) -> list[WireTensor]:
        req = pb.PullRequest(session_id=session_id, names=list(names or ()), datatype=datatype,
                             min_step=min_step, timeout=wait or 0.0)

        def run() -> list[WireTensor]:
            out = _codec.ChunkAssembler()
            for c in self._pull(req, **self._kw()):
                out.add(c.name, c.shape, c.datatype, c.offset, c.data)
            return out.tensors()

        return self._call(run)

    # -- hyperparameters, schedule, state ----------------------------------------

    def set_hyperparameters(self, session_id: str, group: int,
                            changes: Mapping[str, HyperValue]) -> SessionInfo:
        req = pb.SetHyperparametersRequest(session_id=session_id, group=group,
                                           changes=_group_message(changes))
        return _session_info(self._call(lambda: self._set_hyper(req, **self._kw())))

    def set_schedule(self, session_id: str, schedule: Mapping[str, Any] | None) -> SessionInfo:
        req = pb.SetScheduleRequest(
            session_id=session_id,
            schedule_json=json.dumps(dict(schedule)) if schedule is not None else "")
        return _session_info(self._call(lambda: self._set_schedule(req, **self._kw())))

    def export_state(self, session_id: str) -> StateDict:
        req = pb.ExportStateRequest(session_id=session_id)

        def run() -> bytearray:
            parts = [c.data for c in self._export(req, **self._kw())]
            blob = bytearray(sum(len(p) for p in parts))
            pos = 0
            for p in parts:
                blob[pos:pos + len(p)] = p
                pos += len(p)
            return blob

        return _codec.decode_state(self._call(run))

    def import_state(self, session_id: str, state: Mapping[str, Any]) -> SessionInfo:
        blob = _codec.encode_state(state)

        def requests() -> Iterator[Any]:
            for i, piece in enumerate(_codec.blob_pieces(blob)):
                yield pb.ImportStateRequest(session_id=session_id if i == 0 else "",
                                            data=bytes(piece))

        return _session_info(self._call(lambda: self._import(requests(), **self._kw())))

    def checkpoint(self, session_id: str) -> CheckpointInfo:
        req = pb.CheckpointRequest(session_id=session_id)
        r = self._call(lambda: self._checkpoint(req, **self._kw()))
        return CheckpointInfo(r.session_id, int(r.step), r.path, int(r.bytes))

    def commit(self, session_id: str, step: int, tensor_sumsq: Sequence[float],
               total_sumsq: float, *, param_sumsq: Sequence[float] = (),
               update_sumsq: Sequence[float] = (), round_id: int = 0,
               return_datatype: str | None = "FP32") -> StepResult:
        req = pb.CommitRequest(session_id=session_id, step=step,
                               tensor_sumsq=list(tensor_sumsq), total_sumsq=total_sumsq,
                               param_sumsq=list(param_sumsq), update_sumsq=list(update_sumsq),
                               round=round_id, return_datatype=return_datatype or "NONE")

        # a commit repeated is answered with the same outcome: safe to retry
        return self._call(lambda: self._step_responses(self._commit(req, **self._kw()),
                                                      "Commit"))

    def set_workers(self, session_id: str, count: int) -> SessionInfo:
        req = pb.SetWorkersRequest(session_id=session_id, count=count)
        return _session_info(self._call(lambda: self._set_workers(req, **self._kw())))

    def list_checkpoints(self, session_id: str) -> list[int]:
        req = pb.ListCheckpointsRequest(session_id=session_id)
        return [int(s) for s in self._call(lambda: self._list_ckpts(req, **self._kw())).steps]

    def restore_checkpoint(self, session_id: str, step: int) -> SessionInfo:
        req = pb.RestoreCheckpointRequest(session_id=session_id, step=step)
        return _session_info(self._call(lambda: self._restore(req, **self._kw())))

    def close(self) -> None:
        self._channel.close()

    def __repr__(self) -> str:
        return f"GrpcTransport({self.url!r})"
