"""Memory-saving optimizer state: 8-bit block-wise and bfloat16 moments.

Pure NumPy (importable without numba): the quantisation maps, the storage classes, the
float64 reference the kernels must equal bit for bit, and the host conversions that
state import and export use (routed to the numba kernels of
:mod:`adamserve.engine.kernels_quant` when numba is there).

**int8** (block-wise dynamic quantisation). Each tensor of at least
:data:`MIN_QUANTIZED` elements is cut into blocks of :data:`QBLOCK` values from its
first element (its last block may be short). A block x keeps one float32 scale and
one uint8 code per value::

    scale = max|x|                      (float32; NaN if any x is NaN)
    y     = float64(x) / float64(scale)  (0 where scale == 0)
    code  = #{k : mid[k] < y},  mid[k] = (float64(map[k]) + float64(map[k+1])) / 2
    x'    = float32(map[code]) * scale   (in float32)

i.e. ``code = searchsorted(mid, y, side="left")``: the nearest map value, a tie going
to the lower one, a NaN y to the last code. Smaller tensors keep float32 moments,
packed in ``small``. exp_avg uses :data:`SIGNED_MAP`; exp_avg_sq, max_exp_avg_sq and
exp_inf :data:`UNSIGNED_MAP`.

**bfloat16** (the top 16 bits of a float32). Steps write with stochastic rounding::

    bits = (f32_bits(x) + r) >> 16,   r = stochastic_bits(seed, counter, i) in [0, 2**16)

so E[x'] = x; a NaN stays a NaN (quiet), Inf stays Inf, and a finite value above the
largest finite bfloat16 (3.3895e38) rounds to Inf with probability in proportion to
its distance from it, as if Inf were 2**128. Import rounds to nearest even
(:func:`adamserve_proto.codec.bf16_bits`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from types import ModuleType
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt

from adamserve_proto import codec

F32 = npt.NDArray[np.float32]
F64 = npt.NDArray[np.float64]
I64 = npt.NDArray[np.int64]
U8 = npt.NDArray[np.uint8]
U16 = npt.NDArray[np.uint16]
U32 = npt.NDArray[np.uint32]
Array = Any  # a NumPy array, or a CuPy array on the CUDA backend

QBLOCK = 256  # values per int8 block (one float32 scale each)
MIN_QUANTIZED = 4096  # tensors with fewer elements keep float32 moments
KINDS = ("int8", "bfloat16")  # the quantised state dtypes (float32 is the plain one)


# -- the int8 maps ------------------------------------------------------------------------


def dynamic_map(signed: bool) -> F32:
    """The dynamic (decade-exponent) quantisation map, 256 float32 values ascending.

    For decade i = 0..6 the means of adjacent points of
    ``linspace(0.1, 1, n + 1)`` (float32), times ``10**(i - 6)``: n = 2**i values per
    decade and both signs (signed), or n = 2**(i + 1), positive only (unsigned); plus
    0 and 1.0. So the signed map is symmetric but for 1.0 (its least value is
    -0.99296874), and both resolve 7 decades below 1.
    """
    values = [np.array([0.0, 1.0], dtype=np.float32)]
    for i in range(7):
        n = 2**i if signed else 2 ** (i + 1)
        edges = np.linspace(0.1, 1.0, n + 1, dtype=np.float32)
        means = np.float32(10.0 ** (i - 6)) * ((edges[:-1] + edges[1:]) / np.float32(2))
        values += [means, -means] if signed else [means]
    out = np.sort(np.concatenate(values)).astype(np.float32)
    assert out.shape == (256,) and np.unique(out).size == 256
    return out


SIGNED_MAP = dynamic_map(True)
UNSIGNED_MAP = dynamic_map(False)
SIGNED_SLOTS = frozenset({"exp_avg"})  # the rest (exp_avg_sq, max_exp_avg_sq, exp_inf) unsigned


def qmap(signed: bool) -> F32:
    return SIGNED_MAP if signed else UNSIGNED_MAP


def midpoints(signed: bool) -> F64:
    """The 255 decision points between adjacent map values, in float64 (exact)."""
    m = qmap(signed).astype(np.float64)
    return (m[:-1] + m[1:]) / 2


def zero_code(signed: bool) -> int:
    """The code of 0.0 (what a zero block holds)."""
    return int(np.flatnonzero(qmap(signed) == 0)[0])


# The kernels' search: a table on the top bits of TABLE_STRETCH·|y| (its exponent and
# TABLE_BITS mantissa bits) gives a candidate code, and one comparison with the next
# midpoint the code itself. The stretch keeps every midpoint at least TABLE_MARGIN
# (relative) from the buckets' edges, where a rounded |y| could land on the wrong side:
# so a |y| known to a few float32 ulps finds the right bucket, or one whose candidate
# and comparison give the same code. |y|·stretch < 2**TABLE_EMIN (no midpoint lies
# there) shares bucket 0.
TABLE_BITS = 7
TABLE_EMIN = -23
TABLE_STRETCH = 1.17
TABLE_MARGIN = 2.0**-16
TABLE_SIZE = (1 - TABLE_EMIN) << TABLE_BITS  # buckets per sign: binades 2**-23 .. 2**0
TABLE_BASE = (1023 + TABLE_EMIN) << TABLE_BITS  # (float64 bits >> (52 - TABLE_BITS)) of bucket 0
TABLE_SHIFT = 52 - TABLE_BITS
TABLE_BASE32 = (127 + TABLE_EMIN) << TABLE_BITS  # the same from float32 bits
TABLE_SHIFT32 = 23 - TABLE_BITS


def code_table(signed: bool) -> tuple[U8, F64]:
    """The kernels' search tables ``(table, mid)``: uint8[2 * TABLE_SIZE], float64[256].

    With ``b = clip((f64_bits(TABLE_STRETCH·|y|) >> TABLE_SHIFT) - TABLE_BASE, 0,
    TABLE_SIZE - 1)`` (or the same from float32 bits) and
    ``t = table[b + TABLE_SIZE·(y < 0)]``, the code is ``t + (mid[t] < y)`` (``mid[255]``
    = +Inf pads the midpoints). For y >= 0 (a NaN included: its bucket is the last)
    ``t`` counts the midpoints below the bucket, for y < 0 those at or below its negative
    far end; either way at most one midpoint lies between. Raises AssertionError if the
    map breaks what the kernels rely on: one midpoint at most per bucket, none within
    TABLE_MARGIN of an edge, and every midpoint of at most 26 significant bits (so that
    ``mid·scale`` is exact in float64).
    """
    mid = midpoints(signed)
    k = np.arange(TABLE_SIZE + 1, dtype=np.int64)
    edge = ((k + TABLE_BASE) << TABLE_SHIFT).view(np.float64) / TABLE_STRETCH
    lo, hi = edge[:-1].copy(), edge[1:]
    lo[0] = 0.0  # bucket 0 takes everything below 2**TABLE_EMIN too
    pos = np.searchsorted(mid, lo, side="left")
    neg = np.searchsorted(mid, -hi, side="right")
    inner = np.abs(mid[mid != 0])
    near = np.abs(inner[:, None] - edge[None, 1:]).min(axis=1) / inner
    sig = np.frexp(np.abs(mid))[0] * 2.0**26
    if ((np.searchsorted(mid, hi, side="left") - pos).max() > 1
            or (np.searchsorted(mid, -lo, side="right") - neg).max() > 1
            or near.min() < TABLE_MARGIN or (sig != np.round(sig)).any()):
        raise AssertionError("code_table: the map does not fit the kernels' search")
    table = np.concatenate([pos, neg]).astype(np.uint8)
    return table, np.append(mid, np.inf)


# -- the float64 reference ----------------------------------------------------------------


def quantize_ref(x: F32, signed: bool) -> tuple[U8, np.float32]:
    """One block (<= QBLOCK float32 values) as codes and scale, by the definition."""
    x = np.asarray(x, dtype=np.float32)
    with np.errstate(invalid="ignore"):
        scale = np.max(np.abs(x)) if x.size else np.float32(0)
        y = (x.astype(np.float64) / np.float64(scale) if scale != 0
             else np.zeros(x.shape, np.float64))
    codes = np.searchsorted(midpoints(signed), y, side="left").astype(np.uint8)
    return codes, np.float32(scale)


def dequantize_ref(codes: U8, scale: np.float32 | float, signed: bool) -> F32:
    """One block's float32 values: map[code] * scale in float32."""
    with np.errstate(invalid="ignore", over="ignore"):
        out: F32 = qmap(signed)[np.asarray(codes, np.intp)] * np.float32(scale)
    return out


def quantize_tensor_ref(x: F32, signed: bool) -> tuple[U8, F32]:
    """A whole tensor's codes and per-block scales, block by block (the reference)."""
    x = np.asarray(x, dtype=np.float32).reshape(-1)
    codes = np.empty(x.size, dtype=np.uint8)
    scales = np.empty(-(-x.size // QBLOCK), dtype=np.float32)
    for q, lo in enumerate(range(0, x.size, QBLOCK)):
        codes[lo:lo + QBLOCK], scales[q] = quantize_ref(x[lo:lo + QBLOCK], signed)
    return codes, scales


def dequantize_tensor_ref(codes: U8, scales: F32, signed: bool) -> F32:
    """A whole tensor's values from its codes and per-block scales."""
    block = np.repeat(np.asarray(scales, np.float32), QBLOCK)[:len(codes)]
    with np.errstate(invalid="ignore", over="ignore"):
        out: F32 = qmap(signed)[np.asarray(codes, np.intp)] * block
    return out


# -- bfloat16 stochastic rounding ---------------------------------------------------------

_M32 = 0xFFFFFFFF
GOLDEN = 0x9E3779B9  # added to the counter so that (seed 0, counter 0) does not hash to 0
HIGH_MIX = 0x85EBCA6B  # multiplies the high word of an element index past 2**32


def mix32(x: int) -> int:
    """A 32-bit finaliser (xorshift-multiply, constants 0x7feb352d and 0x846ca68b)."""
    x &= _M32
    x ^= x >> 16
    x = (x * 0x7FEB352D) & _M32
    x ^= x >> 15
    x = (x * 0x846CA68B) & _M32
    x ^= x >> 16
    return x


def stream_key(seed: int, counter: int) -> int:
    """The 32-bit key of one kernel call: mix32(seed ^ mix32(counter + GOLDEN)), both
    taken modulo 2**32."""
    return mix32((seed & _M32) ^ mix32((counter + GOLDEN) & _M32))


def _mix32_array(x: npt.NDArray[np.uint64]) -> npt.NDArray[np.uint64]:
    m = np.uint64(_M32)
    x = x & m
    x ^= x >> np.uint64(16)
    x = (x * np.uint64(0x7FEB352D)) & m
    x ^= x >> np.uint64(15)
    x = (x * np.uint64(0x846CA68B)) & m
    x ^= x >> np.uint64(16)
    return x


def stochastic_bits(seed: int, counter: int, index: npt.NDArray[np.int64]) -> U32:
    """The 16 random bits r of flat elements ``index`` in call (seed, counter)::

        r = mix32(lo32(i) ^ key ^ lo32(hi32(i) * HIGH_MIX)) >> 16,  key = stream_key(...)
    """
    i = np.asarray(index, dtype=np.int64).astype(np.uint64)
    m = np.uint64(_M32)
    high = ((i >> np.uint64(32)) * np.uint64(HIGH_MIX)) & m
    h = _mix32_array((i & m) ^ np.uint64(stream_key(seed, counter)) ^ high)
    return (h >> np.uint64(16)).astype(np.uint32)


def stochastic_round_ref(x: F32, r: U32) -> U16:
    """float32 values to bfloat16 bits, rounding up with probability (dropped bits)/2**16:
    ``(f32_bits(x) + r) >> 16``; a NaN keeps its top bits, made quiet."""
    u = np.asarray(x, dtype=np.float32).view(np.uint32).astype(np.uint64)
    out = ((u + np.asarray(r, np.uint64)) >> np.uint64(16)).astype(np.uint16)
    nan = (u & np.uint64(0x7FFFFFFF)) > np.uint64(0x7F800000)
    out[nan] = ((u[nan] >> np.uint64(16)) | np.uint64(0x40)).astype(np.uint16)
    return out


def bf16_values(bits: U16) -> F32:
    """bfloat16 bits as the float32 values they stand for (exact)."""
    return codec.bf16_widen(np.asarray(bits, dtype=np.uint16))


# -- storage --------------------------------------------------------------------------------


class Device(Protocol):
    """What the storage needs from a backend (CpuBackend and CudaBackend have both)."""

    def zeros(self, n: int, dtype: np.dtype[Any]) -> Array: ...

    def to_device(self, host: npt.NDArray[Any]) -> Array: ...


class _Host:
    """NumPy, as a :class:`Device`."""

    def zeros(self, n: int, dtype: np.dtype[Any]) -> Array:
        return np.zeros(n, dtype=dtype)

    def to_device(self, host: npt.NDArray[Any]) -> Array:
        return np.ascontiguousarray(host)


HOST: Device = _Host()


def to_host(x: Array) -> npt.NDArray[Any]:
    """A NumPy array from a NumPy or CuPy one."""
    if isinstance(x, np.ndarray):
        return x
    getter = getattr(x, "get", None)
    if getter is None:
        raise TypeError(f"expected a NumPy or CuPy array, got {type(x).__name__}")
    out: npt.NDArray[Any] = getter()
    return out


def _offsets(offsets: npt.ArrayLike) -> I64:
    off = np.asarray(offsets, dtype=np.int64)
    if off.ndim != 1 or off.size < 1 or off[0] != 0 or (np.diff(off) < 0).any():
        raise ValueError("offsets: expected a non-decreasing int64 vector starting at 0 "
                         f"(one entry per tensor, plus the total), got {off!r}")
    return off


def int8_meta(offsets: npt.ArrayLike) -> tuple[I64, int, int]:
    """``(meta, nblocks, small_size)`` of a layout: meta int64[nseg, 3] holds, per
    tensor, its first block index in ``scale``, its offset in ``small`` (-1 when it is
    quantised) and its first flat element."""
    off = _offsets(offsets)
    sizes = np.diff(off)
    quantised = sizes >= MIN_QUANTIZED
    blocks = np.where(quantised, -(-sizes // QBLOCK), 0)
    smalls = np.where(quantised, 0, sizes)
    meta = np.empty((len(sizes), 3), dtype=np.int64)
    meta[:, 0] = np.cumsum(blocks) - blocks
    meta[:, 1] = np.where(quantised, -1, np.cumsum(smalls) - smalls)
    meta[:, 2] = off[:-1]
    return meta, int(blocks.sum()), int(smalls.sum())


@dataclass
class Int8Moments:
    """One moment slot in 8 bits: codes per flat element (as the params; the entries of
    tensors under MIN_QUANTIZED unused), a float32 scale per QBLOCK of each quantised
    tensor, and the small tensors' float32 values packed in ``small``. ``meta`` is
    :func:`int8_meta`'s. NumPy arrays on the CPU, CuPy arrays on CUDA."""

    codes: Array  # uint8[size]
    scale: Array  # float32[nblocks]
    small: Array  # float32[small_size]
    meta: Array  # int64[nseg, 3]
    signed: bool

    kind = "int8"

    @classmethod
    def zeros(cls, offsets: npt.ArrayLike, signed: bool, device: Device = HOST) -> Int8Moments:
        """All-zero moments of a layout (every code the code of 0, scales 0)."""
        off = _offsets(offsets)
        meta, nblocks, small_size = int8_meta(off)
        codes = device.zeros(int(off[-1]), np.dtype(np.uint8))
        codes.fill(zero_code(signed))
        return cls(codes, device.zeros(nblocks, np.dtype(np.float32)),
                   device.zeros(small_size, np.dtype(np.float32)), device.to_device(meta), signed)

    @property
    def size(self) -> int:
        return int(self.codes.shape[0])

    @property
    def nbytes(self) -> int:
        return int(self.codes.nbytes + self.scale.nbytes + self.small.nbytes + self.meta.nbytes)

    def copy(self) -> Int8Moments:
        return replace(self, codes=self.codes.copy(), scale=self.scale.copy(),
                       small=self.small.copy(), meta=self.meta.copy())

    def moved(self, to: Callable[[npt.NDArray[Any]], Array]) -> Int8Moments:
        """The same moments with every array passed through ``to`` (e.g. a backend's
        ``to_device``, or :func:`to_host`)."""
        return replace(self, codes=to(self.codes), scale=to(self.scale), small=to(self.small),
                       meta=to(self.meta))


@dataclass
class Bf16Moments:
    """One moment slot as bfloat16 bits per flat element. ``seed`` (uint32) and
    ``counter`` (+1 by each kernel call that writes the slot) choose the stochastic
    rounding's random bits (:func:`stochastic_bits`)."""

    bits: Array  # uint16[size]
    seed: int
    counter: int = 0

    kind = "bfloat16"

    @classmethod
    def zeros(cls, size: int, seed: int, device: Device = HOST) -> Bf16Moments:
        return cls(device.zeros(int(size), np.dtype(np.uint16)), _seed(seed))

    @property
    def size(self) -> int:
        return int(self.bits.shape[0])

    @property
    def nbytes(self) -> int:
        return int(self.bits.nbytes)

    def copy(self) -> Bf16Moments:
        return replace(self, bits=self.bits.copy())

    def moved(self, to: Callable[[npt.NDArray[Any]], Array]) -> Bf16Moments:
        return replace(self, bits=to(self.bits))


Moments = Int8Moments | Bf16Moments


def _seed(seed: int) -> int:
    if isinstance(seed, bool) or not isinstance(seed, int | np.integer) or not (
            0 <= int(seed) <= _M32):
        raise ValueError(f"seed: expected an integer in [0, 2**32), got {seed!r}")
    return int(seed)


# -- what a kernel call takes (shared by the CPU and CUDA dispatchers) ---------------------

# The algorithms whose moments may be quantised: their slots in kernel order (a third,
# AMSGrad's max_exp_avg_sq, optional) and the coefficient columns their kernels read (the
# widest index + 1, before the trailing one). adamw runs adam's kernels.
STEP_SLOTS: dict[str, tuple[tuple[str, ...], int]] = {
    "adam": (("exp_avg", "exp_avg_sq", "max_exp_avg_sq"), 10),
    "nadam": (("exp_avg", "exp_avg_sq"), 10),
    "radam": (("exp_avg", "exp_avg_sq"), 12),
    "adamax": (("exp_avg", "exp_inf"), 7),
    "lamb": (("exp_avg", "exp_avg_sq"), 11),
}
STEP_ALIASES = {"adamw": "adam"}


def step_slots(algorithm: str, slots: Mapping[str, Any],
               size: int) -> tuple[str, str, list[Moments | None]]:
    """``(kernel, kind, moments)`` of one quantised step: the kernel's algorithm, "int8"
    or "bfloat16", and the moments in kernel order (None for an absent third). ValueError
    for an algorithm without such kernels, missing or unexpected slots, a mix of kinds, or
    slots not of ``size`` elements."""
    a = STEP_ALIASES.get(algorithm, algorithm)
    if a not in STEP_SLOTS:
        known = ", ".join(sorted([*STEP_SLOTS, *STEP_ALIASES]))
        raise ValueError(f"no quantised-moment kernel for {algorithm!r}; expected one of {known}")
    names = STEP_SLOTS[a][0]
    missing = [n for n in names[:2] if n not in slots]
    extra = sorted(set(slots) - set(names))
    if missing or extra:
        raise ValueError(f"{algorithm}: expected the slots {', '.join(names)}; missing "
                         f"{missing}, unexpected {extra}")
    got: list[Moments | None] = [slots.get(n) for n in names]
    kinds = {type(m) for m in got if m is not None}
    if len(kinds) != 1 or not kinds <= {Int8Moments, Bf16Moments}:
        raise ValueError(f"{algorithm}: the slots must all be Int8Moments or all Bf16Moments, "
                         f"got {', '.join(sorted(k.__name__ for k in kinds))}")
    for n, m in zip(names, got, strict=True):
        if m is not None and m.size != size:
            raise ValueError(f"slot {n}: {m.size} elements, the parameters have {size}")
    return a, (Int8Moments.kind if kinds == {Int8Moments} else Bf16Moments.kind), got


def misaligned(start: I64, end: I64, seg: I64, meta: I64, size: int) -> str | None:
    """Why a block table (host arrays) cannot step int8 moments laid out by ``meta``, or
    None: each block of a quantised tensor must start at one of its QBLOCKs and end at
    one or at the tensor's end, so that no two blocks share a QBLOCK."""
    if seg.shape[0] == 0:
        return None
    ends = np.append(meta[1:, 2], size)
    first = meta[seg, 2]
    bad = (meta[seg, 1] < 0) & (((start - first) % QBLOCK != 0) | (
        ((end - first) % QBLOCK != 0) & (end != ends[seg])))
    if not bad.any():
        return None
    b = int(np.flatnonzero(bad)[0])
    return (f"int8 moments: block [{int(start[b])}, {int(end[b])}) of tensor {int(seg[b])} "
            f"(elements [{int(first[b])}, {int(ends[seg[b]])})) does not start and end on its "
            f"{QBLOCK}-element quantisation blocks; a quantised tensor is stepped whole or in "
            "ranges aligned to them")


# -- host conversions -----------------------------------------------------------------------


def _fast() -> ModuleType | None:
    """The numba kernels, where numba is installed (the server always has it)."""
    try:
        from adamserve.engine import kernels_quant
    except ImportError:  # numba absent: the NumPy reference below
        return None
    return kernels_quant


def _values(values: npt.ArrayLike, size: int, what: str) -> F32:
    v = np.ascontiguousarray(np.asarray(values).reshape(-1), dtype=np.float32)
    if v.size != size:
        raise ValueError(f"{what}: expected {size} values (the layout's size), got {v.size}")
    return v


def quantize_int8(values: npt.ArrayLike, offsets: npt.ArrayLike, signed: bool) -> Int8Moments:
    """float32 values of a whole layout as 8-bit moments (host NumPy arrays)."""
    off = _offsets(offsets)
    v = _values(values, int(off[-1]), "quantize_int8")
    slot = Int8Moments.zeros(off, signed)
    fast = _fast()
    if fast is not None:
        fast.quantize_into(slot, v)
        return slot
    for s in range(len(off) - 1):
        lo, hi = int(off[s]), int(off[s + 1])
        first, small_at = int(slot.meta[s, 0]), int(slot.meta[s, 1])
        if small_at >= 0:
            slot.small[small_at:small_at + hi - lo] = v[lo:hi]
        elif hi > lo:
            codes, scales = quantize_tensor_ref(v[lo:hi], signed)
            slot.codes[lo:hi] = codes
            slot.scale[first:first + len(scales)] = scales
    return slot


def _check_layout(slot: Int8Moments, off: I64) -> None:
    meta, nblocks, small_size = int8_meta(off)
    host_meta = to_host(slot.meta)
    if (slot.size != int(off[-1]) or int(slot.scale.shape[0]) != nblocks
            or int(slot.small.shape[0]) != small_size or not np.array_equal(host_meta, meta)):
        raise ValueError(
            f"int8 moments of {slot.size} elements, {slot.scale.shape[0]} blocks and "
            f"{slot.small.shape[0]} small values do not match the layout ({int(off[-1])} "
            f"elements, {nblocks} blocks, {small_size} small values)")


def dequantize(slot: Moments, offsets: npt.ArrayLike) -> F32:
    """The float32 values of a whole slot (host NumPy), in the params' layout."""
    off = _offsets(offsets)
    if isinstance(slot, Bf16Moments):
        if slot.size != int(off[-1]):
            raise ValueError(f"bfloat16 moments of {slot.size} elements do not match the "
                             f"layout ({int(off[-1])} elements)")
        return bf16_values(to_host(slot.bits))
    _check_layout(slot, off)
    host = slot.moved(to_host)
    fast = _fast()
    if fast is not None:
        values: F32 = fast.dequantize_host(host)
        return values
    out = np.empty(host.size, dtype=np.float32)
    for s in range(len(off) - 1):
        lo, hi = int(off[s]), int(off[s + 1])
        first, small_at = int(host.meta[s, 0]), int(host.meta[s, 1])
        if small_at >= 0:
            out[lo:hi] = host.small[small_at:small_at + hi - lo]
        elif hi > lo:
            nb = -(-(hi - lo) // QBLOCK)
            out[lo:hi] = dequantize_tensor_ref(host.codes[lo:hi],
                                               host.scale[first:first + nb], host.signed)
    return out


def to_bf16(values: npt.ArrayLike, seed: int, counter: int = 0) -> Bf16Moments:
    """float32 values as bfloat16 moments, rounded to nearest even (import)."""
    v = np.ascontiguousarray(np.asarray(values).reshape(-1), dtype=np.float32)
    seed = _seed(seed)
    if _fast() is not None:
        from adamserve.engine.kernels_cpu import bf16_bits_into

        bits = np.empty(v.size, dtype=np.uint16)
        bf16_bits_into(bits, v)
    else:
        bits = codec.bf16_bits(v)
    return Bf16Moments(bits, seed, int(counter))


# -- native export ------------------------------------------------------------------------


def parts(slot: Moments) -> dict[str, npt.NDArray[Any]]:
    """The arrays a checkpoint keeps of a slot (host NumPy): ``codes``, ``scale`` and
    ``small`` (int8), or ``bits`` (bfloat16); the rest follows from the layout."""
    if isinstance(slot, Bf16Moments):
        return {"bits": to_host(slot.bits)}
    return {"codes": to_host(slot.codes), "scale": to_host(slot.scale),
            "small": to_host(slot.small)}


_PARTS: dict[str, dict[str, type[np.generic]]] = {
    "int8": {"codes": np.uint8, "scale": np.float32, "small": np.float32},
    "bfloat16": {"bits": np.uint16}}


def from_parts(kind: str, arrays: Mapping[str, npt.ArrayLike], offsets: npt.ArrayLike,
               signed: bool = False, seed: int = 0, counter: int = 0) -> Moments:
    """A slot from :func:`parts`' arrays (host NumPy), checked against the layout:
    ValueError naming the part, and what was expected, when one is missing, extra, of
    another dtype or length, or (a scale) negative."""
    if kind not in _PARTS:
        raise ValueError(f"state dtype: expected one of {', '.join(KINDS)}, got {kind!r}")
    off = _offsets(offsets)
    want = _PARTS[kind]
    if set(arrays) != set(want):
        raise ValueError(f"{kind} moments: expected the parts {', '.join(sorted(want))}, got "
                         f"{', '.join(sorted(arrays)) or 'none'}")
    meta, nblocks, small_size = int8_meta(off)
    lengths = {"codes": int(off[-1]), "scale": nblocks, "small": small_size,
               "bits": int(off[-1])}
    got: dict[str, npt.NDArray[Any]] = {}
    for name, dtype in want.items():
        a = np.asarray(arrays[name])
        if a.dtype != np.dtype(dtype) or a.ndim != 1 or a.shape[0] != lengths[name]:
            raise ValueError(f"{kind} moments: part {name!r} must be {np.dtype(dtype)} of "
                             f"shape [{lengths[name]}], got {a.dtype} of shape {list(a.shape)}")
        got[name] = np.ascontiguousarray(a)
    if kind == "bfloat16":
        return Bf16Moments(got["bits"], _seed(seed), int(counter))
    if (got["scale"] < 0).any():
        raise ValueError(f"int8 moments: part 'scale' must be >= 0 (a block's max |x|), got "
                         f"{float(got['scale'].min())!r}")
    return Int8Moments(got["codes"], got["scale"], got["small"], meta, bool(signed))


def quantized_nbytes(kind: str, offsets: npt.ArrayLike) -> int:
    """Bytes one slot of ``kind`` takes for a layout (to size sessions before allocating)."""
    off = _offsets(offsets)
    if kind == "bfloat16":
        return 2 * int(off[-1])
    if kind != "int8":
        raise ValueError(f"state dtype: expected one of {', '.join(KINDS)}, got {kind!r}")
    meta, nblocks, small_size = int8_meta(off)
    return int(off[-1]) + 4 * (nblocks + small_size) + meta.nbytes

