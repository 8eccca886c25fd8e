"""The client's dataclasses as ``adamserve_proto.v2`` messages and back, for every wire.

gRPC sends these messages as they are; HTTP sends their proto JSON (field names
and enum names as in the proto), so the conversions live here once. The client
speaks torch's names (``"adamw"``, ``betas`` as a pair, ``mode="sync"``,
schedules as ``{"kind": "cosine", ...}``); the wire speaks the proto's
(``ALGORITHM_ADAMW``, ``beta1``/``beta2`` in a Group's ``values``,
``WORKER_MODE_SYNC``, a typed ``Schedule`` oneof, Durations). What the server
converts too is :mod:`adamserve_proto.convert`'s; this module puts the client's
dataclasses around it and its errors on what it refuses: a value the proto cannot
carry (an unknown algorithm, mode or schedule kind) before any call, as the server
would refuse it (:class:`~adamserve_client.errors.InvalidArgument`), an answer it
cannot read as the server's fault (reason BAD_RESPONSE).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from google.protobuf.message import Message

from adamserve_client import errors
from adamserve_client.transports import _codec
from adamserve_client.transports.base import (
    CheckpointInfo,
    ExchangeSums,
    RegionInfo,
    RegionRef,
    RoundInfo,
    SessionInfo,
    SessionSpec,
    StepResult,
    TensorSpec,
    WireTensor,
    Workers,
)
from adamserve_proto import convert
from adamserve_proto.v2 import optimizer_pb2 as pb

__all__ = [
    "checkpoint_info",
    "duration",
    "field_of",
    "group_message",
    "region_info",
    "region_message",
    "region_ref_message",
    "schedule_message",
    "session_info",
    "session_spec",
    "step_result",
    "tensor_specs",
]

# What the shared conversions refuse (ValueError): in a request, a value the proto
# cannot carry, refused before any call as the server would refuse it; in an answer,
# the server's malformed answer.
_request = convert.raising(
    lambda exc: errors.InvalidArgument(str(exc), reason="INVALID_ARGUMENT"))
_answer = convert.raising(
    lambda exc: _codec.bad_response(f"the server's answer does not read: {exc}"))


duration = _request(convert.duration)
schedule_message = _request(convert.schedule_message)
group_message = _request(convert.group_message)


def tensor_specs(tensors: Sequence[TensorSpec]) -> list[pb.TensorSpec]:
    return [convert.tensor_spec_message(t) for t in tensors]


def _tensor_spec(t: pb.TensorSpec) -> TensorSpec:
    return TensorSpec(t.name, tuple(int(d) for d in t.shape), int(t.group))


# ---------------------------------------------------------------------------
# Sessions


@_request
def session_spec(spec: SessionSpec) -> pb.SessionSpec:
    if spec.dtype.strip().lower() in ("bfloat16", "int8"):  # the moments' (state_dtype) only
        raise ValueError(f"dtype: the master dtype is float32 or float64, got {spec.dtype!r} "
                         "(bfloat16 and int8 are a state_dtype, for the moments)")
    msg = pb.SessionSpec(
        session_id=spec.session_id,
        algorithm=convert.ALGORITHM.number(spec.algorithm, "algorithm"),
        groups=[convert.group_message(g) for g in spec.groups],
        tensors=tensor_specs(spec.tensors),
        dtype=convert.STATE_DTYPE.number(spec.dtype, "dtype"),
        clip_per_tensor=spec.clip_per_tensor, skip_nonfinite=spec.skip_nonfinite,
        workers=convert.workers_message(spec.workers), labels=dict(spec.labels),
        semantics=convert.SEMANTICS.number(spec.semantics, "semantics"),
        state_dtype=convert.MOMENT_DTYPE.number(spec.state_dtype, "state_dtype"))
    if spec.schedule is not None:
        msg.schedule.CopyFrom(convert.schedule_message(spec.schedule))
    if spec.max_grad_norm is not None:
        msg.max_grad_norm = spec.max_grad_norm
    return msg


@_answer
def session_info(msg: pb.Session) -> SessionInfo:
    return SessionInfo(
        session_id=msg.session_id,
        algorithm=convert.ALGORITHM.short(msg.algorithm, "algorithm"),
        dtype=convert.STATE_DTYPE.short(msg.dtype, "dtype"),
        step=int(msg.step),
        tensors=tuple(_tensor_spec(t) for t in msg.tensors),
        groups=tuple(convert.torch_group(g, f"groups[{i}]") for i, g in enumerate(msg.groups)),
        lr=tuple(float(x) for x in msg.lr),
        schedule=convert.schedule_dict(msg.schedule) if msg.HasField("schedule") else None,
        max_grad_norm=msg.max_grad_norm if msg.HasField("max_grad_norm") else None,
        clip_per_tensor=bool(msg.clip_per_tensor),
        skip_nonfinite=bool(msg.skip_nonfinite),
        state_bytes=int(msg.state_bytes),
        checkpointed_step=int(msg.checkpointed_step) if msg.HasField("checkpointed_step")
        else -1,
        backend=convert.BACKEND.short(msg.backend, "backend"),
        workers=Workers(**convert.workers_fields(msg.workers)) if msg.HasField("workers")
        else Workers(),
        labels=dict(msg.labels),
        tenant=msg.tenant,
        semantics=convert.SEMANTICS.short(msg.semantics, "semantics"),
        state_dtype=convert.STATE_DTYPE.short(msg.state_dtype, "state_dtype"),
        moment_bytes=int(msg.moment_bytes),
        bytes_per_parameter=float(msg.bytes_per_parameter),
    )


def step_result(status: pb.StepStatus, params: Sequence[WireTensor] = ()) -> StepResult:
    r, x = status.round, status.exchange
    return StepResult(
        step=int(status.step), skipped=bool(status.skipped),
        grad_norm=status.grad_norm if status.HasField("grad_norm") else None,
        nonfinite=tuple(status.nonfinite), params=tuple(params),
        duplicate=bool(status.duplicate), pending=bool(status.pending),
        workers=RoundInfo(int(r.round_id), int(r.contributors), tuple(r.missing_workers),
                          int(r.staleness)),
        exchange=ExchangeSums(tuple(x.grad_sumsq), tuple(x.param_sumsq),
                              tuple(x.update_sumsq)))


def checkpoint_info(msg: pb.CheckpointInfo) -> CheckpointInfo:
    return CheckpointInfo(msg.session_id, int(msg.step), msg.path, int(msg.size_bytes))


# ---------------------------------------------------------------------------
# Same-host shared memory


def region_message(info: RegionInfo) -> pb.SharedMemoryRegion:
    return pb.SharedMemoryRegion(name=info.name, key=info.key, byte_size=info.byte_size)


def region_info(msg: pb.SharedMemoryRegion) -> RegionInfo:
    return RegionInfo(msg.name, msg.key, int(msg.byte_size))


def region_ref_message(ref: RegionRef) -> pb.SharedMemoryRef:
    return pb.SharedMemoryRef(region=ref.region, offset=ref.offset, byte_size=ref.byte_size)


def field_of(message: Message, name: str) -> Any:
    """``message.<name>``, typed Any (the stubs type each response class apart)."""
    return getattr(message, name)
