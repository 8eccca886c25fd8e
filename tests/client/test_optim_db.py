"""torch's own optimizer database, end to end through the client.

Table-driven over ``torch.testing._internal.common_optimizers.optim_db`` for the seven
torch algorithms the server runs (Adam, AdamW, NAdam, RAdam, Adamax, Adagrad, RMSprop),
on the CPU, in float32 and float64:

* every ``optim_inputs_func`` input: ``torch.optim.X`` and ``adamserve_client.X`` with
  the same keyword arguments train identical parameters on the same gradients; the
  parameters and the whole ``state_dict()`` (slots, values, dtypes, param_groups) must
  be the same. torch's own expansion of each input with the implementation switches it
  supports on the CPU (``& fused``, ``& differentiable``) and the inputs torch lists only
  for accelerators (``capturable``, Tensor lr...) run too: there the client must do
  exactly what torch does on the CPU, train the same or raise the same error at the same
  moment (construction or step);
* every ``optim_error_inputs_func`` input: the client raises (or warns) the same
  exception type with torch's exact message, at the moment torch does; construction
  errors before any network call (the optimizer is also built against a URL nothing
  listens on);
* a grid of the implementation switches, Tensor hyperparameters and parameter kinds:
  ``validation.check_constructor`` / ``check_step`` raise exactly what torch does.

``optim_inputs_func(device="cpu")`` leaves out what the CPU cannot run; nothing here is
skipped.
"""

from __future__ import annotations

import inspect
import itertools
import re
import socket
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from copy import deepcopy
from dataclasses import dataclass
from typing import Any

import pytest
import torch
from torch.testing._internal.common_optimizers import (
    OptimizerErrorEnum,
    _get_optim_inputs_including_global_cliquey_kwargs,
    optim_db,
)

import adamserve_client as ac
from adamserve_client import validation

NAMES = ("Adam", "AdamW", "NAdam", "RAdam", "Adamax", "Adagrad", "RMSprop")
INFOS = {info.name: info for info in optim_db if info.name in NAMES}
KEYS = {"Adam": "adam", "AdamW": "adamw", "NAdam": "nadam", "RAdam": "radam",
        "Adamax": "adamax", "Adagrad": "adagrad", "RMSprop": "rmsprop"}
DTYPES = {"float32": torch.float32, "float64": torch.float64}
# float64: the server is torch-exact; float32: rounding differences of the kernels
TOLERANCE = {torch.float64: (1e-12, 1e-14), torch.float32: (1e-6, 1e-7)}  # rtol, atol
SHAPES = [(3, 4), (5,), (2, 1, 3)]
STEPS = 3


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "_", text).strip("_") or "default"


def _cls(name: str, remote: bool) -> Callable[..., Any]:
    return getattr(ac if remote else torch.optim, name)  # type: ignore[no-any-return]


# -- the inputs --------------------------------------------------------------------------


@dataclass(frozen=True)
class Input:
    """One optimizer input of the database: ``kind`` says where it comes from."""

    name: str
    kind: str  # "db": optim_inputs_func(cpu); "impl": its cliquey expansion; "accel"
    desc: str
    kwargs: dict[str, Any]

    @property
    def id(self) -> str:
        return f"{self.name}-{self.kind}-{_slug(self.desc)}"


def _inputs() -> list[Input]:
    out: list[Input] = []
    for name in NAMES:
        info = INFOS[name]
        cpu = info.optim_inputs_func(device="cpu")
        out += [Input(name, "db", i.desc, i.kwargs) for i in cpu]
        # torch's own expansion with the switches it tests on the CPU; the all-False base
        # config of each is the plain input again, so only the "& flag" variants are new
        for i in _get_optim_inputs_including_global_cliquey_kwargs("cpu", None, info):
            if " & " in i.desc:
                out.append(Input(name, "impl", i.desc, i.kwargs))
        # inputs torch lists for accelerators only (capturable, Tensor lr...): on the CPU
        # torch refuses most at step; the client must refuse them the same way
        seen = {i.desc for i in cpu}
        for device in ("cuda", "mps"):
            for i in info.optim_inputs_func(device=device):
                if i.desc not in seen:
                    seen.add(i.desc)
                    out.append(Input(name, "accel", f"{device} {i.desc}", i.kwargs))
    return out


INPUTS = _inputs()
DB_INPUTS = [i for i in INPUTS if i.kind == "db"]
OTHER_INPUTS = [i for i in INPUTS if i.kind != "db"]
# over HTTP: for each algorithm its input with the most arguments
HTTP_INPUTS = [max((i for i in DB_INPUTS if i.name == n), key=lambda i: len(i.kwargs))
               for n in NAMES]


def make_params(dtype: torch.dtype, seed: int = 0) -> list[torch.nn.Parameter]:
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, generator=g, dtype=dtype)) for s in SHAPES]


def layout(params: list[torch.nn.Parameter], groups: bool,
           kwargs: dict[str, Any], cls: Callable[..., Any]) -> list[Any]:
    """The parameters as passed: one list, or two groups (the second with its own lr)."""
    if not groups:
        return list(params)
    lr = kwargs.get("lr", inspect.signature(cls).parameters["lr"].default)
    return [{"params": params[:2]}, {"params": params[2:], "lr": 0.5 * float(lr)}]


def grads(step: int, dtype: torch.dtype) -> list[torch.Tensor | None]:
    g = torch.Generator().manual_seed(100 + step)
    out: list[torch.Tensor | None] = [torch.randn(s, generator=g, dtype=dtype) for s in SHAPES]
    if step == 1:
        out[1] = None  # torch leaves a parameter without a gradient alone
    return out


# -- running one side ----------------------------------------------------------------------


@dataclass
class Outcome:
    """What one optimizer did with an input: trained (``error`` None) or raised."""

    stage: str  # "construct", "step" or "done"
    error: BaseException | None
    params: list[torch.nn.Parameter]
    state: dict[str, Any] | None

    def describe(self) -> str:
        if self.error is None:
            return "trained"
        return f"{type(self.error).__name__} at {self.stage}: {self.error}"


@contextmanager
def remote_closed(opts: list[Any]) -> Iterator[None]:
    try:
        yield
    finally:
        for opt in opts:
            opt.close(delete=True)


def run(name: str, kwargs: dict[str, Any], dtype: torch.dtype, groups: bool,
        remote: dict[str, Any] | None, opened: list[Any]) -> Outcome:
    """Train ``STEPS`` steps with torch's class (``remote`` None) or ours."""
    cls = _cls(name, remote is not None)
    params = make_params(dtype)
    kwargs = deepcopy(kwargs)
    try:
        opt = cls(layout(params, groups, kwargs, cls), **kwargs, **(remote or {}))
    except Exception as e:
        return Outcome("construct", e, params, None)
    if remote is not None:
        opened.append(opt)
    for step in range(STEPS):
        for p, g in zip(params, grads(step, dtype), strict=True):
            p.grad = g
        try:
            opt.step()
        except Exception as e:
            return Outcome("step", e, params, None)
    return Outcome("done", None, params, opt.state_dict())


def assert_same_value(ours: Any, theirs: Any, where: str, tol: tuple[float, float]) -> None:
    if isinstance(theirs, torch.Tensor):
        assert isinstance(ours, torch.Tensor), f"{where}: {ours!r} is not a Tensor"
        torch.testing.assert_close(ours, theirs, rtol=tol[0], atol=tol[1],
                                   msg=lambda m: f"{where}: {m}")
    elif isinstance(theirs, tuple | list):
        assert isinstance(ours, tuple | list) and len(ours) == len(theirs), \
            f"{where}: {ours!r} != {theirs!r}"
        for k, (a, b) in enumerate(zip(ours, theirs, strict=True)):
            assert_same_value(a, b, f"{where}[{k}]", tol)
    else:
        assert type(ours) is type(theirs) and ours == theirs, f"{where}: {ours!r} != {theirs!r}"


def tolerance(name: str, kwargs: dict[str, Any], dtype: torch.dtype) -> tuple[float, float]:
    """TOLERANCE, but for two inputs where torch itself rounds a float64 run's scalars to
    float32 (the default dtype) and the server keeps them in float64: NAdam's running
    ``mu_product`` (a 0-d tensor of the default dtype: ~2e-10 relative after 3 steps),
    and a float32 Tensor ``lr``, whose step-size arithmetic torch does in float32."""
    lr = kwargs.get("lr")
    if dtype == torch.float64 and name == "NAdam":
        return (1e-9, 1e-14)
    if dtype == torch.float64 and isinstance(lr, torch.Tensor) and lr.dtype == torch.float32:
        return (1e-7, 1e-14)
    return TOLERANCE[dtype]


def assert_same_outcome(ours: Outcome, theirs: Outcome, dtype: torch.dtype,
                        tol: tuple[float, float] | None = None) -> None:
    assert ours.describe() == theirs.describe()
    if theirs.error is not None:
        assert type(ours.error) is type(theirs.error)
        return
    tol = tol or TOLERANCE[dtype]
    for i, (a, b) in enumerate(zip(ours.params, theirs.params, strict=True)):
        assert_same_value(a.detach(), b.detach(), f"parameter {i}", tol)
    assert ours.state is not None and theirs.state is not None
    mine, ref = ours.state, theirs.state
    assert mine.keys() == ref.keys()
    assert mine["state"].keys() == ref["state"].keys()
    for k, entry in ref["state"].items():
        assert set(mine["state"][k]) == set(entry), f"state[{k}] slots"
        for slot, value in entry.items():
            assert_same_value(mine["state"][k][slot], value, f"state[{k}][{slot!r}]", tol)
    assert len(mine["param_groups"]) == len(ref["param_groups"])
    for g, (a, b) in enumerate(zip(mine["param_groups"], ref["param_groups"], strict=True)):
        assert set(a) == set(b), f"param_groups[{g}] keys"
        for key, value in b.items():
            assert_same_value(a[key], value, f"param_groups[{g}][{key!r}]", (0.0, 0.0))


def check_input(inp: Input, dtype: torch.dtype, url: str, sid: str, groups: bool) -> None:
    opened: list[Any] = []
    with remote_closed(opened):
        theirs = run(inp.name, inp.kwargs, dtype, groups, None, opened)
        if inp.kind == "db":
            assert theirs.error is None, f"torch refused a CPU input: {theirs.describe()}"
        ours = run(inp.name, inp.kwargs, dtype, groups, {"server": url, "session": sid},
                   opened)
        assert_same_outcome(ours, theirs, dtype, tolerance(inp.name, inp.kwargs, dtype))


# -- success inputs ------------------------------------------------------------------------


@pytest.mark.parametrize("url", ["grpc"], indirect=True)
@pytest.mark.parametrize("dtype", list(DTYPES.values()), ids=list(DTYPES))
@pytest.mark.parametrize("inp", DB_INPUTS, ids=[i.id for i in DB_INPUTS])
def test_db_inputs_train_as_torch(url: str, sid: str, inp: Input, dtype: torch.dtype) -> None:
    check_input(inp, dtype, url, sid, groups=False)


@pytest.mark.parametrize("url", ["grpc"], indirect=True)
@pytest.mark.parametrize("inp", DB_INPUTS, ids=[i.id for i in DB_INPUTS])
def test_db_inputs_with_two_param_groups(url: str, sid: str, inp: Input) -> None:
    check_input(inp, torch.float64, url, sid, groups=True)


@pytest.mark.parametrize("url", ["http"], indirect=True)
@pytest.mark.parametrize("dtype", list(DTYPES.values()), ids=list(DTYPES))
@pytest.mark.parametrize("inp", HTTP_INPUTS, ids=[i.id for i in HTTP_INPUTS])
def test_db_inputs_over_http(url: str, sid: str, inp: Input, dtype: torch.dtype) -> None:
    check_input(inp, dtype, url, sid, groups=True)


@pytest.mark.parametrize("url", ["grpc"], indirect=True)
@pytest.mark.parametrize("dtype", list(DTYPES.values()), ids=list(DTYPES))
@pytest.mark.parametrize("inp", OTHER_INPUTS, ids=[i.id for i in OTHER_INPUTS])
def test_switch_and_accelerator_inputs_behave_as_torch_on_the_cpu(
        url: str, sid: str, inp: Input, dtype: torch.dtype) -> None:
    check_input(inp, dtype, url, sid, groups=False)


def test_the_table_is_not_empty() -> None:
    counts = {n: sum(i.name == n for i in DB_INPUTS) for n in NAMES}
    assert all(c >= 5 for c in counts.values()), counts
    assert {i.kind for i in OTHER_INPUTS} == {"impl", "accel"}


# -- error inputs ----------------------------------------------------------------------------


@dataclass(frozen=True)
class ErrorInput:
    name: str
    index: int
    dtype: torch.dtype

    def get(self) -> Any:
        """A fresh ErrorOptimizerInput (with fresh sample parameters)."""
        info = INFOS[self.name]
        return info.optim_error_inputs_func(device="cpu", dtype=self.dtype)[self.index]

    @property
    def id(self) -> str:
        e = self.get()
        return (f"{self.name}-{str(self.dtype).removeprefix('torch.')}-{self.index:02d}-"
                f"{_slug(e.optimizer_error_input.desc)}")


ERROR_INPUTS = [ErrorInput(name, k, dtype) for name in NAMES for dtype in DTYPES.values()
                for k in range(len(INFOS[name].optim_error_inputs_func(device="cpu",
                                                                        dtype=dtype)))]


def _dead_url(url: str) -> str:
    """A URL of the same transport where nothing listens."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"{url.split('://')[0]}://127.0.0.1:{port}"


def _torch_error(e: Any, cls: Callable[..., Any]) -> BaseException | Warning:
    """What torch raises (or warns) for the input, checked against the database."""
    oi = e.optimizer_error_input
    params, kwargs = oi.params, oi.kwargs
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            opt = cls(params, **kwargs)
            if e.error_on == OptimizerErrorEnum.STEP_ERROR:
                opt.step()
        except Exception as exc:
            raised: BaseException = exc
            assert type(raised) is e.error_type, raised
            assert re.search(e.error_regex, str(raised)), (e.error_regex, str(raised))
            return raised
    found: Warning | None = None
    assert issubclass(e.error_type, Warning), f"torch raised nothing for {oi.desc}"
    for w in caught:
        if isinstance(w.message, e.error_type) and re.search(e.error_regex, str(w.message)):
            found = w.message
    assert found is not None, [str(w.message) for w in caught]
    return found


@pytest.mark.parametrize("case", ERROR_INPUTS, ids=[c.id for c in ERROR_INPUTS])
def test_error_inputs_raise_as_torch(url: str, sid: str, case: ErrorInput) -> None:
    e = case.get()
    expected = _torch_error(e, _cls(case.name, remote=False))
    ours = _cls(case.name, remote=True)
    oi = e.optimizer_error_input
    if isinstance(expected, Warning):
        # the one warning input, duplicate parameters: torch warns, then the client
        # refuses it (see test_a_parameter_listed_twice_is_refused)
        assert "duplicate parameters" in str(expected)
        with pytest.warns(type(expected)) as record, pytest.raises(
                ValueError, match="appears in the optimizer more than once"):
            ours(oi.params, **oi.kwargs, server=url, session=sid)
        assert str(expected) in [str(w.message) for w in record]
        return
    if e.error_on == OptimizerErrorEnum.CONSTRUCTION_ERROR:
        for server in (_dead_url(url), url):  # raised before any network call
            with pytest.raises(type(expected)) as info:
                ours(oi.params, **oi.kwargs, server=server, session=sid, timeout=2.0)
            assert type(info.value) is type(expected)
            assert str(info.value) == str(expected)
            assert re.search(e.error_regex, str(info.value))
        return
    opt = ours(oi.params, **oi.kwargs, server=url, session=sid)  # pragma: no cover - none
    try:  # on the CPU in torch 2.13; kept for the database's next STEP_ERROR input
        with pytest.raises(type(expected)) as info:
            opt.step()
        assert str(info.value) == str(expected)
    finally:
        opt.close(delete=True)


@pytest.mark.parametrize("name", NAMES)
def test_a_parameter_listed_twice_is_refused(name: str) -> None:
    """The database's one warning input ("a param group cannot have duplicate
    parameters"): torch warns that this will become an error and applies the update
    twice per step; the client refuses it at once, naming the parameter, before any
    network call (a deliberate difference: the alternative is a silently other result)."""
    p = make_params(torch.float64)[0]
    with pytest.warns(UserWarning, match="duplicate parameters"):
        _cls(name, False)([p, p])
    with pytest.warns(UserWarning, match="duplicate parameters"), pytest.raises(
            ValueError, match=r"^parameter 1 of group 0 appears in the optimizer more than "
            r"once \(torch warns that this will become an error\)"):
        _cls(name, True)([p, p], server=_dead_url("grpc://127.0.0.1:1"))


@pytest.mark.parametrize("url", ["grpc"], indirect=True)
@pytest.mark.parametrize("name", [n for n in NAMES if n != "Adagrad"])
def test_a_sparse_gradient_is_refused_as_torch_refuses_it(url: str, name: str) -> None:
    emb = torch.nn.Embedding(4, 2, sparse=True)
    emb(torch.tensor([1, 2])).sum().backward()
    errors = []
    for remote in (False, True):
        opt = _cls(name, remote)(emb.parameters(), **({"server": url} if remote else {}))
        with pytest.raises(RuntimeError) as info:
            opt.step()
        errors.append(str(info.value))
        if remote:
            opt.close()
    assert errors[0] == errors[1]


# -- the switches grid: validation.py against torch ------------------------------------------

SWITCHES = {"foreach": (None, False, True), "fused": (None, False, True),
            "capturable": (False, True), "differentiable": (False, True)}


@dataclass(frozen=True)
class GridCase:
    name: str
    switches: tuple[tuple[str, Any], ...]
    lr: str  # "float", "tensor", "tensor2" (2 elements)
    betas: str  # "float", "tensor", "mixed"
    leaf: bool  # nn.Parameter (autograd leaves) or plain tensors
    override: tuple[tuple[str, Any], ...]  # the second group's own switches
    idle: bool = False  # no parameter of the second group has a gradient

    @property
    def id(self) -> str:
        sw = ",".join(f"{k}={v}" for k, v in self.switches)
        ov = ",".join(f"{k}={v}" for k, v in self.override)
        return (f"{self.name}-{sw}-lr={self.lr}-betas={self.betas}-"
                f"{'leaf' if self.leaf else 'plain'}-g2[{ov}]{'-idle' if self.idle else ''}")


def _grid() -> list[GridCase]:
    cases = []
    for name in NAMES:
        accepted = inspect.signature(_cls(name, remote=False)).parameters
        keys = [k for k in SWITCHES if k in accepted]
        combos = list(itertools.product(*(SWITCHES[k] for k in keys)))
        betas_kinds = ("float", "tensor", "mixed") if name in ("Adam", "AdamW") else ("float",)
        for n, combo in enumerate(combos):
            # the second group takes another combination's switches, except
            # differentiable, which torch reads from the defaults (see validation.py)
            other = combos[len(combos) - 1 - n]
            override = tuple((k, v) for k, v in zip(keys, other, strict=True)
                             if k != "differentiable")
            for lr, betas, leaf in itertools.product(("float", "tensor"), betas_kinds,
                                                     (True, False)):
                cases.append(GridCase(name, tuple(zip(keys, combo, strict=True)), lr, betas,
                                      leaf, override if not leaf else (),
                                      idle=not leaf and n % 2 == 1))
        cases.append(GridCase(name, (), "tensor2", "float", True, ()))
    return cases


GRID = _grid()


def _grid_kwargs(case: GridCase) -> dict[str, Any]:
    kwargs: dict[str, Any] = dict(case.switches)
    kwargs["lr"] = {"float": 1e-3, "tensor": torch.tensor(1e-3),
                    "tensor2": torch.tensor([1e-3, 1e-3])}[case.lr]
    if case.betas == "tensor":
        kwargs["betas"] = (torch.tensor(0.9), torch.tensor(0.99))
    elif case.betas == "mixed":
        kwargs["betas"] = (torch.tensor(0.9), 0.99)
    return kwargs


def _grid_params(case: GridCase) -> tuple[list[Any], list[torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    ts = [torch.randn(s, generator=g) for s in SHAPES]
    params: list[torch.Tensor] = [torch.nn.Parameter(t) for t in ts] if case.leaf else ts
    for p in params[:2]:
        p.grad = torch.randn(p.shape, generator=g)  # the last one has no gradient
    if case.override:
        cut = 2 if case.idle else 1
        return [{"params": params[:cut]}, {"params": params[cut:], **dict(case.override)}], params
    return params, params


def _outcome(fn: Callable[[], None]) -> tuple[str, str] | None:
    try:
        fn()
    except Exception as e:
        return type(e).__name__, str(e)
    return None


def _grid_mismatch(case: GridCase) -> str | None:
    """torch's and validation.py's outcomes for one case, when they differ."""
    cls = _cls(case.name, remote=False)
    kwargs = _grid_kwargs(case)
    arranged, params = _grid_params(case)
    # the constructor's view of the arguments, as RemoteOptimizer builds it
    defaults = {k: p.default for k, p in inspect.signature(cls).parameters.items()
                if p.default is not inspect.Parameter.empty}
    defaults.update(kwargs)
    built: list[Any] = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        t_init = _outcome(lambda: built.append(cls(arranged, **kwargs)))
        t_step = _outcome(built[0].step) if built else None
    key = KEYS[case.name]
    o_init = _outcome(lambda: validation.check_constructor(key, defaults))
    o_step = None
    if built and o_init is None:
        o_step = _outcome(lambda: validation.check_step(key, built[0].param_groups, params))
    if (t_init, t_step) == (o_init, o_step):
        return None
    return f"{case.id}: torch {t_init} / {t_step}, ours {o_init} / {o_step}"


def test_switches_grid_is_torch_exact() -> None:
    """Every case at once (about 1100, a millisecond each): validation.py raises what
    torch 2.13 raises, at construction or at step, or nothing when torch trains."""
    mismatches = [m for m in map(_grid_mismatch, GRID) if m is not None]
    assert not mismatches, "\n".join(mismatches[:40])
    assert len(GRID) > 1000
