"""Same-host shared memory at the service: steps through registered regions equal steps
through chunks, and every misuse (a bad name, a link, another user's object, a place
outside the region, a wrong size, an unregistered or foreign region, a region
unregistered or truncated under a step, a client that died holding one) gets a clear
error, changes nothing and never crashes the server."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import numpy as np
import pytest

from adamserve.engine.kernels_cpu import CpuBackend
from adamserve.engine.optimizer import TensorSpec
from adamserve.errors import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    ServiceError,
)
from adamserve.service import (
    Caller,
    OptimizerService,
    PushId,
    RegionInfo,
    RegionRef,
    Role,
    TensorChunk,
)
from adamserve.service.shared_memory import SHM_DIR, SharedMemoryRegistry
from adamserve.sessions.rounds import WorkersConfig
from adamserve.sessions.session import SessionConfig
from adamserve.sessions.store import Limits, SessionStore
from adamserve_proto import codec
from tests.concurrency import in_threads
from tests.sessions.support import SHAPES
from tests.sessions.support import gradients as _grads
from tests.shm_objects import Obj

CONFIG = SessionConfig("adamw", tuple(TensorSpec(k, s) for k, s in SHAPES.items()),
                       groups=({"lr": 0.01, "weight_decay": 0.1},))
NUMEL = sum(int(np.prod(s)) for s in SHAPES.values())


def _service(allow: bool = True, registry: SharedMemoryRegistry | None = None
             ) -> OptimizerService:
    svc = OptimizerService(SessionStore(CpuBackend(), None, Limits()),
                           allow_shared_memory=allow, shared_memory=registry)
    svc.start()
    return svc


def _packed(chunks: list[TensorChunk], datatype: str = "FP32") -> bytes:
    """Gradient chunks (FP32) as one region's bytes of ``datatype``, in session order."""
    values = np.concatenate([np.frombuffer(c.data, np.float32) for c in chunks])
    return bytes(codec.encode(values, datatype))


def _params(svc: OptimizerService, sid: str, datatype: str = "FP32") -> bytes:
    return b"".join(bytes(c.data) for c in svc.pull(sid, datatype=datatype))


def _refused(call: Callable[[], object], kind: type[ServiceError], reason: str,
             *needles: str) -> ServiceError:
    with pytest.raises(kind) as info:
        call()
    err = info.value
    assert err.reason == reason, (err.reason, str(err))
    for needle in needles:
        assert needle in str(err), (needle, str(err))
    return err


# -- steps through regions ------------------------------------------------------------


@pytest.mark.parametrize(("algorithm", "datatype", "dtype"), [
    ("adamw", "FP32", "float32"), ("adamw", "BF16", "float32"), ("adamw", "FP16", "float32"),
    ("adamw", "FP64", "float64"), ("adamw", "FP32", "float64"), ("lamb", "FP32", "float32"),
    ("rmsprop", "FP32", "float32")])
def test_a_step_through_regions_equals_a_step_through_chunks(
        shm: Callable[[int], Obj], algorithm: str, datatype: str, dtype: str,
        caplog: pytest.LogCaptureFixture) -> None:
    svc = _service()
    size = NUMEL * codec.itemsize(datatype)
    obj = shm(2 * size + 64)
    svc.register_shared_memory("r", obj.key, 2 * size + 64)
    config = replace(CONFIG, algorithm=algorithm, dtype=dtype,
                     groups=({"lr": 0.01, "weight_decay": 0.1},))
    for sid in ("wire", "shm"):
        svc.create(sid, config)
    grads_in = RegionRef("r", 64, size)
    params_out = RegionRef("r", 64 + size, size)
    for seed in range(3):
        grads = _grads(seed)
        wire_grads = [TensorChunk(c.name, c.shape, datatype,
                                  codec.encode(np.frombuffer(c.data, np.float32), datatype))
                      for c in grads]
        want = svc.step("wire", wire_grads, return_datatype=datatype)
        obj.put(64, _packed(grads, datatype))
        got = svc.step("shm", (), gradients_region=grads_in, gradients_datatype=datatype,
                       params_region=params_out, return_datatype=datatype)
        assert obj.get(64, size) == _packed(grads, datatype)  # the client's, unchanged
        assert got.params == [] and got.step == want.step == seed + 1
        assert got.grad_norm == want.grad_norm
        assert obj.get(64 + size, size) == b"".join(bytes(c.data) for c in want.params)
        assert _params(svc, "shm") == _params(svc, "wire")
    svc.unregister_shared_memory("r")
    assert svc.shared_memory._mapped == []
    assert "outlived" not in caplog.text  # unmapped at once: no view of it outlived a step


def test_one_region_each_way_and_a_push(shm: Callable[[int], Obj]) -> None:
    svc = _service()
    size = NUMEL * 4
    obj = shm(size)
    svc.register_shared_memory("g", obj.key, size)
    for sid in ("wire", "shm"):
        svc.create(sid, CONFIG)
    # gradients from the region, parameters in the result
    obj.put(0, _packed(_grads(1)))
    want = svc.step("wire", _grads(1))
    got = svc.step("shm", (), gradients_region=RegionRef("g", 0, size))
    assert got.params == want.params
    # gradients as chunks, parameters into the region
    want = svc.step("wire", _grads(2))
    got = svc.step("shm", _grads(2), params_region=RegionRef("g", 0, size))
    assert got.params == [] and obj.get(0, size) == b"".join(bytes(c.data)
                                                             for c in want.params)
    # a push reads the region and ignores a params region
    obj.put(0, _packed(_grads(3)))
    svc.step("wire", _grads(3), return_datatype=None)
    pushed = svc.step("shm", (), return_datatype=None, gradients_region=RegionRef("g", 0, size),
                      params_region=RegionRef("g", 0, 1))
    assert pushed.step == 3 and pushed.params == []
    assert _params(svc, "shm") == _params(svc, "wire")


def test_a_resent_step_writes_the_parameters_again(shm: Callable[[int], Obj]) -> None:
    svc = _service()
    size = NUMEL * 4
    obj = shm(2 * size)
    svc.register_shared_memory("r", obj.key, 2 * size)
    svc.create("s", CONFIG)
    obj.put(0, _packed(_grads(0)))
    kw: dict[str, Any] = {"gradients_region": RegionRef("r", 0, size),
                          "params_region": RegionRef("r", size, size),
                          "push_id": PushId("w", 1)}
    svc.step("s", (), **kw)
    after = obj.get(size, size)
    obj.put(size, bytes(size))
    again = svc.step("s", (), **kw)
    assert again.duplicate and again.step == 1 and obj.get(size, size) == after


def test_a_synchronous_round_writes_each_workers_region(shm: Callable[[int], Obj]) -> None:
    svc = _service()
    size = NUMEL * 4
    objs = [shm(2 * size) for _ in range(2)]
    for i, obj in enumerate(objs):
        svc.register_shared_memory(f"w{i}", obj.key, 2 * size)
        obj.put(0, _packed(_grads(i)))
    svc.create("s", replace(CONFIG, workers=WorkersConfig(count=2)))
    results = in_threads(*(lambda i=i: svc.step(
        "s", (), push_id=PushId(f"w{i}", 1), base_step=0,
        gradients_region=RegionRef(f"w{i}", 0, size),
        params_region=RegionRef(f"w{i}", size, size)) for i in range(2)))
    assert all(r.step == 1 and r.contributors == 2 and r.params == [] for r in results)
    assert objs[0].get(size, size) == objs[1].get(size, size) == _params(svc, "s")


# -- misuse ---------------------------------------------------------------------------


def test_a_server_without_the_switch_refuses_every_shared_memory_call(
        shm: Callable[[int], Obj]) -> None:
    svc = _service(allow=False)
    svc.create("s", CONFIG)
    obj = shm(NUMEL * 4)
    for call in (lambda: svc.register_shared_memory("r", obj.key, NUMEL * 4),
                 lambda: svc.unregister_shared_memory("r"),
                 svc.list_shared_memory,
                 lambda: svc.step("s", (), gradients_region=RegionRef("r", 0, NUMEL * 4)),
                 lambda: svc.step("s", _grads(), params_region=RegionRef("r", 0, NUMEL * 4))):
        _refused(call, FailedPrecondition, "SHARED_MEMORY_DISABLED", "--allow-shared-memory")
    assert svc.sweep_shared_memory() == 0
    assert svc.store.get("s").opt.step_count == 0


@pytest.mark.parametrize("name", ["", "../etc/passwd", "a/b", ".hidden", "..", "x" * 129,
                                  "sp ace", "é"])
def test_names_and_keys_are_confined(shm: Callable[[int], Obj], name: str) -> None:
    svc = _service()
    obj = shm(64)
    _refused(lambda: svc.register_shared_memory(name, obj.key, 64), InvalidArgument,
             "INVALID_ARGUMENT", "region name")
    _refused(lambda: svc.register_shared_memory("r", name, 64), InvalidArgument,
             "INVALID_ARGUMENT", "shared-memory key", "without '/'")
    assert svc.list_shared_memory() == []


def test_objects_the_server_will_not_map(shm: Callable[[int], Obj]) -> None:
    svc = _service()
    target = shm(64)
    link = f"adamserve-test-link-{uuid.uuid4().hex}"
    fifo = f"adamserve-test-fifo-{uuid.uuid4().hex}"
    folder = f"adamserve-test-dir-{uuid.uuid4().hex}"
    os.symlink(target.path, f"{SHM_DIR}/{link}")
    os.mkfifo(f"{SHM_DIR}/{fifo}")
    os.mkdir(f"{SHM_DIR}/{folder}")
    foreign = shm(64)
    os.chown(foreign.path, os.geteuid() + 4242, -1)
    try:
        for key, why in [(link, "symbolic link"), (fifo, "not a regular file"),
                         (folder, "directory"), (foreign.key, "belongs to user")]:
            _refused(lambda key=key: svc.register_shared_memory("r", key, 64),
                     FailedPrecondition, "SHARED_MEMORY_FORBIDDEN", why)
        _refused(lambda: svc.register_shared_memory("r", "adamserve-test-absent", 64),
                 NotFound, "SHARED_MEMORY_NOT_FOUND", "another host")
        _refused(lambda: svc.register_shared_memory("r", target.key, 65), InvalidArgument,
                 "SHARED_MEMORY_OUT_OF_RANGE", "holds 64 bytes")
        for size in (0, -1):
            _refused(lambda size=size: svc.register_shared_memory("r", target.key, size),
                     InvalidArgument, "INVALID_ARGUMENT", "positive number of bytes")
        assert svc.list_shared_memory() == []
    finally:
        os.unlink(f"{SHM_DIR}/{link}")
        os.unlink(f"{SHM_DIR}/{fifo}")
        os.rmdir(f"{SHM_DIR}/{folder}")


def test_a_name_is_registered_once_and_a_retry_is_answered(shm: Callable[[int], Obj]) -> None:
    svc = _service()
    a, b = shm(64), shm(64)
    info = svc.register_shared_memory("r", a.key, 64)
    assert info == RegionInfo("r", a.key, 64)
    assert svc.register_shared_memory("r", a.key, 64) == info  # a retry
    _refused(lambda: svc.register_shared_memory("r", b.key, 64), AlreadyExists,
             "SHARED_MEMORY_EXISTS", "registered already")
    _refused(lambda: svc.register_shared_memory("r", a.key, 32), AlreadyExists,
             "SHARED_MEMORY_EXISTS")
    svc.register_shared_memory("q", b.key, 32)
    assert svc.list_shared_memory() == [RegionInfo("q", b.key, 32), info]
    svc.unregister_shared_memory("r")
    _refused(lambda: svc.unregister_shared_memory("r"), NotFound, "SHARED_MEMORY_NOT_FOUND")
    assert svc.list_shared_memory() == [RegionInfo("q", b.key, 32)]


def test_the_server_bounds_regions_and_mapped_bytes(shm: Callable[[int], Obj]) -> None:
    svc = _service(registry=SharedMemoryRegistry(max_regions=2, max_bytes=100))
    objs = [shm(64) for _ in range(3)]
    svc.register_shared_memory("a", objs[0].key, 60)
    _refused(lambda: svc.register_shared_memory("b", objs[1].key, 64), ResourceExhausted,
             "QUOTA_EXCEEDED", "over the server's limit of 100")
    svc.register_shared_memory("b", objs[1].key, 40)
    _refused(lambda: svc.register_shared_memory("c", objs[2].key, 1), ResourceExhausted,
             "QUOTA_EXCEEDED", "2 shared-memory regions")
    svc.unregister_shared_memory("a")
    svc.register_shared_memory("c", objs[2].key, 60)


def test_places_outside_the_region_or_of_the_wrong_size_change_nothing(
        shm: Callable[[int], Obj]) -> None:
    svc = _service()
    size = NUMEL * 4
    obj = shm(2 * size)
    svc.register_shared_memory("r", obj.key, 2 * size)
    svc.create("s", CONFIG)
    obj.put(0, _packed(_grads()))
    before = svc.store.get("s").fingerprint()
    out_of_range = [RegionRef("r", 2 * size, size), RegionRef("r", size + 1, size),
                    RegionRef("r", -4, size), RegionRef("r", 0, -size),
                    RegionRef("r", 2 ** 62, size)]
    for ref in out_of_range:
        _refused(lambda ref=ref: svc.step("s", (), gradients_region=ref), InvalidArgument,
                 "SHARED_MEMORY_OUT_OF_RANGE", "do not lie within region 'r'")
        _refused(lambda ref=ref: svc.step("s", _grads(), params_region=ref), InvalidArgument,
                 "SHARED_MEMORY_OUT_OF_RANGE")
    for ref, datatype in [(RegionRef("r", 0, size - 4), "FP32"), (RegionRef("r", 0, size), "BF16"),
                          (RegionRef("r", 0, size), "FP64")]:
        _refused(lambda ref=ref, datatype=datatype: svc.step(
            "s", (), gradients_region=ref, gradients_datatype=datatype), InvalidArgument,
            "INVALID_ARGUMENT", f"{NUMEL} elements as {datatype}")
    _refused(lambda: svc.step("s", _grads(), params_region=RegionRef("r", 0, size),
                              return_datatype="BF16"), InvalidArgument, "INVALID_ARGUMENT",
             f"expected {NUMEL * 2}")
    _refused(lambda: svc.step("s", _grads(), gradients_region=RegionRef("r", 0, size)),
             InvalidArgument, "INVALID_ARGUMENT", "send the gradients one way")
    _refused(lambda: svc.step("s", (), gradients_region=RegionRef("r", 0, size),
                              gradients_datatype="INT8"), InvalidArgument, "INVALID_ARGUMENT",
             "gradients datatype 'INT8'")
    assert svc.store.get("s").fingerprint() == before


ALICE = Caller("alice", Role.READ_WRITE, "alice")
BOB = Caller("bob", Role.READ_WRITE, "bob")


def test_unregistered_and_foreign_regions_are_not_found(shm: Callable[[int], Obj]) -> None:
    svc = _service()
    size = NUMEL * 4
    obj = shm(size)
    svc.create("s", CONFIG, caller=ALICE)
    svc.create("s", CONFIG, caller=BOB)  # bob's own session of that name
    before = {t: svc.store.get(f"{t}~s").fingerprint() for t in ("alice", "bob")}
    _refused(lambda: svc.step("s", (), gradients_region=RegionRef("nope", 0, size),
                              caller=ALICE), NotFound,
             "SHARED_MEMORY_NOT_FOUND", "no shared-memory region named 'nope'")
    svc.register_shared_memory("r", obj.key, size, caller=ALICE)
    assert svc.list_shared_memory(caller=ALICE) == [RegionInfo("r", obj.key, size)]
    # another tenant sees nothing of it: not in its list, not usable, not removable, and
    # the object cannot be registered again under another name
    assert svc.list_shared_memory() == [] and svc.list_shared_memory(caller=BOB) == []
    for call in (lambda: svc.step("s", (), gradients_region=RegionRef("r", 0, size),
                                  caller=BOB),
                 lambda: svc.step("s", _grads(), params_region=RegionRef("r", 0, size),
                                  caller=BOB),
                 lambda: svc.unregister_shared_memory("r", caller=BOB),
                 lambda: svc.register_shared_memory("mine", obj.key, size, caller=BOB)):
        _refused(call, NotFound, "SHARED_MEMORY_NOT_FOUND")
    assert {t: svc.store.get(f"{t}~s").fingerprint() for t in ("alice", "bob")} == before
    obj.put(0, _packed(_grads()))
    assert svc.step("s", (), gradients_region=RegionRef("r", 0, size), caller=ALICE).step == 1


def test_a_truncated_object_is_refused_not_a_crash(shm: Callable[[int], Obj]) -> None:
    svc = _service()
    size = NUMEL * 4
    grads_obj, params_obj = shm(size), shm(size)
    svc.register_shared_memory("g", grads_obj.key, size)
    svc.register_shared_memory("p", params_obj.key, size)
    svc.create("s", CONFIG)
    grads_obj.put(0, _packed(_grads()))
    before = svc.store.get("s").fingerprint()
    os.truncate(params_obj.path, size // 2)  # touching the mapping past it: SIGBUS
    _refused(lambda: svc.step("s", (), gradients_region=RegionRef("g", 0, size),
                              params_region=RegionRef("p", 0, size)), InvalidArgument,
             "SHARED_MEMORY_OUT_OF_RANGE", f"truncated to {size // 2} bytes")
    os.truncate(grads_obj.path, 0)
    _refused(lambda: svc.step("s", (), gradients_region=RegionRef("g", 0, size)),
             InvalidArgument, "SHARED_MEMORY_OUT_OF_RANGE", "truncated to 0 bytes")
    assert svc.store.get("s").fingerprint() == before
    os.truncate(grads_obj.path, size)  # grown back, but sparse: still refused
    _refused(lambda: svc.step("s", (), gradients_region=RegionRef("g", 0, size)),
             InvalidArgument, "SHARED_MEMORY_OUT_OF_RANGE", "truncated to 0 bytes")
    fd = os.open(grads_obj.path, os.O_RDWR)
    os.posix_fallocate(fd, 0, size)  # its pages allocated: usable again (zeros)
    os.close(fd)
    assert svc.step("s", (), gradients_region=RegionRef("g", 0, size)).step == 1


def test_a_sparse_object_is_refused_at_registration() -> None:
    """A full /dev/shm turns the server's first write to a page the object lacks into
    SIGBUS: an object must have all its pages (the client fallocates them)."""
    svc = _service()
    key = f"adamserve-test-{uuid.uuid4().hex}"
    fd = os.open(f"{SHM_DIR}/{key}", os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.ftruncate(fd, 1 << 20)
        _refused(lambda: svc.register_shared_memory("sparse", key, 1 << 20),
                 FailedPrecondition, "SHARED_MEMORY_FORBIDDEN", "a sparse object")
        assert svc.list_shared_memory() == []
    finally:
        os.close(fd)
        os.unlink(f"{SHM_DIR}/{key}")


def test_a_retried_registration_keeps_no_descriptor(shm: Callable[[int], Obj]) -> None:
    svc = _service()
    obj = shm(4096)
    svc.register_shared_memory("r", obj.key, 4096)
    fds = len(os.listdir("/proc/self/fd"))
    for _ in range(20):
        svc.register_shared_memory("r", obj.key, 4096)
    assert len(os.listdir("/proc/self/fd")) == fds


def test_unregistering_during_a_step_lets_the_step_finish(shm: Callable[[int], Obj]) -> None:
    svc = _service()
    size = NUMEL * 4
    obj = shm(2 * size)
    svc.register_shared_memory("r", obj.key, 2 * size)
    svc.create("s", replace(CONFIG, workers=WorkersConfig(count=2)))
    obj.put(0, _packed(_grads(0)))
    session = svc.store.get("s")
    results: list[Any] = []

    def worker() -> None:  # waits in the round, holding both places
        try:
            results.append(svc.step("s", (), push_id=PushId("a", 1), base_step=0,
                                    gradients_region=RegionRef("r", 0, size),
                                    params_region=RegionRef("r", size, size)))
        except BaseException as exc:
            results.append(exc)

    t = threading.Thread(target=worker)
    t.start()
    deadline = time.monotonic() + 10
    while session.round is None or session.round.arrived < 1:
        assert time.monotonic() < deadline, "the first push never joined its round"
        time.sleep(0.005)
    svc.unregister_shared_memory("r")  # mid-step: the name goes now, the mapping later
    assert svc.list_shared_memory() == []
    assert svc.sweep_shared_memory() == 0
    _refused(lambda: svc.step("s", (), gradients_region=RegionRef("r", 0, size),
                              push_id=PushId("b", 1), base_step=0),
             NotFound, "SHARED_MEMORY_NOT_FOUND")
    svc.step("s", _grads(1), push_id=PushId("b", 1), base_step=0, return_datatype=None)
    t.join(10)
    (result,) = results
    assert not isinstance(result, BaseException), result
    assert result.step == 1 and result.contributors == 2
    assert obj.get(size, size) == _params(svc, "s")  # written after the unregister
    assert svc.shared_memory._mapped == []  # and unmapped once the step was done
    svc.register_shared_memory("r", obj.key, 2 * size)  # the name is free again


_CLIENT = textwrap.dedent("""
    import mmap, os, sys
    key = sys.argv[1]
    path = "/dev/shm/" + key
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    os.posix_fallocate(fd, 0, 4096)
    region = mmap.mmap(fd, 4096)
    print("ready", flush=True)
    if sys.stdin.readline().strip() == "exit":
        os.unlink(path)  # what a client does on close and at interpreter exit
""")


@pytest.mark.parametrize("ending", ["exit", "kill"])
def test_a_client_that_went_away_loses_its_regions_to_the_sweep(ending: str) -> None:
    registry = SharedMemoryRegistry(idle_seconds=60)
    svc = _service(registry=registry)
    key = f"adamserve-test-client-{uuid.uuid4().hex}"
    client = subprocess.Popen([sys.executable, "-c", _CLIENT, key], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert client.stdout is not None and client.stdin is not None
        assert client.stdout.readline().strip() == "ready"
        svc.register_shared_memory("r", key, 4096)
        assert svc.sweep_shared_memory() == 0  # alive and just registered
        if ending == "exit":
            client.stdin.write("exit\n")
            client.stdin.flush()
            assert client.wait(10) == 0
            assert svc.sweep_shared_memory() == 1  # its object is gone: at once
        else:
            client.send_signal(signal.SIGKILL)
            client.wait(10)
            assert svc.sweep_shared_memory() == 0  # a killed client leaves its object
            assert registry.sweep(now=time.monotonic() + 61) == 1  # idle past the bound
        assert svc.list_shared_memory() == [] and registry._mapped == []
        svc.create("s", CONFIG)
        _refused(lambda: svc.step("s", (), gradients_region=RegionRef("r", 0, NUMEL * 4)),
                 NotFound, "SHARED_MEMORY_NOT_FOUND")
    finally:
        if client.poll() is None:
            client.kill()
        if os.path.lexists(f"{SHM_DIR}/{key}"):
            os.unlink(f"{SHM_DIR}/{key}")


def test_a_region_in_use_is_not_swept(shm: Callable[[int], Obj]) -> None:
    registry = SharedMemoryRegistry(idle_seconds=0)
    svc = _service(registry=registry)
    obj = shm(64)
    svc.register_shared_memory("r", obj.key, 64)
    with registry.use(RegionRef("r", 0, 64), 64, "", "test", "the test's 64 bytes"):
        os.unlink(obj.path)
        assert registry.sweep(now=time.monotonic() + 1) == 0
    assert registry.sweep(now=time.monotonic() + 1) == 1 and registry._mapped == []


def test_a_shards_session_refuses_regions(shm: Callable[[int], Obj]) -> None:
    """A shard's step is staged for its commit, which takes no region: refused before
    anything is read (the Python client steps a sharded session over the wire)."""
    svc = _service()
    size = NUMEL * 4
    obj = shm(2 * size)
    svc.register_shared_memory("r", obj.key, 2 * size)
    svc.create("s", replace(CONFIG, workers=WorkersConfig(exchange=True)))
    _refused(lambda: svc.step("s", (), gradients_region=RegionRef("r", 0, size),
                              params_region=RegionRef("r", size, size)),
             FailedPrecondition, "SHARED_MEMORY_FORBIDDEN", "one shard of a sharded session")
    assert svc.describe("s").step == 0


def test_only_objects_named_as_regions_are_mapped() -> None:
    """The server's user owns other objects under /dev/shm (torch's, an object
    store's): a caller may name only those made to be regions (adamserve...)."""
    svc = _service()
    key = f"torch_{uuid.uuid4().hex}"
    fd = os.open(f"{SHM_DIR}/{key}", os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.posix_fallocate(fd, 0, 4096)
        _refused(lambda: svc.register_shared_memory("r", key, 4096), InvalidArgument,
                 "INVALID_ARGUMENT", "a region's object is named adamserve")
        assert svc.list_shared_memory() == []
    finally:
        os.close(fd)
        os.unlink(f"{SHM_DIR}/{key}")
