"""TLS on every port: the PEM files read and checked once (:func:`load`), and what each
wire's server takes from them (:func:`grpc_credentials`, :func:`uvicorn_options`,
:func:`flight_options`).

With a client CA the servers ask for a client certificate and refuse a connection
without one signed by that CA (mutual TLS); :func:`peer_common_name` gives a gRPC
handler the common name of the certificate its caller presented.
"""

from __future__ import annotations

import re
import ssl
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc

__all__ = ["TlsError", "TlsFiles", "flight_options", "grpc_credentials", "load",
           "peer_common_name", "uvicorn_options"]

_PEM_CERT = b"-----BEGIN CERTIFICATE-----"
_PEM_KEY = b"PRIVATE KEY-----"  # BEGIN PRIVATE KEY, BEGIN EC / RSA PRIVATE KEY


class TlsError(ValueError):
    """A TLS file that cannot serve: which one, and what is wrong with it (one line)."""


@dataclass(frozen=True)
class TlsFiles:
    """The server's certificate chain and key, and the CA its clients' certificates
    must be signed by (None: no client certificate asked for), with their PEM bytes
    as :func:`load` read them."""

    cert: Path
    key: Path
    client_ca: Path | None = None
    cert_pem: bytes = field(default=b"", repr=False)
    key_pem: bytes = field(default=b"", repr=False)
    client_ca_pem: bytes | None = field(default=None, repr=False)

    @property
    def mutual(self) -> bool:
        return self.client_ca is not None


def _read(what: str, path: Path, marker: bytes, expected: str) -> bytes:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise TlsError(f"{what} {path}: cannot read it ({exc.strerror or exc})") from None
    if marker not in data:
        raise TlsError(f"{what} {path}: not PEM (expected {expected})")
    return data


def load(cert: Path, key: Path, client_ca: Path | None = None) -> TlsFiles:
    """Read and check the files: each readable PEM, the key unencrypted and the
    certificate's, the client CA loadable certificates. :class:`TlsError` names the file
    and the fault."""
    cert_pem = _read("--tls-cert", cert, _PEM_CERT, "'-----BEGIN CERTIFICATE-----'")
    key_pem = _read("--tls-key", key, _PEM_KEY, "'-----BEGIN PRIVATE KEY-----'")
    _certificates("--tls-cert", cert, cert_pem)
    if b"ENCRYPTED" in key_pem:
        raise TlsError(f"--tls-key {key}: encrypted; expected an unencrypted private key")
    try:
        # a password callback: an encrypted key the check above missed fails, never prompts
        ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).load_cert_chain(cert, key, password=lambda: b"")
    except ssl.SSLError as exc:
        if "KEY_VALUES_MISMATCH" in str(exc):
            raise TlsError(f"--tls-key {key}: does not match the certificate in "
                           f"--tls-cert {cert}") from None
        raise TlsError(f"--tls-key {key}: not a readable PEM private key "
                       f"({_why(exc)})") from None
    ca_pem = None
    if client_ca is not None:
        ca_pem = _read("--tls-client-ca", client_ca, _PEM_CERT,
                       "'-----BEGIN CERTIFICATE-----'")
        _certificates("--tls-client-ca", client_ca, ca_pem)
    return TlsFiles(cert, key, client_ca, cert_pem, key_pem, ca_pem)


def _why(exc: ssl.SSLError) -> str:
    return re.sub(r"\s*\(_ssl\.c:\d+\)$", "", exc.reason or str(exc))


def _certificates(what: str, path: Path, pem: bytes) -> None:
    """Every certificate in ``pem`` parses (loaded as trust anchors, which checks just that)."""
    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_verify_locations(
            cadata=pem.decode("ascii", "replace"))
    except ssl.SSLError as exc:
        raise TlsError(f"{what} {path}: not a readable PEM certificate "
                       f"({_why(exc)})") from None


def grpc_credentials(tls: TlsFiles) -> grpc.ServerCredentials:
    return grpc.ssl_server_credentials(
        [(tls.key_pem, tls.cert_pem)], root_certificates=tls.client_ca_pem,
        require_client_auth=tls.mutual)


def uvicorn_options(tls: TlsFiles) -> dict[str, Any]:
    """uvicorn.Config's ssl_* arguments."""
    options: dict[str, Any] = {"ssl_certfile": str(tls.cert), "ssl_keyfile": str(tls.key)}
    if tls.client_ca is not None:
        options |= {"ssl_ca_certs": str(tls.client_ca), "ssl_cert_reqs": ssl.CERT_REQUIRED}
    return options


def flight_options(tls: TlsFiles) -> dict[str, Any]:
    """pyarrow.flight.FlightServerBase's TLS arguments (its location must be grpc+tls://)."""
    options: dict[str, Any] = {"tls_certificates": [(tls.cert_pem, tls.key_pem)]}
    if tls.client_ca_pem is not None:
        options |= {"verify_client": True, "root_certificates": tls.client_ca_pem}
    return options


def peer_common_name(context: grpc.ServicerContext) -> str | None:
    """The common name of the client certificate the TLS handshake verified (mutual
    TLS); None without one."""
    names = context.auth_context().get("x509_common_name") or ()
    for name in names:
        return name.decode("utf-8", "replace") if isinstance(name, bytes) else str(name)
    return None
