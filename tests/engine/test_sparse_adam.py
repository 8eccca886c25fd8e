"""SparseAdam in the engine, against torch.optim.SparseAdam (torch 2.13).

The engine is given the rows (along dim 0) each tensor's gradient carries; the rest of
the gradient buffer is NaN here, so a read of a row not given would show (NaN
parameters, or a step skipped as non-finite). torch is given the same rows as a sparse
COO gradient. Moments agree to the bit; parameters to torch's float32 sqrt (MKL's
vectorised sqrt is within one ulp, not correctly rounded), so the tolerances are the
other parity tests'.
"""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
import sys
import types
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest
import torch

from adamserve.engine import statedict
from adamserve.engine.algorithms import Algorithm, HyperparameterError, resolve_hyperparameters
from adamserve.engine.backend import Backend
from adamserve.engine.kernels_cpu import BLOCK, SERIAL_BELOW, CpuBackend
from adamserve.engine.optimizer import ClipConfig, FlatOptimizer, Layout, TensorSpec
from adamserve.engine.sparse_adam import row_blocks
from adamserve.sessions.checkpoints import CheckpointStore
from adamserve.sessions.session import SessionConfig
from adamserve.sessions.store import SessionStore

Rows = list[npt.NDArray[np.int64] | None]
TOL = {"float64": 1e-12, "float32": 1e-5}
STEPS = 30
# an embedding over several CPU blocks, a vector (rows of one element), a 3-D tensor
# (rows of 6), a 0-d one (one row), an empty one; two groups
SHAPES: list[tuple[int, ...]] = [(3000, 16), (50,), (7, 3, 2), (), (0, 4)]
OWNER = [0, 0, 1, 1, 1]
GROUPS: list[dict[str, Any]] = [{"lr": 1e-2, "betas": (0.8, 0.99)},
                                {"lr": 3e-3, "eps": 1e-6, "betas": (0.9, 0.9), "maximize": True}]


def _nrows(shape: tuple[int, ...]) -> int:
    return shape[0] if shape else 1


class Pair:
    """Our optimizer and torch's over the same parameters, stepped with the same rows."""

    def __init__(self, dtype: str, shapes: list[tuple[int, ...]] = SHAPES,
                 owner: list[int] = OWNER, groups: list[dict[str, Any]] = GROUPS,
                 seed: int = 0, backend: Backend | None = None, **kw: Any) -> None:
        self.dtype, self.shapes = dtype, shapes
        rng = np.random.default_rng(seed)
        p0 = [rng.standard_normal(s).astype(dtype) for s in shapes]
        self.tparams = [torch.tensor(p, requires_grad=True) for p in p0]
        # group by group, so that torch's state_dict indices are the layout's
        assert owner == sorted(owner)
        self.topt = torch.optim.SparseAdam([
            {"params": [t for t, g in zip(self.tparams, owner, strict=True) if g == k], **h}
            for k, h in enumerate(groups)])
        self.layout = Layout(tuple(TensorSpec(f"t{i}", s, g)
                                   for i, (s, g) in enumerate(zip(shapes, owner, strict=True))))
        self.ours = FlatOptimizer("sparse_adam", self.layout, groups, dtype=dtype,
                                  params=np.concatenate([p.ravel() for p in p0]),
                                  backend=backend, **kw)

    def step(self, rng: np.random.Generator, rows: Rows, active: list[bool] | None = None,
             ours: FlatOptimizer | None = None) -> None:
        """One step of both: tensor i gets values for ``rows[i]`` (None: every row)."""
        opt = self.ours if ours is None else ours
        grad = np.full(self.layout.size, np.nan, dtype=self.dtype)  # garbage off the rows
        for i, (t, shape) in enumerate(zip(self.tparams, self.shapes, strict=True)):
            if active is not None and not active[i]:
                t.grad = None
                continue
            r = rows[i]
            full = np.arange(_nrows(shape)) if r is None else r
            values = rng.standard_normal((len(full), *shape[1:])).astype(self.dtype)
            indices = (torch.as_tensor(full, dtype=torch.int64)[None] if shape
                       else torch.zeros((0, len(full)), dtype=torch.int64))
            t.grad = torch.sparse_coo_tensor(indices, torch.as_tensor(values).reshape(
                len(full), *shape[1:]), shape, check_invariants=True)
            width = t.numel() // _nrows(shape) if t.numel() else 0
            grad[self.layout.span(i)].reshape(_nrows(shape), width)[full] = values.reshape(
                len(full), width)
        self.topt.step()
        opt.grad[:] = opt.backend.to_device(grad)
        report = opt.step(None if active is None else np.array(active), rows=rows)
        assert not report.skipped

    def same(self, ours: FlatOptimizer | None = None) -> None:
        opt = self.ours if ours is None else ours
        tol = TOL[self.dtype]
        for i, t in enumerate(self.tparams):
            st = self.topt.state.get(t, {})
            assert int(opt.seg_step[i]) == st.get("step", 0), i
            pairs = [("param", opt.param, t.detach())]
            if st:
                pairs += [(s, opt.slots[s], st[s]) for s in ("exp_avg", "exp_avg_sq")]
            for what, buf, ref in pairs:
                got = opt.backend.to_host(buf)[opt.layout.span(i)].reshape(t.shape)
                r = ref.numpy().astype(np.float64)
                scale = float(np.max(np.abs(r))) if r.size else 1.0
                np.testing.assert_allclose(got.astype(np.float64), r, rtol=tol,
                                           atol=tol * (scale or 1.0), err_msg=f"{what} t{i}")


def _random_rows(rng: np.random.Generator, shape: tuple[int, ...], k: int | None = None
                 ) -> npt.NDArray[np.int64]:
    n = _nrows(shape)
    count = int(rng.integers(0, n + 1)) if k is None else k
    return np.sort(rng.choice(n, size=count, replace=False)).astype(np.int64)


@pytest.fixture(params=["float64", "float32"])
def dtype(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def test_matches_torch_over_random_rows(dtype: str) -> None:
    """30 steps of random distinct rows per tensor; a step with no rows anywhere (the step
    counts move on, nothing else), a dense step (rows None), a long run of consecutive
    rows cut over blocks, tensors without a gradient (torch skips them), maximize in
    group 1."""
    pair = Pair(dtype)
    rng = np.random.default_rng(1)
    for k in range(STEPS):
        rows: Rows = [_random_rows(rng, s) for s in SHAPES]
        active = None
        if k == 3:
            rows = [np.zeros(0, np.int64) for _ in SHAPES]
        elif k == 7:
            rows = [None, None, rows[2], None, None]
        elif k == 11:
            rows[0] = np.arange(100, 2900, dtype=np.int64)  # 44800 elements: two blocks
        elif k % 5 == 4:
            active = [(i + k) % 3 != 0 for i in range(len(SHAPES))]
        before = pair.ours.param.copy()
        pair.step(rng, rows, active)
        if k == 3:  # no rows: the parameters and moments stay, the step counts move on
            np.testing.assert_array_equal(pair.ours.param, before)
        if k in (0, 3, 7, 11):
            pair.same()
    pair.same()
    assert list(pair.ours.seg_step) == [int(pair.topt.state[t]["step"]) for t in pair.tparams]


def test_the_parallel_kernel_matches_torch(dtype: str) -> None:
    """Past SERIAL_BELOW touched elements the parallel kernel runs (a dense step, then a
    large random set of rows)."""
    shape = (12000, 16)
    assert SERIAL_BELOW <= 9000 * 16
    pair = Pair(dtype, [shape], [0], [{"lr": 5e-3}], seed=2)
    rng = np.random.default_rng(3)
    steps: list[Rows] = [[None], [_random_rows(rng, shape, 10000)],
                         [_random_rows(rng, shape, 9000)]]
    for rows in steps:
        pair.step(rng, rows)
    pair.same()


def test_rows_never_read_stay_put_and_a_nan_there_is_not_seen() -> None:
    """NaN off the rows changes nothing (no skip, no NaN); the non-finite check and the
    clipping norm read the given rows only, and a NaN in one of them skips the step."""
    layout = Layout((TensorSpec("e", (10, 3)),))
    opt = FlatOptimizer("sparse_adam", layout, dtype="float64", params=np.ones(30),
                        clip=ClipConfig(max_norm=1e6))
    opt.grad[:] = np.nan
    opt.grad[3:6] = [1.0, 2.0, 2.0]  # row 1
    opt.grad[27:30] = [0.0, 4.0, 0.0]  # row 9
    report = opt.step(rows=[np.array([1, 9])])
    assert not report.skipped and report.grad_norm == pytest.approx(5.0, rel=1e-15)
    p = opt.param.reshape(10, 3)
    untouched = np.setdiff1d(np.arange(10), [1, 9])
    np.testing.assert_array_equal(p[untouched], 1.0)
    np.testing.assert_array_equal(opt.slots["exp_avg"].reshape(10, 3)[untouched], 0.0)
    assert np.isfinite(p).all() and (p[1] != 1.0).all() and p[9, 1] != 1.0
    opt.grad[3] = np.inf
    before = opt.param.copy()
    report = opt.step(rows=[np.array([1])])
    assert report.skipped and report.nonfinite == ("e",) and opt.seg_step[0] == 1
    np.testing.assert_array_equal(opt.param, before)


def test_row_blocks_cover_exactly_the_rows() -> None:
    """Consecutive rows merge into one run, a run is cut at the block size, blocks never
    cross a tensor, and only active tensors have blocks."""
    layout = Layout((TensorSpec("a", (5000, 10)), TensorSpec("b", (9,)), TensorSpec("c", ()),
                     TensorSpec("d", (4, 0)), TensorSpec("e", (3, 2))))
    backend = CpuBackend()
    rows: Rows = [np.r_[0:4000, 4001, 4003:4005].astype(np.int64), np.array([0, 8]),
                  np.array([0]), np.array([1, 2]), None]
    active = np.array([True, True, True, True, False])
    blocks = row_blocks(backend, layout, active, rows)
    covered = np.zeros(layout.size, dtype=bool)
    for lo, hi, seg in zip(blocks.start, blocks.end, blocks.seg, strict=True):
        assert 0 < hi - lo <= BLOCK and not covered[lo:hi].any()
        assert layout.offsets[seg] <= lo < hi <= layout.offsets[seg + 1]
        covered[lo:hi] = True
    want = np.zeros(layout.size, dtype=bool)
    want[:50000].reshape(5000, 10)[rows[0]] = True
    want[[50000, 50008, 50009]] = True  # b's rows 0 and 8, the 0-d c
    np.testing.assert_array_equal(covered, want)
    assert blocks.size == want.sum()
    assert len(blocks.start) == 2 + 2 + 2 + 1  # 40000 elements in two blocks, 2 runs, b, c


@pytest.mark.parametrize(("rows", "message"), [
    ([np.array([2, 1])], r"rows of tensor 'e': expected sorted, distinct row indices; row 1 "
                         r"follows 2"),
    ([np.array([1, 1])], r"row 1 follows 1"),
    ([np.array([0, 10])], r"rows of tensor 'e': row 10 is out of range; expected rows in "
                          r"\[0, 10\)"),
    ([np.array([-1])], r"row -1 is out of range"),
    ([np.array([[0, 1]])], r"expected a 1-D array of row indices, got shape \[1, 2\]"),
    ([None, None], r"rows: expected one entry per tensor \(1\), got 2"),
    ([np.array([0.5])], r"rows of tensor 'e': expected integer row indices, got float64"),
])
def test_bad_rows_are_refused_and_change_nothing(rows: Rows, message: str) -> None:
    opt = FlatOptimizer("sparse_adam", Layout((TensorSpec("e", (10, 3)),)), params=np.ones(30))
    opt.grad[:] = 1.0
    with pytest.raises(ValueError, match=message):
        opt.step(rows=rows)
    assert opt.seg_step[0] == 0 and opt.step_count == 0
    np.testing.assert_array_equal(opt.param, 1.0)


def test_other_algorithms_ignore_rows() -> None:
    layout = Layout((TensorSpec("e", (4, 2)),))
    a, b = (FlatOptimizer("adam", layout, params=np.arange(8.0)) for _ in range(2))
    a.grad[:] = b.grad[:] = np.linspace(-1, 1, 8)
    a.step(rows=[np.array([1])])
    b.step()
    np.testing.assert_array_equal(a.param, b.param)
    assert not FlatOptimizer("sparse_adam", layout, skip_nonfinite=False).streamable


def test_state_dict_both_ways_with_torch(dtype: str) -> None:
    pair = Pair(dtype, seed=4)
    rng = np.random.default_rng(5)
    for k in range(6):  # t1 steps from the second step on
        pair.step(rng, [_random_rows(rng, s) for s in SHAPES], [True, k > 0, True, True, True])
    ours, topt = pair.ours, pair.topt
    exported = statedict.export_state(ours)
    theirs = topt.state_dict()
    assert sorted(exported["state"]) == sorted(theirs["state"])
    for i, entry in theirs["state"].items():
        mine = exported["state"][i]
        assert set(mine) == set(entry) == {"step", "exp_avg", "exp_avg_sq"}
        assert type(mine["step"]) is int and mine["step"] == entry["step"]
        for key in ("exp_avg", "exp_avg_sq"):
            assert mine[key].shape == tuple(entry[key].shape)
            np.testing.assert_array_equal(mine[key], entry[key].numpy())  # moments: bitwise
    for mine_g, their_g in zip(exported["param_groups"], theirs["param_groups"], strict=True):
        assert {k: v for k, v in mine_g.items() if k not in ("params", "param_names")} == {
            k: v for k, v in their_g.items() if k != "params"}
        assert mine_g["params"] == their_g["params"]
    # ours -> torch: a torch.optim.SparseAdam that loads our export steps as torch does
    twin = [torch.tensor(ours.backend.to_host(ours.tensor(ours.param, i)), requires_grad=True)
            for i in range(len(SHAPES))]
    loaded = torch.optim.SparseAdam([{"params": twin[:2]}, {"params": twin[2:]}])
    loaded.load_state_dict({
        "state": {i: {k: v if k == "step" else torch.tensor(v) for k, v in e.items()}
                  for i, e in exported["state"].items()},
        "param_groups": [{k: v for k, v in g.items() if k != "param_names"}
                         for g in exported["param_groups"]]})
    # torch -> ours: a fresh optimizer takes torch's state_dict
    fresh = FlatOptimizer("sparse_adam", ours.layout, [{}, {}], dtype=dtype,
                          params=ours.backend.to_host(ours.param).copy())
    statedict.import_state(fresh, {
        "state": {i: {k: v if k == "step" else v.numpy() for k, v in e.items()}
                  for i, e in theirs["state"].items()},
        "param_groups": theirs["param_groups"]})
    assert fresh.groups == ours.groups
    np.testing.assert_array_equal(fresh.seg_step, ours.seg_step)
    pair.tparams, pair.topt = twin, loaded  # torch from our export, ours from torch's
    for _ in range(4):
        pair.step(rng, [_random_rows(rng, s) for s in SHAPES], ours=fresh)
    pair.same(fresh)


def test_a_checkpoint_keeps_the_moments_and_the_step_counts(tmp_path: Path) -> None:
    store = SessionStore(CpuBackend(), CheckpointStore(tmp_path))
    config = SessionConfig("sparse_adam", tuple(TensorSpec(f"t{i}", s, g) for i, (s, g) in
                                                enumerate(zip(SHAPES, OWNER, strict=True))),
                           tuple(GROUPS), dtype="float64")
    session = store.create("s", config)
    session.lock.release()
    opt = session.opt
    rng = np.random.default_rng(6)
    for _ in range(3):
        opt.grad[:] = rng.standard_normal(opt.layout.size)
        opt.step(rows=[_random_rows(rng, s) for s in SHAPES])
    assert store.checkpoints is not None
    store.checkpoints.write(session)
    back = store.checkpoints.load("s", store.backend)
    assert back is not None
    np.testing.assert_array_equal(back.opt.seg_step, [3] * len(SHAPES))
    for name in ("exp_avg", "exp_avg_sq"):
        np.testing.assert_array_equal(back.opt.slots[name], opt.slots[name])
    rows = [_random_rows(rng, s) for s in SHAPES]
    grad = rng.standard_normal(opt.layout.size)
    for o in (opt, back.opt):
        o.grad[:] = grad
        o.step(rows=rows)
    np.testing.assert_array_equal(back.opt.param, opt.param)


@pytest.mark.parametrize(("given", "message"), [
    ({"lr": 0.0}, r"^lr: expected a value > 0 for sparse_adam, got 0.0$"),
    ({"lr": -1e-3}, r"^lr: expected a value >= 0, got -0.001$"),
    ({"eps": 0}, r"^eps: expected a value > 0 for sparse_adam, got 0.0$"),
    ({"betas": (1.0, 0.999)}, r"^beta1: expected a value in \[0, 1\), got 1.0$"),
    ({"betas": (0.9, -0.1)}, r"^beta2: expected a value in \[0, 1\), got -0.1$"),
    ({"betas": (0.9,)}, r"^betas: expected 2 values \(beta1, beta2\), got \(0.9,\)$"),
    ({"maximize": 1}, r"^maximize: expected true or false, got 1$"),
    ({"weight_decay": 0.1}, r"^unknown hyperparameter 'weight_decay' for sparse_adam; "
                            r"expected one of beta1, beta2, eps, lr, maximize$"),
])
def test_bad_hyperparameters_are_named(given: dict[str, Any], message: str) -> None:
    with pytest.raises(HyperparameterError, match=message):
        resolve_hyperparameters(Algorithm.SPARSE_ADAM, given)
    opt = FlatOptimizer("sparse_adam", Layout((TensorSpec("e", (4, 2)),)))
    with pytest.raises(ValueError, match=message[1:]):
        opt.set_hyperparameters(0, given)
    assert opt.groups[0] == resolve_hyperparameters(Algorithm.SPARSE_ADAM, {})


def test_defaults_are_torchs() -> None:
    torch_defaults = torch.optim.SparseAdam([torch.zeros(1, requires_grad=True)]).defaults
    ours = statedict.torch_group(resolve_hyperparameters(Algorithm.SPARSE_ADAM, {}))
    assert ours == torch_defaults


@pytest.mark.gpu
def test_cuda_kernel_matches_the_cpu_kernel(dtype: str) -> None:
    pytest.importorskip("cupy", reason="CuPy is not installed: the SparseAdam CUDA kernel "
                                       "needs CuPy and a CUDA device")
    from adamserve.engine import kernels_cuda

    if kernels_cuda.device_count() == 0:
        pytest.skip("CuPy found no CUDA device: the SparseAdam CUDA kernel needs one")
    gpu = Pair(dtype, seed=7, backend=kernels_cuda.CudaBackend())
    cpu = Pair(dtype, seed=7)
    rng_g, rng_c = np.random.default_rng(8), np.random.default_rng(8)
    for k in range(10):
        rows: Rows = [_random_rows(np.random.default_rng(k), s) for s in SHAPES]
        gpu.step(rng_g, rows)
        cpu.step(rng_c, rows)
    gpu.same()
    for name in ("param", "exp_avg", "exp_avg_sq"):
        a = gpu.ours.backend.to_host(gpu.ours.param if name == "param" else gpu.ours.slots[name])
        b = cpu.ours.param if name == "param" else cpu.ours.slots[name]
        np.testing.assert_allclose(a, b, rtol=TOL[dtype], atol=TOL[dtype], err_msg=name)


def test_cuda_source_compiles_with_nvcc(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every CUDA kernel (SparseAdam's among them) compiles to PTX for both dtypes with the
    NVRTC options the backend uses, where nvcc is installed (no device needed). The source
    is read from kernels_cuda with an empty module standing in for CuPy, which its import
    needs but the source does not."""
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        pytest.skip("nvcc is not installed: the CUDA source is compiled only where it is")
    monkeypatch.setitem(sys.modules, "cupy", sys.modules.get("cupy") or types.ModuleType("cupy"))
    import adamserve.engine as engine

    spec = importlib.util.spec_from_file_location(
        "_kernels_cuda_source", Path(engine.__file__).parent / "kernels_cuda.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert "sparse_adam" in module._KERNELS
    uses = [f"auto* use_{k}_{c} = &adamserve_{k}<{t}>;"
            for k in module._KERNELS for c, t in module._CTYPES.items()]
    source = tmp_path / "kernels.cu"
    source.write_text(module._SOURCE + "\n" + "\n".join(uses) + "\n")
    done = subprocess.run([nvcc, "-ptx", *module._OPTIONS, "-o", str(tmp_path / "k.ptx"),
                           str(source)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-4000:]
    assert "adamserve_sparse_adam" in (tmp_path / "k.ptx").read_text()
