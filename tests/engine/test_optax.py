"""semantics="optax" in the engine: every optax alias against optax 0.2 on jax's CPU.

Each case runs 30 steps of :class:`FlatOptimizer` (the table's ``optax.<alias>`` row) and
of optax's alias on the same parameters and gradients, float32 and float64 (jax with
x64 on), and compares the parameters and the state. The parameters are four tensors in
two groups of different hyperparameters (optax.multi_transform on the oracle's side): a
matrix whose largest dim is its last (130 x 160), a vector, a 3-D tensor factored over
its first and last dims (140 x 3 x 129: Adafactor's general axes) and a small 3-D one
that no Adafactor factors. optax runs its update under ``jax.jit``, as training does
(jax's op-by-op mode rounds ``b2**count`` differently in the last bit).

Then a server schedule on learning_rate against optax with the same schedule function,
the parallel kernels against their serial twins (which the cases run), the table's
rows (optax's signatures) and :func:`qualified`, the refusals (optax's names only,
dtypes, Adafactor's fixed factoring, a decay_offset past the count), the CUDA source
compiled with nvcc (where it is installed) and the CUDA kernels against the CPU's
(skipped without CuPy and a device).
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Iterator
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest

from adamserve.engine import algorithms as alg
from adamserve.engine.optimizer import FlatOptimizer, Layout, TensorSpec
from adamserve.engine.schedules import Cosine, warmup
from adamserve.engine.statedict import export_state
from adamserve.errors import FailedPrecondition
from adamserve_proto import algorithms as table

jax = pytest.importorskip("jax", reason="jax is the oracle of semantics='optax'")
jnp = pytest.importorskip("jax.numpy")
optax = pytest.importorskip("optax")

Arr = npt.NDArray[Any]

STEPS = 30
TOL = {"float32": 1e-5, "float64": 1e-12}
# (name, shape, group): group 0 first, as a client lays a session out
TENSORS = (("w", (130, 160), 0), ("b", (7,), 0), ("t", (140, 3, 129), 1), ("k", (3, 4, 5), 1))
LAYOUT = Layout(tuple(TensorSpec(n, s, g) for n, s, g in TENSORS))

# (alias, group 0, group 1): non-default hyperparameters, different per group
CASES: list[tuple[str, dict[str, Any], dict[str, Any]]] = [
    ("adam", {"learning_rate": 3e-3, "eps_root": 1e-6},
     {"learning_rate": 1e-2, "b1": 0.8, "b2": 0.99, "eps": 1e-6, "nesterov": True,
      "mu_dtype": "float32"}),
    ("adamw", {"learning_rate": 3e-3, "weight_decay": 0.05, "eps_root": 1e-8},
     {"learning_rate": 1e-2, "nesterov": True}),
    ("nadam", {"learning_rate": 3e-3, "eps_root": 1e-7},
     {"learning_rate": 1e-2, "nesterov": False, "b1": 0.95}),
    ("nadamw", {"learning_rate": 3e-3, "weight_decay": 0.1},
     {"learning_rate": 1e-2, "b1": 0.95, "mu_dtype": "float32"}),
    ("radam", {"learning_rate": 3e-3, "eps_root": 1e-8},
     {"learning_rate": 1e-2, "b2": 0.99, "nesterov": True, "threshold": 6.0}),
    ("amsgrad", {"learning_rate": 3e-3, "eps_root": 1e-8},
     {"learning_rate": 1e-2, "bias_correction_mu": False, "bias_correction_nu": False}),
    ("adamax", {"learning_rate": 3e-3}, {"learning_rate": 1e-2, "b1": 0.8, "b2": 0.99,
                                         "eps": 1e-6}),
    ("lamb", {"learning_rate": 3e-3, "weight_decay": 0.01, "eps_root": 1e-8},
     {"learning_rate": 1e-2, "b1": 0.85}),
    ("adafactor", {"learning_rate": 1e-2, "momentum": 0.9, "weight_decay_rate": 1e-3,
                   "decay_rate": 0.7},
     {"learning_rate": 3e-2, "clipping_threshold": None, "multiply_by_parameter_scale": False,
      "eps": 1e-20, "momentum": 0.5, "dtype_momentum": None}),
    # learning_rate None (no scaling) with the parameter scale off: steps of RMS about 1
    ("adafactor", {"multiply_by_parameter_scale": False},
     {"learning_rate": 1e-2, "clipping_threshold": 2.0, "decay_offset": 0}),
]


@pytest.fixture(params=["float32", "float64"])
def dtype(request: pytest.FixtureRequest) -> Iterator[str]:
    """The session's dtype, with jax's x64 mode on for float64 (and off after)."""
    x64 = bool(jax.config.jax_enable_x64)
    jax.config.update("jax_enable_x64", request.param == "float64")
    try:
        yield str(request.param)
    finally:
        jax.config.update("jax_enable_x64", x64)


def _oracle_args(group: dict[str, Any]) -> dict[str, Any]:
    """A group as optax's alias takes it (dtypes by name as jnp's)."""
    out = dict(group)
    for key in ("mu_dtype", "dtype_momentum"):
        if key in out:
            out[key] = None if out[key] is None else getattr(jnp, out[key])
    return out


class Run:
    """Our optimizer and optax's on the same parameters, stepped on the same gradients."""

    def __init__(self, alias: str, groups: list[dict[str, Any]], dtype: str,
                 schedule: Any = None, oracle_lr: list[Any] | None = None) -> None:
        self.dtype = dtype
        self.rng = np.random.default_rng(len(alias) * 7 + len(groups[1]))
        self.p0 = {n: self.rng.standard_normal(s).astype(dtype) for n, s, _ in TENSORS}
        self.ours = FlatOptimizer(f"optax.{alias}", LAYOUT, groups, dtype=dtype,
                                  schedule=schedule, params=self._flat(self.p0))
        make = getattr(optax, alias)
        inner = {f"g{g}": make(**_oracle_args({**groups[g], **(
            {"learning_rate": oracle_lr[g]} if oracle_lr else {})})) for g in (0, 1)}
        labels = {n: f"g{g}" for n, _, g in TENSORS}
        self.tx = optax.multi_transform(inner, labels)
        self.params = {n: jnp.asarray(v) for n, v in self.p0.items()}
        self.state = self.tx.init(self.params)
        self.update = jax.jit(self.tx.update)

    @staticmethod
    def _flat(tree: dict[str, Any]) -> Arr:
        return np.concatenate([np.asarray(tree[n]).ravel() for n, _, _ in TENSORS])

    def step(self) -> None:
        grads = {n: self.rng.standard_normal(s).astype(self.dtype) for n, s, _ in TENSORS}
        self.ours.grad[:] = self._flat(grads)
        assert not self.ours.step().skipped
        updates, self.state = self.update({n: jnp.asarray(g) for n, g in grads.items()},
                                          self.state, self.params)
        self.params = optax.apply_updates(self.params, updates)

    def max_diff(self) -> float:
        return float(np.max(np.abs(self.ours.param - self._flat(self.params))))


def _state_of(state: Any, field: str, tensor: str) -> Arr:
    """optax's state ``field`` (mu, v, ...) of ``tensor``, wherever multi_transform and
    chain keep it."""
    if hasattr(state, "_fields"):
        value = getattr(state, field, None)
        if isinstance(value, dict) and hasattr(value.get(tensor), "shape"):
            return np.asarray(value[tensor])
        children: Any = [getattr(state, f) for f in state._fields]
    elif isinstance(state, dict):
        children = list(state.values())
    elif isinstance(state, tuple | list):
        children = list(state)
    else:
        children = []
    for child in children:
        found = _state_of(child, field, tensor)
        if found is not None:
            return found
    return None  # type: ignore[return-value]


@pytest.mark.parametrize(("alias", "group0", "group1"), CASES,
                         ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)])
def test_equals_optax(alias: str, group0: dict[str, Any], group1: dict[str, Any],
                      dtype: str) -> None:
    run = Run(alias, [group0, group1], dtype)
    for _ in range(STEPS):
        run.step()
    diff = run.max_diff()
    print(f"optax.{alias} {dtype}: max |ours - optax| = {diff:.2e}")
    assert diff <= TOL[dtype], f"{alias} {dtype}: max |ours - optax| = {diff:.3e}"
    # the state too, under optax's names: the vector's first moment (Adafactor: its v)
    slots = ("v",) if alias == "adafactor" else ("mu", "nu")
    state = export_state(run.ours)["state"][[n for n, _, _ in TENSORS].index("b")]
    for slot in slots:
        theirs = _state_of(run.state, slot, "b")
        assert np.abs(state[slot] - theirs).max() <= TOL[dtype] * max(
            1.0, float(np.abs(theirs).max())), slot


def _warmup_cosine(base: float, warmup_steps: int, total: int, eta_min: float) -> Any:
    """The server's warmup(W, Cosine(T - W, eta_min)) as an optax schedule, in jnp's default
    float (optax's own warmup_cosine_decay_schedule is the same function, but computes
    in float32 under x64 too)."""
    def lr(count: Any) -> Any:
        t = jnp.asarray(count, dtype=jnp.result_type(float))
        cosine = eta_min + (base - eta_min) * (
            1 + jnp.cos(jnp.pi * (t - warmup_steps) / (total - warmup_steps))) / 2
        return jnp.where(t < warmup_steps, base * (t / warmup_steps), cosine)
    return lr


@pytest.mark.parametrize("alias", ["adamw", "adafactor"])
def test_server_schedule_on_learning_rate(alias: str, dtype: str) -> None:
    """A server schedule (warmup then cosine) scales learning_rate as optax does with
    the same function as its learning rate."""
    base = (3e-3, 1e-2)
    schedule = warmup(5, Cosine(total_steps=STEPS - 5, eta_min=1e-4))
    oracle = [_warmup_cosine(b, 5, STEPS, 1e-4) for b in base]
    groups = [{"learning_rate": b} for b in base]
    run = Run(alias, groups, dtype, schedule=schedule, oracle_lr=oracle)
    lrs = []
    for _ in range(STEPS):
        lrs.append(run.ours.current_lr(1))
        run.step()
    assert lrs[0] == 0.0 and lrs[5] == pytest.approx(base[1])
    diff = run.max_diff()
    print(f"optax.{alias} {dtype} with a server schedule: max |ours - optax| = {diff:.2e}")
    assert diff <= TOL[dtype], f"{alias} {dtype} with a schedule: {diff:.3e}"


@pytest.mark.parametrize("alias", ["adam", "amsgrad", "radam", "adamax", "lamb", "adafactor"])
def test_parallel_kernels_equal_the_serial_ones(alias: str,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """The layout above runs the kernels' serial twins (it is below SERIAL_BELOW); the
    parallel ones, bit for bit alike (float64, the first case's hyperparameters)."""
    from adamserve.engine import kernels_cpu

    groups = next([g0, g1] for a, g0, g1 in CASES if a == alias)
    rng = np.random.default_rng(3)
    p0 = rng.standard_normal(LAYOUT.size)
    grads = [rng.standard_normal(LAYOUT.size) for _ in range(3)]
    params = []
    for serial_below in (0, 1 << 40):
        monkeypatch.setattr(kernels_cpu, "SERIAL_BELOW", serial_below)
        opt = FlatOptimizer(f"optax.{alias}", LAYOUT, groups, dtype="float64", params=p0)
        for g in grads:
            opt.grad[:] = g
            opt.step()
        params.append(opt.param.copy())
    assert np.array_equal(params[0], params[1])


# -- the table, names and refusals ---------------------------------------------------------


def _signature_defaults(fn: Any) -> dict[str, Any]:
    """optax's arguments and defaults, but its masks (out of scope)."""
    params = inspect.signature(fn).parameters
    return {k: p.default for k, p in params.items() if k not in ("mask", "weight_decay_mask")}


@pytest.mark.parametrize("alias", ["adam", "adamw", "nadam", "nadamw", "radam", "amsgrad",
                                   "adamax", "lamb", "adafactor"])
def test_rows_have_optaxs_names_and_defaults(alias: str) -> None:
    row = table.ALGORITHMS[table.qualified(alias, "optax")]
    theirs = _signature_defaults(getattr(optax, alias))
    assert list(row.defaults) == list(theirs)  # optax's order too
    required = {k for k, v in theirs.items() if v is inspect.Parameter.empty}
    assert row.required == required
    for key, value in theirs.items():
        if key in required:
            continue
        ours = row.defaults[key]
        if key in ("mu_dtype", "dtype_momentum"):
            assert ours == (None if value is None else jnp.dtype(value).name), key
        else:
            assert ours == value and type(ours) is type(value), key
    assert row.torch_class is None and row.oracle == f"optax.{alias}" and not row.switches


def test_qualified_and_aliases() -> None:
    assert table.qualified("adam", "optax") == "optax.adam"
    assert table.qualified("Adam", "optax") == "optax.adam"
    assert table.qualified("optax.adam", "optax") == "optax.adam"
    assert table.qualified("adam", "torch") == "adam"
    assert table.SEMANTICS == ("torch", "optax")
    with pytest.raises(ValueError, match="semantics: expected one of torch, optax"):
        table.qualified("adam", "jax")
    assert alg.parse_algorithm("optax.nadam") == (alg.Algorithm.OPTAX_ADAM, {"nesterov": True})
    assert alg.parse_algorithm("OPTAX.NADAMW") == (alg.Algorithm.OPTAX_ADAMW, {"nesterov": True})
    assert alg.parse_algorithm("optax.adafactor") == (alg.Algorithm.OPTAX_ADAFACTOR, {})
    assert alg.SPECS[alg.Algorithm.OPTAX_LAMB].lr_key == "learning_rate"


@pytest.mark.parametrize(("algorithm", "given", "message"), [
    ("optax.adam", {"lr": 1e-3}, "unknown hyperparameter 'lr' for optax.adam"),
    ("optax.adam", {"weight_decay": 0.1}, "unknown hyperparameter 'weight_decay'"),
    ("optax.adam", {"b1": 1.0}, r"b1: expected a value in \[0, 1\)"),
    ("optax.adam", {"mu_dtype": "bfloat16"}, "state_dtype=\"bfloat16\""),
    ("optax.adam", {"mu_dtype": "float16"}, "mu_dtype: expected one of None, 'float32'"),
    ("optax.adam", {"nesterov": 1}, "nesterov: expected true or false"),
    ("optax.adam", {"learning_rate": None}, "learning_rate: expected a number"),
    ("optax.radam", {"threshold": 3.0}, r"threshold: expected a value in \[4, 1e\+06\]"),
    ("optax.adafactor", {"min_dim_size_to_factor": 64},
     "optax's default factoring .*other values are not supported, got 64"),
    ("optax.adafactor", {"factored": False}, "factored: .*not supported, got false"),
    ("optax.adafactor", {"momentum": 1.5}, r"momentum: expected a value in \[0, 1\]"),
    ("optax.adafactor", {"clipping_threshold": 0.0}, "clipping_threshold: expected a value > 0"),
    ("optax.adafactor", {"decay_offset": 1.5}, "decay_offset: expected a whole number"),
    ("optax.adafactor", {"dtype_momentum": "bfloat16"}, "not an accumulator dtype"),
])
def test_refusals(algorithm: str, given: dict[str, Any], message: str) -> None:
    with pytest.raises(alg.HyperparameterError, match=message):
        FlatOptimizer(algorithm, LAYOUT, [given, {}])


def test_a_float64_accumulator_in_a_float32_session_is_refused() -> None:
    """Refused when the session is made, its hyperparameters set or its groups added:
    before any state exists or changes."""
    with pytest.raises(alg.HyperparameterError, match="mu_dtype 'float64'"):
        FlatOptimizer("optax.adam", LAYOUT, [{"mu_dtype": "float64"}, {}])
    opt = FlatOptimizer("optax.adam", LAYOUT, [{}, {}])
    with pytest.raises(alg.HyperparameterError, match="mu_dtype 'float64'"):
        opt.set_hyperparameters(0, {"mu_dtype": "float64"})
    assert opt.groups[0]["mu_dtype"] == FlatOptimizer("optax.adam", LAYOUT, [{}, {}]).groups[0][
        "mu_dtype"]
    f64 = FlatOptimizer("optax.adam", LAYOUT, [{"mu_dtype": "float64"}, {}], dtype="float64")
    alg.check_accumulator_dtypes(f64.algorithm, f64.groups, f64.dtype)


def test_decay_offset_past_the_count_changes_nothing() -> None:
    opt = FlatOptimizer("optax.adafactor", LAYOUT, [{"decay_offset": 2}, {}])
    opt.grad[:] = 1.0
    with pytest.raises(FailedPrecondition, match="decay_offset 2 is past a tensor's step count 0"):
        opt.step()
    assert opt.step_count == 0 and not opt.slots["v"].any()


def test_optax_state_names_and_shapes() -> None:
    """optax's state names; Adafactor's statistics in optax's shapes (v_row without the
    largest dim, v_col without the second largest), ema only with a momentum."""
    opt = FlatOptimizer("optax.adafactor", LAYOUT, [{"learning_rate": 1e-2}, {"momentum": 0.9}])
    assert set(opt.slots) == {"v_row", "v_col", "v", "ema"}
    shapes = {n: {s: opt.slot_shape(s, i) for s in opt.slots} for i, (n, _, _) in
              enumerate(TENSORS)}
    assert shapes["w"] == {"v_row": (130,), "v_col": (160,), "v": None, "ema": (130, 160)}
    assert shapes["t"] == {"v_row": (3, 129), "v_col": (140, 3), "v": None, "ema": (140, 3, 129)}
    assert shapes["k"]["v"] == (3, 4, 5) and shapes["k"]["v_row"] is None
    assert FlatOptimizer("optax.amsgrad", LAYOUT, [{}, {}]).slot_names() == ("mu", "nu", "nu_max")
    assert not FlatOptimizer("optax.lamb", LAYOUT, [{}, {}]).streamable
    assert FlatOptimizer("optax.radam", LAYOUT, [{}, {}], skip_nonfinite=False).streamable


# -- the CUDA kernels against the CPU's ------------------------------------------------------


def test_cuda_kernels_equal_the_cpus() -> None:
    cupy = pytest.importorskip(
        "cupy", reason="CuPy is not installed: GPU kernel tests need CuPy and a CUDA device")
    from adamserve.engine import kernels_cuda

    if kernels_cuda.device_count() == 0:
        pytest.skip("CuPy found no CUDA device: GPU kernel tests need one")
    for alias, group0, group1 in CASES:
        for dtype in ("float32", "float64"):
            rng = np.random.default_rng(0)
            p0 = np.concatenate([rng.standard_normal(s).ravel() for _, s, _ in TENSORS])
            pair = [FlatOptimizer(f"optax.{alias}", LAYOUT, [group0, group1], dtype=dtype,
                                  backend=b, params=p0)
                    for b in (kernels_cuda.CudaBackend(), None)]
            for _ in range(10):
                g = rng.standard_normal(LAYOUT.size).astype(dtype)
                for opt in pair:
                    opt.grad[...] = opt.backend.to_device(g)
                    opt.step()
            got = cupy.asnumpy(pair[0].param)
            np.testing.assert_allclose(got, pair[1].param, rtol=TOL[dtype], atol=TOL[dtype],
                                       err_msg=f"{alias} {dtype}")


def test_the_optax_kernels_compile_with_nvcc(tmp_path: Any,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """The CUDA source with the optax kernels compiles to PTX for both dtypes with the
    backend's NVRTC options, where nvcc is installed (no device needed; CuPy stands in
    as an empty module)."""
    import importlib.util
    import shutil
    import subprocess
    import sys
    import types
    from pathlib import Path

    nvcc = shutil.which("nvcc")
    if nvcc is None:
        pytest.skip("nvcc is not installed: the CUDA source is compiled only where it is")
    monkeypatch.setitem(sys.modules, "cupy", sys.modules.get("cupy") or types.ModuleType("cupy"))
    import adamserve.engine as engine

    spec = importlib.util.spec_from_file_location(
        "_kernels_cuda_optax", Path(engine.__file__).parent / "kernels_cuda.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    ours = [k for k in module._KERNELS if k.startswith("optax_")]
    assert len(ours) == 8
    uses = [f"auto* use_{k}_{c} = &adamserve_{k}<{t}>;"
            for k in ours for c, t in module._CTYPES.items()]
    source = tmp_path / "optax.cu"
    source.write_text(module._SOURCE + "\n" + "\n".join(uses) + "\n")
    done = subprocess.run([nvcc, "-ptx", *module._OPTIONS, "-o", str(tmp_path / "k.ptx"),
                           str(source)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-4000:]
    ptx = (tmp_path / "k.ptx").read_text()
    assert all(f"adamserve_{k}" in ptx for k in ours)


def test_dtype_momentum_counts_only_with_a_momentum() -> None:
    """optax keeps no EMA without a momentum: its dtype_momentum is then not looked at."""
    groups = [{"dtype_momentum": "float64", "learning_rate": 1e-2}, {"momentum": 0.5}]
    opt = FlatOptimizer("optax.adafactor", LAYOUT, groups)
    alg.check_accumulator_dtypes(opt.algorithm, opt.groups, opt.dtype)
    opt.grad[:] = 1.0
    opt.step()
    with pytest.raises(alg.HyperparameterError, match="dtype_momentum 'float64'"):
        opt.set_hyperparameters(0, {"momentum": 0.9})
    assert opt.step_count == 1 and math.isnan(float(opt.groups[0]["momentum"]))
