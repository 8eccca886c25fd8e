"""Sessions of many small tensors over real servers (gRPC and HTTP on 127.0.0.1): a step
over 16k tensors is linear (a name lookup is a dict), a create with 30k tensors and one
repeated name is refused at once and stalls no other client's create, a session holds
at most MAX_TENSORS tensors, and empty tensors count TENSOR_OVERHEAD bytes each
against --max-state-bytes.

The time bounds are generous for a loaded 2-core machine; the code they guard against
(a linear scan per chunk, a quadratic duplicate check under the store's lock) took
8-25 s for the same requests.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path

import numpy as np
import pytest

import adamserve_client as ac
from adamserve.sessions.session import MAX_TENSORS, TENSOR_OVERHEAD
from adamserve_client.transports import SessionSpec, TensorSpec, WireTensor
from tests.sessions.test_input_bounds import WIRES, Live, serving

ONE = np.ones(1, np.float32).tobytes()
MANY = 16384
# seconds for one step of MANY tensors, the reply's parameters included (measured here:
# 1.0 s gRPC, 1.8 s HTTP alone; up to 4.8 s HTTP beside the suite's other worker; the
# linear scan per chunk took 6.4 s and 7.9 s alone)
STEP_BOUND = {"grpc": 4.0, "http": 6.5}
CREATE_BOUND = 5.0  # seconds to refuse a create of 30k tensors with a repeated name
OTHERS_BOUND = 2.0  # seconds another client's small create may take meanwhile


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Live]:
    with serving(tmp_path_factory.mktemp("many"), max_state_bytes=1 << 30) as server:
        yield server


def specs(n: int, shape: tuple[int, ...] = (1,), prefix: str = "t") -> tuple[TensorSpec, ...]:
    return tuple(TensorSpec(f"{prefix}{i}", shape) for i in range(n))


def timed(call: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    call()
    return time.perf_counter() - t0


@pytest.mark.parametrize("wire", WIRES)
def test_a_step_over_16k_tensors_is_linear(live: Live, wire: str) -> None:
    sid = f"many-{wire}"
    grads = [WireTensor(f"t{i}", (1,), "FP32", ONE) for i in range(MANY)]
    with live.client(wire) as c:
        c.create_session(SessionSpec(sid, "adam", specs(MANY)))
        c.step(sid, grads)  # warm: the kernels compiled, the connection open
        took = timed(lambda: c.step(sid, grads))
        assert took < STEP_BOUND[wire], f"a step over {MANY} tensors took {took:.2f} s"
        assert c.describe(sid).step == 2
        if wire == "http":  # gRPC streams one message per tensor: its own cost
            names = [f"t{i}" for i in reversed(range(MANY))]
            took = timed(lambda: c.pull(sid, names))
            assert took < STEP_BOUND[wire], f"pulling {MANY} named tensors took {took:.2f} s"
            took = timed(lambda: c.set_parameters(sid, grads))
            assert took < STEP_BOUND[wire], f"setting {MANY} tensors took {took:.2f} s"
            assert c.pull(sid, ["t7"])[0].data == ONE


@pytest.mark.parametrize("wire", WIRES)
def test_a_30k_create_with_a_repeated_name_stalls_no_one(live: Live, wire: str) -> None:
    """Refused within CREATE_BOUND each time, while another client's creates (over gRPC,
    the same store) each finish within OTHERS_BOUND."""
    bad = (*specs(30_000), TensorSpec("t5", (1,)))
    outcomes: list[tuple[float, BaseException | None]] = []
    others: list[float] = []
    running = threading.Event()
    running.set()

    def attacker() -> None:
        with live.client(wire) as c:
            for k in range(3):
                t0 = time.perf_counter()
                try:
                    c.create_session(SessionSpec(f"dup-{wire}-{k}", "adam", bad))
                    outcomes.append((time.perf_counter() - t0, None))
                except ac.AdamserveError as exc:
                    outcomes.append((time.perf_counter() - t0, exc))
        running.clear()

    def other() -> None:
        with live.client("grpc") as c:
            k = 0
            while running.is_set():
                spec = SessionSpec(f"other-{wire}-{k}", "adam", specs(4, (8,)))
                others.append(timed(partial(c.create_session, spec)))
                c.delete_session(spec.session_id)
                k += 1

    threads = [threading.Thread(target=attacker), threading.Thread(target=other)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert len(outcomes) == 3 and others
    for took, exc in outcomes:
        assert isinstance(exc, ac.InvalidArgument), exc
        assert "tensor names must be unique; repeated: t5" in exc.message
        assert took < CREATE_BOUND, f"the repeated name was refused after {took:.2f} s"
    assert max(others) < OTHERS_BOUND, f"another client's create took {max(others):.2f} s"


@pytest.mark.parametrize("wire", WIRES)
def test_a_session_holds_at_most_max_tensors(live: Live, wire: str) -> None:
    with live.client(wire) as c:
        with pytest.raises(ac.InvalidArgument) as caught:
            c.create_session(SessionSpec(f"cap-{wire}", "adam", specs(MAX_TENSORS + 1, (0,))))
        assert f"{MAX_TENSORS + 1} tensors" in caught.value.message
        assert f"at most {MAX_TENSORS} (MAX_TENSORS)" in caught.value.message
        assert f"cap-{wire}" not in [s.session_id for s in c.list_sessions()]


def test_add_tensors_holds_to_max_tensors(live: Live) -> None:
    """The cap counts the session's tensors and the new ones (over gRPC: describing a
    64k-tensor session as JSON is slow on its own)."""
    with live.client("grpc") as c:
        sid = "near-cap"
        c.create_session(SessionSpec(sid, "adam", specs(MAX_TENSORS - 2, (0,))))
        before = c.describe(sid)
        with pytest.raises(ac.InvalidArgument, match=r"at most 65536 \(MAX_TENSORS\)"):
            c.add_tensors(sid, specs(3, (0,), prefix="new"))
        assert c.describe(sid) == before
        c.add_tensors(sid, specs(2, (0,), prefix="new"))
        assert len(c.describe(sid).tensors) == MAX_TENSORS
        c.delete_session(sid)


@pytest.mark.parametrize("wire", WIRES)
def test_empty_tensors_count_against_the_memory_cap(tmp_path: Path, wire: str) -> None:
    """1M `[0]` tensors once added 707 MB under a 64 MiB cap, counted as 0 bytes: each now
    counts TENSOR_OVERHEAD. Under an 8 MiB cap, two sessions of 8192 empty tensors
    (4 MiB each) fit and a third does not; AddTensors is counted the same way."""
    cap = 8 << 20
    per = 8192 * TENSOR_OVERHEAD
    assert 2 * per <= cap < 3 * per
    with serving(tmp_path, max_state_bytes=cap) as live, live.client(wire) as c:
        for k in range(2):
            info = c.create_session(SessionSpec(f"empty-{k}", "adam", specs(8192, (0,))))
            assert info.state_bytes == per
        with pytest.raises(ac.ResourceExhausted) as caught:
            c.create_session(SessionSpec("empty-2", "adam", specs(8192, (0,))))
        assert caught.value.reason == "QUOTA_EXCEEDED"
        assert [s.session_id for s in c.list_sessions()] == ["empty-0", "empty-1"]
        c.delete_session("empty-1")
        c.create_session(SessionSpec("small", "adam", specs(8, (0,))))
        before = c.describe("small")
        with pytest.raises(ac.ResourceExhausted) as caught:  # 8192 more: 4 MiB past the cap
            c.add_tensors("small", specs(8192, (0,), prefix="more"))
        assert caught.value.reason == "QUOTA_EXCEEDED"
        assert c.describe("small") == before
        grown = c.add_tensors("small", specs(4096, (0,), prefix="more"))  # 2 MiB: fits
        assert grown.state_bytes == (8 + 4096) * TENSOR_OVERHEAD
