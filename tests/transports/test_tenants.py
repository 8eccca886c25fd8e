"""Tenants and roles on every transport: one server, an auth file's keys, real clients.

Tenant ``a`` and tenant ``b`` each have a read-write key; ``a`` also a read-only one;
an admin key sees everyone. Every test talks to real gRPC, HTTP and Flight servers on
127.0.0.1 over one OptimizerService, as ``adamserve serve --auth-file`` runs them, and
checks the other tenant's session state (its fingerprint) did not change.
"""

from __future__ import annotations

import itertools
import logging
import secrets
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import httpx
import numpy as np
import pytest
from google.rpc import error_details_pb2, status_pb2

import adamserve_client as ac
from adamserve.app import Server, Settings
from adamserve.cli import main as cli_main
from adamserve.engine.kernels_cpu import CpuBackend
from adamserve.service import Access, OptimizerService
from adamserve.service.access import hash_key
from adamserve.sessions.checkpoints import CheckpointStore
from adamserve.sessions.store import Limits, SessionStore
from adamserve.transports.flight import FlightServerThread
from adamserve.transports.grpc import build_grpc_server
from adamserve.transports.http import HttpServerThread, create_app
from adamserve_client.transports.base import SessionSpec, TensorSpec, WireTensor
from adamserve_proto.v2 import optimizer_pb2 as pb
from adamserve_proto.v2 import optimizer_pb2_grpc as pb_grpc

WIRES = ("grpc", "http", "flight")
KEYS = {name: secrets.token_urlsafe(32) for name in
        ("a", "a_reader", "b", "admin", "slow", "narrow")}


def _auth() -> dict[str, Any]:
    return {
        "tenants": {"a": {"max_sessions": 50}, "b": {"max_state_bytes": 1 << 20},
                    "slow": {"requests_per_second": 2}, "narrow": {"max_streams": 2}},
        "keys": [
            {"name": "alice", "tenant": "a", "role": "read-write", "sha256": hash_key(KEYS["a"])},
            {"name": "auditor", "tenant": "a", "role": "read-only",
             "sha256": hash_key(KEYS["a_reader"])},
            {"name": "bob", "tenant": "b", "role": "read-write", "sha256": hash_key(KEYS["b"])},
            {"name": "ops", "role": "admin", "sha256": hash_key(KEYS["admin"])},
            {"name": "sam", "tenant": "slow", "role": "read-write",
             "sha256": hash_key(KEYS["slow"])},
            {"name": "nia", "tenant": "narrow", "role": "read-write",
             "sha256": hash_key(KEYS["narrow"])},
        ],
    }


@dataclass
class Live:
    urls: dict[str, str]
    service: OptimizerService
    access: Access


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Live]:
    data_dir = tmp_path_factory.mktemp("tenants")
    access = Access.from_mapping(_auth())
    store = SessionStore(CpuBackend(), CheckpointStore(data_dir), Limits(max_state_bytes=1 << 28),
                         access.tenant_limits())
    service = OptimizerService(store)
    service.start()
    grpc_server, port = build_grpc_server(service, access=access)
    http = HttpServerThread(create_app(service, access=access))
    http.start()
    flight = FlightServerThread(service, access=access)
    flight.start()
    yield Live({"grpc": f"grpc://127.0.0.1:{port}", "http": http.url, "flight": flight.url},
               service, access)
    flight.stop()
    http.stop()
    grpc_server.stop(None)


_ids = itertools.count()


def _sid() -> str:
    return f"t{next(_ids)}"


def _client(live: Live, wire: str, who: str) -> Any:
    return ac.connect(live.urls[wire], token=KEYS[who], retries=1)


def _spec(sid: str) -> SessionSpec:
    return SessionSpec(sid, "adamw", (TensorSpec("w", (4,)),), groups=({"lr": 0.1},))


def _grad() -> list[WireTensor]:
    return [WireTensor("w", (4,), "FP32", np.ones(4, np.float32).tobytes())]


def _fingerprint(live: Live, qualified: str) -> str:
    return str(live.service.store.get(qualified).fingerprint())


@pytest.mark.parametrize("wire", WIRES)
def test_another_tenants_session_is_exactly_a_missing_one(live: Live, wire: str) -> None:
    sid = _sid()
    a, b = _client(live, wire, "a"), _client(live, wire, "b")
    a.create_session(_spec(sid))
    a.step(sid, _grad())
    before = _fingerprint(live, f"a~{sid}")
    with pytest.raises(ac.NotFound) as missing:
        b.describe("no-such-session")
    attacks = [lambda: b.describe(sid), lambda: b.step(sid, _grad()),
               lambda: b.set_hyperparameters(sid, 0, {"lr": 1000.0}),
               lambda: b.export_state(sid), lambda: b.pull(sid), lambda: b.delete_session(sid),
               lambda: b.checkpoint(sid), lambda: b.list_checkpoints(sid),
               lambda: b.restore_checkpoint(sid, 1)]
    for attack in attacks:
        with pytest.raises(ac.NotFound) as refused:
            attack()
        # the same reason and message shape as for an id nobody has
        assert refused.value.reason == missing.value.reason == "SESSION_NOT_FOUND"
        assert str(refused.value).replace(sid, "X") == str(missing.value).replace(
            "no-such-session", "X")
    assert sid not in [s.session_id for s in b.list_sessions()]
    assert sid in [s.session_id for s in a.list_sessions()]
    # b has its own namespace: the same id is free for it, and the two never meet
    b.create_session(_spec(sid))
    assert b.describe(sid).tenant == "b" and a.describe(sid).tenant == "a"
    b.step(sid, _grad())
    b.delete_session(sid)
    assert _fingerprint(live, f"a~{sid}") == before
    assert a.describe(sid).step == 1
    a.close()
    b.close()


@pytest.mark.parametrize("wire", WIRES)
def test_a_tenant_may_name_its_own_session_qualified(live: Live, wire: str) -> None:
    """``a~x`` from tenant a's key is its session x (as listings of an admin show it);
    from tenant b's it is refused as an id b cannot hold, whether or not a~x exists."""
    sid = _sid()
    a, b = _client(live, wire, "a"), _client(live, wire, "b")
    a.create_session(_spec(sid))
    assert a.step(f"a~{sid}", _grad()).step == 1
    assert a.describe(f"a~{sid}").step == 1
    for name in (f"a~{sid}", "a~no-such-session"):
        with pytest.raises(ac.InvalidArgument, match="session id"):
            b.describe(name)
    a.close()
    b.close()


@pytest.mark.parametrize("wire", WIRES)
def test_a_read_only_key_reads_and_changes_nothing(live: Live, wire: str) -> None:
    sid = _sid()
    a, reader = _client(live, wire, "a"), _client(live, wire, "a_reader")
    a.create_session(_spec(sid))
    before = _fingerprint(live, f"a~{sid}")
    assert reader.describe(sid).step == 0
    assert [t.name for t in reader.pull(sid)] == ["w"]
    assert sid in [s.session_id for s in reader.list_sessions()]
    for change in (lambda: reader.step(sid, _grad()), lambda: reader.delete_session(sid),
                   lambda: reader.set_hyperparameters(sid, 0, {"lr": 1.0}),
                   lambda: reader.create_session(_spec(_sid()))):
        with pytest.raises(ac.PermissionDenied) as denied:
            change()
        assert denied.value.reason == "PERMISSION_DENIED" and "read-only" in str(denied.value)
    assert _fingerprint(live, f"a~{sid}") == before
    a.close()
    reader.close()


@pytest.mark.parametrize("wire", WIRES)
def test_an_admin_sees_every_tenant_and_names_theirs_qualified(live: Live, wire: str) -> None:
    sid = _sid()
    a, admin = _client(live, wire, "a"), _client(live, wire, "admin")
    a.create_session(_spec(sid))
    listed = {(s.tenant, s.session_id) for s in admin.list_sessions()}
    assert ("a", sid) in listed
    info = admin.describe(f"a~{sid}")
    assert (info.tenant, info.session_id, info.step) == ("a", sid, 0)
    admin.step(f"a~{sid}", _grad())
    assert a.describe(sid).step == 1
    with pytest.raises(ac.NotFound):  # an admin's bare id is its own tenant's
        admin.describe(sid)
    # for a tenant the qualified form is no id at all ('~' is not in the alphabet),
    # whether or not the session exists
    with pytest.raises(ac.InvalidArgument, match="session id"):
        _client(live, wire, "b").describe(f"a~{sid}")
    with pytest.raises(ac.InvalidArgument, match="session id"):
        _client(live, wire, "b").describe("a~no-such-session")
    a.close()
    admin.close()


@pytest.mark.parametrize("wire", WIRES)
def test_a_wrong_key_is_refused_before_anything(live: Live, wire: str) -> None:
    c = ac.connect(live.urls[wire], token="not-a-key", retries=1)
    with pytest.raises(ac.Unauthenticated) as refused:
        c.list_sessions()
    assert refused.value.reason == "UNAUTHENTICATED"
    c.close()


def test_tenant_quotas_sessions_and_state_bytes(live: Live) -> None:
    b = _client(live, "grpc", "b")
    big = SessionSpec(_sid(), "adam", (TensorSpec("w", (1 << 17,)),))  # 2 MiB of state
    with pytest.raises(ac.ResourceExhausted) as over:
        b.create_session(big)
    assert over.value.reason == "QUOTA_EXCEEDED" and "tenant 'b'" in str(over.value)
    # a's quota is its own: b's cap does not touch it
    a = _client(live, "grpc", "a")
    a.create_session(big)
    a.delete_session(big.session_id)
    b.close()
    a.close()


def test_session_count_quota(tmp_path: Path) -> None:
    access = Access.from_mapping({"tenants": {"a": {"max_sessions": 2}}, "keys": [
        {"name": "alice", "tenant": "a", "role": "read-write", "sha256": hash_key(KEYS["a"])}]})
    store = SessionStore(CpuBackend(), None, Limits(), access.tenant_limits())
    service = OptimizerService(store)
    service.start()
    server, port = build_grpc_server(service, access=access)
    try:
        a = ac.connect(f"grpc://127.0.0.1:{port}", token=KEYS["a"], retries=1)
        a.create_session(_spec("one"))
        a.create_session(_spec("two"))
        with pytest.raises(ac.ResourceExhausted, match="2 sessions"):
            a.create_session(_spec("three"))
        a.delete_session("one")
        a.create_session(_spec("three"))
        a.close()
    finally:
        server.stop(None)


def _status_details(exc: grpc.RpcError) -> status_pb2.Status:
    for key, value in exc.trailing_metadata() or ():  # type: ignore[attr-defined]
        if key == "grpc-status-details-bin":
            return status_pb2.Status.FromString(value)
    raise AssertionError("no status details")


def test_rate_quota_answers_with_a_retry_hint(live: Live) -> None:
    """2 requests per second: the third at once is refused, with when to retry."""
    # gRPC: RESOURCE_EXHAUSTED, ErrorInfo RATE_LIMITED and a google.rpc.RetryInfo
    channel = grpc.insecure_channel(live.urls["grpc"].removeprefix("grpc://"))
    stub = pb_grpc.OptimizerServiceStub(channel)
    md = (("authorization", f"Bearer {KEYS['slow']}"),)
    time.sleep(1.1)  # a full bucket
    codes = []
    for _ in range(3):
        try:
            stub.ListSessions(pb.ListSessionsRequest(), metadata=md)
            codes.append("OK")
        except grpc.RpcError as exc:
            codes.append(exc.code().name)
            details = _status_details(exc)
    assert codes == ["OK", "OK", "RESOURCE_EXHAUSTED"]
    kinds = {d.type_url.rsplit("/", 1)[1]: d for d in details.details}
    info = error_details_pb2.ErrorInfo()
    kinds["google.rpc.ErrorInfo"].Unpack(info)
    retry = error_details_pb2.RetryInfo()
    kinds["google.rpc.RetryInfo"].Unpack(retry)
    assert info.reason == "RATE_LIMITED"
    assert 0 < retry.retry_delay.ToTimedelta().total_seconds() <= 0.5
    channel.close()
    # HTTP: 429 with Retry-After
    time.sleep(1.1)
    headers = {"authorization": f"Bearer {KEYS['slow']}"}
    answers = [httpx.get(live.urls["http"] + "/v2/sessions", headers=headers) for _ in range(3)]
    assert [r.status_code for r in answers] == [200, 200, 429]
    assert answers[2].headers["retry-after"] == "1"
    assert answers[2].json()["reason"] == "RATE_LIMITED"
    # Flight and the Python client: ResourceExhausted with the same reason
    time.sleep(1.1)
    c = _client(live, "flight", "slow")
    c.list_sessions()
    c.list_sessions()
    with pytest.raises(ac.ResourceExhausted) as limited:
        c.list_sessions()
    assert limited.value.reason == "RATE_LIMITED"
    assert limited.value.retry_after is not None and 0 < limited.value.retry_after <= 0.5
    c.close()
    time.sleep(1.1)
    for wire in ("grpc", "http"):  # the client reads the hint on every wire
        c = _client(live, wire, "slow")
        c.list_sessions()
        c.list_sessions()
        with pytest.raises(ac.ResourceExhausted) as limited:
            c.list_sessions()
        assert limited.value.retry_after is not None and limited.value.retry_after > 0
        c.close()
        time.sleep(1.1)


@pytest.mark.parametrize("wire", WIRES)
def test_calls_in_flight_are_capped_per_tenant(live: Live, wire: str) -> None:
    """Tenant ``narrow`` may hold 2 calls at once: two pulls waiting for a step hold
    them; a third call is refused (TOO_MANY_STREAMS), another tenant's is not."""
    sid = _sid()
    owner = _client(live, wire, "narrow")
    owner.create_session(_spec(sid))
    waiting = [threading.Thread(target=_pull_until, args=(live, wire, sid, 2.0))
               for _ in range(2)]
    for t in waiting:
        t.start()
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and not _both_waiting(live):
        time.sleep(0.02)
    assert _both_waiting(live)
    with pytest.raises(ac.ResourceExhausted) as refused:
        owner.describe(sid)
    assert refused.value.reason == "TOO_MANY_STREAMS"
    other = _client(live, wire, "a")
    t0 = time.perf_counter()
    other.list_sessions()
    assert time.perf_counter() - t0 < 0.5
    for t in waiting:
        t.join(10)
    owner.describe(sid)  # the slots are free again
    owner.delete_session(sid)
    owner.close()
    other.close()


def _both_waiting(live: Live) -> bool:
    return live.access.in_flight(live.access.authenticate(f"Bearer {KEYS['narrow']}")) >= 2


def _pull_until(live: Live, wire: str, sid: str, timeout: float) -> None:
    c = _client(live, wire, "narrow")
    with pytest.raises(ac.DeadlineExceeded):
        c.pull(sid, min_step=1, wait=timeout)
    c.close()


def test_audit_lines_name_the_tenant_key_action_and_outcome(
        live: Live, caplog: pytest.LogCaptureFixture) -> None:
    sid = _sid()
    a, reader = _client(live, "http", "a"), _client(live, "http", "a_reader")
    with caplog.at_level(logging.INFO, logger="adamserve.audit"):
        a.create_session(_spec(sid))
        a.checkpoint(sid)
        a.import_state(sid, a.export_state(sid))
        a.restore_checkpoint(sid, 0)
        with pytest.raises(ac.PermissionDenied):
            reader.delete_session(sid)
        a.delete_session(sid)
        with pytest.raises(ac.NotFound):
            a.delete_session(sid)
    lines = [r.getMessage() for r in caplog.records if r.name == "adamserve.audit"]
    expected = [f"tenant=a key=alice action=CreateSession session={sid} outcome=ok",
                f"tenant=a key=alice action=Checkpoint session={sid} outcome=ok",
                f"tenant=a key=alice action=ImportState session={sid} outcome=ok",
                f"tenant=a key=alice action=RestoreCheckpoint session={sid} outcome=ok",
                f"tenant=a key=auditor action=DeleteSession session={sid} outcome=denied: "
                "read-only role",
                f"tenant=a key=alice action=DeleteSession session={sid} outcome=ok",
                f"tenant=a key=alice action=DeleteSession session={sid} outcome=refused: "
                "SESSION_NOT_FOUND"]
    assert lines == expected
    assert all(KEYS["a"] not in m and KEYS["a_reader"] not in m for m in lines)
    a.close()
    reader.close()


def test_sessions_keep_their_tenant_across_a_restart(tmp_path: Path) -> None:
    auth = tmp_path / "auth.toml"
    auth.write_text(
        f'[[keys]]\nname = "alice"\ntenant = "a"\nrole = "read-write"\nsha256 = '
        f'"{hash_key(KEYS["a"])}"\n[[keys]]\nname = "bob"\ntenant = "b"\nrole = "read-write"\n'
        f'sha256 = "{hash_key(KEYS["b"])}"\n')
    settings = Settings(grpc_port=0, http_port=0, flight_port=0, data_dir=tmp_path / "data",
                        auth_file=auth)
    for round_ in range(2):
        server = Server(settings)
        server.start()
        try:
            a = ac.connect(f"grpc://127.0.0.1:{server.grpc_port}", token=KEYS["a"], retries=1)
            b = ac.connect(f"grpc://127.0.0.1:{server.grpc_port}", token=KEYS["b"], retries=1)
            if round_ == 0:
                a.create_session(_spec("run"))
                a.step("run", _grad())
                b.create_session(_spec("run"))
            else:  # restored from the checkpoints written on stop, each in its tenant
                assert a.describe("run").step == 1 and a.describe("run").tenant == "a"
                assert b.describe("run").step == 0 and b.describe("run").tenant == "b"
                assert [s.session_id for s in a.list_sessions()] == ["run"]
            a.close()
            b.close()
        finally:
            server.stop()
    # the checkpoint directories carry the tenant in their name
    assert {p.name for p in (tmp_path / "data" / "sessions").iterdir()} >= {"a~run", "b~run"}


@pytest.mark.parametrize(("text", "message"), [
    ("[[keys]]\nname='x'\nrole='admin'\nsha256='abc'\n", "64 lowercase hex"),
    ("[[keys]]\nname='x'\nrole='owner'\nsha256='" + "0" * 64 + "'\n", "role = 'owner'"),
    ("[[keys]]\nname='x'\ntenant='A B'\nrole='admin'\nsha256='" + "0" * 64 + "'\n",
     "tenant 'A B'"),
    ("[tenants.a]\nmax_sessions = -1\n[[keys]]\nname='x'\nrole='admin'\nsha256='" + "0" * 64
     + "'\n", "max_sessions = -1"),
    ("[tenants.a]\nmax_memory = 1\n", "unknown quota 'max_memory'"),
    ("keys = 3\n", "array of tables"),
    ("", "no [[keys]]"),
    ("[[keys]\n", "not valid TOML"),
])
def test_a_bad_auth_file_stops_the_server_with_one_line(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], text: str, message: str) -> None:
    auth = tmp_path / "auth.toml"
    auth.write_text(text)
    code = cli_main(["serve", "--auth-file", str(auth), "--grpc-port", "0", "--http-port", "0",
                     "--flight-port", "0", "--data-dir", "none"])
    err = capsys.readouterr().err.strip()
    assert code == 1 and len(err.splitlines()) == 1 and message in err, err


def test_a_token_on_the_command_line_is_refused(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        cli_main(["serve", "--token", "s3cret"])
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert "ADAMSERVE_TOKEN" in err and "s3cret" not in err


def test_keys_new_prints_a_key_whose_hash_the_server_accepts(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli_main(["keys", "new", "--tenant", "team-a", "--role", "read-write",
                     "--name", "alice"]) == 0
    out = capsys.readouterr().out
    key = out.splitlines()[0].rsplit(" ", 1)[1]
    entry = "\n".join(out.splitlines()[1:])
    auth = tmp_path / "auth.toml"
    auth.write_text(entry + "\n")
    access = Access.from_file(auth)
    caller = access.authenticate(f"Bearer {key}")
    assert caller is not None and (caller.tenant, caller.role.value, caller.name) == (
        "team-a", "read-write", "alice")
    assert key not in auth.read_text()


def test_shared_memory_regions_belong_to_their_tenant(tmp_path: Path, shm: Any) -> None:
    access = Access.from_mapping(_auth())
    store = SessionStore(CpuBackend(), None, Limits())
    service = OptimizerService(store, allow_shared_memory=True)
    service.start()
    http = HttpServerThread(create_app(service, access=access))
    http.start()
    try:
        key = shm(4096).key
        a, b = (ac.connect(http.url, token=KEYS[w], retries=1) for w in ("a", "b"))
        a.register_shared_memory("grads", key, 4096)
        assert [r.name for r in a.list_shared_memory()] == ["grads"]
        assert b.list_shared_memory() == []
        with pytest.raises(ac.NotFound):
            b.unregister_shared_memory("grads")
        with pytest.raises(ac.NotFound):  # another tenant's object: as if absent
            b.register_shared_memory("mine", key, 4096)
        assert [r.name for r in a.list_shared_memory()] == ["grads"]
        a.unregister_shared_memory("grads")
        a.close()
        b.close()
    finally:
        http.stop()


def test_a_client_certificate_names_its_tenant_over_grpc(tmp_path: Path) -> None:
    """Mutual TLS with ``[[certificates]]``: the verified certificate's common name is
    the caller (no key needed); an unlisted common name is refused; keys still work."""
    import trustme

    from adamserve.transports.tls import load as load_tls

    ca = trustme.CA()
    ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    files = {}
    for name, leaf in (("server", ca.issue_cert("127.0.0.1", "localhost")),
                       ("trainer", ca.issue_cert("trainer.clients", common_name="trainer-a")),
                       ("nobody", ca.issue_cert("nobody.clients", common_name="nobody"))):
        crt, key = tmp_path / f"{name}.pem", tmp_path / f"{name}.key"
        crt.write_bytes(b"".join(b.bytes() for b in leaf.cert_chain_pems))
        leaf.private_key_pem.write_to_path(str(key))
        files[name] = (crt, key)
    access = Access.from_mapping({
        "keys": [{"name": "bob", "tenant": "b", "role": "read-write",
                  "sha256": hash_key(KEYS["b"])}],
        "certificates": [{"common_name": "trainer-a", "tenant": "a", "role": "read-write"}]})
    service = OptimizerService(SessionStore(CpuBackend(), None, Limits()))
    service.start()
    tls = load_tls(*files["server"], tmp_path / "ca.pem")
    server, port = build_grpc_server(service, tls=tls, access=access)
    url = f"grpcs://127.0.0.1:{port}"
    try:
        trainer = ac.connect(url, tls_ca=str(tmp_path / "ca.pem"),
                             tls_cert=str(files["trainer"][0]),
                             tls_key=str(files["trainer"][1]), retries=1)
        trainer.create_session(_spec("run"))
        assert trainer.describe("run").tenant == "a"
        nobody = ac.connect(url, tls_ca=str(tmp_path / "ca.pem"), tls_cert=str(files["nobody"][0]),
                            tls_key=str(files["nobody"][1]), retries=1)
        with pytest.raises(ac.Unauthenticated):
            nobody.list_sessions()
        # a key over the same mutual-TLS connection names its own tenant
        bob = ac.connect(url, token=KEYS["b"], tls_ca=str(tmp_path / "ca.pem"),
                         tls_cert=str(files["nobody"][0]), tls_key=str(files["nobody"][1]),
                         retries=1)
        with pytest.raises(ac.NotFound):
            bob.describe("run")
        assert [s.tenant for s in bob.list_sessions()] == []
        for c in (trainer, nobody, bob):
            c.close()
    finally:
        server.stop(None)


@pytest.mark.parametrize("wire", ("grpc", "http"))
def test_a_tenants_checkpoint_names_its_session_as_the_tenant_does(live: Live, wire: str) -> None:
    sid = _sid()
    a = _client(live, wire, "a")
    a.create_session(_spec(sid))
    info = a.checkpoint(sid)
    assert info.session_id == sid and not Path(info.path).is_absolute()
    a.delete_session(sid)
    a.close()


@pytest.mark.parametrize("wire", WIRES)
def test_a_default_tenant_key_cannot_reach_a_tenant_by_its_qualified_id(
        tmp_path: Path, wire: str) -> None:
    """A non-admin key of the default tenant ("") naming ``a~x`` must not reach tenant
    a's session ``x``: a bare id never holds the separator."""
    access = Access.from_mapping({"keys": [
        {"name": "alice", "tenant": "a", "role": "read-write", "sha256": hash_key(KEYS["a"])},
        {"name": "dee", "role": "read-write", "sha256": hash_key(KEYS["b"])}]})
    service = OptimizerService(SessionStore(CpuBackend(), None, Limits()))
    service.start()
    grpc_server, port = build_grpc_server(service, access=access)
    http = HttpServerThread(create_app(service, access=access))
    http.start()
    flight = FlightServerThread(service, access=access)
    flight.start()
    urls = {"grpc": f"grpc://127.0.0.1:{port}", "http": http.url, "flight": flight.url}
    try:
        a = ac.connect(urls[wire], token=KEYS["a"], retries=1)
        dee = ac.connect(urls[wire], token=KEYS["b"], retries=1)
        a.create_session(_spec("x"))
        before = str(service.store.get("a~x").fingerprint())
        for attack in (lambda: dee.describe("a~x"), lambda: dee.step("a~x", _grad()),
                       lambda: dee.delete_session("a~x"),
                       lambda: dee.create_session(_spec("a~planted"))):
            with pytest.raises(ac.InvalidArgument, match="session id"):
                attack()
        assert [s.session_id for s in a.list_sessions()] == ["x"]
        assert str(service.store.get("a~x").fingerprint()) == before
        a.close()
        dee.close()
    finally:
        flight.stop()
        http.stop()
        grpc_server.stop(None)


def test_an_admins_pages_hold_every_tenants_sessions_of_one_name(live: Live) -> None:
    sid = _sid()
    a, b, admin = (_client(live, "grpc", w) for w in ("a", "b", "admin"))
    a.create_session(_spec(sid))
    b.create_session(_spec(sid))
    channel = grpc.insecure_channel(live.urls["grpc"].removeprefix("grpc://"))
    stub = pb_grpc.OptimizerServiceStub(channel)
    md = (("authorization", f"Bearer {KEYS['admin']}"),)
    seen, token = [], ""
    while True:
        page = stub.ListSessions(pb.ListSessionsRequest(page_size=1, page_token=token),
                                 metadata=md)
        seen += [(s.tenant, s.session_id) for s in page.sessions]
        token = page.next_page_token
        if not token:
            break
    assert ("a", sid) in seen and ("b", sid) in seen and len(seen) == len(set(seen))
    assert len(seen) == len(admin.list_sessions())
    channel.close()
    for c in (a, b, admin):
        c.close()


def test_metrics_need_an_admin_key(live: Live) -> None:
    url = live.urls["http"] + "/metrics"
    assert httpx.get(url, headers={"authorization": f"Bearer {KEYS['a']}"}).status_code == 403
    r = httpx.get(url, headers={"authorization": f"Bearer {KEYS['admin']}"})
    assert r.status_code == 200 and "adamserve_sessions" in r.text
