"""Proto v2 messages <-> plain data: what the server and the client both convert.

Each idea once, for both sides (neither imports the other; both import this):

* the closed sets (:data:`ALGORITHM`, :data:`STATE_DTYPE`, :data:`WORKER_MODE`,
  :data:`STRAGGLER_POLICY`, :data:`BACKEND`, :data:`ANNEAL_STRATEGY`): an enum's
  values <-> the short lower-case names both sides speak ("adamw", "float64",
  "sync", ...), one :class:`EnumMap` each;
* Durations <-> seconds (:func:`seconds`, :func:`duration`);
* a hyperparameter ``Group`` <-> a dict: :func:`group_dict` (``beta1``/``beta2``
  as they travel), :func:`torch_group` (torch's ``betas`` pair), :func:`group_message`;
* the typed ``Schedule`` oneof <-> the ``{"kind": ...}`` dict both sides use
  (:func:`schedule_dict`, every key present; :func:`schedule_message`, checked);
* ``Workers`` and ``TensorSpec`` messages from either side's dataclasses
  (:func:`workers_message`, :func:`workers_fields`, :func:`tensor_spec_message`);
* proto3's JSON mapping under the proto's field names (:func:`message_json`,
  :func:`parse_json`), as the HTTP API reads and writes it.

Plain Python on protobuf and the standard library. A value that does not fit
raises ValueError whose message names the field and what was expected; each side
turns it into its own error with :func:`raising` (the server's InvalidArgument, the
client's InvalidArgument for a request it would send, its BAD_RESPONSE for an answer
it cannot read).
"""

from __future__ import annotations

import base64
import functools
import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Generic, ParamSpec, Protocol, TypeVar, cast

from google.protobuf import json_format
from google.protobuf.descriptor import Descriptor, EnumDescriptor, FieldDescriptor
from google.protobuf.duration_pb2 import Duration
from google.protobuf.message import Message

from adamserve_proto.algorithms import join_betas, split_betas
from adamserve_proto.text import shown
from adamserve_proto.v2 import optimizer_pb2 as pb

if TYPE_CHECKING:
    from google.protobuf.internal.enum_type_wrapper import _EnumTypeWrapper

__all__ = [
    "ALGORITHM",
    "ANNEAL_STRATEGY",
    "BACKEND",
    "MOMENT_DTYPE",
    "SCHEDULE_DEFAULTS",
    "SEMANTICS",
    "STATE_DTYPE",
    "STATE_FORMAT",
    "STRAGGLER_POLICY",
    "WORKER_MODE",
    "EnumMap",
    "duration",
    "group_dict",
    "group_message",
    "message_json",
    "parse_json",
    "raising",
    "schedule_dict",
    "schedule_message",
    "seconds",
    "tensor_spec_message",
    "torch_group",
    "workers_fields",
    "workers_message",
]

P = ParamSpec("P")
T = TypeVar("T")


def raising(error: Callable[[ValueError], Exception]
            ) -> Callable[[Callable[P, T]], Callable[P, T]]:
    """A decorator: what ``fn`` refuses (a ValueError, as every conversion here raises)
    raised as ``error(exc)`` instead, the side's own error type."""

    def wrap(fn: Callable[P, T]) -> Callable[P, T]:
        @functools.wraps(fn)
        def run(*args: P.args, **kwargs: P.kwargs) -> T:
            try:
                return fn(*args, **kwargs)
            except ValueError as exc:
                raise error(exc) from None

        return run

    return wrap


# ---------------------------------------------------------------------------
# Closed sets

V = TypeVar("V", bound=int)


@dataclass(frozen=True)
class EnumMap(Generic[V]):
    """One proto enum and the short names of its values.

    The short name of ``PREFIX_NAME`` is ``name`` in lower case (``ALGORITHM_ADAMW``
    -> ``"adamw"``); ``PREFIX_UNSPECIFIED`` stands for ``unspecified`` (the default
    both sides assume), or is refused where that is None.
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

    @property
    def all_names(self) -> tuple[str, ...]:
        """Every proto name (UNSPECIFIED too: the default), as JSON may write them."""
        return tuple(v.name for v in self.descriptor.values)

    @property
    def shorts(self) -> tuple[str, ...]:
        """The short names of the values that mean something."""
        return tuple(n.removeprefix(self._prefix).lower() for n in self.names)

    @property
    def noun(self) -> str:
        """What a value is, in words (``StateDtype`` -> "state dtype")."""
        return re.sub(r"(?<!^)(?=[A-Z])", " ", self.descriptor.name).lower()

    def short(self, number: int, field: str) -> str:
        """The short name of a proto value; ValueError for an unknown one, or for
        UNSPECIFIED where there is no default."""
        value = self.descriptor.values_by_number.get(number)
        expected = ", ".join(self.names)
        if value is None:
            raise ValueError(f"{field}: unknown {self.descriptor.name} value {number}; "
                             f"expected one of {expected}")
        if number == 0:
            if self.unspecified is None:
                raise ValueError(f"{field}: not set ({value.name}); expected one of {expected}")
            return self.unspecified
        return value.name.removeprefix(self._prefix).lower()

    def number(self, short: str, field: str) -> V:
        """The proto value of a short name (any case; the default: its own value, else
        UNSPECIFIED); ValueError naming ``field`` for a name the enum lacks."""
        key = str(short).strip().lower()
        name = self._prefix + key.upper()
        if key and name in self.descriptor.values_by_name:
            return self.enum.Value(name)
        if key == self.unspecified:
            return self.enum.Value(self.descriptor.values[0].name)
        raise ValueError(f"{field}: unknown {self.noun} {shown(short)}; expected one of "
                         f"{', '.join(self.shorts)}")


ALGORITHM = EnumMap(pb.Algorithm, None)
STATE_DTYPE = EnumMap(pb.StateDtype, "float32")
# SessionSpec.state_dtype: the moments' precision; unset ("") is the master dtype's
MOMENT_DTYPE = EnumMap(pb.StateDtype, "")
SEMANTICS = EnumMap(pb.Semantics, "torch")
STATE_FORMAT = EnumMap(pb.StateFormat, "torch")
WORKER_MODE = EnumMap(pb.WorkerMode, "sync")
STRAGGLER_POLICY = EnumMap(pb.StragglerPolicy, "fail")
BACKEND = EnumMap(pb.Backend, "")
ANNEAL_STRATEGY = EnumMap(pb.AnnealStrategy, "cos")

# The table of each enum a schedule's fields use.
_SCHEDULE_ENUMS: dict[str, EnumMap[Any]] = {pb.AnnealStrategy.DESCRIPTOR.full_name: ANNEAL_STRATEGY}

# ---------------------------------------------------------------------------
# Durations


def seconds(d: Duration, field: str) -> float:
    """A Duration as seconds; ValueError if negative or malformed."""
    if d.seconds < 0 or d.nanos < 0:
        raise ValueError(f"{field}: negative duration ({d.seconds} s {d.nanos} ns); "
                         "expected >= 0")
    if d.nanos >= 1_000_000_000:
        raise ValueError(f"{field}: nanos {d.nanos} out of range 0-999999999")
    return d.seconds + d.nanos / 1e9


def duration(s: float, field: str = "duration") -> Duration:
    """Seconds as a Duration, to the nanosecond (a negative one too: the receiver refuses
    it); ValueError for a number that is not finite."""
    if not math.isfinite(s):
        raise ValueError(f"{field}: expected a finite number of seconds, got {shown(s)}")
    d = Duration()
    d.FromNanoseconds(round(s * 1e9))
    return d


# ---------------------------------------------------------------------------
# Hyperparameter groups: numbers in `values`, switches in `flags`, betas split


def group_dict(msg: pb.Group, field: str) -> dict[str, float | bool | str | None]:
    """A Group as one dict as it travels (``beta1``/``beta2`` apart; numbers sorted by
    name, then the switches, the names, the keys set to None); ValueError for a key
    given in more than one of them."""
    values = {str(k): float(v) for k, v in sorted(msg.values.items())}
    flags = {str(k): bool(v) for k, v in sorted(msg.flags.items())}
    names = {str(k): str(v) for k, v in sorted(msg.names.items())}
    unset = dict.fromkeys(sorted(str(k) for k in msg.unset))
    both = sorted(set(values) & set(flags))
    if both:
        raise ValueError(f"{field}: {', '.join(both)} given both as a value and as a flag")
    again = sorted((set(values) | set(flags)) & (set(names) | set(unset))
                   | set(names) & set(unset))
    if again:
        raise ValueError(f"{field}: {', '.join(again)} given twice (in names or unset, and "
                         "elsewhere): give each key once")
    return {**values, **flags, **names, **unset}


def torch_group(msg: pb.Group, field: str) -> dict[str, Any]:
    """A Group under torch's names: as :func:`group_dict`, ``betas`` a pair."""
    return join_betas(group_dict(msg, field))


def group_message(group: Mapping[str, Any]) -> pb.Group:
    """A group under torch's names (``betas`` a pair, or ``beta1``/``beta2``) as a Group;
    ValueError for a pair other than betas."""
    msg = pb.Group()
    for key, value in split_betas(group).items():
        if isinstance(value, bool):
            msg.flags[key] = value
        elif isinstance(value, str):
            msg.names[key] = value
        elif value is None:
            msg.unset.append(key)
        else:
            msg.values[key] = value
    return msg


# ---------------------------------------------------------------------------
# Schedules: the Schedule oneof <-> {"kind": name, field: value, ...}

_KIND = pb.Schedule.DESCRIPTOR.oneofs_by_name["kind"]
# What an absent optional field means (the proto's comments): the {"kind": ...} form
# holds every key, as the engine's schedules write it (max_lr None: the group's lr).
SCHEDULE_DEFAULTS: Mapping[str, Mapping[str, Any]] = {
    "constant": {"factor": 1.0},
    "linear": {"end_factor": 1.0},
    "step": {"gamma": 0.1},
    "one_cycle": {"max_lr": None, "pct_start": 0.3, "div_factor": 25.0,
                  "final_div_factor": 1e4, "cycle_momentum": True, "base_momentum": 0.85,
                  "max_momentum": 0.95},
}


def schedule_dict(msg: pb.Schedule, field: str = "schedule") -> dict[str, Any]:
    """A Schedule in its ``{"kind": ...}`` form, every key present (an absent optional
    field: :data:`SCHEDULE_DEFAULTS`); ValueError for a schedule (or a piece of a join)
    without a kind, or an enum value out of range. The values' ranges are the engine's
    to check."""
    kind = msg.WhichOneof("kind")
    if kind is None:
        raise ValueError(f"{field}: no kind set; expected one of "
                         f"{', '.join(f.name for f in _KIND.fields)}")
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
            out[f.name] = SCHEDULE_DEFAULTS.get(kind, {}).get(f.name)
        elif f.enum_type is not None:
            out[f.name] = _SCHEDULE_ENUMS[f.enum_type.full_name].short(int(value), path)
        elif f.type == FieldDescriptor.TYPE_BOOL:
            out[f.name] = bool(value)
        elif f.type in (FieldDescriptor.TYPE_INT64, FieldDescriptor.TYPE_INT32):
            out[f.name] = int(value)
        else:
            out[f.name] = float(value)
    return out


def schedule_message(d: Mapping[str, Any], field: str = "schedule") -> pb.Schedule:
    """A schedule's ``{"kind": ...}`` form as the typed oneof (None values left unset);
    ValueError naming the key for what the proto cannot carry (an unknown kind or key,
    a value of the wrong type)."""
    if not isinstance(d, Mapping):
        raise ValueError(f"{field}: expected a mapping with a 'kind', got {shown(d)}")
    kinds = tuple(f.name for f in _KIND.fields)
    kind = d.get("kind")
    if kind not in kinds:
        raise ValueError(f"{field}.kind: expected one of {', '.join(map(repr, kinds))}, "
                         f"got {shown(kind)}")
    msg = pb.Schedule()
    piece: Message = getattr(msg, str(kind))
    piece.SetInParent()
    fields = piece.DESCRIPTOR.fields_by_name
    for key, value in d.items():
        if key == "kind" or value is None:
            continue
        path = f"{field}.{key}"
        f = fields.get(key)
        if f is None:
            raise ValueError(f"{path}: unknown key for kind {shown(kind)}; allowed: "
                             f"{', '.join(map(repr, fields))}")
        if f.message_type is pb.Schedule.DESCRIPTOR:  # join's pieces
            if isinstance(value, str | bytes | Mapping) or not isinstance(value, Sequence):
                raise ValueError(f"{path}: expected a list of schedules, got {shown(value)}")
            getattr(piece, key).extend(schedule_message(s, f"{path}[{i}]")
                                       for i, s in enumerate(value))
        elif f.enum_type is not None:
            setattr(piece, key, _SCHEDULE_ENUMS[f.enum_type.full_name].number(value, path))
        else:
            try:
                if f.is_repeated:
                    getattr(piece, key).extend(value)
                else:
                    setattr(piece, key, value)
            except (TypeError, ValueError) as exc:
                raise ValueError(f"{path}: {shown(value)} is not a valid value ({exc})") from None
    return msg


# ---------------------------------------------------------------------------
# Workers and tensor specs, from either side's dataclasses


class WorkersLike(Protocol):
    """Either side's workers settings (the server's WorkersConfig, the client's Workers)."""

    @property
    def count(self) -> int: ...
    @property
    def mode(self) -> str: ...
    @property
    def straggler_timeout(self) -> float: ...
    @property
    def straggler_policy(self) -> str: ...
    @property
    def max_staleness(self) -> int | None: ...
    @property
    def scale_lr_by_staleness(self) -> bool: ...
    @property
    def exchange(self) -> bool: ...


def workers_message(w: WorkersLike, field: str = "workers") -> pb.Workers:
    """Workers settings as the proto's Workers; ValueError for a mode or policy the
    proto lacks."""
    msg = pb.Workers(count=w.count, mode=WORKER_MODE.number(w.mode, f"{field}.mode"),
                     straggler_policy=STRAGGLER_POLICY.number(w.straggler_policy,
                                                              f"{field}.straggler_policy"),
                     scale_lr_by_staleness=w.scale_lr_by_staleness, exchange=w.exchange)
    if w.straggler_timeout:
        msg.straggler_timeout.CopyFrom(duration(w.straggler_timeout,
                                                f"{field}.straggler_timeout"))
    if w.max_staleness is not None:
        msg.max_staleness = w.max_staleness
    return msg


def workers_fields(msg: pb.Workers, field: str = "workers") -> dict[str, Any]:
    """A Workers message as the keyword arguments of either side's dataclass (count 0:
    1; the enums' defaults for UNSPECIFIED); ValueError as :meth:`EnumMap.short`."""
    return {
        "count": int(msg.count) or 1,
        "mode": WORKER_MODE.short(msg.mode, f"{field}.mode"),
        "straggler_timeout": seconds(msg.straggler_timeout, f"{field}.straggler_timeout"),
        "straggler_policy": STRAGGLER_POLICY.short(msg.straggler_policy,
                                                   f"{field}.straggler_policy"),
        "max_staleness": int(msg.max_staleness) if msg.HasField("max_staleness") else None,
        "scale_lr_by_staleness": bool(msg.scale_lr_by_staleness),
        "exchange": bool(msg.exchange),
    }


class TensorSpecLike(Protocol):
    @property
    def name(self) -> str: ...
    @property
    def shape(self) -> tuple[int, ...]: ...
    @property
    def group(self) -> int: ...


def tensor_spec_message(t: TensorSpecLike) -> pb.TensorSpec:
    return pb.TensorSpec(name=t.name, shape=list(t.shape), group=t.group)


# ---------------------------------------------------------------------------
# JSON (HTTP): proto3's JSON mapping with the proto's field names, int64s as numbers


def message_json(msg: Message, *, defaults: bool = True) -> dict[str, Any]:
    """A message as JSON values: fields under their proto names, enums by name,
    Durations as strings ("30s"), 64-bit integers as numbers (non-finite floats as
    floats: a JSON writer's NaN literals), bytes as base64; optional and message fields
    only when set. ``defaults``: fields without presence are written at their default
    values too (else left out, as a step's header leaves out "" and 0)."""
    out: dict[str, Any] = {}
    # cast: types-protobuf types DESCRIPTOR as either implementation's descriptor
    desc = cast(Descriptor, msg.DESCRIPTOR)
    for f in desc.fields:
        value = getattr(msg, f.name)
        if f.has_presence and not f.is_repeated:
            if not msg.HasField(f.name):
                continue
        elif not defaults and (len(value) == 0 if f.is_repeated else value == f.default_value):
            continue
        out[f.name] = _json_value(f, value)
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
    if f.type == FieldDescriptor.TYPE_BYTES:
        return base64.b64encode(value).decode()
    return value


def parse_json(data: Mapping[str, Any], message: Message, field: str, *,
               ignore_unknown: bool = False) -> None:
    """Fill ``message`` from its JSON form (proto field names or JSON names; enums by
    name, Durations as "1.5s"; NaN and the infinities as numbers or as proto3 JSON's
    strings); ValueError naming ``field`` for what protobuf refuses."""
    try:
        json_format.ParseDict(_quoted(data), message, ignore_unknown_fields=ignore_unknown)
    except json_format.ParseError as exc:
        raise ValueError(f"{field}: {exc}") from None


def _quoted(value: Any) -> Any:
    """JSON values as json_format reads them: NaN and the infinities as strings."""
    if isinstance(value, float) and not math.isfinite(value):
        return "NaN" if value != value else ("Infinity" if value > 0 else "-Infinity")
    if isinstance(value, Mapping):
        return {k: _quoted(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_quoted(v) for v in value]
    return value
