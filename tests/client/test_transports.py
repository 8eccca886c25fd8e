"""The transports directly: a two-method wire under one implementation of the session
operations, the same behaviour over gRPC and HTTP, ListSessions' pages, the codecs
against the server's, StepUnary and resent steps (errors and retries: test_errors.py)."""

from __future__ import annotations

import inspect
import math
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import torch
from google.protobuf.message import Message

import adamserve_client as ac
from adamserve.transports.state_codec import decode_state as server_decode_state
from adamserve.transports.state_codec import encode_state as server_encode_state
from adamserve_client import errors
from adamserve_client.tensors import decode, encode
from adamserve_client.transports import (
    Client,
    SessionSpec,
    TensorSpec,
    Transport,
    Wire,
    WireTensor,
    connect,
)
from adamserve_client.transports._codec import decode_state, encode_state, parse_url, with_retries
from adamserve_client.transports.base import Payload, Reply, Sender
from adamserve_client.transports.grpc import GrpcTransport, GrpcWire, tensor_messages
from adamserve_client.transports.http import HttpTransport, HttpWire
from adamserve_proto import rpc, wire
from adamserve_proto.v2 import optimizer_pb2 as pb
from tests.client.conftest import Live


@pytest.fixture
def transport(url: str) -> Iterator[Client]:
    with connect(url, timeout=30) as t:
        yield t


def f32(name: str, arr: np.ndarray) -> WireTensor:
    return WireTensor(name, arr.shape, "FP32", encode(arr, "FP32"))


def values(t: WireTensor) -> np.ndarray:
    return np.asarray(decode(t.data, t.datatype)).reshape(t.shape)


def public(cls: type) -> set[str]:
    return {n for n, v in inspect.getmembers(cls, callable) if not n.startswith("_")}


# -- the seams --------------------------------------------------------------------------


def test_a_wire_is_two_calls_and_the_operations_are_written_once() -> None:
    assert {n for n in Wire.__abstractmethods__} == {"unary", "stream", "close"}
    assert public(GrpcWire) == public(HttpWire) == public(Wire)
    for name in public(Wire):
        assert (inspect.signature(getattr(GrpcWire, name))
                == inspect.signature(getattr(HttpWire, name))
                == inspect.signature(getattr(Wire, name))), name
    # the per-wire transports are the one Client over their wire, adding nothing
    assert public(GrpcTransport) == public(HttpTransport) == public(Client) == public(Transport)
    for cls in (GrpcTransport, HttpTransport):
        assert [k for k in vars(cls) if not k.startswith("_")] == [], cls
        assert [k for k in vars(cls) if k.startswith("__") and callable(vars(cls)[k])] == [
            "__init__"], cls
    assert not Client.__abstractmethods__


def test_every_rpc_the_client_makes_is_in_the_v2_service() -> None:
    calls: list[str] = []

    class Recording(Wire):
        url, timeout = "memory://", None

        def unary(self, method: str, request: Message, *, idempotent: bool = True) -> Message:
            calls.append(method)
            assert type(request) is rpc.RPCS[method].request_type
            raise errors.ServerError("recorded")

        def stream(self, method: str, request: Message, payload: Payload = (), *,
                   idempotent: bool = True) -> Reply:
            calls.append(method)
            assert type(request) is rpc.RPCS[method].request_type
            raise errors.ServerError("recorded")

        def close(self) -> None:
            pass

    c = Client(Recording())
    spec = SessionSpec("s", "adam", (TensorSpec("w", (1,)),))
    for op in (lambda: c.create_session(spec), lambda: c.add_tensors("s", ()),
               lambda: c.step("s", []), lambda: c.push("s", []), lambda: c.pull("s"),
               lambda: c.commit("s", 1, [], 0.0), lambda: c.set_workers("s", 1),
               lambda: c.list_checkpoints("s"), lambda: c.restore_checkpoint("s", 1),
               lambda: c.set_parameters("s", []), lambda: c.set_hyperparameters("s", 0, {}),
               lambda: c.set_schedule("s", None), lambda: c.export_state("s"),
               lambda: c.import_state("s", {"state": {}, "param_groups": []}),
               lambda: c.checkpoint("s"), lambda: c.describe("s"), c.list_sessions,
               lambda: c.delete_session("s")):
        with pytest.raises(errors.ServerError, match="recorded"):
            op()
    assert set(calls) <= set(rpc.RPCS) and len(set(calls)) == 18


def test_connect_picks_the_wire_by_scheme() -> None:
    assert isinstance(connect("grpc://localhost:1"), GrpcTransport)
    assert isinstance(connect("grpc://localhost:1").wire, GrpcWire)
    assert isinstance(connect("http://localhost:1").wire, HttpWire)
    assert isinstance(connect("https://localhost").wire, HttpWire)
    assert parse_url("grpc://[::1]").hostport == "[::1]:50051"
    with pytest.raises(ValueError, match="expected grpc://host:port"):
        connect("ftp://localhost")


# -- the same operations, the same answers, on both wires --------------------------------


def _transcript(t: Client, sid: str) -> list[Any]:
    """What every operation answers, in plain values (errors as class and reason)."""
    out: list[Any] = []

    def note(label: str, fn: Any) -> Any:
        try:
            got = fn()
        except errors.AdamserveError as exc:
            out.append((label, type(exc).__name__, exc.code, exc.reason))
            return None
        out.append((label, summary(got)))
        return got

    def summary(x: Any) -> Any:
        if isinstance(x, list | tuple):
            return [summary(v) for v in x]
        if isinstance(x, WireTensor):
            return (x.name, x.shape, x.datatype, round(float(values(x).astype(float).sum()), 5))
        if hasattr(x, "session_id") and hasattr(x, "groups"):  # SessionInfo
            return (x.step, [tt.name for tt in x.tensors], x.groups, x.lr, x.schedule,
                    x.workers, x.checkpointed_step)
        if hasattr(x, "params"):  # StepResult
            return (x.step, x.skipped, x.duplicate, x.pending, x.nonfinite,
                    summary(list(x.params)), x.contributors)
        if hasattr(x, "path"):  # CheckpointInfo
            return x.step
        return x

    w = np.linspace(-1, 1, 6, dtype=np.float32).reshape(2, 3)
    spec = SessionSpec(sid, "adam", (TensorSpec("w", (2, 3)), TensorSpec("b", (3,), 1)),
                       groups=({"lr": 0.1}, {"lr": 0.01, "betas": (0.8, 0.9)}),
                       schedule={"kind": "step", "step_size": 2})
    note("create", lambda: t.create_session(spec, [f32("w", w)]))
    note("create again", lambda: t.create_session(spec))
    g = [f32("w", np.ones((2, 3), np.float32)), f32("b", -np.ones(3, np.float32))]
    note("step", lambda: t.step(sid, g, return_datatype="FP64"))
    note("step sender", lambda: t.step(sid, g, sender=Sender("a", 1)))
    note("step resent", lambda: t.step(sid, g, sender=Sender("a", 1)))
    note("push", lambda: t.push(sid, g[:1]))
    note("bad shape", lambda: t.step(sid, [f32("w", np.ones(4, np.float32))]))
    note("pull", lambda: t.pull(sid, ["b", "w"], "BF16"))
    note("set params", lambda: t.set_parameters(sid, [f32("b", np.full(3, 2, np.float32))]))
    note("hyper", lambda: t.set_hyperparameters(sid, 1, {"lr": 0.5, "amsgrad": True}))
    note("bad hyper", lambda: t.set_hyperparameters(sid, 0, {"lr": -1.0}))
    note("schedule", lambda: t.set_schedule(sid, {"kind": "linear", "start_factor": 0.5,
                                                  "total_steps": 4}))
    note("no schedule", lambda: t.set_schedule(sid, None))
    state = note("export", lambda: t.export_state(sid)["param_groups"][1]["param_names"])
    note("import", lambda: t.import_state(sid, t.export_state(sid)))
    note("workers", lambda: t.set_workers(sid, 2))
    note("workers back", lambda: t.set_workers(sid, 1))
    note("checkpoint", lambda: t.checkpoint(sid))
    note("step after", lambda: t.step(sid, g))
    note("checkpoints", lambda: t.list_checkpoints(sid))
    note("restore", lambda: t.restore_checkpoint(sid, 3))
    note("restore missing", lambda: t.restore_checkpoint(sid, 99))
    note("commit", lambda: t.commit(sid, 4, [0.0, 0.0], 0.0))
    note("listed", lambda: sid in {s.session_id for s in t.list_sessions()})
    note("describe", lambda: t.describe(sid))
    note("delete", lambda: t.delete_session(sid))
    note("describe deleted", lambda: t.describe(sid))
    note("delete deleted", lambda: t.delete_session(sid))
    assert state == ["b"]
    return out


def test_the_same_operations_behave_identically_over_grpc_and_http(
        url: str, live: Live, sid: str) -> None:
    with connect(url, timeout=30) as t:
        mine = _transcript(t, sid)
    with connect(live.urls["grpc"], timeout=30) as reference:
        theirs = _transcript(reference, sid + "-ref")
    assert mine == theirs
    errors_seen = {row[0]: row[1:] for row in mine if len(row) == 4}
    assert errors_seen == {
        "create again": ("AlreadyExists", "already_exists", "SESSION_EXISTS"),
        "bad shape": ("InvalidArgument", "invalid_argument", "INVALID_ARGUMENT"),
        "bad hyper": ("InvalidArgument", "invalid_argument", "INVALID_ARGUMENT"),
        "restore missing": ("NotFound", "not_found", "CHECKPOINT_NOT_FOUND"),
        "commit": ("FailedPrecondition", "failed_precondition", "NO_STAGED_STEP"),
        "describe deleted": ("NotFound", "not_found", "SESSION_NOT_FOUND"),
        "delete deleted": ("NotFound", "not_found", "SESSION_NOT_FOUND"),
    }


def test_a_whole_session(transport: Transport, sid: str) -> None:
    """create, step, push, pull, hyperparameters, schedule, state, checkpoint, list, delete."""
    w = np.arange(12, dtype=np.float32).reshape(3, 4) / 10
    spec = SessionSpec(sid, "adamw", (TensorSpec("w", (3, 4)), TensorSpec("b", (4,), 1),
                                      TensorSpec("empty", (0,), 1)),
                       groups=({"lr": 0.1, "betas": (0.8, 0.99)}, {"amsgrad": True}))
    info = transport.create_session(spec, [f32("w", w)])
    assert info.session_id == sid and info.step == 0 and info.algorithm == "adamw"
    assert info.groups[0]["betas"] == (0.8, 0.99) and info.groups[1]["amsgrad"] is True
    assert info.tensors[1] == TensorSpec("b", (4,), 1) and info.checkpointed_step == -1
    g = np.ones((3, 4), np.float32)
    r = transport.step(sid, [f32("w", g)])
    assert (r.step, r.skipped) == (1, False)
    got = {t.name: values(t) for t in r.params}
    assert set(got) == {"w", "b", "empty"}
    # AdamW's first step moves every weight by lr (after decay); b had no gradient
    np.testing.assert_allclose(got["w"], w * (1 - 0.1 * 0.01) - 0.1, atol=1e-6)
    np.testing.assert_array_equal(got["b"], 0)
    r = transport.push(sid, [f32("b", np.ones(4, np.float32))])
    assert r.step == 2 and r.params == ()
    pulled = {t.name: values(t) for t in transport.pull(sid, ["b"], "FP64")}
    assert list(pulled) == ["b"] and pulled["b"].dtype == np.float64
    info = transport.set_hyperparameters(sid, 1, {"lr": 0.5, "betas": (0.5, 0.6)})
    assert info.groups[1]["lr"] == 0.5 and info.groups[1]["betas"] == (0.5, 0.6)
    info = transport.set_schedule(sid, {"kind": "constant", "factor": 0.5})
    assert info.schedule == {"kind": "constant", "factor": 0.5}
    assert info.lr[1] == pytest.approx(0.25)
    info = transport.set_schedule(sid, {"kind": "join", "milestones": [3], "schedules": [
        {"kind": "linear", "start_factor": 0.0, "total_steps": 3},
        {"kind": "one_cycle", "total_steps": 10, "anneal_strategy": "linear"}]})
    assert info.schedule is not None and info.schedule["schedules"][1] == {
        "kind": "one_cycle", "total_steps": 10, "max_lr": None, "pct_start": 0.3,
        "anneal_strategy": "linear", "div_factor": 25.0, "final_div_factor": 1e4,
        "three_phase": False, "cycle_momentum": True, "base_momentum": 0.85,
        "max_momentum": 0.95}
    assert transport.set_schedule(sid, None).schedule is None
    state = transport.export_state(sid)
    # (a zero-size tensor counts as always present, so it steps with every request)
    assert sorted(state["state"]) == [0, 1, 2] and state["state"][0]["step"] == 1.0
    assert state["param_groups"][1]["param_names"] == ["b", "empty"]
    assert state["state"][1]["max_exp_avg_sq"].shape == (4,)
    assert state["state"][0]["exp_avg"].flags.writeable
    info = transport.import_state(sid, state)
    assert info.step == 2
    ck = transport.checkpoint(sid)
    assert ck.step == 2 and ck.bytes > 0 and transport.describe(sid).checkpointed_step == 2
    assert sid in {s.session_id for s in transport.list_sessions()}
    transport.delete_session(sid)
    with pytest.raises(KeyError, match=sid):
        transport.describe(sid)


def test_add_tensors(transport: Transport, sid: str) -> None:
    """A session grows in place: a new group with initial values, then refused adds."""
    transport.create_session(SessionSpec(sid, "adam", (TensorSpec("w", (2,)),),
                                         groups=({"lr": 0.1},)))
    try:
        transport.step(sid, [f32("w", np.ones(2, np.float32))])
        h = np.arange(6, dtype=np.float32).reshape(2, 3)
        info = transport.add_tensors(
            sid, [TensorSpec("h", (2, 3), 1), TensorSpec("z", (4,), 1)],
            {"lr": 0.5, "betas": (0.8, 0.9), "amsgrad": True}, [f32("h", h)])
        assert info.tensors == (TensorSpec("w", (2,)), TensorSpec("h", (2, 3), 1),
                                TensorSpec("z", (4,), 1))
        assert info.step == 1 and info.lr == (0.1, 0.5)
        assert info.groups[1]["betas"] == (0.8, 0.9) and info.groups[1]["amsgrad"] is True
        pulled = {t.name: values(t) for t in transport.pull(sid, ["h", "z"])}
        np.testing.assert_array_equal(pulled["h"], h)
        np.testing.assert_array_equal(pulled["z"], 0)
        info = transport.add_tensors(sid, [TensorSpec("x", (1,))])  # joins group 0
        assert info.tensors[-1] == TensorSpec("x", (1,)) and len(info.groups) == 2
        r = transport.step(sid, [f32("h", np.ones((2, 3), np.float32))])
        got = {t.name: values(t) for t in r.params}
        np.testing.assert_allclose(got["h"], h - 0.5, rtol=1e-6)  # first Adam step: lr
        state = transport.export_state(sid)
        assert [state["state"][i]["step"] for i in range(2)] == [1.0, 1.0]
        with pytest.raises(ValueError, match="already in the session: w"):
            transport.add_tensors(sid, [TensorSpec("w", (2,), 2)], {})
        with pytest.raises(ValueError, match="group 3 does not exist"):
            transport.add_tensors(sid, [TensorSpec("q", (2,), 3)], {})
        with pytest.raises(ValueError, match="lr: expected a value >= 0"):
            transport.add_tensors(sid, [TensorSpec("q", (2,), 2)], {"lr": -1.0})
        with pytest.raises(KeyError, match=f"nope-{sid}"):
            transport.add_tensors(f"nope-{sid}", [TensorSpec("q", (2,))])
        after = transport.describe(sid)
        assert len(after.tensors) == 4 and len(after.groups) == 2 and after.step == 2
    finally:
        transport.delete_session(sid)


def test_same_answers_over_every_wire(live: Live, sid: str) -> None:
    rng = np.random.default_rng(4)
    w = rng.standard_normal((5, 6)).astype(np.float32)
    results = []
    for kind, u in live.urls.items():
        with connect(u) as t:
            s = f"{sid}-{kind}"
            t.create_session(SessionSpec(s, "nadam", (TensorSpec("w", w.shape),)), [f32("w", w)])
            for i in range(3):
                g = np.random.default_rng(i).standard_normal(w.shape).astype(np.float32)
                r = t.step(s, [WireTensor("w", w.shape, "BF16", encode(g, "BF16"))],
                           return_datatype="FP16")
            results.append((values(r.params[0]), t.export_state(s)))
            t.delete_session(s)
    assert len(results) == 3  # grpc, http, flight
    p1, s1 = results[0]
    assert p1.dtype == np.float16
    for p2, s2 in results[1:]:
        np.testing.assert_array_equal(p1, p2)
        np.testing.assert_array_equal(s1["state"][0]["exp_avg"], s2["state"][0]["exp_avg"])
        assert s1["state"][0]["mu_product"] == s2["state"][0]["mu_product"]


class Counting(Wire):
    """A wire around another that counts the calls of each method (wires compose)."""

    def __init__(self, inner: Wire) -> None:
        self.inner, self.url, self.timeout = inner, inner.url, inner.timeout
        self.calls: dict[str, int] = {}

    def unary(self, method: str, request: Message, *, idempotent: bool = True) -> Message:
        self.calls[method] = self.calls.get(method, 0) + 1
        return self.inner.unary(method, request, idempotent=idempotent)

    def stream(self, method: str, request: Message, payload: Payload = (), *,
               idempotent: bool = True) -> Reply:
        self.calls[method] = self.calls.get(method, 0) + 1
        return self.inner.stream(method, request, payload, idempotent=idempotent)

    def close(self) -> None:
        self.inner.close()


def test_list_sessions_follows_the_pages(transport: Client, sid: str) -> None:
    ids = [f"{sid}-{i}" for i in range(7)]
    for s in ids:
        transport.create_session(SessionSpec(s, "adam", (TensorSpec("w", (1,)),)))
    try:
        counted = Client(Counting(transport.wire))
        everything = [s.session_id for s in counted.list_sessions(page_size=3)]
        assert sorted(everything) == everything and len(set(everything)) == len(everything)
        assert set(ids) <= set(everything)
        assert counted.wire.calls["ListSessions"] >= math.ceil(len(everything) / 3) >= 3
        assert [s.session_id for s in transport.list_sessions()] == everything
        page = transport.wire.unary("ListSessions", pb.ListSessionsRequest(page_size=3))
        assert len(page.sessions) == 3 and page.next_page_token
    finally:
        for s in ids:
            transport.delete_session(s)


# -- codecs -----------------------------------------------------------------------------


def test_tensor_messages_check_the_size_and_chunk_as_protobuf_writes() -> None:
    data = np.arange(1000, dtype=np.float32)
    t = WireTensor("layer.w", (10, 100), "FP32", encode(data, "FP32"))
    got = bytearray()
    for raw in tensor_messages(t, wire.STEP_CHUNK, max_bytes=1024):
        chunk = pb.StepRequest.FromString(raw).chunk
        assert chunk.name == "layer.w" and chunk.offset == len(got) // 4
        got += chunk.data
    assert bytes(got) == data.tobytes()
    with pytest.raises(ValueError, match="needs 16"):
        list(tensor_messages(WireTensor("x", (4,), "FP32", b"12")))


def test_bfloat16_encoding_matches_torch() -> None:
    x = np.random.default_rng(0).standard_normal(10000).astype(np.float32) * 100
    x[:3] = [np.nan, np.inf, -0.0]
    ours = np.frombuffer(encode(x, "BF16"), np.uint16)
    theirs = torch.from_numpy(x).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    np.testing.assert_array_equal(ours[1:], theirs[1:])
    assert np.isnan(decode(encode(x, "BF16"), "BF16")[0])


def test_state_blob_is_the_servers_format() -> None:
    rng = np.random.default_rng(1)
    sd = {"state": {0: {"step": 3.0, "exp_avg": rng.standard_normal((2, 3)).astype(np.float32),
                        "exp_avg_sq": rng.random((2, 3)).astype(np.float32)},
                    2: {"step": 1.0, "mu_product": 0.5, "exp_avg": np.float32(1.5),
                        "exp_avg_sq": np.zeros(0, np.float64)}},
          "param_groups": [{"lr": 0.1, "betas": (0.9, 0.99), "amsgrad": False,
                            "params": [0, 1, 2], "param_names": ["a", "b", "c"]}]}
    for back in (server_decode_state(encode_state(sd)),
                 decode_state(bytearray(server_encode_state(sd)))):
        assert back["param_groups"][0]["betas"] == (0.9, 0.99)
        assert back["param_groups"][0]["param_names"] == ["a", "b", "c"]
        assert back["state"][2]["mu_product"] == 0.5
        for k, entry in sd["state"].items():
            for slot, v in entry.items():
                np.testing.assert_array_equal(back["state"][k][slot], v)
                if isinstance(v, np.ndarray):
                    assert back["state"][k][slot].dtype == v.dtype


def test_with_retries_is_bounded() -> None:
    calls = []

    def flaky() -> str:
        calls.append(1)
        if len(calls) < 3:
            raise ConnectionRefusedError("down")
        return "up"

    assert with_retries(flaky, lambda e: isinstance(e, ConnectionError), backoff=0) == "up"
    calls.clear()
    with pytest.raises(ConnectionRefusedError):
        with_retries(lambda: flaky() if len(calls) < 5 else "", lambda e: True, attempts=2,
                     backoff=0)
    assert len(calls) == 2
    calls.clear()
    with pytest.raises(ValueError):
        with_retries(lambda: calls.append(1) or int("x"), lambda e: False, backoff=0)
    assert len(calls) == 1


# -- sessions by name -------------------------------------------------------------------


def test_attach_and_resume_by_name(url: str, sid: str) -> None:
    torch.manual_seed(0)
    start = torch.randn(4, 3)
    grads = [torch.randn(4, 3) for _ in range(10)]
    ref_p = start.clone()
    ref = torch.optim.Adam([ref_p], lr=1e-2)
    for g in grads:
        ref_p.grad = g
        ref.step()
    p = start.clone()
    first = ac.Adam([("w", p)], lr=1e-2, server=url, session=sid)
    for g in grads[:5]:
        p.grad = g
        first.step()
    first.close()  # a named session outlives its optimizer
    q = torch.zeros(4, 3)
    second = ac.Adam([("w", q)], lr=1e-2, server=url, session=sid)
    try:
        np.testing.assert_array_equal(q.numpy(), p.numpy())  # resumed from the server
        for g in grads[5:]:
            q.grad = g
            second.step()
        np.testing.assert_allclose(q.numpy(), ref_p.numpy(), rtol=0, atol=1e-6)
        with pytest.raises(ValueError, match=r"holds 1 tensors in 1 groups: w \[4, 3\] \(group 0\)"
                                             r"; this optimizer has 1 in 1 groups: w \[3\]"):
            ac.Adam([("w", torch.zeros(3))], server=url, session=sid)
        with pytest.raises(ValueError, match="runs adam; this optimizer is rmsprop"):
            ac.RMSprop([("w", torch.zeros(4, 3))], server=url, session=sid)
    finally:
        second.close(delete=True)


def test_anonymous_sessions_are_deleted(url: str, live: Live) -> None:
    before = {s.id for s in live.service.list()}
    opt = ac.Adam([torch.zeros(2)], server=url)
    sid = opt.session_id
    assert sid not in before and sid in {s.id for s in live.service.list()}
    opt.close()
    assert sid not in {s.id for s in live.service.list()}
    opt = ac.Adam([torch.zeros(2)], server=url)
    sid = opt.session_id
    del opt
    import gc

    gc.collect()
    assert sid not in {s.id for s in live.service.list()}


def test_client_never_imports_the_server() -> None:
    code = ("import sys, adamserve_client, adamserve_client.transports.grpc, "
            "adamserve_client.transports.http, adamserve_client.optim; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] == 'adamserve'))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60, check=True)
    assert out.stdout.strip() == "[]"


def test_grpc_small_steps_go_unary_and_large_sessions_fall_back_to_the_stream(
        live: Live, sid: str) -> None:
    """Small gradients travel as one StepUnary message; when the session's parameters
    would not fit one reply, the server refuses before changing anything and the
    wire sends the same step over the stream."""
    big = np.zeros(2_000_000, dtype=np.float32)  # 8 MB of parameters: too large for one reply
    small = np.zeros(10, dtype=np.float32)
    ref_big, ref_small = big.copy(), small.copy()
    opt = ac.Adam([big, small], lr=0.1, server=live.urls["grpc"], session=sid)
    ref = ac.Adam([ref_big, ref_small], lr=0.1, server=live.urls["http"], session=sid + "-ref")
    g = np.ones(10, dtype=np.float32)
    for _ in range(3):
        opt.step([None, g])  # 40 bytes of gradient: tries StepUnary first
        ref.step([None, g])
    assert isinstance(opt.transport, Client) and isinstance(opt.transport.wire, GrpcWire)
    assert sid in opt.transport.wire.small.stream_only
    np.testing.assert_array_equal(small, ref_small)
    np.testing.assert_array_equal(big, ref_big)
    assert live.service.describe(sid).step == 3
    opt.close()
    ref.close()


def test_a_step_resent_by_its_sender_is_applied_once(transport: Transport, sid: str) -> None:
    """What makes resending a step whose answer was lost safe, on both wires."""
    spec = SessionSpec(sid, "adam", (TensorSpec("w", (3,)),))
    transport.create_session(spec)
    g = [WireTensor("w", (3,), "FP32", np.ones(3, np.float32).tobytes())]
    first = transport.step(sid, g, sender=Sender("w0", 1))
    again = transport.step(sid, g, sender=Sender("w0", 1))
    pushed = transport.push(sid, g, sender=Sender("w0", 1))
    assert (first.duplicate, again.duplicate, pushed.duplicate) == (False, True, True)
    assert again.step == 1 and again.params == first.params
    assert transport.step(sid, g, sender=Sender("w0", 2)).step == 2
    transport.delete_session(sid)
