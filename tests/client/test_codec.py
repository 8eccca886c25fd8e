"""The tensor codec both sides share (``adamserve_proto.codec``, the client's
``adamserve_client.tensors``): bf16 rounds as torch rounds, every datatype round-trips,
and the server's engine writes the same bytes."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest

from adamserve_client import tensors

torch = pytest.importorskip("torch")

SPECIAL = np.array([0.0, -0.0, 1.0, -1.5, np.inf, -np.inf, np.nan,
                    3.4028235e38, 1e-40, -1e-45,  # the largest float32, subnormals
                    1.00390625, 1.01171875,  # exactly halfway: ties to even, down and up
                    ], dtype=np.float32)
# NaNs whose payload sits only in the low bits: truncated, they would read as Inf
LOW_NANS = np.array([0x7F800001, 0xFF800001, 0x7F807FFF], dtype=np.uint32).view(np.float32)


@pytest.fixture(autouse=True)
def _quiet_overflow() -> Iterator[None]:
    """FP16 overflows to Inf for the largest values and signalling NaNs widen to quiet
    ones, as they should: no warnings."""
    with np.errstate(over="ignore", invalid="ignore"):
        yield


def _values() -> np.ndarray:
    rng = np.random.default_rng(0)
    return np.concatenate([SPECIAL, rng.standard_normal(10_000).astype(np.float32) * 1e3])


def test_bf16_rounds_as_torch() -> None:
    x = _values()
    want = torch.from_numpy(x.copy()).to(torch.bfloat16).view(torch.int16).numpy()
    got = tensors.bf16_bits(x)
    nan = np.isnan(x)  # torch writes its own NaN pattern; a NaN is all that must stay
    assert np.array_equal(got[~nan], want.view(np.uint16)[~nan])
    assert np.isnan(tensors.bf16_widen(got[nan])).all()


def test_bf16_keeps_nans_nan() -> None:
    widened = tensors.bf16_widen(tensors.bf16_bits(LOW_NANS))
    assert np.isnan(widened).all()


@pytest.mark.parametrize("datatype", ["FP32", "FP64", "FP16", "BF16"])
def test_each_datatype_round_trips(datatype: str) -> None:
    x = _values()[np.isfinite(_values())]
    data = tensors.encode(x, datatype)
    assert len(memoryview(data)) == x.size * tensors.itemsize(datatype)
    back = tensors.decode(data, datatype)
    if datatype == "BF16":
        want = torch.from_numpy(x.copy()).to(torch.bfloat16).float().numpy()
    else:
        want = x.astype(tensors.DATATYPES[datatype]).astype(back.dtype)
    assert np.array_equal(back, want)
    out = np.empty(x.size, dtype=np.float64)
    tensors.decode_into(out, data, datatype)
    assert np.array_equal(out, back.astype(np.float64))


def test_encode_is_a_view_when_the_dtype_already_matches() -> None:
    x = np.arange(4, dtype=np.float32)
    data = tensors.encode(x, "FP32")
    x[0] = 7.0
    assert tensors.decode(data, "FP32")[0] == 7.0
    assert bytes(tensors.encode(np.zeros(0, np.float32), "BF16")) == b""


@pytest.mark.parametrize("datatype", ["FP32", "FP64", "FP16", "BF16"])
def test_the_server_encodes_and_decodes_the_same(datatype: str) -> None:
    dtypes = pytest.importorskip("adamserve.engine.dtypes")
    x = np.concatenate([_values(), LOW_NANS])
    assert dtypes.encode(x, datatype) == bytes(tensors.encode(x, datatype))
    data = dtypes.encode(x, datatype)
    out = np.empty(x.size, dtype=np.float32)
    sumsq = dtypes.decode_into(out, data, datatype)
    assert np.array_equal(out, tensors.decode(data, datatype).astype(np.float32),
                          equal_nan=True)
    assert np.isnan(sumsq)  # the NaNs reach the non-finite check
    finite = out[np.isfinite(out)]
    assert dtypes.decode_into(finite.copy(), tensors.encode(finite, "FP32"), "FP32") == (
        pytest.approx(float(np.sum(finite.astype(np.float64) ** 2)), rel=1e-12))


@pytest.mark.parametrize("n", [0, 1, 16383, 16384, 16385, 100_003])  # around codec's blocks
def test_blocked_bf16_conversions_cover_every_element(n: int) -> None:
    rng = np.random.default_rng(n)
    x = np.resize(np.concatenate([SPECIAL, LOW_NANS,
                                  rng.standard_normal(max(n, 1)).astype(np.float32)]), n)
    got = tensors.bf16_bits(x.reshape(-1, 1) if n else x)
    assert got.shape == ((n, 1) if n else (0,))
    want = torch.from_numpy(x.copy()).to(torch.bfloat16).view(torch.int16).numpy()
    nan = np.isnan(x)
    assert np.array_equal(got.reshape(-1)[~nan], want.view(np.uint16)[~nan])
    assert np.isnan(tensors.bf16_widen(got.reshape(-1)[nan])).all()
    data = got.tobytes()
    for dtype in (np.float32, np.float64):
        out = np.full(n, 7.0, dtype=dtype)
        tensors.decode_into(out, data, "BF16")
        assert np.array_equal(out, tensors.bf16_widen(got.reshape(-1)).astype(dtype),
                              equal_nan=True)
        strided = np.full((n, 2), 7.0, dtype=dtype)[:, 0]  # not contiguous: written in place
        tensors.decode_into(strided, data, "BF16")
        assert np.array_equal(strided, out, equal_nan=True)
