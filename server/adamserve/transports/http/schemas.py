"""Wire models of the HTTP API: pydantic only, no logic.

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

from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, WithJsonSchema

from adamserve.sessions.session import MAX_ELEMENTS, MAX_RANK

# Wire datatypes, as in adamserve.engine.dtypes.WIRE_DTYPES. Kept a plain string in
# the models (the enum is documentation) so an unknown one gets a message naming
# the tensor, from the transport, rather than a generic literal error.
DATATYPES = ("FP32", "FP64", "FP16", "BF16")
MAX_DIM = MAX_ELEMENTS

Datatype = Annotated[str, Field(json_schema_extra={"enum": list(DATATYPES)},
                                description="FP32, FP64, FP16 or BF16 (little-endian)")]
Dim = Annotated[int, Field(ge=0, le=MAX_DIM)]
Shape = Annotated[list[Dim], Field(max_length=MAX_RANK)]
Name = Annotated[str, Field(min_length=1, max_length=1024)]


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


def _hyper_value(v: Any) -> float | bool | list[float]:
    """A hyperparameter: true/false, a number, or a list of numbers (betas).

    Ranges and names are the engine's to check; this only keeps the JSON types
    the engine expects (a single message instead of one per union branch).
    """
    if isinstance(v, bool):
        return v
    if isinstance(v, list):
        return [_number(x) for x in v]
    if isinstance(v, int | float):
        return _number(v)
    raise ValueError(f"expected a number, true/false or a list of numbers, got {_short(v)}")


HyperValue = Annotated[
    Any,
    AfterValidator(_hyper_value),
    WithJsonSchema({"anyOf": [{"type": "number"}, {"type": "boolean"},
                              {"type": "array", "items": {"type": "number"}}]}),
]
Hyperparameters = dict[str, HyperValue]


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid")


class _Response(BaseModel):
    model_config = ConfigDict(ser_json_inf_nan="constants")


class TensorParameters(BaseModel):
    model_config = ConfigDict(extra="forbid")

    binary_data_size: int | None = Field(
        default=None, ge=0,
        description="Bytes of this tensor in the binary part of the body, in order")


class TensorIn(_Request):
    """A tensor in a request: ``data`` (JSON numbers) or ``parameters.binary_data_size``."""

    name: Name
    shape: Shape
    datatype: Datatype = "FP32"
    data: list[float] | None = Field(
        default=None, description="Flat row-major values, prod(shape) of them")
    parameters: TensorParameters | None = None


class TensorOut(_Response):
    """A tensor in a response: ``data`` in JSON output, ``parameters`` in binary output."""

    name: str
    shape: list[int]
    datatype: str
    data: list[float] | None = None
    parameters: TensorParameters | None = None


class TensorSpecIn(_Request):
    name: Name
    shape: Shape
    group: int = Field(default=0, ge=0, description="Index into 'groups'")


class TensorSpecOut(_Response):
    name: str
    shape: list[int]
    group: int


class WorkersIn(_Request):
    """How the pushes of several workers become steps (see the proto's Workers)."""

    count: int = Field(default=1, ge=1, le=512, description="Workers pushing each step")
    mode: Literal["sync", "async"] = Field(
        default="sync", description="sync: step t is the mean of the workers' gradients; "
        "async: every push is applied on arrival")
    straggler_timeout: float = Field(
        default=0.0, ge=0, description="Seconds from a round's first push; 0: wait forever")
    straggler_policy: Literal["fail", "apply"] = Field(
        default="fail", description="After the timeout: fail the round (409), or apply the "
        "mean of what arrived")
    max_staleness: int | None = Field(
        default=None, ge=0, le=2**31, description="async: refuse pushes more steps behind")
    scale_lr_by_staleness: bool = Field(default=False,
                                        description="async: lr * 1 / (1 + staleness)")
    exchange: bool = Field(
        default=False, description="One shard of a sharded model: full rounds are staged "
        "and applied by a commit carrying sums over every shard")


class WorkersOut(_Response):
    count: int
    mode: str
    straggler_timeout: float
    straggler_policy: str
    max_staleness: int | None
    scale_lr_by_staleness: bool
    exchange: bool


Labels = Annotated[dict[str, str], Field(max_length=64)]


def _one_group() -> list[Hyperparameters]:
    return [{}]


class CreateSessionRequest(_Request):
    session_id: str = Field(description="1-128 letters, digits, '.', '_' or '-'")
    algorithm: str = Field(
        description="adam, adamw, amsgrad, nadam, radam, adamax, adagrad, rmsprop or lamb")
    tensors: list[TensorSpecIn] = Field(min_length=1)
    groups: list[Hyperparameters] = Field(
        default_factory=_one_group, min_length=1,
        description="Parameter groups: torch.optim hyperparameter names, betas as [b1, b2]")
    dtype: Literal["float32", "float64"] = "float32"
    schedule: dict[str, Any] | None = Field(
        default=None, description="A learning-rate schedule, as schedules.to_dict writes it")
    max_grad_norm: float | None = None
    clip_per_tensor: bool = False
    skip_nonfinite: bool = True
    workers: WorkersIn | None = Field(default=None, description="Several workers; null: one")
    labels: Labels = Field(default_factory=dict, description="Free-form labels kept with the "
                           "session and its checkpoints")
    initial: list[TensorIn] = Field(
        default_factory=list, description="Initial parameter values; others start at zero")


class AddTensorsRequest(_Request):
    tensors: list[TensorSpecIn] = Field(
        description="The new tensors, appended after the session's; names must be new. "
        "With 'group', each one's group must be the new group's index (the session's "
        "current number of groups)")
    group: Hyperparameters | None = Field(
        default=None, description="Hyperparameters of a new parameter group for the new "
        "tensors (torch.optim names, betas as [b1, b2]; keys left out take the algorithm's "
        "defaults); null: no new group, the tensors join existing ones")
    initial: list[TensorIn] = Field(
        default_factory=list, description="Initial values of new tensors; others start at zero")


class StepRequest(_Request):
    gradients: list[TensorIn]
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


class PushRequest(_Request):
    gradients: list[TensorIn]
    require_all: bool = False
    worker_id: str | None = Field(default=None, min_length=1, max_length=128,
                                  description="As in a step request")
    sequence: int | None = Field(default=None, ge=1, le=2**63 - 1,
                                 description="As in a step request")
    base_step: int | None = Field(default=None, ge=0, le=2**63 - 1,
                                  description="As in a step request")


class ParametersRequest(_Request):
    values: list[TensorIn] = Field(
        description="New values of whole tensors (others keep theirs); the optimizer state "
        "and step count are kept")


class PullRequest(_Request):
    names: list[str] | None = Field(default=None, description="Tensors to return; all if empty")
    datatype: Datatype = "FP32"
    binary_output: bool = False
    min_step: int = Field(default=0, ge=0, le=2**63 - 1,
                          description="Wait until the session reaches this step (409 if its "
                          "round fails)")
    timeout: float | None = Field(default=None, ge=0, le=86400,
                                  description="Seconds to wait for min_step (408 after)")


class CommitRequest(_Request):
    step: int = Field(ge=1, le=2**63 - 1, description="The staged step")
    tensor_sumsq: list[float] = Field(
        description="Per tensor of this session: the gradient's sum of squares over the "
        "whole model tensor it is part of")
    total_sumsq: float = Field(description="Sum of squares of the whole gradient")
    param_sumsq: list[float] = Field(default_factory=list,
                                     description="LAMB's second commit: whole-tensor totals")
    update_sumsq: list[float] = Field(default_factory=list, description="See param_sumsq")
    return_datatype: Datatype | None = Field(default="FP32",
                                             description="null: no parameters back")
    round: int = Field(default=0, ge=0, le=2**64 - 1, description="The round the push's "
                       "answer named (0: whichever is staged for step)")
    binary_output: bool = False


class WorkersRequest(_Request):
    count: int = Field(ge=1, le=512, description="The new number of workers")


class RestoreRequest(_Request):
    step: int = Field(ge=0, le=2**63 - 1, description="The checkpoint's step")


class CheckpointList(_Response):
    steps: list[int] = Field(description="Steps of the complete checkpoints, oldest first")


class HyperparametersRequest(_Request):
    group: int = Field(default=0, ge=0)
    values: Hyperparameters


class ScheduleRequest(_Request):
    schedule: dict[str, Any] | None = Field(description="null removes the schedule")


class StepResponse(_Response):
    step: int = Field(description="The session's step count after this request")
    skipped: bool = Field(description="True when a gradient held NaN or Inf; nothing changed")
    grad_norm: float | None
    nonfinite: list[str] = Field(description="Tensors whose gradient held NaN or Inf")
    params: list[TensorOut] = Field(default_factory=list)
    duplicate: bool = Field(
        default=False, description="The (worker_id, sequence) was applied before: nothing "
        "changed; the parameters are the current ones")
    staleness: int = Field(default=0, description="async: steps behind base_step was")
    pending: bool = Field(default=False, description="In a round not applied yet, or staged "
                          "for its commit: no parameters")
    contributors: int = Field(default=0, description="sync: gradients averaged")
    missing_workers: list[str] = Field(default_factory=list,
                                       description="sync: workers absent from this step")
    grad_sumsq: list[float] = Field(default_factory=list,
                                    description="A staged step's per-tensor sums of squares")
    param_sumsq: list[float] = Field(default_factory=list, description="LAMB, first commit")
    update_sumsq: list[float] = Field(default_factory=list, description="LAMB, first commit")
    round: int = Field(default=0, description="The round the push joined (sync), for its "
                       "commit")


class PullResponse(_Response):
    params: list[TensorOut]


class SessionOut(_Response):
    id: str
    algorithm: str
    dtype: str
    step: int
    tensors: list[TensorSpecOut]
    groups: list[dict[str, Any]]
    lr: list[float] = Field(description="The lr the next step uses, per group")
    schedule: dict[str, Any] | None
    max_grad_norm: float | None
    clip_per_tensor: bool
    skip_nonfinite: bool
    state_bytes: int
    checkpointed_step: int
    backend: str
    workers: WorkersOut
    labels: dict[str, str]


class SessionList(_Response):
    sessions: list[SessionOut]


class CheckpointOut(_Response):
    session_id: str
    step: int
    path: str
    bytes: int


class ErrorBody(BaseModel):
    error: str = Field(description="What was wrong and what was expected")
    code: str = Field(description="invalid_argument, not_found, already_exists, "
                      "failed_precondition, resource_exhausted, unauthenticated, internal, ...")


class Health(BaseModel):
    status: str
