"""The server's fused conversions (kernels_cpu, used by engine.dtypes) against torch and
the shared NumPy codec: BF16 rounding bit for bit, widening exactly, and the sums of
squares that decoding computes on the way, on the serial and the parallel paths."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest
import torch

from adamserve.engine import dtypes, kernels_cpu
from adamserve_proto import codec

# Below and above the size at which the kernels switch to the thread pool.
SIZES = [1, 1000, kernels_cpu.SERIAL_BELOW - 1, kernels_cpu.SERIAL_BELOW + 12345]


@pytest.fixture(autouse=True)
def _quiet_casts() -> Iterator[None]:
    """Signalling NaNs widen to quiet ones and FP16 overflows to Inf, as they should."""
    with np.errstate(over="ignore", invalid="ignore"):
        yield


def patterns() -> np.ndarray:
    """float32 values with every possible upper half (each sign, exponent, the bf16
    mantissas, Inf, every NaN prefix, subnormals) and lower halves that round down, tie,
    tie from an odd or even kept bit, round up, or carry into the exponent."""
    upper = np.arange(1 << 16, dtype=np.uint32) << 16
    lower = np.array([0, 1, 0x4000, 0x7FFF, 0x8000, 0x8001, 0xC000, 0xFFFF], dtype=np.uint32)
    return (upper[:, None] | lower[None, :]).reshape(-1).view(np.float32)


def torch_bits(x: np.ndarray) -> np.ndarray:
    return torch.from_numpy(x.copy()).to(torch.bfloat16).view(torch.int16).numpy().view(
        np.uint16)


def fused_bits(x: np.ndarray) -> np.ndarray:
    out = np.empty(x.size, dtype=np.uint16)
    kernels_cpu.bf16_bits_into(out, x)
    return out


@pytest.mark.parametrize("n", [*SIZES, patterns().size])
def test_rounding_is_torchs_bit_for_bit(n: int) -> None:
    x = np.resize(patterns(), n)
    got = fused_bits(x)
    nan = np.isnan(x)
    assert np.array_equal(got[~nan], torch_bits(x)[~nan])  # ties to even, Inf, subnormals
    # torch writes one NaN for all; ours keeps the sign and payload prefix, made quiet
    assert np.array_equal(got, codec.bf16_bits(x))
    assert np.isnan(codec.bf16_widen(got[nan])).all()
    assert (got[nan] & 0x0040).all()


def test_the_edge_cases_one_by_one() -> None:
    cases = {
        1.0: 0x3F80, -0.0: 0x8000,
        1.00390625: 0x3F80,  # halfway between 0x3F80 and 0x3F81: to the even one, down
        1.01171875: 0x3F82,  # halfway between 0x3F81 and 0x3F82: to the even one, up
        3.4028235e38: 0x7F80,  # the largest float32 rounds up to Inf, as torch's does
        float("inf"): 0x7F80, float("-inf"): 0xFF80,
        1e-40: 0x0001, -1e-45: 0x8000,  # subnormals
    }
    x = np.array(list(cases), dtype=np.float32)
    assert fused_bits(x).tolist() == list(cases.values())
    assert torch_bits(x).tolist() == list(cases.values())
    # NaNs whose payload is only in the low half must not truncate to Inf
    low_nans = np.array([0x7F800001, 0xFF800001, 0x7F807FFF], dtype=np.uint32).view(np.float32)
    assert fused_bits(low_nans).tolist() == [0x7FC0, 0xFFC0, 0x7FC0]


def test_float64_rounds_through_float32_as_torch_and_the_codec_do() -> None:
    rng = np.random.default_rng(3)
    x = np.concatenate([rng.standard_normal(300_000) * 10.0 ** rng.integers(-40, 40, 300_000),
                        [1.00390625 + 1e-12, 1.00390625 - 1e-12, 1e300, -1e-300, np.nan,
                         np.inf]])
    got = fused_bits(x)
    assert np.array_equal(got, codec.bf16_bits(x))
    finite = np.isfinite(x)
    assert np.array_equal(got[finite], torch_bits(x)[finite])


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_widening_is_exact_and_sums_the_squares(dtype: type) -> None:
    bits = np.arange(1 << 16, dtype=np.uint16)
    out = np.empty(bits.size, dtype=dtype)
    sumsq = kernels_cpu.bf16_widen_sumsq(out, bits)
    want = codec.bf16_widen(bits)
    assert np.array_equal(out, want.astype(dtype), equal_nan=True)
    assert np.array_equal(want, torch.from_numpy(bits.view(np.int16).copy()).view(
        torch.bfloat16).float().numpy(), equal_nan=True)
    assert np.isnan(sumsq)  # the NaN patterns reach the non-finite check
    finite = bits[np.isfinite(want)]
    out = np.empty(finite.size, dtype=dtype)
    assert kernels_cpu.bf16_widen_sumsq(out, finite) == pytest.approx(
        float(np.sum(codec.bf16_widen(finite).astype(np.float64) ** 2)), rel=1e-12)
    inf = np.array([0x3F80, 0x7F80], dtype=np.uint16)
    assert kernels_cpu.bf16_widen_sumsq(np.empty(2, dtype), inf) == float("inf")


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_decode_into_sums_the_squares_of_what_it_stored(n: int, dtype: type) -> None:
    rng = np.random.default_rng(n)
    x = (rng.standard_normal(n) * 1e3).astype(np.float32)
    for datatype in dtypes.WIRE_DTYPES:
        data = dtypes.encode(x, datatype)
        out = np.empty(n, dtype=dtype)
        sumsq = dtypes.decode_into(out, data, datatype)
        want = codec.decode(data, datatype).astype(dtype)
        assert np.array_equal(out, want), datatype
        assert sumsq == pytest.approx(float(np.sum(want.astype(np.float64) ** 2)),
                                      rel=1e-12), datatype


def test_decode_into_reads_data_at_any_address() -> None:
    # a chunk read by hand out of a message: its data starts wherever the framing ends
    x = np.linspace(-3, 3, 5001, dtype=np.float32)
    for datatype in ("FP32", "BF16", "FP64"):
        data = dtypes.encode(x, datatype)
        framed = memoryview(b"\x01\x02\x03" + data)[3:]
        out = np.empty(x.size, dtype=np.float32)
        plain = np.empty(x.size, dtype=np.float32)
        assert dtypes.decode_into(out, framed, datatype) == dtypes.decode_into(plain, data,
                                                                                datatype)
        assert np.array_equal(out, plain)


@pytest.mark.parametrize("datatype", list(dtypes.WIRE_DTYPES))
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_encodings_are_the_codecs(datatype: str, dtype: type) -> None:
    x = np.concatenate([patterns()[::7], np.linspace(-1e5, 1e5, 3001, dtype=np.float32)])
    x = x.astype(dtype)
    want = bytes(codec.encode(x, datatype))
    assert dtypes.encode(x, datatype) == want
    buf = dtypes.encode_buffer(x, datatype)
    assert buf.format == "B" and buf.tobytes() == want
    x[:] = 0  # a buffer of its own: the values of then, not a view
    assert buf.tobytes() == want


def test_encode_buffer_of_nothing() -> None:
    for datatype in dtypes.WIRE_DTYPES:
        assert len(dtypes.encode_buffer(np.zeros(0, np.float32), datatype)) == 0
        assert dtypes.encode(np.zeros(0, np.float64), datatype) == b""
