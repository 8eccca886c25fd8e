"""What one tenant may make a Flight server hold: steps meeting over several streams
(per tenant, counted against the memory caps, refused to read-only keys), and action
bodies (bounded before they are copied)."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.flight as fl
import pytest

from adamserve.engine.kernels_cpu import CpuBackend
from adamserve.service import Access, OptimizerService
from adamserve.service.access import hash_key
from adamserve.sessions.store import Limits, SessionStore
from adamserve.transports.flight import FlightServerThread, streams
from adamserve.transports.grpc.servicer import MAX_RECEIVE_BYTES
from adamserve_client.transports import SessionSpec, TensorSpec, connect
from adamserve_proto.v2 import optimizer_pb2 as pb

from .test_flight import _batch, _status, _step

KEYS = {"a": "key-a-" + "1" * 30, "b": "key-b-" + "2" * 30, "reader": "key-r-" + "3" * 30}


@dataclass
class Live:
    server: FlightServerThread
    service: OptimizerService

    def raw(self, who: str) -> fl.FlightClient:
        client = fl.connect(self.server.url.replace("flight://", "grpc://"))
        return _Authorized(client, KEYS[who])


class _Authorized:
    """A raw Flight client that sends a key with every call."""

    def __init__(self, client: fl.FlightClient, key: str) -> None:
        self.client = client
        self.options = fl.FlightCallOptions(headers=[(b"authorization", f"Bearer {key}".encode())])

    def do_exchange(self, descriptor: fl.FlightDescriptor, options: object = None) -> object:
        return self.client.do_exchange(descriptor, options=self.options)

    def do_action(self, action: fl.Action, options: object = None) -> object:
        return self.client.do_action(action, options=self.options)

    def close(self) -> None:
        self.client.close()


@pytest.fixture
def live() -> Iterator[Live]:
    access = Access.from_mapping({"keys": [
        {"name": "a", "tenant": "a", "role": "read-write", "sha256": hash_key(KEYS["a"])},
        {"name": "b", "tenant": "b", "role": "read-write", "sha256": hash_key(KEYS["b"])},
        {"name": "r", "tenant": "a", "role": "read-only", "sha256": hash_key(KEYS["reader"])}]})
    service = OptimizerService(SessionStore(CpuBackend(), None, Limits(max_state_bytes=9 << 20)))
    service.start()
    server = FlightServerThread(service, stream_wait=1.0, access=access)
    server.start()
    for who in ("a", "b"):
        with connect(server.url, token=KEYS[who]) as t:
            t.create_session(SessionSpec("meet", "adam", (TensorSpec("w", (8,)),)))
    yield Live(server, service)
    server.stop()


def _command(index: int, token: str, count: int = 2) -> bytes:
    return pb.FlightCommand(step=pb.StepRequest(header=pb.StepHeader(session_id="meet")),
                            streams=pb.FlightStreams(id=token, count=count, index=index)
                            ).SerializeToString()


HALF = [_batch("w", (8,), np.ones(4))]


def test_a_read_only_key_cannot_open_any_stream_of_a_step(live: Live) -> None:
    raw = live.raw("reader")
    for index in (0, 1):
        with pytest.raises(fl.FlightError) as refused:
            _step(raw, _command(index, f"r{index}"), HALF)  # type: ignore[arg-type]
        assert "read-only" in _status(refused.value)[1]
    assert live.server.server.gathers._open == {}  # nothing left waiting
    raw.close()


def test_one_tenant_cannot_fill_the_servers_meetings(live: Live) -> None:
    """Tenant b opens as many lone stream-1 meetings as it may; the next is refused
    (TOO_MANY_STREAMS), and tenant a's step over two streams still goes through."""
    raw_b = live.raw("b")
    lone = [threading.Thread(target=_lone, args=(raw_b, i))
            for i in range(streams.MAX_GATHERS_PER_TENANT)]
    for t in lone:
        t.start()
    deadline = time.monotonic() + 5
    while len(live.server.server.gathers._open) < len(lone) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert len(live.server.server.gathers._open) == len(lone)
    with pytest.raises(fl.FlightError) as refused:
        _step(raw_b, _command(1, "one-too-many"), HALF)  # type: ignore[arg-type]
    assert "TOO_MANY_STREAMS" in str(_status(refused.value))
    raw_a = live.raw("a")
    done: list[object] = []
    rest = [_batch("w", (8,), np.ones(4), offset=4)]
    second = threading.Thread(target=lambda: done.append(
        _step(raw_a, _command(1, "a-step"), rest)))  # type: ignore[arg-type]
    second.start()
    _step(raw_a, _command(0, "a-step"), HALF)  # type: ignore[arg-type]
    second.join(5)
    assert done, "tenant a's second stream did not finish"
    with connect(live.server.url, token=KEYS["a"]) as t:
        assert t.describe("meet").step == 1
    for t in lone:
        t.join(10)
    assert live.server.server.gathers._open == {}
    raw_a.close()
    raw_b.close()


def _lone(raw: _Authorized, i: int) -> None:
    with pytest.raises(fl.FlightError):
        _step(raw, _command(1, f"lone{i}"), HALF)  # type: ignore[arg-type]


def test_a_meeting_counts_against_the_memory_cap(live: Live) -> None:
    """While streams meet, the bytes they may hand over are the session's: counted, so
    a meeting that does not fit is refused before it holds anything."""
    store = live.service.store
    with connect(live.server.url, token=KEYS["a"]) as t:
        t.create_session(SessionSpec("big", "adam", (TensorSpec("w", (1 << 18,)),)))  # 4 MiB
    raw = live.raw("a")
    before = store.total_bytes()
    command = pb.FlightCommand(step=pb.StepRequest(header=pb.StepHeader(session_id="big")),
                               streams=pb.FlightStreams(id="m", count=2, index=1))
    def meet_alone() -> None:  # its stream 0 never comes
        with pytest.raises(fl.FlightError):
            _step(raw, command.SerializeToString(), [])  # type: ignore[arg-type]

    waiting = threading.Thread(target=meet_alone)
    waiting.start()
    deadline = time.monotonic() + 5
    while store.total_bytes() == before and time.monotonic() < deadline:
        time.sleep(0.01)
    assert store.total_bytes() == before + (1 << 18) * 8  # the most it may hand over
    waiting.join(10)
    assert store.total_bytes() == before  # given back when the meeting ends
    # a meeting bigger than what is free: refused at once
    with connect(live.server.url, token=KEYS["b"]) as t:
        t.create_session(SessionSpec("big", "adam", (TensorSpec("w", (1 << 18,)),)))
    raw_b = live.raw("b")
    big_b = pb.FlightCommand(step=pb.StepRequest(header=pb.StepHeader(session_id="big")),
                             streams=pb.FlightStreams(id="m", count=2, index=1))
    with pytest.raises(fl.FlightError) as refused:
        _step(raw_b, big_b.SerializeToString(), [])  # type: ignore[arg-type]
    assert "QUOTA_EXCEEDED" in str(_status(refused.value))
    raw.close()
    raw_b.close()


def test_an_action_body_past_the_message_limit_is_refused(live: Live) -> None:
    raw = live.raw("reader")
    body = pa.allocate_buffer(MAX_RECEIVE_BYTES + 1)
    with pytest.raises(fl.FlightError) as refused:
        list(raw.do_action(fl.Action("GetSession", body)))  # type: ignore[attr-defined]
    assert f"at most {MAX_RECEIVE_BYTES}" in _status(refused.value)[1]
    raw.close()


@pytest.mark.slow
def test_a_stalled_call_does_not_stop_the_shutdown_saving_other_tenants(tmp_path: object) -> None:
    """Tenant a opens a create over Flight and sends nothing; on stop, tenant b's unsaved
    steps are still checkpointed, and the stop ends in bounded time."""
    from pathlib import Path

    from adamserve.app import Server, Settings
    from adamserve.sessions.checkpoint_policy import STOP_LOCK_WAIT

    auth = Path(str(tmp_path)) / "auth.toml"
    auth.write_text("".join(
        f'[[keys]]\nname = "{w}"\ntenant = "{w}"\nrole = "read-write"\nsha256 = '
        f'"{hash_key(KEYS[w])}"\n' for w in ("a", "b")))
    with socket.socket() as probe:  # a free port: Flight's port 0 means no Flight
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = Server(Settings(grpc_port=0, http_port=0, flight_port=port, auth_file=auth,
                             data_dir=Path(str(tmp_path)) / "data"))
    server.start()
    url = f"flight://127.0.0.1:{server.flight_port}"
    with connect(url, token=KEYS["b"]) as b:
        b.create_session(SessionSpec("victim", "adam", (TensorSpec("w", (4,)),)))
        b.step("victim", [_wire()])
        b.step("victim", [_wire()])
    raw = fl.connect(url.replace("flight://", "grpc://"))
    options = fl.FlightCallOptions(headers=[(b"authorization", f"Bearer {KEYS['a']}".encode())])
    command = pb.FlightCommand(create_session=pb.CreateSessionRequest(spec=pb.SessionSpec(
        session_id="stall", algorithm=pb.ALGORITHM_ADAM,
        tensors=[pb.TensorSpec(name="w", shape=[4])]))).SerializeToString()
    writer, _ = raw.do_put(fl.FlightDescriptor.for_command(command),
                           _batch("w", (4,), np.ones(4)).schema, options=options)
    deadline = time.monotonic() + 5
    while "a~stall" not in [s.id for s in server.service.store.all()]:
        assert time.monotonic() < deadline
        time.sleep(0.02)
    t0 = time.monotonic()
    done = server.stop()
    assert time.monotonic() - t0 < STOP_LOCK_WAIT + 10
    assert "b~victim" in done.saved and "a~stall" in done.failed
    assert (Path(str(tmp_path)) / "data" / "sessions" / "b~victim").is_dir()
    with contextlib.suppress(fl.FlightError):  # the server is gone
        writer.close()
    raw.close()


def _wire() -> object:
    from adamserve_client.transports import WireTensor

    return WireTensor("w", (4,), "FP32", np.ones(4, np.float32).tobytes())
