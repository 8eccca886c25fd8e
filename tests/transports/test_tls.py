"""TLS and mutual TLS on every port, over real servers on 127.0.0.1.

The test makes its own CA and certificates (trustme): a server certificate for
127.0.0.1, a client certificate from the same CA (common name ``tenant-a``) and one
from another CA. One server is ``adamserve serve``'s own (:class:`adamserve.app.Server`
with ``--tls-cert`` / ``--tls-key``), one is built from the transports' pieces with a
client CA (mutual TLS). Sessions step over ``grpcs://``, ``https://`` and
``flight+tls://``; clients without the right certificate, or without TLS, are refused
with a clear error; bad files fail at once, naming the file.
"""

from __future__ import annotations

import re
import socket
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pydantic
import pytest
import torch
import trustme

import adamserve_client as ac
from adamserve.app import Server, Settings
from adamserve.cli import load_settings
from adamserve.engine.kernels_cpu import CpuBackend
from adamserve.service import OptimizerService
from adamserve.sessions.store import Limits, SessionStore
from adamserve.transports import tls
from adamserve.transports.flight import FlightServerThread
from adamserve.transports.grpc import build_grpc_server
from adamserve.transports.http import HttpServerThread, create_app
from adamserve_client import errors
from adamserve_client.transports import connect

SCHEMES = ("grpcs", "https", "flight+tls")
PLAIN = {"grpcs": "grpc", "https": "http", "flight+tls": "flight"}


@dataclass(frozen=True)
class Pki:
    ca: Path  # the CA of the server's and the good client's certificates
    server_cert: Path
    server_key: Path
    client_cert: Path  # common name tenant-a, signed by ``ca``
    client_key: Path
    other_cert: Path  # signed by another CA
    other_key: Path
    other_ca: Path


def _write(cert: trustme.LeafCert, directory: Path, name: str) -> tuple[Path, Path]:
    crt, key = directory / f"{name}.crt", directory / f"{name}.key"
    crt.write_bytes(b"".join(blob.bytes() for blob in cert.cert_chain_pems))
    cert.private_key_pem.write_to_path(str(key))
    return crt, key


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    d = tmp_path_factory.mktemp("pki")
    ca, other = trustme.CA(), trustme.CA()
    ca.cert_pem.write_to_path(str(d / "ca.pem"))
    other.cert_pem.write_to_path(str(d / "other-ca.pem"))
    server = _write(ca.issue_cert("127.0.0.1", "localhost"), d, "server")
    client = _write(ca.issue_cert("tenant-a.clients", common_name="tenant-a"), d, "client")
    stranger = _write(other.issue_cert("tenant-a.clients", common_name="tenant-a"), d, "other")
    return Pki(d / "ca.pem", *server, *client, *stranger, d / "other-ca.pem")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def tls_urls(pki: Pki) -> Iterator[dict[str, str]]:
    """`adamserve serve --tls-cert --tls-key` on free ports (Flight's 0 means off): TLS,
    no client certificates."""
    server = Server(load_settings([
        "serve", "--grpc-port", "0", "--http-port", "0", "--flight-port", str(_free_port()),
        "--data-dir", "none", "--max-state-bytes", str(1 << 28),
        "--tls-cert", str(pki.server_cert), "--tls-key", str(pki.server_key)]))
    server.start()
    assert server.flight is not None
    yield {"grpcs": f"grpcs://127.0.0.1:{server.grpc_port}", "https": server.http.url,
           "flight+tls": server.flight.url}
    server.stop()


@pytest.fixture(scope="module")
def mtls_urls(pki: Pki) -> Iterator[dict[str, str]]:
    """The three transports over one service, with a client CA: mutual TLS."""
    files = tls.load(pki.server_cert, pki.server_key, pki.ca)
    service = OptimizerService(SessionStore(CpuBackend(), None, Limits(1 << 28)))
    service.start()
    grpc_server, port = build_grpc_server(service, port=0, tls=files)
    http = HttpServerThread(create_app(service), tls=files)
    http.start()
    flight = FlightServerThread(service, tls=files)
    flight.start()
    yield {"grpcs": f"grpcs://127.0.0.1:{port}", "https": http.url, "flight+tls": flight.url}
    flight.stop()
    http.stop()
    grpc_server.stop(None)


@pytest.fixture
def no_tls_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    for name in ("ADAMSERVE_TLS_CA", "ADAMSERVE_TLS_CERT", "ADAMSERVE_TLS_KEY"):
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def _steps_like_torch(server: Any) -> None:
    """Three Adam steps on the server equal torch.optim.Adam's."""
    rng = np.random.default_rng(0)
    params = [rng.standard_normal(shape).astype(np.float32) for shape in ((3, 4), (5,))]
    refs = [torch.tensor(p.copy(), requires_grad=True) for p in params]
    opt = ac.Adam(params, lr=1e-2, server=server)
    torch_opt = torch.optim.Adam(refs, lr=1e-2)
    try:
        for _ in range(3):
            grads = [rng.standard_normal(p.shape).astype(np.float32) for p in params]
            opt.step(grads)
            for ref, g in zip(refs, grads, strict=True):
                ref.grad = torch.tensor(g)
            torch_opt.step()
        for p, ref in zip(params, refs, strict=True):
            np.testing.assert_allclose(p, ref.detach().numpy(), rtol=0, atol=1e-6)
        assert opt.describe().step == 3
    finally:
        opt.close(delete=True)


# -- sessions over TLS ----------------------------------------------------------------


@pytest.mark.parametrize("scheme", SCHEMES)
def test_a_session_steps_over_tls(tls_urls: dict[str, str], pki: Pki, scheme: str,
                                  no_tls_env: pytest.MonkeyPatch) -> None:
    url = tls_urls[scheme]
    # an explicit CA
    with connect(url, timeout=10, tls_ca=pki.ca) as client:
        _steps_like_torch(client)
    # the environment's CA, as a training script would have it: server= unchanged
    no_tls_env.setenv("ADAMSERVE_TLS_CA", str(pki.ca))
    _steps_like_torch(url)


def test_the_server_prints_tls_schemes(tls_urls: dict[str, str]) -> None:
    assert [u.partition("://")[0] for u in tls_urls.values()] == list(SCHEMES)


def test_a_sharded_session_over_tls_urls(tls_urls: dict[str, str], mtls_urls: dict[str, str],
                                         pki: Pki, no_tls_env: pytest.MonkeyPatch) -> None:
    """A list of URLs: the environment's options apply to each shard (the TLS-only server
    ignores the client certificate the mutual-TLS one needs)."""
    no_tls_env.setenv("ADAMSERVE_TLS_CA", str(pki.ca))
    no_tls_env.setenv("ADAMSERVE_TLS_CERT", str(pki.client_cert))
    no_tls_env.setenv("ADAMSERVE_TLS_KEY", str(pki.client_key))
    _steps_like_torch([tls_urls["grpcs"], mtls_urls["flight+tls"]])


# -- mutual TLS -------------------------------------------------------------------------


@pytest.mark.parametrize("scheme", SCHEMES)
def test_mutual_tls_wants_a_certificate_from_its_ca(mtls_urls: dict[str, str], pki: Pki,
                                                   scheme: str,
                                                   no_tls_env: pytest.MonkeyPatch) -> None:
    url = mtls_urls[scheme]
    with connect(url, timeout=10, tls_ca=pki.ca, tls_cert=pki.client_cert,
                 tls_key=pki.client_key) as client:
        _steps_like_torch(client)
    for cert, key in ((None, None), (pki.other_cert, pki.other_key)):
        with connect(url, timeout=10, tls_ca=pki.ca, tls_cert=cert, tls_key=key,
                     retries=1) as client, \
                pytest.raises(errors.Unavailable, match="closed the TLS connection: it may "
                                                        "want a client certificate"):
            client.list_sessions()


def _echo_common_name(files: tls.TlsFiles) -> tuple[grpc.Server, int]:
    """A gRPC server whose one method answers ``peer_common_name`` of its caller."""
    def name(request: bytes, context: grpc.ServicerContext) -> bytes:
        return (tls.peer_common_name(context) or "<none>").encode()

    server = grpc.server(ThreadPoolExecutor(2))
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(
        "t.Echo", {"Name": grpc.unary_unary_rpc_method_handler(name)}),))
    port = server.add_secure_port("127.0.0.1:0", tls.grpc_credentials(files))
    server.start()
    return server, port


@pytest.mark.parametrize("mutual", [True, False])
def test_peer_common_name_is_the_verified_client_certificates(pki: Pki, mutual: bool) -> None:
    files = tls.load(pki.server_cert, pki.server_key, pki.ca if mutual else None)
    server, port = _echo_common_name(files)
    try:
        credentials = grpc.ssl_channel_credentials(
            pki.ca.read_bytes(), pki.client_key.read_bytes(), pki.client_cert.read_bytes())
        with grpc.secure_channel(f"127.0.0.1:{port}", credentials) as channel:
            answer = channel.unary_unary("/t.Echo/Name")(b"", timeout=10)
        # without a client CA the server asks for no certificate: nobody is named
        assert answer == (b"tenant-a" if mutual else b"<none>")
    finally:
        server.stop(None)


# -- refused: no TLS, an untrusted certificate -------------------------------------------


@pytest.mark.parametrize("scheme", SCHEMES)
def test_a_plain_client_to_a_tls_port_fails_clearly(tls_urls: dict[str, str], scheme: str,
                                                    no_tls_env: pytest.MonkeyPatch) -> None:
    url = tls_urls[scheme].replace(f"{scheme}://", f"{PLAIN[scheme]}://")
    with connect(url, timeout=10, retries=1) as client, \
            pytest.raises(errors.Unavailable,
                          match=re.escape(f"if the server speaks TLS, use {scheme}://")):
        client.list_sessions()


@pytest.mark.parametrize("scheme", SCHEMES)
def test_an_untrusted_server_certificate_is_refused(tls_urls: dict[str, str], pki: Pki,
                                                   scheme: str,
                                                   no_tls_env: pytest.MonkeyPatch) -> None:
    """The default trust store (no tls_ca) and another CA both refuse the test CA's
    certificate, naming the fix."""
    for ca in (None, pki.other_ca):
        with connect(tls_urls[scheme], timeout=10, retries=1, tls_ca=ca) as client, \
                pytest.raises(errors.Unavailable, match="not signed by a CA this client "
                                                        "trusts: pass tls_ca="):
            client.list_sessions()


@pytest.mark.parametrize("scheme", SCHEMES)
def test_a_tls_client_to_a_plain_port_fails_clearly(scheme: str, pki: Pki,
                                                    no_tls_env: pytest.MonkeyPatch) -> None:
    service = OptimizerService(SessionStore(CpuBackend(), None, Limits(1 << 20)))
    service.start()
    grpc_server, port = build_grpc_server(service, port=0)
    http = HttpServerThread(create_app(service))
    http.start()
    flight = FlightServerThread(service)
    flight.start()
    plain = {"grpcs": f"grpc://127.0.0.1:{port}", "https": http.url, "flight+tls": flight.url}
    try:
        url = plain[scheme].replace(f"{PLAIN[scheme]}://", f"{scheme}://")
        with connect(url, timeout=10, retries=1, tls_ca=pki.ca) as client, \
                pytest.raises(errors.Unavailable, match="does not speak TLS on this port: try "
                                                        f"{PLAIN[scheme]}://"):
            client.list_sessions()
    finally:
        flight.stop()
        http.stop()
        grpc_server.stop(None)


# -- the client's options ----------------------------------------------------------------


def test_client_tls_files_fail_at_once_naming_the_file(pki: Pki, tmp_path: Path,
                                                       no_tls_env: pytest.MonkeyPatch) -> None:
    junk = tmp_path / "junk.pem"
    junk.write_text("not a certificate")
    url = "grpcs://127.0.0.1:1"  # nothing listens: the files fail before any connection
    cases: list[tuple[dict[str, Any], str]] = [
        ({"tls_ca": tmp_path / "missing.pem"}, "tls_ca .*missing.pem: cannot read it"),
        ({"tls_ca": junk}, "tls_ca .*junk.pem: not PEM"),
        ({"tls_cert": pki.client_cert}, "needs both tls_cert and tls_key"),
        ({"tls_cert": pki.client_cert, "tls_key": pki.other_key},
         "tls_key .*other.key: does not match the certificate in tls_cert .*client.crt"),
        ({"tls_cert": junk, "tls_key": pki.client_key}, "tls_cert .*junk.pem: not PEM"),
        ({"tls_cert": pki.client_cert, "tls_key": pki.ca}, "tls_key .*ca.pem: not PEM"),
    ]
    for scheme in ("grpcs", "https", "flight+tls"):
        for options, message in cases:
            with pytest.raises(ValueError, match=message):
                connect(url.replace("grpcs", scheme), **options)
    # from the environment: the variable is named
    no_tls_env.setenv("ADAMSERVE_TLS_CA", str(junk))
    with pytest.raises(ValueError, match=r"ADAMSERVE_TLS_CA .*junk\.pem: not PEM"):
        connect("https://127.0.0.1:1")
    with pytest.raises(ValueError, match=r"ADAMSERVE_TLS_CA .*junk\.pem: not PEM"):
        ac.Adam([np.zeros(2, np.float32)], server="flight+tls://127.0.0.1:1")
    # a plain URL does not read them
    connect("http://127.0.0.1:1").close()


@pytest.mark.parametrize("url", ["grpc://127.0.0.1:1", "http://127.0.0.1:1",
                                 "flight://127.0.0.1:1"])
def test_tls_options_for_a_plain_url_are_refused(url: str, pki: Pki) -> None:
    secure = {v: k for k, v in PLAIN.items()}[url.partition("://")[0]]
    with pytest.raises(ValueError, match=re.escape(f"need a TLS URL: {secure}://")):
        connect(url, tls_ca=pki.ca)


def test_tls_schemes_have_the_plain_schemes_default_ports(pki: Pki) -> None:
    from adamserve_client.transports._codec import parse_url
    from adamserve_client.transports.flight import parse_flight_url

    assert parse_url("grpcs://example.com").port == parse_url("grpc://example.com").port
    assert parse_url("https://example.com").port == 443
    flight, _ = parse_flight_url("flight+tls://example.com")
    assert (flight.scheme, flight.port) == ("flight+tls", parse_flight_url("flight://h")[0].port)
    with pytest.raises(ValueError, match="a grpcs:// URL has no path"):
        parse_url("grpcs://example.com/x")


# -- the server's files and flags --------------------------------------------------------


def test_a_bad_certificate_and_key_pair_stops_the_server_at_start(pki: Pki,
                                                                  tmp_path: Path) -> None:
    port = _free_port()
    settings = Settings(grpc_port=port, http_port=0, flight_port=0, data_dir=None,
                        max_state_bytes=1 << 20, tls_cert=pki.server_cert,
                        tls_key=pki.other_key)
    with pytest.raises(tls.TlsError) as caught:
        Server(settings)
    assert str(caught.value) == (f"--tls-key {pki.other_key}: does not match the certificate "
                                 f"in --tls-cert {pki.server_cert}")
    with socket.socket() as s:  # nothing was started on the port
        s.bind(("127.0.0.1", port))


def test_server_tls_files_fail_naming_the_file(pki: Pki, tmp_path: Path) -> None:
    junk = tmp_path / "junk.pem"
    junk.write_text("-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n")
    text = tmp_path / "text.pem"
    text.write_text("hello")
    cert, key = pki.server_cert, pki.server_key
    cases: list[tuple[tuple[Path, Path, Path | None], str]] = [
        ((tmp_path / "none.crt", key, None), "--tls-cert .*none.crt: cannot read it"),
        ((text, key, None), "--tls-cert .*text.pem: not PEM"),
        ((junk, key, None), "--tls-cert .*junk.pem: not a readable PEM certificate"),
        ((cert, text, None), "--tls-key .*text.pem: not PEM"),
        ((cert, key, text), "--tls-client-ca .*text.pem: not PEM"),
        ((cert, key, junk), "--tls-client-ca .*junk.pem: not a readable PEM certificate"),
        ((cert, key, key), "--tls-client-ca .*server.key: not PEM"),
    ]
    for args, message in cases:
        with pytest.raises(tls.TlsError, match=message) as caught:
            tls.load(*args)
        assert "\n" not in str(caught.value)
    loaded = tls.load(cert, key, pki.ca)
    assert loaded.mutual and loaded.cert_pem == cert.read_bytes()
    assert "PRIVATE" not in repr(loaded)  # the key stays out of logs


def test_serve_tls_flags(pki: Pki, monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("ADAMSERVE_TLS_CERT", "ADAMSERVE_TLS_KEY", "ADAMSERVE_TLS_CLIENT_CA"):
        monkeypatch.delenv(name, raising=False)
    s = load_settings(["serve", "--tls-cert", str(pki.server_cert), "--tls-key",
                       str(pki.server_key), "--tls-client-ca", str(pki.ca)])
    assert (s.tls_cert, s.tls_key, s.tls_client_ca) == (pki.server_cert, pki.server_key, pki.ca)
    plain = load_settings(["serve"])
    assert (plain.tls_cert, plain.tls_key, plain.tls_client_ca) == (None, None, None)
    with pytest.raises(pydantic.ValidationError, match="--tls-cert and --tls-key go together"):
        load_settings(["serve", "--tls-cert", str(pki.server_cert)])
    with pytest.raises(pydantic.ValidationError, match="--tls-cert and --tls-key go together"):
        load_settings(["serve", "--tls-key", str(pki.server_key)])
    with pytest.raises(pydantic.ValidationError,
                       match=r"--tls-client-ca .*needs --tls-cert and --tls-key"):
        load_settings(["serve", "--tls-client-ca", str(pki.ca)])
    # the environment, as every flag; an empty variable is unset
    monkeypatch.setenv("ADAMSERVE_TLS_CERT", str(pki.server_cert))
    monkeypatch.setenv("ADAMSERVE_TLS_KEY", str(pki.server_key))
    monkeypatch.setenv("ADAMSERVE_TLS_CLIENT_CA", "")
    s = load_settings(["serve"])
    assert (s.tls_cert, s.tls_key, s.tls_client_ca) == (pki.server_cert, pki.server_key, None)
