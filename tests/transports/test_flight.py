"""The Arrow Flight data plane against the gRPC service, over real servers on 127.0.0.1.

Steps, pushes, pulls and control actions over Flight equal the gRPC results
bitwise for each family of algorithm (elementwise, clipped, LAMB); bad input
(garbage descriptors, wrong schemas, unknown tensors, wrong sizes, truncated
streams, nulls) gets the same clear errors as over gRPC, with the reason in the
google.rpc.Status of the Flight error, and changes nothing.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.flight as fl
import pytest
from google.rpc import error_details_pb2, status_pb2

from adamserve.engine.kernels_cpu import CpuBackend
from adamserve.service import OptimizerService
from adamserve.sessions.store import Limits, SessionStore
from adamserve.transports.flight import FlightServerThread
from adamserve.transports.grpc import build_grpc_server
from adamserve_client import errors
from adamserve_client.tensors import decode, encode
from adamserve_client.transports import SessionSpec, TensorSpec, WireTensor, connect
from adamserve_proto import flight as layout
from adamserve_proto import rpc
from adamserve_proto.v2 import optimizer_pb2 as pb

SHAPES = {"w": (4, 5), "b": (7,), "s": ()}


@pytest.fixture(scope="module")
def urls() -> Iterator[dict[str, str]]:
    service = OptimizerService(SessionStore(CpuBackend(), None, Limits(1 << 30)))
    service.start()
    grpc_server, port = build_grpc_server(service, port=0)
    flight = FlightServerThread(service)
    flight.start()
    yield {"grpc": f"grpc://127.0.0.1:{port}", "flight": flight.url}
    flight.stop()
    grpc_server.stop(None)


@pytest.fixture
def raw(urls: dict[str, str]) -> Iterator[fl.FlightClient]:
    client = fl.connect(urls["flight"].replace("flight://", "grpc://"))
    yield client
    client.close()


def _tensors(rng: np.random.Generator, datatype: str = "FP32") -> list[WireTensor]:
    return [WireTensor(n, s, datatype, encode(rng.standard_normal(s).astype(np.float32),
                                              datatype)) for n, s in SHAPES.items()]


def _spec(sid: str, algorithm: str, **kw: Any) -> SessionSpec:
    return SessionSpec(sid, algorithm, tuple(TensorSpec(n, s) for n, s in SHAPES.items()),
                       **kw)


def _values(ts: Any) -> dict[str, bytes]:
    return {t.name: bytes(t.data) for t in ts}


FAMILIES = {
    "elementwise": ("adamw", {"groups": ({"lr": 0.01, "weight_decay": 0.1},)}),
    "clipped": ("adam", {"max_grad_norm": 0.5, "groups": ({"lr": 0.01, "amsgrad": True},)}),
    "lamb": ("lamb", {"groups": ({"lr": 0.01},)}),
}


@pytest.mark.parametrize("datatype", ["FP32", "BF16"])
@pytest.mark.parametrize("family", FAMILIES)
def test_flight_equals_grpc_bitwise(urls: dict[str, str], family: str, datatype: str) -> None:
    algorithm, kw = FAMILIES[family]
    answers: dict[str, list[Any]] = {}
    for kind, url in urls.items():
        sid = f"eq-{family}-{datatype}-{kind}"
        rng = np.random.default_rng(3)
        with connect(url) as t:
            out: list[Any] = []
            t.create_session(_spec(sid, algorithm, **kw), _tensors(rng))
            for _ in range(3):
                r = t.step(sid, _tensors(rng, datatype), return_datatype=datatype)
                out.append((r.step, r.skipped, r.grad_norm, _values(r.params)))
            out.append(t.push(sid, _tensors(rng, datatype)).step)
            out.append(_values(t.pull(sid, ["b", "w"], datatype)))
            t.set_hyperparameters(sid, 0, {"lr": 0.002})
            out.append(t.step(sid, _tensors(rng, datatype)).step)
            t.set_parameters(sid, [WireTensor("b", (7,), "FP32",
                                              encode(np.arange(7.0, dtype=np.float32), "FP32"))])
            out.append(_values(t.pull(sid)))
            state = t.export_state(sid)
            out.append({i: {k: np.asarray(v).tobytes() for k, v in s.items()}
                        for i, s in state["state"].items()})
            t.import_state(sid, state)
            info = t.describe(sid)
            out.append((info.step, info.lr, info.groups, info.state_bytes))
            answers[kind] = out
            t.delete_session(sid)
    assert answers["flight"] == answers["grpc"]


def test_sharded_over_flight_equals_one_grpc_server(urls: dict[str, str]) -> None:
    """A LAMB session with clipping (both need the two-phase exchange) on two Flight
    shards, against one gRPC session; the client tests run every sharded case over
    Flight as well (tests/client/test_sharded.py)."""
    from adamserve_client.transports.sharded import ShardedTransport

    shards = [_flight_server() for _ in range(2)]
    spec = _spec("sh", "lamb", groups=({"lr": 0.01},), max_grad_norm=1.0)
    rng = np.random.default_rng(5)
    initial = _tensors(rng)
    one = connect(urls["grpc"])
    sharded = ShardedTransport([connect(s.url) for s in shards], split_elements=4)
    try:
        one.create_session(spec, initial)
        sharded.create_session(spec, initial)
        for _ in range(3):
            grads = _tensors(rng)
            a, b = one.step("sh", grads), sharded.step("sh", grads)
            assert (a.step, a.skipped) == (b.step, b.skipped)
            assert [t.name for t in a.params] == [t.name for t in b.params]
            for x, y in zip(a.params, b.params, strict=True):
                np.testing.assert_allclose(decode(y.data, "FP32"), decode(x.data, "FP32"),
                                           rtol=1e-6, atol=1e-7)
    finally:
        one.delete_session("sh")
        one.close()
        sharded.close()
        for s in shards:
            s.stop()


def _flight_server() -> FlightServerThread:
    service = OptimizerService(SessionStore(CpuBackend(), None, Limits(1 << 30)))
    service.start()
    server = FlightServerThread(service)
    server.start()
    return server


def test_full_duplex_step_returns_each_batch_as_applied(urls: dict[str, str],
                                                        raw: fl.FlightClient) -> None:
    with connect(urls["flight"]) as t:
        t.create_session(SessionSpec("duplex", "adam", (TensorSpec("w", (1 << 20,)),),
                                     skip_nonfinite=False))
        with connect(urls["grpc"]) as g:
            g.create_session(SessionSpec("duplex-ref", "adam", (TensorSpec("w", (1 << 20,)),),
                                         skip_nonfinite=False))
            grad = np.random.default_rng(1).standard_normal(1 << 20).astype(np.float32)
            ref = g.step("duplex-ref", [WireTensor("w", (1 << 20,), "FP32", grad.data)])
            g.delete_session("duplex-ref")
    header = pb.StepHeader(session_id="duplex", apply_as_received=True)
    writer, reader = raw.do_exchange(fl.FlightDescriptor.for_command(
        pb.FlightCommand(step=pb.StepRequest(header=header)).SerializeToString()))
    writer.begin(layout.schema("FP32"))
    got = []
    for batch in layout.batches([("w", (1 << 20,), grad.data, 0)], "FP32", max_bytes=1 << 20):
        writer.write_batch(batch)  # each answered before the next goes out
        chunk = reader.read_chunk()
        got.extend(layout.rows(chunk.data, "FP32"))
    writer.done_writing()
    status = pb.StepResponse.FromString(reader.read_chunk().app_metadata.to_pybytes()).status
    writer.close()
    assert status.step == 1 and len(got) == 4
    assert b"".join(bytes(r.data) for r in got) == bytes(ref.params[0].data)


def test_every_rpc_is_an_action(raw: fl.FlightClient) -> None:
    assert sorted(a.type for a in raw.list_actions()) == sorted(rpc.RPCS)
    results = list(raw.do_action(fl.Action("ListSessions",
                                           pb.ListSessionsRequest().SerializeToString())))
    assert len(results) == 1
    pb.ListSessionsResponse.FromString(results[0].body.to_pybytes())


# -- bad input --------------------------------------------------------------------------


def _status(exc: fl.FlightError) -> tuple[int, str, str]:
    """(code, message, reason) of the google.rpc.Status in a Flight error."""
    status = status_pb2.Status.FromString(exc.extra_info)
    info = error_details_pb2.ErrorInfo()
    assert status.details[0].Unpack(info) and info.domain == "adamserve"
    return status.code, status.message, info.reason


def _step(raw: fl.FlightClient, command: bytes, batches: list[pa.RecordBatch],
          schema: pa.Schema | None = None, done: bool = True) -> None:
    writer, reader = raw.do_exchange(fl.FlightDescriptor.for_command(command))
    writer.begin(schema or (batches[0].schema if batches else layout.schema("FP32")))
    for b in batches:
        writer.write_batch(b)
    if done:
        writer.done_writing()
    try:
        reader.read_all()
    finally:
        writer.close()


def _cmd(sid: str) -> bytes:
    return pb.FlightCommand(step=pb.StepRequest(header=pb.StepHeader(session_id=sid))
                            ).SerializeToString()


def _batch(name: str, shape: tuple[int, ...], values: Any, datatype: str = "FP32",
           offset: int = 0) -> pa.RecordBatch:
    data = np.ascontiguousarray(values, dtype=np.float32)
    return next(layout.batches([(name, shape, encode(data, datatype), offset)], datatype))


INVALID = 3  # google.rpc.Code.INVALID_ARGUMENT


def _past_the_buffers(good: pa.RecordBatch) -> pa.RecordBatch:
    """``good`` with the tensor names' end offset patched to 1 << 30: a batch that
    reads (Arrow checks little on reading) but whose offsets point past its buffers."""
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, good.schema) as writer:
        writer.write_batch(good)
    data = sink.getvalue().to_pybytes()
    start = np.array([0, 1], np.int32).tobytes()
    for i in (i for i in range(len(data)) if data.startswith(start, i)):
        patched = bytearray(data)
        patched[i + 4:i + 8] = np.array([1 << 30], np.int32).tobytes()
        try:
            bad = pa.ipc.open_stream(pa.py_buffer(bytes(patched))).read_next_batch()
            bad.validate(full=True)
        except pa.ArrowInvalid as exc:
            if "column 0" in str(exc):
                return bad
        except (pa.ArrowException, OSError):
            continue
    raise AssertionError("no string offsets found to patch")


def _bad_inputs() -> dict[str, tuple[Any, str]]:
    w = np.ones(20, np.float32)
    wrong_schema = pa.record_batch([pa.array(w)], names=["g"])
    f64 = layout.schema("FP64").with_metadata({"datatype": "FP32"})
    lying = pa.record_batch(_batch("w", (4, 5), w.astype(np.float64), "FP64").columns,
                            schema=f64)
    nulls = pa.record_batch([pa.array(["w"]), pa.array([[4, 5]], pa.list_(pa.int64())),
                             pa.array([None], pa.int64()),
                             pa.array([list(w)], pa.list_(pa.float32()))],
                            schema=layout.schema("FP32"))
    good = _batch("w", (4, 5), w)
    inner_nulls = pa.record_batch(
        [*good.columns[:3], pa.array([[1.0, None, *([1.0] * 18)]], pa.list_(pa.float32()))],
        schema=layout.schema("FP32"))
    return {
        "offsets past the buffers": ([_past_the_buffers(good)], "record batch: "),
        "nulls inside a list": ([inner_nulls], "null values"),
        "garbage descriptor": (b"\xff\xfe garbage", "not a adamserve_proto.v2.FlightCommand"),
        "a pull in DoExchange": (pb.FlightCommand(pull=pb.PullRequest(session_id="bad"))
                                 .SerializeToString(), "expected `step`"),
        "no header": (pb.FlightCommand(step=pb.StepRequest(chunk=pb.TensorChunk()))
                      .SerializeToString(), "must carry `header`"),
        "wrong schema": ([wrong_schema], "metadata 'datatype' is ''"),
        "schema disagrees with its datatype": ([lying], "expected tensor: string"),
        "unknown tensor": ([_batch("x", (4, 5), w)], "tensor 'x' is not in this session"),
        "wrong shape": ([_batch("w", (5, 4), w)], "expected shape [4, 5], got [5, 4]"),
        "too many elements": ([_batch("w", (4, 5), np.ones(25))], "25 elements sent, expected 20"),
        "a gap": ([_batch("w", (4, 5), w, offset=3)], "starts at element 3, expected 0"),
        "truncated": ([_batch("w", (4, 5), np.ones(12))], "received 12 of 20 elements"),
        "nulls": ([nulls], "null values"),
        "nothing": ([], "carries no gradient tensors"),
    }


@pytest.mark.parametrize("case", list(_bad_inputs()))
def test_bad_input_is_refused_and_changes_nothing(urls: dict[str, str], raw: fl.FlightClient,
                                                  case: str) -> None:
    sid = "bad"
    with connect(urls["flight"]) as t:
        if sid not in {s.session_id for s in t.list_sessions()}:
            t.create_session(_spec(sid, "adam"), _tensors(np.random.default_rng(0)))
        before = (t.describe(sid).step, _values(t.pull(sid)))
        what, message = _bad_inputs()[case]
        command, batches = (what, []) if isinstance(what, bytes) else (_cmd(sid), what)
        with pytest.raises(fl.FlightServerError) as e:
            _step(raw, command, batches)
        code, text, reason = _status(e.value)
        assert (code, reason) == (INVALID, "INVALID_ARGUMENT") and message in text, text
        assert (t.describe(sid).step, _values(t.pull(sid))) == before


def test_errors_match_grpc(urls: dict[str, str]) -> None:
    """The same mistakes get the same exception, reason and message on both wires."""
    seen: dict[str, list[tuple[str, str | None, str]]] = {}
    for kind, url in urls.items():
        with connect(url) as t:
            sid = f"errs-{kind}"
            t.create_session(_spec(sid, "adam"))
            attempts = [
                lambda t, sid: t.step(sid, [WireTensor("nope", (2,), "FP32", bytes(8))]),
                lambda t, sid: t.step(f"{sid}-missing", _tensors(np.random.default_rng(0))),
                lambda t, sid: t.push(sid, [WireTensor("w", (4, 5), "FP32", bytes(12 * 4))]),
                lambda t, sid: t.pull(sid, ["zz"]),
                lambda t, sid: t.create_session(_spec(sid, "adam")),
                lambda t, sid: t.set_hyperparameters(sid, 0, {"lr": -1.0}),
                lambda t, sid: t.restore_checkpoint(sid, 5),
            ]
            out = []
            for attempt in attempts:
                with pytest.raises((errors.AdamserveError, ValueError)) as e:
                    attempt(t, sid)
                out.append((type(e.value).__name__, getattr(e.value, "reason", None),
                            str(e.value).replace(url, "URL")))
            seen[kind] = out
            t.delete_session(sid)
    assert seen["flight"] == [(k, r, m.replace("errs-grpc", "errs-flight"))
                              for k, r, m in seen["grpc"]]


def test_a_stream_cut_off_changes_nothing(urls: dict[str, str], raw: fl.FlightClient) -> None:
    """A client that goes away mid-step (no done_writing: the call is cancelled)."""
    with connect(urls["flight"]) as t:
        t.create_session(SessionSpec("cut", "adam", (TensorSpec("w", (1 << 20,)),)))
        writer, reader = raw.do_exchange(fl.FlightDescriptor.for_command(_cmd("cut")))
        writer.begin(layout.schema("FP32"))
        writer.write_batch(_batch("w", (1 << 20,), np.ones(1 << 18)))
        reader.cancel()  # the client goes away: the call is cancelled
        with contextlib.suppress(fl.FlightError):
            writer.close()
        info = t.describe("cut")
        assert info.step == 0
        assert not np.any(decode(t.pull("cut")[0].data, "FP32"))
        t.step("cut", [WireTensor("w", (1 << 20,), "FP32", np.ones(1 << 20, np.float32).data)])
        assert t.describe("cut").step == 1  # the server is fine
        t.delete_session("cut")


def test_garbage_actions_are_refused(raw: fl.FlightClient) -> None:
    with pytest.raises(fl.FlightServerError) as e:
        list(raw.do_action(fl.Action("Explode", b"")))
    assert _status(e.value)[1].startswith("DoAction: unknown action 'Explode'; expected one of")
    with pytest.raises(fl.FlightServerError) as e:
        list(raw.do_action(fl.Action("GetSession", b"\xff\xff\xff")))
    code, text, _ = _status(e.value)
    assert code == INVALID and "not a adamserve_proto.v2.GetSessionRequest" in text
    with pytest.raises(fl.FlightServerError) as e:
        raw.do_get(fl.Ticket(b"\x01\x02")).read_all()
    assert "DoGet: not a adamserve_proto.v2.FlightCommand" in _status(e.value)[1]


# -- one step over several streams ---------------------------------------------------------


def test_a_step_over_several_streams_equals_one_stream(urls: dict[str, str]) -> None:
    shapes = {"a": (3_000_000,), "e": (0,), "b": (5,), "c": (3, 1_000_000)}
    specs = tuple(TensorSpec(n, s) for n, s in shapes.items())
    got = []
    for url in (urls["flight"], urls["flight"] + "?streams=4"):
        sid = f"streams-{len(got)}"
        with connect(url) as t:
            t.create_session(SessionSpec(sid, "adam", specs, groups=({"lr": 0.01},)))
            steps = []
            for i in range(2):
                grads = [WireTensor(n, s, "FP32", np.random.default_rng(i).standard_normal(
                    s).astype(np.float32).data) for n, s in shapes.items()]
                r = t.step(sid, grads)
                steps.append((r.step, _values(r.params)))
            got.append(steps)
            t.delete_session(sid)
    assert got[0] == got[1]


def test_streams_that_do_not_meet_fail_the_step_and_change_nothing() -> None:
    service = OptimizerService(SessionStore(CpuBackend(), None, Limits(1 << 30)))
    service.start()
    server = FlightServerThread(service, stream_wait=0.3)
    server.start()
    raw = fl.connect(server.url.replace("flight://", "grpc://"))
    try:
        with connect(server.url) as t:
            t.create_session(SessionSpec("meet", "adam", (TensorSpec("w", (8,)),)))

            def command(index: int, count: int = 2, token: str = "x") -> bytes:
                return pb.FlightCommand(
                    step=pb.StepRequest(header=pb.StepHeader(session_id="meet")),
                    streams=pb.FlightStreams(id=token, count=count, index=index)
                ).SerializeToString()

            half = [_batch("w", (8,), np.ones(4))]
            for index in (0, 1):  # the other stream never comes
                with pytest.raises(fl.FlightServerError) as e:
                    _step(raw, command(index, token=f"lone{index}"), half)
                assert "did not arrive" in _status(e.value)[1]
            for bad, message in ((command(0, count=1), "expected 2 to 16 streams"),
                                 (command(5), "streams.index 5: expected 0 to 1")):
                with pytest.raises(fl.FlightServerError) as e:
                    _step(raw, bad, half)
                assert message in _status(e.value)[1]
            assert server.server.gathers._open == {}  # lone streams leave nothing behind
            # streams of one step with different headers (another return datatype)
            other = pb.FlightCommand(
                step=pb.StepRequest(header=pb.StepHeader(session_id="meet",
                                                         return_datatype="BF16")),
                streams=pb.FlightStreams(id="mixed", count=2, index=1)).SerializeToString()
            def lone_first() -> None:  # refused too: its second stream never comes
                with pytest.raises(fl.FlightServerError):
                    _step(raw, command(0, token="mixed"), half)

            first = threading.Thread(target=lone_first)
            first.start()
            time.sleep(0.1)  # stream 0 first: the header stream 1 must match
            with pytest.raises(fl.FlightServerError) as e:
                _step(raw, other, half)
            assert "its step header differs" in _status(e.value)[1]
            first.join()
            assert t.describe("meet").step == 0
            assert not np.any(decode(t.pull("meet")[0].data, "FP32"))
    finally:
        raw.close()
        server.stop()


def test_stop_does_not_wait_for_a_client_that_holds_a_call_open() -> None:
    service = OptimizerService(SessionStore(CpuBackend(), None, Limits(1 << 30)))
    service.start()
    server = FlightServerThread(service)
    server.start()
    raw = fl.connect(server.url.replace("flight://", "grpc://"))
    with connect(server.url) as t:
        t.create_session(SessionSpec("idle", "adam", (TensorSpec("w", (8,)),)))
    writer, _ = raw.do_exchange(fl.FlightDescriptor.for_command(_cmd("idle")))
    writer.begin(layout.schema("FP32"))  # and never done_writing
    began = time.monotonic()
    server.stop(grace=0.5)
    assert time.monotonic() - began < 5
    raw.close()


def test_the_rows_column_carries_row_sparse_tensors_and_nulls_for_dense_ones() -> None:
    """A stream with row-sparse tensors has a fifth column, rows: list<int64>; null in
    it for a dense chunk; a large row-sparse tensor is cut between whole rows."""
    ids = np.arange(0, 4000, 2, dtype="<i8")
    values = np.arange(len(ids) * 300, dtype="<f4")  # 300-element rows: 2.4 MB
    dense = np.ones(6, dtype="<f4")
    batches = list(layout.batches([("emb", (4000, 300), values.tobytes(), 0, ids.tobytes()),
                                   ("bias", (6,), dense.tobytes(), 0, None)], "FP32",
                                  max_bytes=1 << 20, rows=True))
    assert len(batches) > 2
    assert all(b.schema.equals(layout.schema("FP32", rows=True)) for b in batches)
    assert layout.datatype_of(batches[0].schema) == "FP32"
    got = [r for b in batches for r in layout.rows(b, "FP32")]
    emb = [r for r in got if r.name == "emb"]
    assert all(r.rows is not None and len(r.data) == 1200 * len(r.rows) // 8 for r in emb)
    assert b"".join(bytes(r.rows or b"") for r in emb) == ids.tobytes()
    assert b"".join(bytes(r.data) for r in emb) == values.tobytes()
    (bias,) = [r for r in got if r.name == "bias"]
    assert bias.rows is None and bytes(bias.data) == dense.tobytes()
    with pytest.raises(ValueError, match="the stream needs rows=True"):
        list(layout.batches([("emb", (4000, 300), b"", 0, b"")], "FP32"))
