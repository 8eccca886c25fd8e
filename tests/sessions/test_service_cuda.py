"""The service on the CUDA backend equals the service on the CPU backend.

Covers the paths that differ on a GPU: gradients staged through host memory, the
full-duplex step, checkpoints written from and restored onto the device.
Skipped (with the reason shown by ``pytest -ra``) without CuPy and a CUDA device.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from adamserve.engine.kernels_cpu import CpuBackend
from adamserve.engine.optimizer import TensorSpec
from adamserve.service import OptimizerService, StepResult, TensorChunk
from adamserve.sessions.checkpoints import CheckpointStore
from adamserve.sessions.session import SessionConfig
from adamserve.sessions.store import SessionStore

cupy = pytest.importorskip(
    "cupy", reason="CuPy is not installed: GPU service tests need CuPy and a CUDA device")

from adamserve.engine import kernels_cuda  # noqa: E402

if kernels_cuda.device_count() == 0:
    pytest.skip("CuPy found no CUDA device: GPU service tests need one", allow_module_level=True)

SHAPES = {"w": (300, 200), "b": (200,), "s": (1,)}


def _service(backend: object, data: Path) -> OptimizerService:
    svc = OptimizerService(SessionStore(backend, CheckpointStore(data)))  # type: ignore[arg-type]
    svc.start()
    return svc


def _chunks(grads: dict[str, np.ndarray], datatype: str = "FP32") -> list[TensorChunk]:
    out = []
    for k, g in grads.items():
        raw = g.astype(np.float32)
        if datatype == "BF16":
            data = (raw.view(np.uint32) >> 16).astype("<u2").tobytes()
        else:
            data = raw.tobytes()
        out.append(TensorChunk(k, g.shape, datatype, data))
    return out


@pytest.mark.parametrize("algorithm", ["adamw", "lamb", "rmsprop"])
def test_cuda_service_equals_cpu_service(tmp_path: Path, algorithm: str) -> None:
    rng = np.random.default_rng(0)
    config = SessionConfig(algorithm, tuple(TensorSpec(k, s) for k, s in SHAPES.items()),
                           ({"lr": 1e-2},), max_grad_norm=1.0)
    init = {k: rng.standard_normal(s).astype(np.float32) for k, s in SHAPES.items()}
    cpu = _service(CpuBackend(), tmp_path / "cpu")
    gpu = _service(kernels_cuda.CudaBackend(), tmp_path / "gpu")
    for svc in (cpu, gpu):
        svc.create("s", config, _chunks(init))
    for step in range(5):
        grads = {k: rng.standard_normal(s).astype(np.float32) for k, s in SHAPES.items()}
        dtype = "BF16" if step % 2 else "FP32"
        a = cpu.step("s", _chunks(grads, dtype))
        b = gpu.step("s", _chunks(grads, dtype))
        assert a.step == b.step and a.grad_norm == pytest.approx(b.grad_norm, rel=1e-6)
        for x, y in zip(a.params, b.params, strict=True):
            np.testing.assert_allclose(np.frombuffer(x.data, "<f4"), np.frombuffer(y.data, "<f4"),
                                       rtol=1e-5, atol=1e-6)
    bad = {k: np.full(s, np.nan, np.float32) for k, s in SHAPES.items()}
    before = gpu.store.get("s").fingerprint()
    assert gpu.step("s", _chunks(bad)).skipped
    assert gpu.store.get("s").fingerprint() == before
    gpu.checkpoint("s")
    restored = _service(kernels_cuda.CudaBackend(), tmp_path / "gpu")
    assert restored.store.get("s").fingerprint() == before


def test_cuda_full_duplex_step_equals_a_step(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    config = SessionConfig("adam", tuple(TensorSpec(k, s) for k, s in SHAPES.items()),
                           skip_nonfinite=False)
    gpu = _service(kernels_cuda.CudaBackend(), tmp_path / "gpu")
    gpu.create("stream", config)
    gpu.create("whole", config)
    for _ in range(3):
        grads = {k: rng.standard_normal(s).astype(np.float32) for k, s in SHAPES.items()}
        pieces = []
        for k, g in grads.items():
            flat = g.ravel()
            half = flat.size // 2
            pieces += [TensorChunk(k, g.shape, "FP32", flat[:half].tobytes(), 0),
                       TensorChunk(k, g.shape, "FP32", flat[half:].tobytes(), half)]
        out = list(gpu.step_stream("stream", pieces))
        assert isinstance(out[-1], StepResult)
        whole = gpu.step("whole", _chunks(grads))
        streamed = {k: b"".join(c.data for c in out[:-1] if isinstance(c, TensorChunk)
                                and c.name == k) for k in SHAPES}
        for p in whole.params:
            assert streamed[p.name] == bytes(p.data)


def test_cuda_add_tensors_equals_cpu(tmp_path: Path) -> None:
    rng = np.random.default_rng(2)
    config = SessionConfig("adagrad", tuple(TensorSpec(k, s) for k, s in SHAPES.items()),
                           ({"lr": 1e-2, "initial_accumulator_value": 0.1},))
    cpu = _service(CpuBackend(), tmp_path / "cpu")
    gpu = _service(kernels_cuda.CudaBackend(), tmp_path / "gpu")
    new = [TensorSpec("head", (50, 4), 1)]
    head0 = rng.standard_normal((50, 4)).astype(np.float32)
    for svc in (cpu, gpu):
        svc.create("s", config)
        svc.step("s", _chunks({k: np.ones(s, np.float32) for k, s in SHAPES.items()}))
        svc.add_tensors("s", new, {"lr": 0.1, "initial_accumulator_value": 0.5},
                        [TensorChunk("head", (50, 4), "FP32", head0.tobytes())])
    for _ in range(3):
        grads = {k: rng.standard_normal(s).astype(np.float32)
                 for k, s in {**SHAPES, "head": (50, 4)}.items()}
        a, b = cpu.step("s", _chunks(grads)), gpu.step("s", _chunks(grads))
        for x, y in zip(a.params, b.params, strict=True):
            np.testing.assert_allclose(np.frombuffer(x.data, "<f4"), np.frombuffer(y.data, "<f4"),
                                       rtol=1e-5, atol=1e-6)
