"""The CUDA kernels over 8-bit and bfloat16 moments (engine/kernels_cuda_quant.py).

Without a GPU: the CUDA source compiles to PTX with the backend's NVRTC options (where
nvcc is installed), and its element code (the updates, the int8 code search, the
stochastic rounding), built for the host with g++, equals the reference and the float32
CPU kernels bit for bit. With CuPy and a device: each fused kernel equals "dequantise
with the reference, run kernels_cuda's float32 kernel, quantise with the reference".
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
import pytest

import adamserve.engine as engine
from adamserve.engine import quantize as q
from adamserve.engine.backend import make_blocks
from adamserve.engine.kernels_cpu import CpuBackend
from tests.engine.test_quantize import (
    CASES,
    OFFSETS,
    SIZES,
    Steps,
    crafted,
    gradient,
    ref_dequantize,
    ref_quantize,
    same_bits,
    same_int8,
    start,
)

N = int(OFFSETS[-1])


def _source_module(monkeypatch: pytest.MonkeyPatch) -> types.ModuleType:
    """kernels_cuda_quant read with an empty module standing in for CuPy (its import
    needs one, its source does not), without leaving either behind."""
    monkeypatch.setitem(sys.modules, "cupy", sys.modules.get("cupy") or types.ModuleType("cupy"))
    here = Path(engine.__file__).parent
    loaded = []
    for name, file in (("adamserve.engine.kernels_cuda", "kernels_cuda.py"),
                       ("_kernels_cuda_quant_source", "kernels_cuda_quant.py")):
        spec = importlib.util.spec_from_file_location(name, here / file)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        monkeypatch.setitem(sys.modules, name, module)
        spec.loader.exec_module(module)
        loaded.append(module)
    return loaded[1]


def test_cuda_source_compiles_with_nvcc(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        pytest.skip("nvcc is not installed: the CUDA source is compiled only where it is")
    module = _source_module(monkeypatch)
    uses = [f"auto* use_{i} = &{k};" for i, k in enumerate(module.KERNELS)]
    source = tmp_path / "kernels.cu"
    source.write_text(module._SOURCE + "\n" + "\n".join(uses) + "\n")
    options = sys.modules["adamserve.engine.kernels_cuda"]._OPTIONS
    done = subprocess.run([nvcc, "-ptx", *options, "-o", str(tmp_path / "k.ptx"), str(source)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    ptx = (tmp_path / "k.ptx").read_text()
    assert ptx.count(".entry") == len(module.KERNELS) == 10


# -- the element code, built for the host -------------------------------------------------

HARNESS = r"""
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <math.h>
#include <string>
#include <vector>
#define __device__
#define __forceinline__ inline
static inline unsigned __float_as_uint(float f) { unsigned u; std::memcpy(&u, &f, 4); return u; }
static inline float __uint_as_float(unsigned u) { float f; std::memcpy(&f, &u, 4); return f; }
static inline long long __double_as_longlong(double d) {
    long long u; std::memcpy(&u, &d, 8); return u;
}
@SOURCE@
template <class T> static std::vector<T> get(FILE* f, long long n) {
    std::vector<T> v(n); if (n && fread(v.data(), sizeof(T), n, f) != (size_t)n) throw 1; return v;
}
template <class T> static void put(FILE* f, const std::vector<T>& v) {
    fwrite(v.data(), sizeof(T), v.size(), f);
}
template <class Op> static void run(FILE* in, FILE* out, long long n) {
    auto c = get<float>(in, 16);
    auto use3 = get<int>(in, 1)[0];
    auto p = get<float>(in, n), g = get<float>(in, n), m = get<float>(in, n),
         v = get<float>(in, n), x = get<float>(in, n);
    const Op op(c.data());
    for (long long i = 0; i < n; ++i) op(p[i], g[i], m[i], v[i], x[i], use3 != 0);
    put(out, p); put(out, g); put(out, m); put(out, v); put(out, x);
}
int main(int argc, char** argv) {
    std::string mode = argv[1];
    FILE* in = fopen(argv[2], "rb");
    FILE* out = fopen(argv[3], "wb");
    long long n = get<long long>(in, 1)[0];
    if (mode == "code") {
        auto x = get<float>(in, n), s = get<float>(in, n);
        auto tab = get<unsigned char>(in, 2 * TS);
        auto mid = get<double>(in, 256);
        std::vector<unsigned char> codes(n);
        for (long long i = 0; i < n; ++i) codes[i] = q8_code(x[i], s[i], tab.data(), mid.data());
        put(out, codes);
    } else if (mode == "sround") {
        auto x = get<float>(in, n);
        auto key = get<unsigned>(in, 1)[0];
        auto index = get<long long>(in, n);
        std::vector<unsigned short> bits(n);
        for (long long i = 0; i < n; ++i) bits[i] = q_sround(x[i], key, index[i]);
        put(out, bits);
    } else if (mode == "AdamOp") { run<AdamOp>(in, out, n);
    } else if (mode == "NadamOp") { run<NadamOp>(in, out, n);
    } else if (mode == "RadamOp") { run<RadamOp>(in, out, n);
    } else if (mode == "AdamaxOp") { run<AdamaxOp>(in, out, n);
    } else if (mode == "LambOp") { run<LambOp>(in, out, n);
    } else { return 2; }
    fclose(out);
    return 0;
}
"""


class Host:
    """The CUDA element code compiled for the host (IEEE float32 and float64, no
    contraction into fused multiply-adds, as the NVRTC options ask of the device)."""

    def __init__(self, tmp: Path, module: types.ModuleType) -> None:
        gxx = shutil.which("g++")
        if gxx is None:
            pytest.skip("g++ is not installed: the CUDA element code is built for the host "
                        "only where it is")
        self.tmp = tmp
        (tmp / "harness.cpp").write_text(HARNESS.replace("@SOURCE@", module._ELEMENT_SOURCE))
        done = subprocess.run([gxx, "-O2", "-std=c++17", "-ffp-contract=off", "-fno-fast-math",
                               "-o", str(tmp / "harness"), str(tmp / "harness.cpp")],
                              capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-4000:]

    def __call__(self, mode: str, n: int, *arrays: Any, out: int) -> bytes:
        (self.tmp / "in").write_bytes(np.int64(n).tobytes() + b"".join(
            np.ascontiguousarray(a).tobytes() for a in arrays))
        done = subprocess.run([str(self.tmp / "harness"), mode, str(self.tmp / "in"),
                               str(self.tmp / "out")], capture_output=True, timeout=120)
        assert done.returncode == 0, done.stderr
        data = (self.tmp / "out").read_bytes()
        assert len(data) == out
        return data


@pytest.fixture(scope="module")
def host(tmp_path_factory: pytest.TempPathFactory) -> Any:
    with pytest.MonkeyPatch.context() as mp:
        module = _source_module(mp)
    return Host(tmp_path_factory.mktemp("cuda_host"), module)


@pytest.mark.parametrize("signed", [True, False])
def test_host_built_code_search_is_the_reference(host: Host, signed: bool) -> None:
    x = crafted(signed, np.random.default_rng(1))
    codes, scales = q.quantize_tensor_ref(x, signed)
    s = np.repeat(scales, q.QBLOCK)[:x.size]
    tab, mid = q.code_table(signed)
    nan = np.full(5, np.nan, np.float32)  # NaN and Inf scales, zero scale with -0
    xs = np.concatenate([x, nan, [1.0, -np.inf, 0.0, 2.0, -0.0]]).astype(np.float32)
    ss = np.concatenate([s, nan, [np.inf] * 4, [0.0]]).astype(np.float32)
    inf_block = q.quantize_ref(np.array([1.0, -np.inf, 0.0, 2.0], np.float32), signed)[0]
    want = np.concatenate([codes, np.full(5, 255), inf_block, [q.zero_code(signed)]])
    got = np.frombuffer(host("code", xs.size, xs, ss, tab, mid, out=xs.size), np.uint8)
    np.testing.assert_array_equal(got, want)


def test_host_built_stochastic_rounding_is_the_reference(host: Host) -> None:
    rng = np.random.default_rng(2)
    upper = np.arange(0, 1 << 16, dtype=np.uint32) << 16
    x = (upper | rng.integers(0, 1 << 16, upper.size, dtype=np.uint32)).view(np.float32)
    index = rng.integers(0, 1 << 40, x.size, dtype=np.int64)
    seed, counter = 123456789, 2**33 + 5
    key = np.uint32(q.stream_key(seed, counter))
    got = np.frombuffer(host("sround", x.size, x, key, index, out=2 * x.size), np.uint16)
    want = q.stochastic_round_ref(x, q.stochastic_bits(seed, counter, index))
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("case", list(CASES))
def test_host_built_updates_are_the_float32_kernels(host: Host, case: str) -> None:
    """Each functor on one tensor's elements against kernels_cpu's float32 kernel with the
    same coefficient row (LAMB: the float32 formula in NumPy, as the CPU kernel may fuse
    multiply-adds)."""
    steps = Steps(case, len(SIZES))
    rng = np.random.default_rng(3)
    n = 5000
    one = np.array([0, n], dtype=np.int64)
    blocks = make_blocks(CpuBackend(), one)
    for t in range(2):
        row = steps.coef(t)[t % 2]
        c = np.zeros(16, np.float32)
        c[:row.size] = row
        p, g = rng.standard_normal(n).astype(np.float32), gradient(rng, n)
        init = start(steps, rng, n)
        m = init["exp_avg"]
        v = init[steps.slots[1]]
        x = init.get("max_exp_avg_sq", np.zeros(n, np.float32))
        use3 = np.int32("max_exp_avg_sq" in init and row[9] != 0)
        op = {"adamw": "AdamOp"}.get(steps.name, f"{steps.name.capitalize()}Op")
        raw = host(op, n, c, use3, p, g, m, v, x, out=20 * n)
        got = np.frombuffer(raw, np.float32).reshape(5, n)
        ref = {k: a.copy() for k, a in init.items()}
        pr, gr = p.copy(), g.copy()
        if steps.name == "lamb":
            gs, b1, omb1, b2, omb2, bc1, bc2, eps, wd = row[[0, 3, 4, 5, 6, 7, 8, 9, 10]]
            gi = g * gs
            ref["exp_avg"] = omb1 * gi + b1 * m
            ref["exp_avg_sq"] = omb2 * gi * gi + b2 * v
            gr = (ref["exp_avg"] / bc1) / (np.sqrt(ref["exp_avg_sq"] / bc2) + eps) + wd * p
        else:
            CpuBackend().run(steps.name, ref, pr, gr, blocks, row[None, :].copy())
        for k, (name, want) in enumerate([("param", pr), ("grad", gr), ("m", ref["exp_avg"]),
                                          ("v", ref[steps.slots[1]]),
                                          ("x", ref.get("max_exp_avg_sq", x))]):
            same_bits(got[k], want, f"{case} step {t}: {name}")


# -- on a device ------------------------------------------------------------------------


def _cuda() -> tuple[Any, Any, Any]:
    cupy = pytest.importorskip(
        "cupy", reason="CuPy is not installed: GPU kernel tests need CuPy and a CUDA device")
    from adamserve.engine import kernels_cuda

    if kernels_cuda.device_count() == 0:
        pytest.skip("CuPy found no CUDA device: GPU kernel tests need one")
    from adamserve.engine import kernels_cuda_quant

    return cupy, kernels_cuda.CudaBackend(), kernels_cuda_quant


@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["int8", "bfloat16"])
@pytest.mark.parametrize("case", list(CASES))
def test_cuda_kernels_equal_the_reference(case: str, kind: str) -> None:
    cupy, gpu, kcq = _cuda()
    steps = Steps(case, len(SIZES))
    blocks = make_blocks(gpu, OFFSETS)
    rng = np.random.default_rng(4)
    p = rng.standard_normal(N).astype(np.float32)
    init = start(steps, rng, N)
    slots: dict[str, Any] = {
        s: (q.quantize_int8(v, OFFSETS, s in q.SIGNED_SLOTS) if kind == "int8"
            else q.to_bf16(v, seed=11 + i)).moved(gpu.to_device)
        for i, (s, v) in enumerate(init.items())}
    p_dev = gpu.to_device(p)
    for t in range(3):
        coef = steps.coef(t)
        g = gradient(rng, N)
        host = {s: v.moved(q.to_host) for s, v in slots.items()}
        if kind == "int8":
            f32 = {s: ref_dequantize(v, OFFSETS) for s, v in host.items()}
        else:
            f32 = {s: q.bf16_values(v.bits) for s, v in host.items()}
            r = {s: q.stochastic_bits(v.seed, v.counter, np.arange(N)) for s, v in host.items()}
        ref = {s: gpu.to_device(v) for s, v in f32.items()}
        p_ref, g_ref, g_dev = p_dev.copy(), gpu.to_device(g), gpu.to_device(g)
        if steps.name == "lamb":
            want = gpu.lamb_moments(ref, p_ref, g_ref, blocks, gpu.to_device(coef))
            got = kcq.lamb_moments_quantized(slots, p_dev, g_dev, blocks, gpu.to_device(coef))
            np.testing.assert_allclose(got[0], want[0], rtol=1e-12)
            np.testing.assert_allclose(got[1], want[1], rtol=1e-12)
        else:
            gpu.run(steps.name, ref, p_ref, g_ref, blocks, gpu.to_device(coef))
            kcq.run_quantized(steps.name, slots, p_dev, g_dev, blocks, gpu.to_device(coef))
        same_bits(cupy.asnumpy(p_dev), cupy.asnumpy(p_ref), f"{case} step {t}: param")
        same_bits(cupy.asnumpy(g_dev), cupy.asnumpy(g_ref), f"{case} step {t}: grad")
        for s, v in slots.items():
            new = cupy.asnumpy(ref[s])
            if kind == "int8":
                same_int8(v.moved(q.to_host), ref_quantize(new, OFFSETS, v.signed), f"{s}")
            else:
                np.testing.assert_array_equal(cupy.asnumpy(v.bits),
                                              q.stochastic_round_ref(new, r[s]), err_msg=s)
