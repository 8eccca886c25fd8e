"""8-bit and bfloat16 moments (engine/quantize.py, engine/kernels_quant.py).

The oracle of every kernel is the float64 reference by its definition (searchsorted on
the midpoints) composed with the float32 kernels of kernels_cpu: a fused step must equal
"dequantise, run the float32 kernel, quantise" bit for bit, over tensors of mixed sizes
(some kept in float32), several steps and per-tensor coefficient rows from
engine.algorithms.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest

from adamserve.engine import algorithms as alg
from adamserve.engine import kernels_quant as kq
from adamserve.engine import quantize as q
from adamserve.engine.backend import Blocks, make_blocks
from adamserve.engine.kernels_cpu import SERIAL_BELOW, CpuBackend
from adamserve_proto import codec

Arr = npt.NDArray[Any]
CPU = CpuBackend()

# quantised tensors (one over a kernel block, with a short last QBLOCK; one of exactly
# MIN_QUANTIZED), float32 ones under MIN_QUANTIZED (one of a single element), an empty one
SIZES = [5000, 100, 70000, 4096, 4095, 1, 0, 9000]
OFFSETS = np.concatenate([[0], np.cumsum(SIZES)]).astype(np.int64)
N = int(OFFSETS[-1])
STEPS = 3


@pytest.fixture(autouse=True)
def _quiet() -> Iterator[None]:
    with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
        yield


# -- the reference, by the definition ---------------------------------------------------


def ref_quantize(values: Arr, offsets: Arr, signed: bool) -> q.Int8Moments:
    slot = q.Int8Moments.zeros(offsets, signed)
    for s in range(len(offsets) - 1):
        lo, hi = int(offsets[s]), int(offsets[s + 1])
        first, small = int(slot.meta[s, 0]), int(slot.meta[s, 1])
        if small >= 0:
            slot.small[small:small + hi - lo] = values[lo:hi]
        elif hi > lo:
            codes, scales = q.quantize_tensor_ref(values[lo:hi], signed)
            slot.codes[lo:hi] = codes
            slot.scale[first:first + len(scales)] = scales
    return slot


def ref_dequantize(slot: q.Int8Moments, offsets: Arr) -> Arr:
    out = np.zeros(slot.size, dtype=np.float32)
    for s in range(len(offsets) - 1):
        lo, hi = int(offsets[s]), int(offsets[s + 1])
        first, small = int(slot.meta[s, 0]), int(slot.meta[s, 1])
        if small >= 0:
            out[lo:hi] = slot.small[small:small + hi - lo]
        elif hi > lo:
            nb = -(-(hi - lo) // q.QBLOCK)
            out[lo:hi] = q.dequantize_tensor_ref(slot.codes[lo:hi], slot.scale[first:first + nb],
                                                 signed=slot.signed)
    return out


def same_int8(got: q.Int8Moments, want: q.Int8Moments, what: str) -> None:
    np.testing.assert_array_equal(got.codes, want.codes, err_msg=f"{what}: codes")
    np.testing.assert_array_equal(got.scale, want.scale, err_msg=f"{what}: scale")
    np.testing.assert_array_equal(got.small.view(np.uint32), want.small.view(np.uint32),
                                  err_msg=f"{what}: small")


def same_tensors(got: q.Int8Moments, want: q.Int8Moments, tensors: Arr, what: str) -> None:
    """``same_int8`` over the listed tensors only."""
    for s in tensors:
        lo, hi = int(OFFSETS[s]), int(OFFSETS[s + 1])
        first, small = int(got.meta[s, 0]), int(got.meta[s, 1])
        if small >= 0:
            same_bits(got.small[small:small + hi - lo], want.small[small:small + hi - lo], what)
            continue
        nb = -(-(hi - lo) // q.QBLOCK)
        np.testing.assert_array_equal(got.codes[lo:hi], want.codes[lo:hi], err_msg=what)
        np.testing.assert_array_equal(got.scale[first:first + nb], want.scale[first:first + nb],
                                      err_msg=what)


def same_bits(a: Arr, b: Arr, what: str) -> None:
    np.testing.assert_array_equal(np.asarray(a).view(np.uint32), np.asarray(b).view(np.uint32),
                                  err_msg=what)


# -- the maps -----------------------------------------------------------------------------


@pytest.mark.parametrize("signed", [True, False])
def test_maps(signed: bool) -> None:
    m = q.qmap(signed)
    assert m.dtype == np.float32 and m.shape == (256,)
    assert (np.diff(m) > 0).all()  # sorted, distinct
    assert 0.0 in m and 1.0 in m
    pos = m[(m > 0) & (m < 1)]
    if signed:
        inner = m[m != 1]
        np.testing.assert_array_equal(np.sort(-inner), inner)  # symmetric but for 1.0
        assert m[0] == -m[-2]
    else:
        assert m[0] == 0.0
    # 2**i (signed) or 2**(i+1) values in decade i, evenly spread means of its tenths
    decade = np.floor(np.log10(pos.astype(np.float64))).astype(int) + 7
    for i in range(7):
        n = 2**i if signed else 2 ** (i + 1)
        got = np.sort(pos[decade == i]).astype(np.float64)
        want = 10.0 ** (i - 6) * (0.1 + 0.9 * (np.arange(n) + 0.5) / n)
        np.testing.assert_allclose(got, want, rtol=1e-6)
    assert q.zero_code(signed) == int(np.flatnonzero(m == 0)[0])


# -- quantisation equals the reference ------------------------------------------------------


def blockify(values: Arr, scale: float) -> list[Arr]:
    """QBLOCKs of ``values``, each led by ``scale`` (so its max |x|) and padded with 0."""
    out = []
    for i in range(0, len(values), 255):
        b = np.zeros(256)
        b[0] = scale
        b[1:1 + len(values[i:i + 255])] = values[i:i + 255]
        out.append(b)
    return out


def crafted(signed: bool, rng: np.random.Generator) -> Arr:
    """QBLOCKs of every kind, laid end to end: random ones of many magnitudes, an
    all-zero one, one huge value among small ones, subnormals (and a subnormal scale),
    y exactly at midpoints and one float32 either side, y = ±1, ±0, negatives for the
    unsigned map, and a short last block."""
    blocks = [rng.standard_normal(256) * 10.0 ** rng.uniform(-30, 30) for _ in range(40)]
    blocks += [rng.uniform(-1, 1, 256) ** 7, np.zeros(256), -np.zeros(256)]
    huge = rng.standard_normal(256) * 1e-3
    huge[17] = 3e38
    blocks += [huge, rng.standard_normal(256) * 1e-40, rng.standard_normal(256) * 1e-44]
    mid = q.midpoints(signed)
    exact = mid[np.float32(mid).astype(np.float64) == mid]  # midpoints a float32 can hold
    assert exact.size > 50
    for scale in (1.0, 2.0**-20, 2.0**100):
        at = (exact * scale).astype(np.float32)
        up, down = np.nextafter(at, np.float32(np.inf)), np.nextafter(at, np.float32(-np.inf))
        blocks += blockify(np.concatenate([at, up, down]), scale)
    blocks += blockify(np.array([1.0, -1.0, 0.5, -0.0, 0.0, -0.5] * 40), 1.0)
    blocks += [np.array([-2.0, 2.0, -1.0])]
    x: Arr = np.concatenate(blocks).astype(np.float32)
    return x if signed else np.where(rng.random(x.size) < 0.9, np.abs(x), x)


@pytest.mark.parametrize("signed", [True, False])
def test_quantisation_equals_the_reference(signed: bool) -> None:
    x = crafted(signed, np.random.default_rng(1))
    one = np.array([0, x.size], dtype=np.int64)
    got = q.quantize_int8(x, one, signed)  # the numba kernel
    codes, scales = q.quantize_tensor_ref(x, signed)
    np.testing.assert_array_equal(got.codes, codes)
    np.testing.assert_array_equal(got.scale, scales)
    back = q.dequantize(got, one)
    same_bits(back, q.dequantize_tensor_ref(codes, scales, signed), "dequantise")
    # the ties really are ties: each sits at a midpoint and goes to the lower code
    y = x.astype(np.float64) / np.repeat(scales, q.QBLOCK)[:x.size].astype(np.float64)
    at_mid = np.isin(y, q.midpoints(signed))
    assert at_mid.sum() > 100
    assert (q.qmap(signed)[codes[at_mid]] < y[at_mid]).all()


@pytest.mark.parametrize("signed", [True, False])
def test_quantisation_of_layouts_and_nonfinite_blocks(signed: bool) -> None:
    rng = np.random.default_rng(2)
    x = (rng.standard_normal(N) * 1e-3).astype(np.float32)
    x[OFFSETS[2] + 300] = np.nan  # one block of the big tensor NaN, one Inf
    x[OFFSETS[2] + 1000] = -np.inf
    x[OFFSETS[4]:OFFSETS[4] + 300] = 0.0
    got = q.quantize_int8(x, OFFSETS, signed)
    want = ref_quantize(x, OFFSETS, signed)
    same_int8(got, want, "quantise")
    assert np.isnan(got.scale).sum() == 1 and np.isinf(got.scale).sum() == 1
    back = q.dequantize(got, OFFSETS)
    np.testing.assert_array_equal(back, ref_dequantize(want, OFFSETS))
    assert got.nbytes == q.quantized_nbytes("int8", OFFSETS)


def test_large_layouts_take_the_parallel_host_kernels() -> None:
    offsets = np.array([0, 100, SERIAL_BELOW + 777], dtype=np.int64)
    x = np.random.default_rng(3).standard_normal(int(offsets[-1])).astype(np.float32)
    got = q.quantize_int8(x, offsets, True)
    same_int8(got, ref_quantize(x, offsets, True), "parallel quantise")
    same_bits(q.dequantize(got, offsets), ref_dequantize(got, offsets), "parallel dequantise")


def test_the_fast_path_of_the_search_is_the_definition() -> None:
    """Every float32 |x| of a wide range (all mantissas of the top binades, strided
    below) against scales of many magnitudes: the kernels' table-and-product search
    finds searchsorted's code."""
    top = (np.arange(0x3F000000, 0x3F800001, 7, dtype=np.uint32)).view(np.float32)
    low = (np.arange(0x33000000, 0x3F000000, 4099, dtype=np.uint32)).view(np.float32)
    y = np.concatenate([top, low, -top, -low])
    for scale in (np.float32(1.0), np.float32(3.7e-20), np.float32(1.3e30)):
        x = (y * scale).astype(np.float32)
        x = np.concatenate([[scale], x])
        for signed in (True, False):
            one = np.array([0, x.size], dtype=np.int64)
            got = q.quantize_int8(x, one, signed)
            codes, scales = q.quantize_tensor_ref(x, signed)
            np.testing.assert_array_equal(got.codes, codes)
            np.testing.assert_array_equal(got.scale, scales)


# -- the fused kernels -----------------------------------------------------------------------

# (algorithm, options of each tensor's group, by tensor): mixed rows per step
CASES: dict[str, tuple[str, list[dict[str, Any]]]] = {
    "adam": ("adam", [{}, {"lr": 3e-3, "betas": (0.8, 0.99)}]),
    "adam-amsgrad": ("adam", [{"amsgrad": True}, {"amsgrad": False, "weight_decay": 0.1}]),
    "adamw": ("adamw", [{"weight_decay": 0.1}, {"maximize": True, "lr": 1e-2}]),
    "nadam": ("nadam", [{}, {"weight_decay": 0.1, "decoupled_weight_decay": True}]),
    "radam": ("radam", [{}, {"weight_decay": 0.1}]),  # rho_t <= 5, then > 5, by step
    "adamax": ("adamax", [{"weight_decay": 0.1}, {"lr": 1e-2}]),
    "lamb": ("lamb", [{"weight_decay": 0.1}, {}]),
}


class Steps:
    """Per-tensor coefficient rows of one case, step by step (tensor i in group i % 2,
    starting its steps i steps late, so the rows' bias corrections differ)."""

    def __init__(self, case: str, nseg: int) -> None:
        self.name, groups = CASES[case]
        self.algorithm, alias = alg.parse_algorithm(self.name)
        hyper = [alg.resolve_hyperparameters(self.algorithm, {**alias, **g}) for g in groups]
        keys = hyper[0].keys()
        self.values = {k: np.array([float(hyper[i % 2][k]) for i in range(nseg)]) for k in keys}
        self.mu = np.ones(nseg)
        self.nseg = nseg

    def coef(self, t: int) -> Arr:
        step = np.arange(self.nseg, dtype=np.int64) + t + 1
        if self.algorithm is alg.Algorithm.RADAM:
            step = step + 3 * t  # cross rho_t > 5 within the steps
        h = alg.SegmentHyper(dict(self.values), step, self.mu.copy())
        rows = alg.coefficients(self.algorithm, h, self.values["lr"], np.ones(self.nseg))
        if self.algorithm is alg.Algorithm.NADAM:
            self.mu = self.mu * alg.nadam_mu(h)
        return rows.astype(np.float32)

    @property
    def slots(self) -> tuple[str, ...]:
        names = {"adamax": ("exp_avg", "exp_inf")}.get(self.name, ("exp_avg", "exp_avg_sq"))
        return (*names, "max_exp_avg_sq") if "amsgrad" in self.values and (
            self.values["amsgrad"] > 0).any() else names


def fp32_step(steps: Steps, slots: dict[str, Arr], p: Arr, g: Arr, blocks: Blocks,
              coef: Arr) -> tuple[Arr, Arr] | None:
    if steps.name == "lamb":
        return CPU.lamb_moments(slots, p, g, blocks, coef)
    CPU.run(steps.name, slots, p, g, blocks, coef)
    return None


def start(steps: Steps, rng: np.random.Generator, n: int) -> dict[str, Arr]:
    out = {}
    for s in steps.slots:
        x = rng.standard_normal(n).astype(np.float32) * np.float32(1e-3)
        out[s] = x if s == "exp_avg" else x * x
    return out


def gradient(rng: np.random.Generator, n: int) -> Arr:
    g = rng.standard_normal(n).astype(np.float32)
    g[: n // 3] *= np.float32(1e-4)  # magnitudes differing by tensor and block
    return g


@pytest.mark.parametrize("case", list(CASES))
def test_int8_kernels_equal_the_reference(case: str) -> None:
    steps = Steps(case, len(SIZES))
    blocks = make_blocks(CPU, OFFSETS)
    rng = np.random.default_rng(4)
    p = rng.standard_normal(N).astype(np.float32)
    slots = {s: q.quantize_int8(v, OFFSETS, s in q.SIGNED_SLOTS)
             for s, v in start(steps, rng, N).items()}
    for t in range(STEPS):
        coef = steps.coef(t)
        g = gradient(rng, N)
        f32 = {s: ref_dequantize(v, OFFSETS) for s, v in slots.items()}
        p_ref, g_ref = p.copy(), g.copy()
        sums_ref = fp32_step(steps, f32, p_ref, g_ref, blocks, coef)
        if steps.name == "lamb":
            sums = kq.lamb_moments_quantized(slots, p, g, blocks, coef)
        else:
            kq.run_quantized(steps.name, slots, p, g, blocks, coef)
        same_bits(p, p_ref, f"{case} step {t}: param")
        same_bits(g, g_ref, f"{case} step {t}: grad (LAMB's update)")
        if sums_ref is not None:  # the same squares, summed in another order
            np.testing.assert_allclose(sums[0], sums_ref[0], rtol=1e-12)
            np.testing.assert_allclose(sums[1], sums_ref[1], rtol=1e-12)
        for s, v in slots.items():
            same_int8(v, ref_quantize(f32[s], OFFSETS, v.signed), f"{case} step {t}: {s}")


@pytest.mark.parametrize("case", list(CASES))
def test_bf16_kernels_equal_the_reference(case: str) -> None:
    steps = Steps(case, len(SIZES))
    blocks = make_blocks(CPU, OFFSETS)
    rng = np.random.default_rng(5)
    p = rng.standard_normal(N).astype(np.float32)
    slots = {s: q.to_bf16(v, seed=11 + i) for i, (s, v) in enumerate(start(steps, rng, N).items())}
    index = np.arange(N, dtype=np.int64)
    for t in range(STEPS):
        coef = steps.coef(t)
        g = gradient(rng, N)
        f32 = {s: q.bf16_values(v.bits) for s, v in slots.items()}
        r = {s: q.stochastic_bits(v.seed, v.counter, index) for s, v in slots.items()}
        p_ref, g_ref = p.copy(), g.copy()
        fp32_step(steps, f32, p_ref, g_ref, blocks, coef)
        if steps.name == "lamb":
            kq.lamb_moments_quantized(slots, p, g, blocks, coef)
        else:
            kq.run_quantized(steps.name, slots, p, g, blocks, coef)
        same_bits(p, p_ref, f"{case} step {t}: param")
        same_bits(g, g_ref, f"{case} step {t}: grad")
        for s, v in slots.items():
            np.testing.assert_array_equal(v.bits, q.stochastic_round_ref(f32[s], r[s]),
                                          err_msg=f"{case} step {t}: {s}")
            assert v.counter == t + 1


@pytest.mark.parametrize("kind", ["int8", "bfloat16"])
def test_parallel_and_serial_kernels_agree(kind: str) -> None:
    """The thread pool's kernel (run for SERIAL_BELOW elements and more) against its
    serial twin on the same state: the same bits."""
    steps = Steps("adam-amsgrad", len(SIZES))
    blocks = make_blocks(CPU, OFFSETS)
    rng = np.random.default_rng(6)
    init = start(steps, rng, N)
    p0, g, coef = rng.standard_normal(N).astype(np.float32), gradient(rng, N), steps.coef(0)
    out = []
    for size in (SERIAL_BELOW, 1):
        big = Blocks(blocks.start, blocks.end, blocks.seg, blocks.host_seg, size)
        slots: dict[str, Any] = {
            s: q.quantize_int8(v, OFFSETS, s in q.SIGNED_SLOTS) if kind == "int8"
            else q.to_bf16(v, seed=3) for s, v in init.items()}
        p = p0.copy()
        kq.run_quantized("adam", slots, p, g.copy(), big, coef)
        out.append((p, {s: q.parts(v) for s, v in slots.items()}))
    same_bits(out[0][0], out[1][0], "param")
    for s in init:
        for part, a in out[0][1][s].items():
            np.testing.assert_array_equal(a, out[1][1][s][part], err_msg=f"{s}.{part}")


@pytest.mark.parametrize("kind", ["int8", "bfloat16"])
def test_nonfinite_gradients_give_defined_state(kind: str) -> None:
    """The engine skips such steps before the kernel; the kernel itself still writes
    what the reference defines (NaN scales and last codes where a block went NaN),
    touches no other tensor and reads and writes nothing out of bounds."""
    steps = Steps("adam-amsgrad", len(SIZES))
    active = np.array([i != 0 for i in range(len(SIZES))])  # tensor 0 is left alone
    blocks = make_blocks(CPU, OFFSETS, active)
    rng = np.random.default_rng(7)
    init = start(steps, rng, N)
    pad = 1000  # guards around every buffer: a stray write would show there
    guard = rng.standard_normal(N + 2 * pad).astype(np.float32)
    p = guard.copy()
    g = gradient(rng, N + 2 * pad)
    inner = slice(pad, pad + N)
    g[pad + OFFSETS[2] + 5] = np.nan
    g[pad + OFFSETS[2] + 40000] = np.inf
    g[pad + OFFSETS[5]] = -np.inf  # the one-element float32 tensor
    coef = steps.coef(0)
    if kind == "int8":
        slots: dict[str, Any] = {s: q.quantize_int8(v, OFFSETS, s in q.SIGNED_SLOTS)
                                 for s, v in init.items()}
        before = {s: q.parts(v.copy()) for s, v in slots.items()}
        f32 = {s: ref_dequantize(v, OFFSETS) for s, v in slots.items()}
    else:
        slots = {s: q.to_bf16(v, seed=5) for s, v in init.items()}
        before = {s: q.parts(v.copy()) for s, v in slots.items()}
        f32 = {s: q.bf16_values(v.bits) for s, v in slots.items()}
    r = {s: q.stochastic_bits(v.seed, v.counter, np.arange(N)) for s, v in slots.items()
         if kind == "bfloat16"}
    p_ref = p[inner].copy()
    CPU.run("adam", f32, p_ref, g[inner].copy(), blocks, coef)
    kq.run_quantized("adam", slots, p[inner], g[inner], blocks, coef)
    same_bits(p[inner], p_ref, "param")
    same_bits(p[:pad], guard[:pad], "guard")
    same_bits(p[-pad:], guard[-pad:], "guard")
    lo, hi = int(OFFSETS[0]), int(OFFSETS[1])
    for s, v in slots.items():
        now = q.parts(v)
        if kind == "int8":
            want = ref_quantize(f32[s], OFFSETS, v.signed)
            same_tensors(v, want, np.flatnonzero(active), s)
            np.testing.assert_array_equal(now["codes"][lo:hi], before[s]["codes"][lo:hi])
            np.testing.assert_array_equal(now["scale"][:int(v.meta[1, 0])],
                                          before[s]["scale"][:int(v.meta[1, 0])])
        else:
            np.testing.assert_array_equal(v.bits, q.stochastic_round_ref(f32[s], r[s]))
            np.testing.assert_array_equal(now["bits"][lo:hi], before[s]["bits"][lo:hi])
    m, v = slots["exp_avg"], slots["exp_avg_sq"]  # (max() drops a NaN, as in float32)
    if kind == "int8":
        assert np.isnan(m.scale).any() and np.isnan(v.scale).any()
        lo2, first = int(OFFSETS[2]), int(m.meta[2, 0])
        for k in np.flatnonzero(np.isnan(m.scale)):  # NaN blocks: all the last code
            assert (m.codes[lo2 + (k - first) * q.QBLOCK:][:q.QBLOCK] == 255).all()
    else:
        assert np.isnan(q.bf16_values(m.bits)).any() and np.isnan(q.bf16_values(v.bits)).any()


# -- bfloat16 rounding --------------------------------------------------------------------------


def bf16_patterns() -> Arr:
    """Every bfloat16 prefix (each sign and exponent, Inf, NaNs, subnormals) with lower
    halves that round either way or carry into the exponent."""
    upper = np.arange(0, 1 << 16, 3, dtype=np.uint32) << 16
    lower = np.array([0, 1, 0x7FFF, 0x8000, 0xFFFF], dtype=np.uint32)
    return (upper[:, None] | lower[None, :]).reshape(-1).view(np.float32)


def test_import_rounds_to_nearest_as_the_codec() -> None:
    x = bf16_patterns()
    slot = q.to_bf16(x, seed=9)
    np.testing.assert_array_equal(slot.bits, codec.bf16_bits(x))
    assert slot.counter == 0 and slot.nbytes == 2 * x.size


def test_the_kernels_rounding_is_the_reference() -> None:
    """The numba rounding equals stochastic_round_ref on every kind of value: a bfloat16
    adamax step with w = 0.5, b2 = 0.5, eps = lr = 0 writes m = g/2 (NaN from a NaN or
    an Inf) and u = max(u/2, |g|) (the top of the range, Inf) from m = 0, u = 1e-30."""
    x = bf16_patterns()
    n = x.size
    offsets = np.array([0, n], dtype=np.int64)
    blocks = make_blocks(CPU, offsets)
    coef = np.zeros((1, 8), dtype=np.float32)
    coef[0, [0, 3, 4, 7]] = 1.0, 0.5, 0.5, 1.0  # gs, w, b2 and the trailing one
    zero, tiny = np.zeros(n, np.float32), np.full(n, 1e-30, np.float32)
    slots = {"exp_avg": q.to_bf16(zero, 1), "exp_inf": q.to_bf16(tiny, 2**32 - 1, 2**40)}
    r = {s: q.stochastic_bits(v.seed, v.counter, np.arange(n)) for s, v in slots.items()}
    f32 = {s: q.bf16_values(v.bits) for s, v in slots.items()}
    p, p_ref = np.ones(n, np.float32), np.ones(n, np.float32)
    CPU.run("adamax", f32, p_ref, x.copy(), blocks, coef)
    kq.run_quantized("adamax", slots, p, x.copy(), blocks, coef)
    same_bits(p, p_ref, "param")
    for s, v in slots.items():
        want = q.stochastic_round_ref(f32[s], r[s])
        np.testing.assert_array_equal(v.bits, want, err_msg=s)
    m, u = (q.bf16_values(v.bits) for v in slots.values())
    assert np.isnan(m).any() and np.isinf(u).any() and (np.abs(u) > 3e38).any()


def test_stochastic_rounding_is_unbiased() -> None:
    rng = np.random.default_rng(8)
    x = (1.0 + rng.random(1 << 18)).astype(np.float32)  # in [1, 2): one bf16 ulp = 2**-7
    ulp = 2.0**-7
    errors = []
    for counter in range(4):
        r = q.stochastic_bits(77, counter, np.arange(x.size) + (1 << 33))
        errors.append(q.bf16_values(q.stochastic_round_ref(x, r)).astype(np.float64) - x)
    err = np.concatenate(errors) / ulp
    assert np.abs(err).max() < 1.0
    sigma = err.std() / np.sqrt(err.size)
    assert abs(err.mean()) < 4 * sigma  # unbiased
    # a value a quarter of the way up rounds up a quarter of the time
    y = np.full(1 << 16, np.float32(1.0 + 0.25 * ulp), dtype=np.float32)
    up = q.bf16_values(q.stochastic_round_ref(y, q.stochastic_bits(5, 0, np.arange(y.size))))
    assert abs((up > 1.0).mean() - 0.25) < 0.01


def test_random_bits_are_counter_based() -> None:
    i = np.arange(1 << 16, dtype=np.int64)
    a, b = q.stochastic_bits(1, 0, i), q.stochastic_bits(1, 1, i)
    assert a.max() < 1 << 16 and not np.array_equal(a, b)
    np.testing.assert_array_equal(a, q.stochastic_bits(1, 0, i))
    np.testing.assert_array_equal(q.stochastic_bits(1, 0, i[5:9]), a[5:9])
    assert abs(a.mean() / 65535 - 0.5) < 0.01
    assert q.stream_key(0, 0) != 0


# -- storage, host conversions and the native form ------------------------------------------


def test_storage_and_native_form_round_trip() -> None:
    x = (np.random.default_rng(9).standard_normal(N) * 1e-2).astype(np.float32)
    slot = q.quantize_int8(x, OFFSETS, True)
    parts = q.parts(slot)
    assert set(parts) == {"codes", "scale", "small"}
    back = q.from_parts("int8", parts, OFFSETS, signed=True)
    assert isinstance(back, q.Int8Moments)
    same_int8(back, slot, "from_parts")
    np.testing.assert_array_equal(q.dequantize(back, OFFSETS), q.dequantize(slot, OFFSETS))
    small = q.dequantize(slot, OFFSETS)[OFFSETS[4]:OFFSETS[6]]
    same_bits(small, x[OFFSETS[4]:OFFSETS[6]], "small tensors stay float32")
    err = np.abs(q.dequantize(slot, OFFSETS) - x)
    assert err.max() <= np.abs(x).max() * 0.02
    zeros = q.Int8Moments.zeros(OFFSETS, True)
    assert not q.dequantize(zeros, OFFSETS).view(np.uint32).any()  # +0.0 throughout
    assert zeros.nbytes == slot.nbytes == q.quantized_nbytes("int8", OFFSETS)
    assert slot.nbytes < 0.3 * 4 * N

    b = q.to_bf16(x, seed=4, counter=7)
    bp = q.parts(b)
    assert set(bp) == {"bits"}
    b2 = q.from_parts("bfloat16", bp, OFFSETS, seed=4, counter=7)
    assert isinstance(b2, q.Bf16Moments) and (b2.seed, b2.counter) == (4, 7)
    np.testing.assert_array_equal(q.dequantize(b2, OFFSETS), q.bf16_values(b.bits))
    assert q.quantized_nbytes("bfloat16", OFFSETS) == b.nbytes
    c = b.copy()
    c.bits[0] ^= 1
    assert c.bits[0] != b.bits[0]


def _bad_parts(case: str) -> tuple[str, dict[str, Any]]:
    good = q.parts(q.Int8Moments.zeros(OFFSETS, False))
    if case == "kind":
        return "int4", good
    if case == "missing":
        return "int8", {"codes": good["codes"], "scale": good["scale"]}
    if case == "dtype":
        return "int8", {**good, "codes": good["codes"].view(np.int8)}
    if case == "length":
        return "int8", {**good, "small": good["small"][:-1]}
    if case == "negative":
        return "int8", {**good, "scale": -np.ones_like(good["scale"])}
    return "bfloat16", {"bits": np.zeros(N, np.float32)}


@pytest.mark.parametrize(("case", "message"), [
    ("kind", "state dtype: expected one of int8, bfloat16"),
    ("missing", "expected the parts codes, scale, small"),
    ("dtype", "part 'codes' must be uint8"),
    ("length", rf"part 'small' must be float32 of shape \[{SIZES[4] + 1 + SIZES[1]}\]"),
    ("negative", "part 'scale' must be >= 0"),
    ("bits", "part 'bits' must be uint16"),
])
def test_from_parts_refuses_what_does_not_fit(case: str, message: str) -> None:
    kind, parts = _bad_parts(case)
    with pytest.raises(ValueError, match=message):
        q.from_parts(kind, parts, OFFSETS)


def test_dispatch_refuses_what_it_cannot_step() -> None:
    steps = Steps("adam", len(SIZES))
    coef = steps.coef(0)
    p, g = np.zeros(N, np.float32), np.zeros(N, np.float32)
    blocks = make_blocks(CPU, OFFSETS)
    m, v = q.Int8Moments.zeros(OFFSETS, True), q.Int8Moments.zeros(OFFSETS, False)
    with pytest.raises(ValueError, match="all be Int8Moments or all Bf16Moments"):
        kq.run_quantized("adam", {"exp_avg": m, "exp_avg_sq": q.to_bf16(np.zeros(N), 1)}, p, g,
                         blocks, coef)
    with pytest.raises(ValueError, match="expected the slots"):
        kq.run_quantized("adam", {"exp_avg": m}, p, g, blocks, coef)
    with pytest.raises(ValueError, match="no quantised-moment kernel"):
        kq.run_quantized("rmsprop", {"exp_avg": m, "exp_avg_sq": v}, p, g, blocks, coef)
    with pytest.raises(ValueError, match="float32"):
        kq.run_quantized("adam", {"exp_avg": m, "exp_avg_sq": v}, p.astype(np.float64), g,
                         blocks, coef)
    ams = Steps("adam-amsgrad", len(SIZES)).coef(0)
    with pytest.raises(ValueError, match="max_exp_avg_sq"):
        kq.run_quantized("adam", {"exp_avg": m, "exp_avg_sq": v}, p, g, blocks, ams)
    # a range that starts inside a QBLOCK of a quantised tensor (a stream's piece)
    lo = int(OFFSETS[2]) + 100
    start = np.array([lo], dtype=np.int64)
    piece = Blocks(start, start + 500, np.array([2]), np.array([2]), 500)
    with pytest.raises(ValueError, match="quantisation blocks"):
        kq.run_quantized("adam", {"exp_avg": m, "exp_avg_sq": v}, p, g, piece, coef)
    # aligned pieces, and any piece of a float32 tensor, are fine
    ok = Blocks(np.array([OFFSETS[2] + 512, OFFSETS[4] + 3]), np.array([OFFSETS[3], 500]),
                np.array([2, 4]), np.array([2, 4]), 2)
    ok = Blocks(ok.start, np.array([OFFSETS[3], OFFSETS[4] + 500]), ok.seg, ok.host_seg, 2)
    kq.run_quantized("adam", {"exp_avg": m, "exp_avg_sq": v}, p, g, ok, coef)
