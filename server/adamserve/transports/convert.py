"""Proto v2 messages <-> the service's domain types, for both transports.

gRPC converts its messages here directly; HTTP parses its JSON bodies into the
same messages (``json_format``) and writes its answers from them
(:func:`message_json`), so both wires say the same thing in the same words:

* the closed sets (:data:`ALGORITHM`, :data:`STATE_DTYPE`, :data:`WORKER_MODE`,
  :data:`STRAGGLER_POLICY`, :data:`BACKEND`, :data:`ANNEAL_STRATEGY`): proto enum
  values <-> the domain's strings ("adamw", "float64", "sync", ...), one table each;
* schedules: the typed ``Schedule`` oneof <-> the engine's dict form
  (``schedules.to_dict`` / ``schedule_from_dict``, which checks them);
* Durations <-> seconds; groups (``values`` and ``flags``) <-> one dict;
* sessions, step outcomes, checkpoints and ListSessions' pages.

Checks made here are those only the wire can get wrong (an enum value out of
range, a schedule without a kind, a bad page token); the rest is the service's.
"""

from __future__ import annotations

import base64
import binascii
import math
import zlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Generic, TypeVar, cast

from google.protobuf import json_format
from google.protobuf.descriptor import Descriptor, EnumDescriptor, FieldDescriptor
from google.protobuf.duration_pb2 import Duration
from google.protobuf.message import Message

from adamserve import errors
from adamserve.engine.optimizer import TensorSpec
from adamserve.service import SessionInfo, StepResult
from adamserve.sessions.checkpoints import CheckpointInfo
from adamserve.sessions.rounds import WorkersConfig
from adamserve.sessions.session import MAX_ELEMENTS, MAX_RANK, SessionConfig
from adamserve_proto.v2 import optimizer_pb2 as pb

if TYPE_CHECKING:
    from google.protobuf.internal.enum_type_wrapper import _EnumTypeWrapper

# ---------------------------------------------------------------------------
# Closed sets


V = TypeVar("V", bound=int)


@dataclass(frozen=True)
class EnumMap(Generic[V]):
    """One proto enum and the domain's strings for its values.

    The domain string of ``PREFIX_NAME`` is ``name`` in lower case
    (``ALGORITHM_ADAMW`` -> ``"adamw"``); ``PREFIX_UNSPECIFIED`` stands for
    ``unspecified`` (the domain's default), or is refused when that is None.
    """

    enum: _EnumTypeWrapper[V]  # pb.Algorithm, ...
    unspecified: str | None

    @property
    def descriptor(self) -> EnumDescriptor:
        return self.enum.DESCRIPTOR

    @property
    def _prefix(self) -> str:
        return self.descriptor.values[0].name.removesuffix("UNSPECIFIED")

    @property
    def names(self) -> tuple[str, ...]:
        """The proto names of the values that mean something (UNSPECIFIED left out)."""
        return tuple(v.name for v in self.descriptor.values if v.number != 0)

    def _expected(self) -> str:
        return ", ".join(self.names)

    def domain(self, number: int, field: str) -> str:
        """The domain's string for a proto value; InvalidArgument for an unknown one, or
        UNSPECIFIED where there is no default."""
        value = self.descriptor.values_by_number.get(number)
        if value is None:
            raise errors.InvalidArgument(
                f"{field}: unknown {self.descriptor.name} value {number}; expected one of "
                f"{self._expected()}")
        if number == 0:
            if self.unspecified is None:
                raise errors.InvalidArgument(
                    f"{field}: not set ({value.name}); expected one of {self._expected()}")
            return self.unspecified
        return value.name.removeprefix(self._prefix).lower()

    def domain_of_name(self, name: str, field: str) -> str:
        """As :meth:`domain`, for a value given by its proto name (JSON)."""
        value = self.descriptor.values_by_name.get(name)
        if value is None:
            raise errors.InvalidArgument(
                f"{field}: unknown {self.descriptor.name} {name!r}; expected one of "
                f"{self._expected()}")
        return self.domain(value.number, field)

    def number(self, domain: str) -> V:
        """The proto value of a domain string (UNSPECIFIED for one the enum lacks)."""
        name = self._prefix + domain.upper()
        return self.enum.Value(name if name in self.descriptor.values_by_name
                               else self.descriptor.values[0].name)

    def name(self, domain: str) -> str:
        """The proto name of a domain string."""
        return self.enum.Name(self.number(domain))


ALGORITHM = EnumMap(pb.Algorithm, None)
STATE_DTYPE = EnumMap(pb.StateDtype, "float32")
WORKER_MODE = EnumMap(pb.WorkerMode, "sync")
STRAGGLER_POLICY = EnumMap(pb.StragglerPolicy, "fail")
BACKEND = EnumMap(pb.Backend, "")
ANNEAL_STRATEGY = EnumMap(pb.AnnealStrategy, "cos")

# Which table each enum-typed field of the schedules uses.
_SCHEDULE_ENUMS: dict[str, EnumMap[Any]] = {pb.AnnealStrategy.DESCRIPTOR.full_name: ANNEAL_STRATEGY}

# ---------------------------------------------------------------------------
# Durations


def seconds(d: Duration, field: str) -> float:
    """A Duration as seconds; InvalidArgument if negative or malformed."""
    if d.seconds < 0 or d.nanos < 0:
        raise errors.InvalidArgument(f"{field}: negative duration "
                                     f"({d.seconds} s {d.nanos} ns); expected >= 0")
    if d.nanos >= 1_000_000_000:
        raise errors.InvalidArgument(f"{field}: nanos {d.nanos} out of range 0-999999999")
    return d.seconds + d.nanos / 1e9


def duration(s: float) -> Duration:
    """Seconds (finite, >= 0) as a Duration, to the nanosecond."""
    whole = math.floor(s)
    return Duration(seconds=int(whole), nanos=min(999_999_999, round((s - whole) * 1e9)))


# ---------------------------------------------------------------------------
# Tensors, groups


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
        what = f"tensor {t.name!r}" if t.name else f"{field}[{i}]"
        shape = check_shape(t.shape, what)
        total += math.prod(shape)
        tensors.append(TensorSpec(t.name, shape, int(t.group)))
    if total > MAX_ELEMENTS:
        raise errors.InvalidArgument(f"the session's tensors hold {total} elements; at most "
                                     f"{MAX_ELEMENTS}")
    return tuple(tensors)


def tensor_spec_message(t: TensorSpec) -> pb.TensorSpec:
    return pb.TensorSpec(name=t.name, shape=list(t.shape), group=t.group)


def group_dict(msg: pb.Group, field: str) -> dict[str, Any]:
    """A Group as the service's hyperparameter dict (numbers and switches together)."""
    values = {str(k): float(v) for k, v in msg.values.items()}
    flags = {str(k): bool(v) for k, v in msg.flags.items()}
    both = sorted(set(values) & set(flags))
    if both:
        raise errors.InvalidArgument(
            f"{field}: {', '.join(both)} given both as a value and as a flag")
    return {**values, **flags}


def group_message(group: Mapping[str, Any]) -> pb.Group:
    """The service's hyperparameters (betas a pair) as a Group (beta1 and beta2)."""
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


# ---------------------------------------------------------------------------
# Schedules: the Schedule oneof <-> {"kind": name, field: value, ...}

_KIND = pb.Schedule.DESCRIPTOR.oneofs_by_name["kind"]
# What an absent optional field means where the engine has no default of its own.
_ABSENT: dict[tuple[str, str], float] = {("linear", "end_factor"): 1.0}


def schedule_dict(msg: pb.Schedule, field: str = "schedule") -> dict[str, Any]:
    """A Schedule as the engine's dict form (the engine checks the values)."""
    kind = msg.WhichOneof("kind")
    if kind is None:
        raise errors.InvalidArgument(
            f"{field}: no kind set; expected one of {', '.join(f.name for f in _KIND.fields)}")
    piece: Message = getattr(msg, kind)
    out: dict[str, Any] = {"kind": kind}
    for f in piece.DESCRIPTOR.fields:
        path = f"{field}.{kind}.{f.name}"
        value = getattr(piece, f.name)
        if f.message_type is pb.Schedule.DESCRIPTOR:  # join's pieces
            out[f.name] = [schedule_dict(s, f"{path}[{i}]") for i, s in enumerate(value)]
        elif f.is_repeated:
            out[f.name] = [int(v) for v in value]
        elif f.has_presence and not piece.HasField(f.name):
            if (kind, f.name) in _ABSENT:
                out[f.name] = _ABSENT[(kind, f.name)]
        elif f.enum_type is not None:
            out[f.name] = _SCHEDULE_ENUMS[f.enum_type.full_name].domain(int(value), path)
        else:
            out[f.name] = value
    return out


def schedule_message(d: Mapping[str, Any]) -> pb.Schedule:
    """The engine's dict form of a schedule as a Schedule (None values left unset)."""
    msg = pb.Schedule()
    kind = str(d["kind"])
    piece: Message = getattr(msg, kind)
    piece.SetInParent()
    for f in piece.DESCRIPTOR.fields:
        value = d.get(f.name)
        if value is None:
            continue
        if f.message_type is pb.Schedule.DESCRIPTOR:
            getattr(piece, f.name).extend(schedule_message(s) for s in value)
        elif f.is_repeated:
            getattr(piece, f.name).extend(value)
        elif f.enum_type is not None:
            setattr(piece, f.name, _SCHEDULE_ENUMS[f.enum_type.full_name].number(str(value)))
        else:
            setattr(piece, f.name, value)
    return msg


# ---------------------------------------------------------------------------
# Sessions


def workers_config(msg: pb.Workers, field: str = "workers") -> WorkersConfig:
    return WorkersConfig(
        count=msg.count or 1,
        mode=WORKER_MODE.domain(msg.mode, f"{field}.mode"),
        straggler_timeout=seconds(msg.straggler_timeout, f"{field}.straggler_timeout"),
        straggler_policy=STRAGGLER_POLICY.domain(msg.straggler_policy,
                                                 f"{field}.straggler_policy"),
        max_staleness=msg.max_staleness if msg.HasField("max_staleness") else None,
        scale_lr_by_staleness=msg.scale_lr_by_staleness, exchange=msg.exchange)


def workers_message(w: WorkersConfig) -> pb.Workers:
    msg = pb.Workers(count=w.count, mode=WORKER_MODE.number(w.mode),
                     straggler_policy=STRAGGLER_POLICY.number(w.straggler_policy),
                     scale_lr_by_staleness=w.scale_lr_by_staleness, exchange=w.exchange)
    if w.straggler_timeout:
        msg.straggler_timeout.CopyFrom(duration(w.straggler_timeout))
    if w.max_staleness is not None:
        msg.max_staleness = w.max_staleness
    return msg


def session_config(spec: pb.SessionSpec) -> SessionConfig:
    """A SessionSpec as the service's SessionConfig (wire-level checks only)."""
    tensors = tensor_specs(spec.tensors)
    groups = tuple(group_dict(g, f"groups[{i}]") for i, g in enumerate(spec.groups)) or ({},)
    return SessionConfig(
        algorithm=ALGORITHM.domain(spec.algorithm, "algorithm"),
        tensors=tensors,
        groups=groups,
        dtype=STATE_DTYPE.domain(spec.dtype, "dtype"),
        schedule=schedule_dict(spec.schedule) if spec.HasField("schedule") else None,
        max_grad_norm=spec.max_grad_norm if spec.HasField("max_grad_norm") else None,
        clip_per_tensor=spec.clip_per_tensor,
        skip_nonfinite=spec.skip_nonfinite if spec.HasField("skip_nonfinite") else True,
        workers=workers_config(spec.workers) if spec.HasField("workers") else WorkersConfig(),
        labels=dict(spec.labels),
    )


def session_message(info: SessionInfo) -> pb.Session:
    msg = pb.Session(
        session_id=info.id,
        algorithm=ALGORITHM.number(info.algorithm),
        dtype=STATE_DTYPE.number(info.dtype),
        step=info.step,
        tensors=[tensor_spec_message(t) for t in info.tensors],
        groups=[group_message(g) for g in info.groups],
        lr=list(info.lr),
        clip_per_tensor=info.clip_per_tensor,
        skip_nonfinite=info.skip_nonfinite,
        state_bytes=info.state_bytes,
        backend=BACKEND.number(info.backend),
        workers=workers_message(info.workers),
        labels=info.labels,
    )
    if info.schedule is not None:
        msg.schedule.CopyFrom(schedule_message(info.schedule))
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
            f"page_token {token[:80]!r} is not a token this server gave: pass a previous "
            "response's next_page_token, or none for the first page") from None


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
    ordered = sorted((i for i in infos if after is None or i.id > after), key=lambda i: i.id)
    out = ordered[:size]
    return out, _page_token(out[-1].id) if len(ordered) > size else ""


# ---------------------------------------------------------------------------
# JSON (HTTP): proto3's JSON mapping with the proto's field names, int64s as numbers


def parse_json(data: dict[str, Any], message: Message, field: str) -> None:
    """Fill ``message`` from its JSON form (proto field names; enums by name, Durations
    as "1.5s"); InvalidArgument naming the field for what protobuf refuses."""
    try:
        json_format.ParseDict(data, message)
    except json_format.ParseError as exc:
        raise errors.InvalidArgument(f"{field}: {exc}") from None


def message_json(msg: Message) -> dict[str, Any]:
    """A message as JSON values: fields under their proto names, every field without
    presence written (defaults too), optional and message fields only when set, enums
    by name, Durations as strings ("30s"), 64-bit integers as numbers."""
    out: dict[str, Any] = {}
    # cast: types-protobuf types DESCRIPTOR as either implementation's descriptor
    desc = cast(Descriptor, msg.DESCRIPTOR)
    for f in desc.fields:
        if f.has_presence and not f.is_repeated and not msg.HasField(f.name):
            continue
        out[f.name] = _json_value(f, getattr(msg, f.name))
    return out


def _json_value(f: FieldDescriptor, value: Any) -> Any:
    if f.message_type is not None and f.message_type.GetOptions().map_entry:
        value_field = f.message_type.fields_by_name["value"]
        return {str(k): _json_scalar(value_field, v) for k, v in value.items()}
    if f.is_repeated:
        return [_json_scalar(f, v) for v in value]
    return _json_scalar(f, value)


def _json_scalar(f: FieldDescriptor, value: Any) -> Any:
    if f.message_type is Duration.DESCRIPTOR:
        return value.ToJsonString()
    if f.message_type is not None:
        return message_json(value)
    if f.enum_type is not None:
        known = f.enum_type.values_by_number.get(value)
        return known.name if known is not None else int(value)
    return value


def enum_names(enum: EnumMap[Any]) -> list[str]:
    """Every name of ``enum`` a JSON body may use (UNSPECIFIED too: the default)."""
    return [v.name for v in enum.descriptor.values]

