"""The transports directly: same methods and same answers over gRPC and HTTP, the wire
codecs against the server's, errors that carry the server's message, retries."""

from __future__ import annotations

import inspect
import socket
import subprocess
import sys
import time
from collections.abc import Iterator

import numpy as np
import pytest
import torch

import adamserve_client as ac
from adamserve.transports.state_codec import decode_state as server_decode_state
from adamserve.transports.state_codec import encode_state as server_encode_state
from adamserve_client.tensors import decode, encode
from adamserve_client.transports import (
    SessionSpec,
    TensorSpec,
    Transport,
    WireTensor,
    connect,
)
from adamserve_client.transports._codec import (
    chunk_messages,
    decode_state,
    encode_state,
    parse_url,
    with_retries,
)
from adamserve_client.transports.grpc import GrpcTransport
from adamserve_client.transports.http import HttpTransport
from adamserve_proto.v1 import optimizer_pb2 as pb
from tests.client.conftest import Live


@pytest.fixture
def transport(url: str) -> Iterator[Transport]:
    with connect(url, timeout=30) as t:
        yield t


def f32(name: str, arr: np.ndarray) -> WireTensor:
    return WireTensor(name, arr.shape, "FP32", encode(arr, "FP32"))


def values(t: WireTensor) -> np.ndarray:
    return np.asarray(decode(t.data, t.datatype)).reshape(t.shape)


# -- the seam ---------------------------------------------------------------------------


def test_both_transports_have_exactly_the_transport_methods() -> None:
    def public(cls: type) -> set[str]:
        return {n for n, v in inspect.getmembers(cls, callable) if not n.startswith("_")}

    assert public(GrpcTransport) == public(HttpTransport) == public(Transport)
    for name in public(Transport):
        assert (inspect.signature(getattr(GrpcTransport, name))
                == inspect.signature(getattr(HttpTransport, name))
                == inspect.signature(getattr(Transport, name))), name


def test_connect_picks_the_transport_by_scheme() -> None:
    assert isinstance(connect("grpc://localhost:1"), GrpcTransport)
    assert isinstance(connect("http://localhost:1"), HttpTransport)
    assert isinstance(connect("https://localhost"), HttpTransport)
    assert parse_url("grpc://[::1]").hostport == "[::1]:50051"
    with pytest.raises(ValueError, match="expected grpc://host:port"):
        connect("ftp://localhost")


def test_a_whole_session(transport: Transport, sid: str) -> None:
    """create, step, push, pull, hyperparameters, schedule, state, checkpoint, list, delete."""
    w = np.arange(12, dtype=np.float32).reshape(3, 4) / 10
    spec = SessionSpec(sid, "adamw", (TensorSpec("w", (3, 4)), TensorSpec("b", (4,), 1),
                                      TensorSpec("empty", (0,), 1)),
                       groups=({"lr": 0.1, "betas": (0.8, 0.99)}, {"amsgrad": True}))
    info = transport.create_session(spec, [f32("w", w)])
    assert info.session_id == sid and info.step == 0 and info.algorithm == "adamw"
    assert info.groups[0]["betas"] == (0.8, 0.99) and info.groups[1]["amsgrad"] is True
    assert info.tensors[1] == TensorSpec("b", (4,), 1)
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
    assert info.schedule is not None and info.lr[1] == pytest.approx(0.25)
    assert transport.set_schedule(sid, None).schedule is None
    state = transport.export_state(sid)
    # (a zero-size tensor counts as always present, so it steps with every request)
    assert sorted(state["state"]) == [0, 1, 2] and state["state"][0]["step"] == 1.0
    assert state["param_groups"][1]["param_names"] == ["b", "empty"]
    assert state["state"][1]["max_exp_avg_sq"].shape == (4,)
    info = transport.import_state(sid, state)
    assert info.step == 2
    ck = transport.checkpoint(sid)
    assert ck.step == 2 and ck.bytes > 0
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


def test_same_answers_over_both_wires(live: Live, sid: str) -> None:
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
    (p1, s1), (p2, s2) = results
    assert p1.dtype == np.float16
    np.testing.assert_array_equal(p1, p2)
    np.testing.assert_array_equal(s1["state"][0]["exp_avg"], s2["state"][0]["exp_avg"])
    assert s1["state"][0]["mu_product"] == s2["state"][0]["mu_product"]


# -- codecs -----------------------------------------------------------------------------


def test_chunk_messages_are_what_protobuf_writes() -> None:
    data = np.arange(1000, dtype=np.float32)
    t = WireTensor("layer.w", (10, 100), "FP32", encode(data, "FP32"))
    msgs = list(chunk_messages(t, wrap_field=2, max_bytes=1024 + 64 + 400))
    assert len(msgs) > 5
    got = bytearray()
    for i, raw in enumerate(msgs):
        chunk = pb.StepRequest.FromString(raw).chunk
        assert chunk.name == "layer.w" and list(chunk.shape) == [10, 100]
        assert chunk.datatype == "FP32" and chunk.offset == len(got) // 4, i
        got += chunk.data
    assert bytes(got) == data.tobytes()
    whole = pb.TensorChunk(name="s", shape=[], datatype="FP64",
                           data=np.float64(2.5).tobytes())
    (one,) = chunk_messages(WireTensor("s", (), "FP64", whole.data))
    assert one == whole.SerializeToString()
    with pytest.raises(ValueError, match="needs 16"):
        list(chunk_messages(WireTensor("x", (4,), "FP32", b"12")))


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


# -- errors -----------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.parametrize("scheme", ["grpc", "http"])
def test_unreachable_server_is_a_connection_error_naming_the_url(scheme: str) -> None:
    url = f"{scheme}://127.0.0.1:{_free_port()}"
    t0 = time.monotonic()
    with pytest.raises(ConnectionError, match=f"cannot reach the adamserve server at {url}") as e:
        ac.Adam([torch.zeros(3)], server=url)
    assert time.monotonic() - t0 < 5
    assert isinstance(e.value, ac.Unavailable) and e.value.url == url


def test_bad_hyperparameter_is_a_value_error_with_the_servers_message(url: str) -> None:
    # the constructor checks as torch does, before any call to the server
    with pytest.raises(ValueError, match=r"^Invalid learning rate: -1\.0$") as e:
        ac.Adam([torch.zeros(3)], lr=-1.0, server=url)
    assert not isinstance(e.value, ac.InvalidArgument)
    # what reaches the server is checked there too, and its message comes back
    opt = ac.Adam([torch.zeros(3)], server=url)
    try:
        with pytest.raises(ValueError, match=r"lr: expected a value >= 0, got -1\.0") as e:
            opt.transport.set_hyperparameters(opt.session_id, 0, {"lr": -1.0})
        assert isinstance(e.value, ac.InvalidArgument) and e.value.code == "invalid_argument"
    finally:
        opt.close()
    with pytest.raises(ValueError, match="unknown hyperparameter"):
        ac.RemoteOptimizer([torch.zeros(3)], "adam", server=url, momentum=0.9)
    with pytest.raises(ValueError, match="unknown algorithm 'sgd'"):
        ac.RemoteOptimizer([torch.zeros(3)], "sgd", server=url)


def test_bad_requests_map_to_exceptions(transport: Transport, sid: str) -> None:
    with pytest.raises(LookupError, match=f"'nope-{sid}'") as e:
        transport.describe(f"nope-{sid}")
    assert isinstance(e.value, KeyError) and isinstance(e.value, ac.NotFound)
    spec = SessionSpec(sid, "adam", (TensorSpec("w", (2,)),))
    transport.create_session(spec)
    try:
        with pytest.raises(ac.AlreadyExists):
            transport.create_session(spec)
        with pytest.raises(ValueError, match=r"tensor 'w': expected shape \[2\], got \[3\]"):
            transport.step(sid, [f32("w", np.zeros(3, np.float32))])
        with pytest.raises(ValueError, match="'v' is not in this session"):
            transport.step(sid, [f32("v", np.zeros(2, np.float32))])
        assert transport.describe(sid).step == 0
    finally:
        transport.delete_session(sid)


@pytest.fixture(scope="module")
def token_urls(live: Live) -> Iterator[dict[str, str]]:
    from adamserve.transports.grpc import build_grpc_server
    from adamserve.transports.http import HttpServerThread, create_app

    server, port = build_grpc_server(live.service, port=0, token="s3cret")
    http = HttpServerThread(create_app(live.service, token="s3cret"))
    http.start()
    yield {"grpc": f"grpc://127.0.0.1:{port}", "http": http.url}
    http.stop()
    server.stop(None)


@pytest.mark.parametrize("scheme", ["grpc", "http"])
def test_token(token_urls: dict[str, str], scheme: str) -> None:
    with pytest.raises(PermissionError, match="token"):
        connect(token_urls[scheme]).list_sessions()
    with pytest.raises(PermissionError):
        connect(token_urls[scheme], token="wrong").list_sessions()
    with ac.Adam([torch.zeros(2)], server=token_urls[scheme], token="s3cret") as opt:
        assert opt.describe().step == 0


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
    transport sends the same step over the stream."""
    import numpy as np

    import adamserve_client as ac

    big = np.zeros(2_000_000, dtype=np.float32)  # 8 MB of parameters: too large for one reply
    small = np.zeros(10, dtype=np.float32)
    ref_big, ref_small = big.copy(), small.copy()
    opt = ac.Adam([big, small], lr=0.1, server=live.urls["grpc"], session=sid)
    ref = ac.Adam([ref_big, ref_small], lr=0.1, server=live.urls["http"], session=sid + "-ref")
    g = np.ones(10, dtype=np.float32)
    for _ in range(3):
        opt.step([None, g])  # 40 bytes of gradient: tries StepUnary first
        ref.step([None, g])
    assert sid in opt.transport._stream_only  # type: ignore[attr-defined]
    np.testing.assert_array_equal(small, ref_small)
    np.testing.assert_array_equal(big, ref_big)
    assert live.service.describe(sid).step == 3
    opt.close()
    ref.close()


def test_steps_are_retried_only_when_they_never_reached_a_server() -> None:
    """An UNAVAILABLE in the middle of a step may follow an applied step: retrying it
    could apply it twice. Only a connection that was never made is retried."""
    import grpc

    from adamserve_client.transports.grpc import _never_sent, _unavailable

    class Err(grpc.RpcError):
        def __init__(self, code: grpc.StatusCode, details: str) -> None:
            self._code, self._details = code, details

        def code(self) -> grpc.StatusCode:
            return self._code

        def details(self) -> str:
            return self._details

    refused = Err(grpc.StatusCode.UNAVAILABLE, "failed to connect to all addresses; last "
                  "error: UNKNOWN: ipv4:127.0.0.1:1: Connection refused")
    midway = Err(grpc.StatusCode.UNAVAILABLE, "Socket closed")
    assert _never_sent(refused) and _unavailable(refused)
    assert not _never_sent(midway) and _unavailable(midway)
    assert not _never_sent(Err(grpc.StatusCode.INVALID_ARGUMENT, "failed to connect"))


def test_a_step_resent_by_its_sender_is_applied_once(transport: Transport, sid: str) -> None:
    """What makes resending a step whose answer was lost safe, on both transports."""
    from adamserve_client.transports.base import Sender

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
