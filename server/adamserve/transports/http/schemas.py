"""Wire models of the HTTP API (v2): pydantic only, no logic.

Field names and values are the proto's (adamserve_proto/v2/optimizer.proto, in proto3's
JSON mapping with the proto's field names): ``session_id``, groups as ``{"values":
{...}, "flags": {...}, "names": {...}, "unset": [...]}``, enums by name
(``"ALGORITHM_ADAMW"``), a schedule as its typed oneof (``{"cosine": {"total_steps":
100}}``), durations as strings (``"30s"``), optional fields left out when absent; 64-bit
integers are JSON numbers. The routes parse these bodies into the proto's messages and
answer from them (:mod:`adamserve.transports.convert`), so the models here describe and
bound what travels; tests/transports/test_http.py checks that each one has the proto
message's fields.

Tensors follow the Open Inference Protocol's shape: ``{"name", "shape", "datatype",
"data"}`` with ``data`` a flat row-major list of numbers, or, in a binary request
(see :mod:`adamserve.transports.http.binary`), ``"parameters": {"binary_data_size": n}``
and the raw bytes after the JSON header. Request models forbid unknown keys so a
misspelt field is an error, not a silently ignored option.

Non-finite numbers: JSON has none, so ``data`` accepts the literals ``NaN``,
``Infinity`` and ``-Infinity`` (as Python's and JavaScript's JSON5 readers write
them) and the strings ``"nan"``, ``"inf"``, ``"-inf"``; responses write the
literals. Ask for binary output where a strict JSON reader must parse the result.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, Any

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    JsonValue,
    WithJsonSchema,
    model_validator,
)
from pydantic.config import JsonDict

from adamserve.sessions.session import MAX_ELEMENTS, MAX_NAME, MAX_RANK
from adamserve_proto import convert

# Wire datatypes, as in adamserve.engine.dtypes.WIRE_DTYPES. Kept a plain string in
# the models (the enum is documentation) so an unknown one gets a message naming
# the tensor, from the transport, rather than a generic literal error.
DATATYPES = ("FP32", "FP64", "FP16", "BF16")
MAX_DIM = MAX_ELEMENTS

Datatype = Annotated[str, Field(json_schema_extra={"enum": list(DATATYPES)},
                                description="FP32, FP64, FP16 or BF16 (little-endian)")]
Dim = Annotated[int, Field(ge=0, le=MAX_DIM)]
Shape = Annotated[list[Dim], Field(max_length=MAX_RANK)]
Name = Annotated[str, Field(min_length=1, max_length=MAX_NAME)]


def _number(v: Any) -> float:
    if isinstance(v, bool) or not isinstance(v, int | float):
        raise ValueError(f"expected a number, got {_short(v)}")
    try:
        return float(v)
    except OverflowError:
        raise ValueError(f"expected a finite number, got {_short(v)}") from None


def _short(v: Any) -> str:
    text = repr(v)
    return text if len(text) <= 60 else text[:57] + "..."


Number = Annotated[Any, AfterValidator(_number), WithJsonSchema({"type": "number"})]
Int64 = Annotated[int, Field(ge=-(2**63), le=2**63 - 1)]
Step = Annotated[int, Field(ge=0, le=2**63 - 1)]
Int32 = Annotated[int, Field(ge=-(2**31), le=2**31 - 1)]
# proto3 JSON's Duration: seconds with up to 9 decimals and an "s" ("30s", "0.25s")
Duration = Annotated[str, Field(pattern=r"^-?[0-9]{1,12}(\.[0-9]{1,9})?s$",
                                description="A duration as proto3 JSON writes it: \"30s\", "
                                "\"0.5s\"")]


def _names(enum: convert.EnumMap[Any]) -> JsonDict:
    """The JSON schema's enum: the proto's names (UNSPECIFIED, the default, too)."""
    names: list[JsonValue] = list(enum.all_names)
    return {"enum": names}


def _member(enum: convert.EnumMap[Any]) -> Callable[[str], str]:
    """A validator: one of the enum's names, or a message listing them."""
    names = enum.all_names

    def check(v: str) -> str:
        if v not in names:
            raise ValueError(f"unknown {enum.descriptor.name} {_short(v)}; expected one of "
                             f"{', '.join(enum.names)}")
        return v

    return check


Algorithm = Annotated[str, AfterValidator(_member(convert.ALGORITHM)), Field(
    json_schema_extra=_names(convert.ALGORITHM),
    description="The update rule: ALGORITHM_ADAMW, ...")]
StateDtype = Annotated[str, AfterValidator(_member(convert.STATE_DTYPE)), Field(
    json_schema_extra=_names(convert.STATE_DTYPE), description="Master state precision")]
MomentDtype = Annotated[str, AfterValidator(_member(convert.MOMENT_DTYPE)), Field(
    json_schema_extra=_names(convert.MOMENT_DTYPE),
    description="The moments' precision: STATE_DTYPE_BFLOAT16 (stochastic rounding) or "
    "STATE_DTYPE_INT8 (block-wise 8-bit) for Adam, AdamW, AMSGrad, NAdam, RAdam, Adamax and "
    "LAMB with a float32 master; unset: the master dtype")]
Semantics = Annotated[str, AfterValidator(_member(convert.SEMANTICS)), Field(
    json_schema_extra=_names(convert.SEMANTICS),
    description="SEMANTICS_TORCH (unset) or SEMANTICS_OPTAX: optax's update rules, "
    "hyperparameter names and defaults (docs/optax.md)")]
StateFormat = Annotated[str, AfterValidator(_member(convert.STATE_FORMAT)), Field(
    json_schema_extra=_names(convert.STATE_FORMAT),
    description="STATE_FORMAT_TORCH (unset): moments as float tensors; STATE_FORMAT_NATIVE: "
    "as the session stores them (bfloat16 bits, int8 codes and block scales)")]
WorkerMode = Annotated[str, AfterValidator(_member(convert.WORKER_MODE)), Field(
    json_schema_extra=_names(convert.WORKER_MODE),
    description="WORKER_MODE_SYNC: step t is the mean of the workers' gradients; "
    "WORKER_MODE_ASYNC: every push is applied on arrival")]
StragglerPolicy = Annotated[str, AfterValidator(_member(convert.STRAGGLER_POLICY)), Field(
    json_schema_extra=_names(convert.STRAGGLER_POLICY),
    description="After the straggler timeout: fail the round (409), or apply the mean of "
    "what arrived")]
Backend = Annotated[str, AfterValidator(_member(convert.BACKEND)), Field(
    json_schema_extra=_names(convert.BACKEND), description="Where the session's kernels run")]
AnnealStrategy = Annotated[str, AfterValidator(_member(convert.ANNEAL_STRATEGY)), Field(
    json_schema_extra=_names(convert.ANNEAL_STRATEGY), description="OneCycle's annealing")]


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid")


class _Response(BaseModel):
    model_config = ConfigDict(ser_json_inf_nan="constants")


class TensorParameters(BaseModel):
    model_config = ConfigDict(extra="forbid")

    binary_data_size: int | None = Field(
        default=None, ge=0,
        description="Bytes of this tensor in the binary part of the body, in order")


# any int64: the service names a row out of range, as on every wire
Row = Annotated[int, Field(ge=-(2**63), le=2**63 - 1)]
_ROWS = ("Row-sparse: the tensor's rows (slices along its first dim) carried, in the order "
         "of their values")


class TensorIn(_Request):
    """A tensor in a request: ``data`` (JSON numbers) or ``parameters.binary_data_size``."""

    name: Name
    shape: Shape
    datatype: Datatype = "FP32"
    data: list[float] | None = Field(
        default=None, description="Flat row-major values, prod(shape) of them (with 'rows': "
        "those rows' values, row after row)")
    parameters: TensorParameters | None = None
    rows: list[Row] | None = Field(
        default=None, description=_ROWS + "; the rows not sent are zero (SparseAdam leaves "
        "them untouched); distinct, each in [0, shape[0])")


class TensorOut(_Response):
    """A tensor in a response: ``data`` in JSON output, ``parameters`` in binary output."""

    name: str
    shape: list[int]
    datatype: str
    data: list[float] | None = None
    parameters: TensorParameters | None = None
    rows: list[int] | None = Field(default=None, description=_ROWS)


class RowSelection(_Request):
    """Some rows of one tensor (proto RowSelection, its rows as JSON numbers)."""

    name: Name
    rows: list[Row] = Field(description="Row indices, each in [0, shape[0])")


class TensorSpec(_Request):
    """The declaration of one named tensor (proto TensorSpec)."""

    name: Name
    shape: Shape
    group: int = Field(default=0, ge=0, le=2**31 - 1, description="Index into 'groups'")


class Group(_Request):
    """Hyperparameters of one parameter group (proto Group): torch.optim's names, betas
    split into beta1/beta2; keys left out take the defaults (or keep their values)."""

    values: dict[str, Number] = Field(default_factory=dict,
                                      description='Numbers, e.g. {"lr": 0.001, "beta1": 0.9}')
    flags: dict[str, bool] = Field(default_factory=dict,
                                   description='Switches, e.g. {"amsgrad": true}')
    names: dict[str, str] = Field(default_factory=dict, description='Choices, e.g. '
                                  '{"adjust_lr_fn": "match_rms_adamw"}')
    unset: list[str] = Field(default_factory=list,
                             description='Keys set to None, e.g. ["adjust_lr_fn"]')


# -- schedules: the proto's Schedule oneof, one key naming the kind --------------------


class ConstantSchedule(_Request):
    factor: Number | None = Field(default=None, description="absent: 1")


class LinearSchedule(_Request):
    start_factor: Number = 0.0
    end_factor: Number | None = Field(default=None, description="absent: 1")
    total_steps: Int64 = 0


class CosineSchedule(_Request):
    total_steps: Int64 = 0
    eta_min: Number = 0.0


class InverseSqrtSchedule(_Request):
    warmup_steps: Int64 = 0


class ExponentialSchedule(_Request):
    gamma: Number = 0.0


class StepSchedule(_Request):
    step_size: Int64 = 0
    gamma: Number | None = Field(default=None, description="absent: 0.1")


class OneCycleSchedule(_Request):
    total_steps: Int64 = 0
    max_lr: Number | None = Field(default=None, description="absent: the group's lr")
    pct_start: Number | None = None
    anneal_strategy: AnnealStrategy = "ANNEAL_STRATEGY_UNSPECIFIED"
    div_factor: Number | None = None
    final_div_factor: Number | None = None
    three_phase: bool = False
    cycle_momentum: bool | None = None
    base_momentum: Number | None = None
    max_momentum: Number | None = None


class JoinSchedule(_Request):
    schedules: list[Schedule] = Field(default_factory=list, max_length=64)
    milestones: list[Int64] = Field(default_factory=list, max_length=63)


class Schedule(_Request):
    """A learning-rate schedule: exactly one of the keys (proto Schedule), e.g.
    ``{"cosine": {"total_steps": 1000}}``."""

    constant: ConstantSchedule | None = None
    linear: LinearSchedule | None = None
    cosine: CosineSchedule | None = None
    inverse_sqrt: InverseSqrtSchedule | None = None
    exponential: ExponentialSchedule | None = None
    step: StepSchedule | None = None
    one_cycle: OneCycleSchedule | None = None
    join: JoinSchedule | None = None

    @model_validator(mode="after")
    def _one_kind(self) -> Schedule:
        kinds = [k for k in type(self).model_fields if getattr(self, k) is not None]
        if len(kinds) != 1:
            raise ValueError("a schedule has exactly one of the keys "
                             f"{', '.join(type(self).model_fields)}; got "
                             f"{', '.join(kinds) if kinds else 'none'}")
        return self


JoinSchedule.model_rebuild()

# -- sessions -------------------------------------------------------------------------


class Workers(_Request):
    """How the pushes of several workers become steps (proto Workers)."""

    count: int = Field(default=0, ge=0, le=512, description="Workers pushing each step; 0: 1")
    mode: WorkerMode = "WORKER_MODE_UNSPECIFIED"
    straggler_timeout: Duration | None = Field(
        default=None, description="From a round's first push; absent or \"0s\": wait forever")
    straggler_policy: StragglerPolicy = "STRAGGLER_POLICY_UNSPECIFIED"
    max_staleness: int | None = Field(
        default=None, ge=0, le=2**31 - 1, description="async: refuse pushes more steps behind")
    scale_lr_by_staleness: bool = Field(default=False,
                                        description="async: lr * 1 / (1 + staleness)")
    exchange: bool = Field(
        default=False, description="One shard of a sharded model: full rounds are staged "
        "and applied by a commit carrying sums over every shard")


Labels = Annotated[dict[str, str], Field(max_length=64)]


class CreateSessionRequest(_Request):
    """The proto's SessionSpec, and the initial values (``initial``: OIP tensors)."""

    session_id: str = Field(description="1-128 letters, digits, '.', '_' or '-'")
    algorithm: Algorithm
    tensors: list[TensorSpec] = Field(min_length=1)
    groups: list[Group] = Field(default_factory=list,
                                description="Parameter groups; empty: one with the defaults")
    dtype: StateDtype = "STATE_DTYPE_UNSPECIFIED"
    schedule: Schedule | None = Field(default=None, description="absent: none")
    max_grad_norm: Number | None = Field(default=None, description="absent: no clipping")
    clip_per_tensor: bool = False
    skip_nonfinite: bool | None = Field(default=None, description="absent: true")
    workers: Workers | None = Field(default=None, description="absent: one worker")
    labels: Labels = Field(default_factory=dict, description="Free-form labels kept with the "
                           "session and its checkpoints")
    semantics: Semantics = "SEMANTICS_UNSPECIFIED"
    state_dtype: MomentDtype = "STATE_DTYPE_UNSPECIFIED"
    initial: list[TensorIn] = Field(
        default_factory=list, description="Initial parameter values; others start at zero")


class AddTensorsRequest(_Request):
    """The proto's AddTensorsSpec (the session is the path's), and initial values."""

    tensors: list[TensorSpec] = Field(
        description="The new tensors, appended after the session's; names must be new. "
        "With 'new_group', each one's group must be the new group's index (the session's "
        "current number of groups)")
    new_group: Group | None = Field(
        default=None, description="Hyperparameters of a new parameter group for the new "
        "tensors (keys left out take the algorithm's defaults); absent: no new group, the "
        "tensors join existing ones")
    initial: list[TensorIn] = Field(
        default_factory=list, description="Initial values of new tensors; others start at zero")


class SharedMemoryRef(_Request):
    """A place in a registered shared-memory region (proto SharedMemoryRef)."""

    region: Name = Field(description="The region's name, as registered")
    offset: int = Field(default=0, ge=0, le=2**63 - 1,
                        description="Where the bytes start, from the start of the region")
    byte_size: int = Field(default=0, ge=0, le=2**63 - 1,
                           description="How many bytes: offset + byte_size lie within the region")


_GRADIENTS_REGION = ("Same-host shared memory: the gradients of every tensor of the session, "
                     "packed in the session's tensor order, as gradients_datatype, at this place "
                     "of a registered region; 'gradients' is then empty")


class StepRequest(_Request):
    """The proto's StepHeader (the session is the path's) and the gradients."""

    gradients: list[TensorIn] = Field(description="The gradients; empty with gradients_region")
    return_datatype: Datatype = Field(
        default="FP32", description="Wire datatype of the updated parameters returned")
    binary_output: bool = Field(
        default=False, description="Return parameters in the binary layout "
        "(also chosen by 'Accept: application/octet-stream')")
    require_all: bool = Field(
        default=False, description="Refuse the step unless every tensor has a gradient")
    worker_id: str | None = Field(
        default=None, min_length=1, max_length=128,
        description="Exactly once: who sends this step (with 'sequence'). A (worker_id, "
        "sequence) the session applied before is acknowledged with duplicate=true and not "
        "applied again, also after a restart, so a lost answer can be retried safely")
    sequence: int | None = Field(
        default=None, ge=1, le=2**63 - 1,
        description="The worker's step number: 1, 2, 3, ... (with 'worker_id')")
    base_step: int | None = Field(
        default=None, ge=0, le=2**63 - 1,
        description="The step whose parameters the gradient was computed from: sync sessions "
        "refuse a push for a step already applied (409), async ones use it for staleness")
    gradients_region: SharedMemoryRef | None = Field(default=None,
                                                     description=_GRADIENTS_REGION)
    gradients_datatype: Datatype = Field(default="FP32",
                                         description="Datatype of the gradients_region")
    params_region: SharedMemoryRef | None = Field(
        default=None, description="Same-host shared memory: write the updated parameters of "
        "every tensor, packed in the session's tensor order, as return_datatype, at this place "
        "of a registered region; the response then carries none")
    return_rows: bool = Field(
        default=False, description="Of each gradient sent with 'rows', return only those "
        "rows of its parameters (the other tensors whole)")


class PushRequest(_Request):
    gradients: list[TensorIn] = Field(description="The gradients; empty with gradients_region")
    require_all: bool = False
    worker_id: str | None = Field(default=None, min_length=1, max_length=128,
                                  description="As in a step request")
    sequence: int | None = Field(default=None, ge=1, le=2**63 - 1,
                                 description="As in a step request")
    base_step: int | None = Field(default=None, ge=0, le=2**63 - 1,
                                  description="As in a step request")
    gradients_region: SharedMemoryRef | None = Field(default=None,
                                                     description=_GRADIENTS_REGION)
    gradients_datatype: Datatype = Field(default="FP32",
                                         description="Datatype of the gradients_region")
    params_region: SharedMemoryRef | None = Field(default=None,
                                                  description="Ignored: a push returns nothing")


class ParametersRequest(_Request):
    values: list[TensorIn] = Field(
        description="New values of whole tensors (others keep theirs); the optimizer state "
        "and step count are kept")


class PullRequest(_Request):
    names: list[str] = Field(default_factory=list, description="Tensors to return; empty: all")
    datatype: Datatype = "FP32"
    binary_output: bool = False
    min_step: Step = Field(default=0, description="Wait until the session reaches this step "
                           "(409 if its round fails)")
    timeout: Duration | None = Field(default=None, description="How long to wait for min_step "
                                     "(408 after); absent: the server's limit (600 s)")
    rows: list[RowSelection] = Field(
        default_factory=list, description="Only these rows of these tensors (after the "
        "tensors of 'names', which come whole; none without names)")


class CommitRequest(_Request):
    step: int = Field(ge=1, le=2**63 - 1, description="The staged step")
    tensor_sumsq: list[Number] = Field(
        description="Per tensor of this session: the gradient's sum of squares over the "
        "whole model tensor it is part of")
    total_sumsq: Number = Field(description="Sum of squares of the whole gradient")
    param_sumsq: list[Number] = Field(default_factory=list,
                                      description="LAMB's second commit: whole-tensor totals")
    update_sumsq: list[Number] = Field(default_factory=list, description="See param_sumsq")
    return_datatype: Datatype = "FP32"
    skip_params: bool = Field(default=False, description="Return no parameters")
    round_id: Step = Field(default=0, description="The round the push's answer named (0: "
                           "whichever is staged for step)")
    binary_output: bool = False


class SetWorkersRequest(_Request):
    count: int = Field(ge=1, le=512, description="The new number of workers")


class RestoreCheckpointRequest(_Request):
    step: Step = Field(description="The checkpoint's step")


class SetHyperparametersRequest(_Request):
    group: int = Field(default=0, ge=0, le=2**31 - 1, description="The group to change")
    changes: Group = Field(description="Keys left out keep their values")


class SetScheduleRequest(_Request):
    schedule: Schedule | None = Field(default=None, description="absent or null: no schedule")


# -- responses: the proto's messages in its JSON mapping ------------------------------


class Session(_Response):
    """A session as it is now (proto Session); optional fields are left out when absent."""

    session_id: str
    algorithm: Algorithm
    dtype: StateDtype
    step: int
    tensors: list[TensorSpec]
    groups: list[Group] = Field(description="Every key of each group")
    lr: list[float] = Field(description="The lr the next step uses, per group")
    schedule: Schedule | None = Field(default=None, description="absent: none")
    max_grad_norm: float | None = Field(default=None, description="absent: no clipping")
    clip_per_tensor: bool
    skip_nonfinite: bool
    state_bytes: int
    checkpointed_step: int | None = Field(default=None, description="Step of the last durable "
                                          "checkpoint; absent when there is none")
    backend: Backend
    workers: Workers
    labels: dict[str, str]
    tenant: str = Field(default="", description="The owner; \"\" the default tenant. An admin "
                        "names another tenant's session as <tenant>~<session_id>")
    semantics: Semantics
    state_dtype: StateDtype = Field(description="The moments' precision")
    bytes_per_parameter: float = Field(description="Bytes of the master parameters and the "
                                       "moments per parameter (12 for float32 Adam)")
    moment_bytes: int = Field(description="Bytes of the moment buffers")


class RoundStatus(_Response):
    round_id: int = Field(description="The round the push joined, for its commit")
    contributors: int = Field(description="sync: gradients averaged")
    missing_workers: list[str] = Field(description="sync: workers absent from this step")
    staleness: int = Field(description="async: steps behind base_step was")


class ExchangeSums(_Response):
    grad_sumsq: list[float] = Field(description="A staged step's per-tensor sums of squares")
    param_sumsq: list[float] = Field(description="LAMB, first commit")
    update_sumsq: list[float] = Field(description="LAMB, first commit")


class StepResponse(_Response):
    """The proto's StepStatus, and the parameters (``params``: OIP tensors)."""

    step: int = Field(description="The session's step count after this request")
    skipped: bool = Field(description="True when a gradient held NaN or Inf; nothing changed")
    grad_norm: float | None = Field(default=None, description="absent: not computed")
    nonfinite: list[str] = Field(description="Tensors whose gradient held NaN or Inf")
    duplicate: bool = Field(description="The (worker_id, sequence) was applied before: "
                            "nothing changed; the parameters are the current ones")
    pending: bool = Field(description="In a round not applied yet, or staged for its commit: "
                          "no parameters")
    round: RoundStatus | None = Field(default=None, description="Sessions of several workers")
    exchange: ExchangeSums | None = Field(default=None, description="Exchange sessions")
    params: list[TensorOut] = Field(default_factory=list)


class PullResponse(_Response):
    params: list[TensorOut]


class ListSessionsResponse(_Response):
    sessions: list[Session] = Field(description="One page, ordered by id")
    next_page_token: str = Field(description="Token of the next page; empty on the last")


class CheckpointInfo(_Response):
    session_id: str
    step: int
    path: str
    size_bytes: int


class ListCheckpointsResponse(_Response):
    steps: list[int] = Field(description="Steps of the complete checkpoints, oldest first")


class SharedMemoryRegion(_Request):
    """A shared-memory region (proto SharedMemoryRegion): the body of a registration,
    and what the server answers about one."""

    name: Name = Field(description="The name requests use for it: 1-128 letters, digits, "
                       "'_', '-', '.'")
    key: Name = Field(description="The POSIX shared-memory object (what shm_open takes, "
                      "without the leading '/')")
    byte_size: int = Field(ge=0, le=2**63 - 1,
                           description="The bytes of the object the server maps, from its start")


class ListSharedMemoryResponse(_Response):
    regions: list[SharedMemoryRegion] = Field(description="Ordered by name")


class ErrorBody(BaseModel):
    error: str = Field(description="What was wrong and what was expected")
    code: str = Field(description="invalid_argument, not_found, already_exists, "
                      "failed_precondition, resource_exhausted, unauthenticated, internal, ...")
    reason: str = Field(description="Stable and machine-readable, as the gRPC ErrorInfo's: "
                        "SESSION_NOT_FOUND, STALE_PUSH, ROUND_ABORTED, ... (see the proto)")
    metadata: dict[str, str] = Field(description='Context, e.g. {"session_id": "s", '
                                     '"step": "3"}')


class Health(BaseModel):
    status: str
