"""Proto v2 messages <-> the service's domain types, for both transports.

gRPC converts its messages here directly; HTTP parses its JSON bodies into the
same messages (:func:`parse_json`) and writes its answers from them
(:func:`message_json`), so both wires say the same thing in the same words.

What the client converts too (the closed sets' names, Durations, groups, the
schedule's dict form, Workers, the JSON mapping) is :mod:`adamserve_proto.convert`'s,
once for both sides; its ValueErrors become InvalidArgument here (:func:`_invalid`).
What is the server's own: the bounds every tensor keeps, sessions, step outcomes,
checkpoints and ListSessions' pages.

Checks made here are those only the wire can get wrong (an enum value out of
range, a schedule without a kind, a bad page token); the rest is the service's.
"""

from __future__ import annotations

import base64
import binascii
import math
import zlib
from collections.abc import Iterable
from dataclasses import dataclass

from adamserve import errors
from adamserve.engine.dtypes import WIRE_DTYPES
from adamserve.engine.optimizer import TensorSpec
from adamserve.service import (
    LOCAL,
    Caller,
    OptimizerService,
    PushId,
    RegionInfo,
    RegionRef,
    SessionInfo,
    StepResult,
    TensorChunk,
)
from adamserve.sessions import names
from adamserve.sessions.checkpoints import CheckpointInfo
from adamserve.sessions.rounds import WorkersConfig
from adamserve.sessions.session import MAX_ELEMENTS, MAX_RANK, SessionConfig
from adamserve_proto import convert as proto
from adamserve_proto.v2 import optimizer_pb2 as pb

# The shared conversions' refusals (ValueError) as the service's InvalidArgument.
_invalid = proto.raising(lambda exc: errors.InvalidArgument(str(exc)))

seconds = _invalid(proto.seconds)
group_dict = _invalid(proto.group_dict)
schedule_dict = _invalid(proto.schedule_dict)
parse_json = _invalid(proto.parse_json)
message_json = proto.message_json


# ---------------------------------------------------------------------------
# Tensors


def datatype(value: str, field: str) -> str:
    """A wire datatype field (empty: FP32)."""
    value = value or "FP32"
    if value not in WIRE_DTYPES:
        raise errors.InvalidArgument(
            f"{field}: unknown datatype {errors.shown(value)}; expected one of "
            f"{', '.join(WIRE_DTYPES)}")
    return value


def session_id(value: str, field: str = "session_id") -> str:
    if not value:
        raise errors.InvalidArgument(f"{field} is empty")
    return value


@dataclass(frozen=True)
class StepCall:
    """A StepHeader as the arguments of ``OptimizerService.step``, checked."""

    session_id: str
    return_datatype: str | None  # None: a push (no parameters back)
    require_all: bool
    push_id: PushId | None
    base_step: int | None
    apply_as_received: bool
    gradients_region: RegionRef | None = None
    gradients_datatype: str = "FP32"
    params_region: RegionRef | None = None  # never for a push
    return_rows: bool = False


def region_ref(msg: pb.SharedMemoryRef) -> RegionRef:
    """A place in a shared-memory region (checked against the region by the service)."""
    return RegionRef(msg.region, int(msg.offset), int(msg.byte_size))


def region_info(msg: pb.SharedMemoryRegion) -> RegionInfo:
    return RegionInfo(msg.name, msg.key, int(msg.byte_size))


def region_message(info: RegionInfo) -> pb.SharedMemoryRegion:
    return pb.SharedMemoryRegion(name=info.name, key=info.key, byte_size=info.byte_size)


def step_call(header: pb.StepHeader, push: bool) -> StepCall:
    """The step (or, with ``push``, the push) a header asks for; every transport's."""
    push_id = (PushId(header.worker_id, int(header.sequence))
               if header.sequence or header.worker_id else None)
    gradients = (region_ref(header.gradients_region)
                 if header.HasField("gradients_region") else None)
    params = (region_ref(header.params_region)
              if header.HasField("params_region") and not push else None)
    apply_as_received = header.apply_as_received and not push
    if apply_as_received and (gradients is not None or params is not None):
        raise errors.InvalidArgument(
            "header.apply_as_received streams chunks both ways; a step naming "
            "shared-memory regions sends none: set one or the other")
    return StepCall(
        session_id=session_id(header.session_id, "header.session_id"),
        return_datatype=None if push else datatype(header.return_datatype,
                                                   "header.return_datatype"),
        require_all=header.require_all, push_id=push_id,
        base_step=int(header.base_step) if header.HasField("base_step") else None,
        apply_as_received=apply_as_received, gradients_region=gradients,
        gradients_datatype=datatype(header.gradients_datatype, "header.gradients_datatype"),
        params_region=params, return_rows=header.return_rows and not push)


def run_commit(service: OptimizerService, request: pb.CommitRequest, *,
               caller: Caller = LOCAL) -> StepResult:
    """The commit ``request`` asks for (every transport's)."""
    rtype = None if request.skip_params else datatype(request.return_datatype,
                                                      "return_datatype")
    return service.commit(
        session_id(request.session_id), request.step, list(request.tensor_sumsq),
        request.total_sumsq, param_sumsq=list(request.param_sumsq),
        update_sumsq=list(request.update_sumsq), round_id=request.round_id,
        return_datatype=rtype, caller=caller)


def run_step(service: OptimizerService, header: pb.StepHeader, grads: Iterable[TensorChunk],
             *, push: bool, wait: float | None, caller: Caller = LOCAL) -> StepResult:
    """The step (or push) ``header`` asks for, with the gradients ``grads`` (none when
    the header names a gradients region)."""
    call = step_call(header, push)
    return service.step(call.session_id, grads, return_datatype=call.return_datatype,
                        require_all=call.require_all, push_id=call.push_id,
                        base_step=call.base_step, wait=wait,
                        gradients_region=call.gradients_region,
                        gradients_datatype=call.gradients_datatype,
                        params_region=call.params_region, return_rows=call.return_rows,
                        caller=caller)


def check_shape(shape: Iterable[int], what: str) -> tuple[int, ...]:
    """A declared or sent shape, within the bounds every tensor keeps."""
    dims = tuple(int(d) for d in shape)
    if len(dims) > MAX_RANK:
        raise errors.InvalidArgument(f"{what}: {len(dims)} dimensions; at most {MAX_RANK}")
    if any(d < 0 for d in dims):
        raise errors.InvalidArgument(f"{what}: shape {list(dims)} has a negative dimension")
    if math.prod(dims) > MAX_ELEMENTS:
        raise errors.InvalidArgument(
            f"{what}: shape {list(dims)} has {math.prod(dims)} elements; at most "
            f"{MAX_ELEMENTS}")
    return dims


def tensor_specs(msgs: Iterable[pb.TensorSpec], field: str = "tensors"
                 ) -> tuple[TensorSpec, ...]:
    """TensorSpec messages as the service's TensorSpecs (shape bounds checked)."""
    tensors = []
    total = 0
    for i, t in enumerate(msgs):
        what = f"tensor {errors.shown(t.name)}" if t.name else f"{field}[{i}]"
        shape = check_shape(t.shape, what)
        total += math.prod(shape)
        tensors.append(TensorSpec(t.name, shape, int(t.group)))
    if total > MAX_ELEMENTS:
        raise errors.InvalidArgument(f"the session's tensors hold {total} elements; at most "
                                     f"{MAX_ELEMENTS}")
    return tuple(tensors)


# ---------------------------------------------------------------------------
# Sessions


@_invalid
def workers_config(msg: pb.Workers, field: str = "workers") -> WorkersConfig:
    return WorkersConfig(**proto.workers_fields(msg, field))


@_invalid
def session_config(spec: pb.SessionSpec) -> SessionConfig:
    """A SessionSpec as the service's SessionConfig (wire-level checks only)."""
    tensors = tensor_specs(spec.tensors)
    groups = tuple(proto.group_dict(g, f"groups[{i}]")
                   for i, g in enumerate(spec.groups)) or ({},)
    return SessionConfig(
        algorithm=proto.ALGORITHM.short(spec.algorithm, "algorithm"),
        tensors=tensors,
        groups=groups,
        dtype=proto.STATE_DTYPE.short(spec.dtype, "dtype"),
        schedule=proto.schedule_dict(spec.schedule) if spec.HasField("schedule") else None,
        max_grad_norm=spec.max_grad_norm if spec.HasField("max_grad_norm") else None,
        clip_per_tensor=spec.clip_per_tensor,
        skip_nonfinite=spec.skip_nonfinite if spec.HasField("skip_nonfinite") else True,
        workers=workers_config(spec.workers) if spec.HasField("workers") else WorkersConfig(),
        labels=dict(spec.labels),
        semantics=proto.SEMANTICS.short(spec.semantics, "semantics"),
        state_dtype=proto.MOMENT_DTYPE.short(spec.state_dtype, "state_dtype"),
    )


@_invalid
def native_format(format: int | str) -> bool:
    """Whether an ExportState asks for the session's own storage (STATE_FORMAT_NATIVE);
    ``format`` the enum's number (gRPC) or name (HTTP)."""
    number = pb.StateFormat.Value(format) if isinstance(format, str) and (
        format in proto.STATE_FORMAT.all_names) else format
    if isinstance(number, str):
        raise ValueError(f"format: unknown state format {errors.shown(number)}; expected one of "
                         f"{', '.join(proto.STATE_FORMAT.names)}")
    return proto.STATE_FORMAT.short(number, "format") == "native"


def session_message(info: SessionInfo) -> pb.Session:
    msg = pb.Session(
        session_id=info.id,
        algorithm=proto.ALGORITHM.number(info.algorithm, "algorithm"),
        dtype=proto.STATE_DTYPE.number(info.dtype, "dtype"),
        step=info.step,
        tensors=[proto.tensor_spec_message(t) for t in info.tensors],
        groups=[proto.group_message(g) for g in info.groups],
        lr=list(info.lr),
        clip_per_tensor=info.clip_per_tensor,
        skip_nonfinite=info.skip_nonfinite,
        state_bytes=info.state_bytes,
        backend=proto.BACKEND.number(info.backend, "backend"),
        workers=proto.workers_message(info.workers),
        labels=info.labels,
        tenant=info.tenant,
        semantics=proto.SEMANTICS.number(info.semantics, "semantics"),
        state_dtype=proto.STATE_DTYPE.number(info.state_dtype, "state_dtype"),
        moment_bytes=info.moment_bytes,
        bytes_per_parameter=info.bytes_per_parameter,
    )
    if info.schedule is not None:
        msg.schedule.CopyFrom(proto.schedule_message(info.schedule))
    if info.max_grad_norm is not None:
        msg.max_grad_norm = info.max_grad_norm
    if info.checkpointed_step >= 0:
        msg.checkpointed_step = info.checkpointed_step
    return msg


def step_status(result: StepResult) -> pb.StepStatus:
    msg = pb.StepStatus(step=result.step, skipped=result.skipped,
                        nonfinite=list(result.nonfinite), duplicate=result.duplicate,
                        pending=result.pending)
    if result.grad_norm is not None:
        msg.grad_norm = result.grad_norm
    if result.round or result.contributors or result.missing or result.staleness:
        msg.round.CopyFrom(pb.RoundStatus(
            round_id=result.round, contributors=result.contributors,
            missing_workers=list(result.missing), staleness=result.staleness))
    if result.grad_sumsq or result.param_sumsq or result.update_sumsq:
        msg.exchange.CopyFrom(pb.ExchangeSums(
            grad_sumsq=list(result.grad_sumsq), param_sumsq=list(result.param_sumsq),
            update_sumsq=list(result.update_sumsq)))
    return msg


def checkpoint_message(info: CheckpointInfo) -> pb.CheckpointInfo:
    return pb.CheckpointInfo(session_id=info.session_id, step=info.step, path=info.path,
                             size_bytes=info.bytes)


# ---------------------------------------------------------------------------
# ListSessions' pages

DEFAULT_PAGE_SIZE = 100
MAX_PAGE_SIZE = 1000
_TOKEN_TAG = b"adamserve.sessions.after:"


def _page_token(last_id: str) -> str:
    """An opaque token naming ``last_id``: base64url of a tag, the id and its CRC-32 (so a
    token cut short or made up is refused, not read as another id)."""
    raw = last_id.encode()
    return base64.urlsafe_b64encode(
        _TOKEN_TAG + raw + zlib.crc32(raw).to_bytes(4, "big")).decode().rstrip("=")


def _after(token: str) -> str:
    try:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
        body, crc = raw[len(_TOKEN_TAG):-4], raw[-4:]
        if not raw.startswith(_TOKEN_TAG) or zlib.crc32(body).to_bytes(4, "big") != crc:
            raise ValueError("not a page token")
        return body.decode()
    except (ValueError, binascii.Error, UnicodeDecodeError):
        raise errors.InvalidArgument(
            f"page_token {errors.shown(token)} is not a token this server gave: pass a previous "
            "response's next_page_token, or none for the first page") from None


# An imported state blob may be this much larger than the session's state.
IMPORT_SLACK_BYTES = 64 << 20


def import_limit(state_bytes: int) -> int:
    """The most bytes an ImportState blob of a session with ``state_bytes`` may have: a
    state_dict holds the slots only; float64 slots for a float32 session and generous
    metadata fit, anything more is refused rather than buffered."""
    return 2 * state_bytes + IMPORT_SLACK_BYTES


def page(infos: Iterable[SessionInfo], page_size: int, page_token: str
         ) -> tuple[list[SessionInfo], str]:
    """One page of sessions ordered by id and the next page's token ("" on the last).

    ``page_size`` 0 means :data:`DEFAULT_PAGE_SIZE`; more than :data:`MAX_PAGE_SIZE`
    is that many. The token names the last id of its page, so sessions created or
    deleted between pages neither repeat nor hide the others.
    """
    if page_size < 0:
        raise errors.InvalidArgument(f"page_size: expected 0 to {MAX_PAGE_SIZE}, got "
                                     f"{page_size}")
    size = min(page_size or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)
    after = _after(page_token) if page_token else None

    def key(i: SessionInfo) -> str:  # an admin's listing holds several tenants' ids
        return names.qualified(i.tenant, i.id)

    ordered = sorted((i for i in infos if after is None or key(i) > after), key=key)
    out = ordered[:size]
    return out, _page_token(key(out[-1])) if len(ordered) > size else ""
