"""The client's dataclasses as ``adamserve_proto.v2`` messages and back, for every wire.

gRPC sends these messages as they are; HTTP sends their proto JSON (field names
and enum names as in the proto), so the conversions live here once. The client
speaks torch's names (``"adamw"``, ``betas`` as a pair, ``mode="sync"``,
schedules as ``{"kind": "cosine", ...}``); the wire speaks the proto's
(``ALGORITHM_ADAMW``, ``beta1``/``beta2`` in a Group's ``values``,
``WORKER_MODE_SYNC``, a typed ``Schedule`` oneof, Durations). A value the proto
cannot carry (an unknown algorithm, mode or schedule kind) is refused here, before
any call, as the server would refuse it: :class:`~adamserve_client.errors.InvalidArgument`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from google.protobuf.descriptor import EnumDescriptor, FieldDescriptor
from google.protobuf.duration_pb2 import Duration
from google.protobuf.message import Message

from adamserve_client import errors
from adamserve_client.transports.base import (
    CheckpointInfo,
    ExchangeSums,
    Hyperparameters,
    HyperValue,
    RoundInfo,
    SessionInfo,
    SessionSpec,
    StepResult,
    TensorSpec,
    WireTensor,
    Workers,
)
from adamserve_proto.v2 import optimizer_pb2 as pb

__all__ = [
    "checkpoint_info",
    "duration",
    "group_message",
    "schedule_dict",
    "schedule_message",
    "session_info",
    "session_spec",
    "step_result",
    "tensor_specs",
    "workers_message",
]

# ---------------------------------------------------------------------------
# Closed sets: the client's lower-case names <-> the proto's enum values


class _Names:
    """An enum's values by the client's name: ``ALGORITHM_ADAMW`` is ``"adamw"``."""

    def __init__(self, enum: EnumDescriptor, prefix: str, what: str) -> None:
        self.what = what
        self.by_name = {v.name.removeprefix(prefix).lower(): v.number for v in enum.values
                        if not v.name.endswith("_UNSPECIFIED")}
        self.by_number = {n: name for name, n in self.by_name.items()}

    def number(self, name: str) -> Any:  # the enum's ValueType
        key = name.strip().lower()
        if key not in self.by_name:
            raise errors.InvalidArgument(
                f"{self.what}: expected one of {', '.join(map(repr, self.by_name))}, "
                f"got {name!r}", reason="INVALID_ARGUMENT")
        return self.by_name[key]

    def name(self, number: int, unspecified: str = "") -> str:
        return self.by_number.get(number, unspecified)


ALGORITHMS = _Names(pb.Algorithm.DESCRIPTOR, "ALGORITHM_", "algorithm")
DTYPES = _Names(pb.StateDtype.DESCRIPTOR, "STATE_DTYPE_", "dtype")
MODES = _Names(pb.WorkerMode.DESCRIPTOR, "WORKER_MODE_", "workers.mode")
POLICIES = _Names(pb.StragglerPolicy.DESCRIPTOR, "STRAGGLER_POLICY_", "workers.straggler_policy")
BACKENDS = _Names(pb.Backend.DESCRIPTOR, "BACKEND_", "backend")
ANNEAL = _Names(pb.AnnealStrategy.DESCRIPTOR, "ANNEAL_STRATEGY_", "anneal_strategy")


def _algorithm(name: str) -> Any:
    if name.strip().lower() not in ALGORITHMS.by_name:
        raise errors.InvalidArgument(
            f"unknown algorithm {name!r}: expected one of {', '.join(ALGORITHMS.by_name)}",
            reason="INVALID_ARGUMENT")
    return ALGORITHMS.number(name)


def duration(seconds: float) -> Duration:
    d = Duration()
    d.FromNanoseconds(round(seconds * 1e9))
    return d


# ---------------------------------------------------------------------------
# Hyperparameter groups: torch's names, betas a pair


def split_betas(group: Mapping[str, HyperValue]) -> tuple[dict[str, float], dict[str, bool]]:
    """A group as the proto's ``values`` and ``flags`` (betas as beta1/beta2)."""
    values: dict[str, float] = {}
    flags: dict[str, bool] = {}
    for key, value in group.items():
        if isinstance(value, bool):
            flags[key] = value
        elif isinstance(value, tuple):
            if key != "betas" or len(value) != 2:
                raise ValueError(f"hyperparameter {key!r}: only betas may be a pair, "
                                 f"got {value!r}")
            values["beta1"], values["beta2"] = float(value[0]), float(value[1])
        else:
            values[key] = float(value)
    return values, flags


def join_betas(values: Mapping[str, float], flags: Mapping[str, bool]) -> Hyperparameters:
    """The proto's ``values`` and ``flags`` as one torch-style group."""
    out: Hyperparameters = {}
    for key, v in sorted(values.items()):
        if key == "beta1":
            out["betas"] = (float(v), float(values.get("beta2", 0.0)))
        elif key != "beta2":
            out[key] = float(v)
    out.update({k: bool(v) for k, v in sorted(flags.items())})
    return out


def group_message(group: Mapping[str, HyperValue]) -> pb.Group:
    values, flags = split_betas(group)
    return pb.Group(values=values, flags=flags)


def tensor_specs(tensors: Sequence[TensorSpec]) -> list[pb.TensorSpec]:
    return [pb.TensorSpec(name=t.name, shape=list(t.shape), group=t.group) for t in tensors]


def _tensor_spec(t: pb.TensorSpec) -> TensorSpec:
    return TensorSpec(t.name, tuple(int(d) for d in t.shape), int(t.group))


# ---------------------------------------------------------------------------
# Schedules: {"kind": "cosine", "total_steps": 100} <-> Schedule(cosine=...)

_KINDS = pb.Schedule.DESCRIPTOR.oneofs_by_name["kind"]
# What an absent optional field means (the proto's comments): the {"kind": ...} form
# the client returns always holds every key, as the server's schedules write it.
_ABSENT: dict[str, dict[str, Any]] = {
    "constant": {"factor": 1.0},
    "linear": {"end_factor": 1.0},
    "step": {"gamma": 0.1},
    "one_cycle": {"max_lr": None, "pct_start": 0.3, "div_factor": 25.0,
                  "final_div_factor": 1e4, "cycle_momentum": True, "base_momentum": 0.85,
                  "max_momentum": 0.95},
}


def _bad_schedule(path: str, detail: str) -> errors.InvalidArgument:
    return errors.InvalidArgument(f"{path}: {detail}", reason="INVALID_ARGUMENT")


def schedule_message(d: Mapping[str, Any], path: str = "schedule") -> pb.Schedule:
    """A schedule's ``{"kind": ...}`` form as the proto's typed oneof."""
    if not isinstance(d, Mapping):
        raise _bad_schedule(path, f"expected a mapping with a 'kind', got {d!r}")
    kinds = {f.name: f for f in _KINDS.fields}
    kind = d.get("kind")
    if kind not in kinds:
        raise _bad_schedule(f"{path}.kind", f"expected one of {', '.join(map(repr, kinds))}, "
                                            f"got {kind!r}")
    out = pb.Schedule()
    sub = getattr(out, kind)
    sub.SetInParent()
    fields = sub.DESCRIPTOR.fields_by_name
    for key, value in d.items():
        if key == "kind" or value is None:
            continue
        if key not in fields:
            raise _bad_schedule(f"{path}.{key}", f"unknown key for kind {kind!r}; allowed: "
                                                 f"{', '.join(map(repr, fields))}")
        try:
            if key == "schedules":
                sub.schedules.extend(schedule_message(piece, f"{path}.schedules[{i}]")
                                     for i, piece in enumerate(value))
            elif key == "anneal_strategy":
                sub.anneal_strategy = ANNEAL.number(str(value))
            elif fields[key].is_repeated:
                getattr(sub, key).extend(value)
            else:
                setattr(sub, key, value)
        except (TypeError, ValueError) as exc:
            if isinstance(exc, errors.AdamserveError):
                raise
            raise _bad_schedule(f"{path}.{key}", f"{value!r} is not a valid value "
                                                 f"({exc})") from None
    return out


def schedule_dict(msg: pb.Schedule) -> dict[str, Any] | None:
    """The proto's typed schedule in its ``{"kind": ...}`` form, every key present."""
    kind = msg.WhichOneof("kind")
    if kind is None:
        return None
    sub = getattr(msg, kind)
    out: dict[str, Any] = {"kind": kind}
    for f in sub.DESCRIPTOR.fields:
        value = getattr(sub, f.name)
        if f.name == "schedules":
            out[f.name] = [schedule_dict(piece) for piece in value]
        elif f.name == "anneal_strategy":
            out[f.name] = ANNEAL.name(value, "cos")
        elif f.is_repeated:
            out[f.name] = [int(v) for v in value]
        elif f.has_presence and not sub.HasField(f.name):
            out[f.name] = _ABSENT.get(kind, {}).get(f.name)
        elif f.type in (FieldDescriptor.TYPE_INT64, FieldDescriptor.TYPE_INT32):
            out[f.name] = int(value)
        elif f.type == FieldDescriptor.TYPE_BOOL:
            out[f.name] = bool(value)
        else:
            out[f.name] = float(value)
    return out


# ---------------------------------------------------------------------------
# Workers and sessions


def workers_message(w: Workers) -> pb.Workers:
    msg = pb.Workers(count=w.count, mode=MODES.number(w.mode),
                     straggler_policy=POLICIES.number(w.straggler_policy),
                     scale_lr_by_staleness=w.scale_lr_by_staleness, exchange=w.exchange)
    if w.straggler_timeout:
        msg.straggler_timeout.CopyFrom(duration(w.straggler_timeout))
    if w.max_staleness is not None:
        msg.max_staleness = w.max_staleness
    return msg


def _workers(msg: pb.Workers) -> Workers:
    return Workers(count=int(msg.count) or 1, mode=MODES.name(msg.mode, "sync"),
                   straggler_timeout=msg.straggler_timeout.ToNanoseconds() / 1e9,
                   straggler_policy=POLICIES.name(msg.straggler_policy, "fail"),
                   max_staleness=int(msg.max_staleness) if msg.HasField("max_staleness")
                   else None,
                   scale_lr_by_staleness=bool(msg.scale_lr_by_staleness),
                   exchange=bool(msg.exchange))


def session_spec(spec: SessionSpec) -> pb.SessionSpec:
    msg = pb.SessionSpec(
        session_id=spec.session_id, algorithm=_algorithm(spec.algorithm),
        groups=[group_message(g) for g in spec.groups], tensors=tensor_specs(spec.tensors),
        dtype=DTYPES.number(spec.dtype), clip_per_tensor=spec.clip_per_tensor,
        skip_nonfinite=spec.skip_nonfinite, workers=workers_message(spec.workers),
        labels=dict(spec.labels))
    if spec.schedule is not None:
        msg.schedule.CopyFrom(schedule_message(spec.schedule))
    if spec.max_grad_norm is not None:
        msg.max_grad_norm = spec.max_grad_norm
    return msg


def session_info(msg: pb.Session) -> SessionInfo:
    return SessionInfo(
        session_id=msg.session_id,
        algorithm=ALGORITHMS.name(msg.algorithm),
        dtype=DTYPES.name(msg.dtype, "float32"),
        step=int(msg.step),
        tensors=tuple(_tensor_spec(t) for t in msg.tensors),
        groups=tuple(join_betas(dict(g.values), dict(g.flags)) for g in msg.groups),
        lr=tuple(float(x) for x in msg.lr),
        schedule=schedule_dict(msg.schedule) if msg.HasField("schedule") else None,
        max_grad_norm=msg.max_grad_norm if msg.HasField("max_grad_norm") else None,
        clip_per_tensor=bool(msg.clip_per_tensor),
        skip_nonfinite=bool(msg.skip_nonfinite),
        state_bytes=int(msg.state_bytes),
        checkpointed_step=int(msg.checkpointed_step) if msg.HasField("checkpointed_step")
        else -1,
        backend=BACKENDS.name(msg.backend),
        workers=_workers(msg.workers) if msg.HasField("workers") else Workers(),
        labels=dict(msg.labels),
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


def field_of(message: Message, name: str) -> Any:
    """``message.<name>``, typed Any (the stubs type each response class apart)."""
    return getattr(message, name)
