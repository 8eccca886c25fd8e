"""The client's TLS options, shared by the three wires' TLS schemes (``grpcs://``,
``https://``, ``flight+tls://``): the CA to trust and the client certificate and key
(mutual TLS), each a PEM file given as an argument or, when not given, by
``ADAMSERVE_TLS_CA`` / ``ADAMSERVE_TLS_CERT`` / ``ADAMSERVE_TLS_KEY``.

The files are read and checked once, here, so a bad one fails before any connection
with a ValueError naming it. Without a CA the default trust store is used (the
system's for HTTPS; gRPC's own roots for gRPC and Flight, which
``GRPC_DEFAULT_SSL_ROOTS_FILE_PATH`` replaces).
"""

from __future__ import annotations

import os
import re
import ssl
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["ENV", "SECURE_SCHEMES", "PathLike", "TlsOptions", "check_scheme", "hint"]

PathLike = str | os.PathLike[str]

ENV = {"tls_ca": "ADAMSERVE_TLS_CA", "tls_cert": "ADAMSERVE_TLS_CERT",
       "tls_key": "ADAMSERVE_TLS_KEY"}
# each TLS scheme and the plain one it secures
SECURE_SCHEMES = {"grpcs": "grpc", "https": "http", "flight+tls": "flight"}


@dataclass(frozen=True)
class TlsOptions:
    """PEM bytes as read from the files (None: not given), and the files' paths."""

    ca: bytes | None = None
    cert: bytes | None = field(default=None, repr=False)
    key: bytes | None = field(default=None, repr=False)
    ca_path: Path | None = None
    cert_path: Path | None = None
    key_path: Path | None = None

    @classmethod
    def load(cls, tls_ca: PathLike | None = None, tls_cert: PathLike | None = None,
             tls_key: PathLike | None = None) -> TlsOptions:
        """Read the files; each one not given comes from its environment variable."""
        given = {"tls_ca": tls_ca, "tls_cert": tls_cert, "tls_key": tls_key}
        paths: dict[str, tuple[str, Path] | None] = {}
        for option, value in given.items():
            if value is None:
                value = os.environ.get(ENV[option]) or None
                paths[option] = (ENV[option], Path(value)) if value else None
            else:
                paths[option] = (option, Path(value))
        ca, cert, key = paths["tls_ca"], paths["tls_cert"], paths["tls_key"]
        if (cert is None) != (key is None):
            named = cert or key
            assert named is not None
            raise ValueError(f"{named[0]} {named[1]}: a client certificate needs both "
                             "tls_cert and tls_key (ADAMSERVE_TLS_CERT / ADAMSERVE_TLS_KEY)")
        ca_pem = _certificates(ca) if ca else None
        cert_pem = key_pem = None
        if cert is not None and key is not None:
            cert_pem = _certificates(cert)
            key_pem = _read(key, b"PRIVATE KEY-----", "-----BEGIN PRIVATE KEY-----")
            if b"ENCRYPTED" in key_pem:
                raise ValueError(f"{key[0]} {key[1]}: encrypted; expected an unencrypted "
                                 "private key")
            try:
                # a password callback: an encrypted key fails here, it never prompts
                ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_cert_chain(
                    cert[1], key[1], password=lambda: b"")
            except ssl.SSLError as exc:
                if "KEY_VALUES_MISMATCH" in str(exc):
                    raise ValueError(f"{key[0]} {key[1]}: does not match the certificate in "
                                     f"{cert[0]} {cert[1]}") from None
                raise ValueError(f"{key[0]} {key[1]}: not a readable PEM private key "
                                 f"({_why(exc)})") from None
        return cls(ca_pem, cert_pem, key_pem, ca[1] if ca else None,
                   cert[1] if cert else None, key[1] if key else None)

    def ssl_context(self) -> ssl.SSLContext:
        """For HTTPS: the CA (else the system's trust store), the client certificate."""
        context = ssl.create_default_context(
            cadata=self.ca.decode("ascii", "replace") if self.ca is not None else None)
        if self.cert_path is not None:
            context.load_cert_chain(self.cert_path, self.key_path)
        return context


def check_scheme(url: str, scheme: str, tls: TlsOptions | None) -> TlsOptions | None:
    """The TLS options a wire to ``url`` uses: for a TLS scheme ``tls``, or the
    environment's when None; for a plain scheme none (TLS options given for one are a
    mistake: ValueError)."""
    if scheme in SECURE_SCHEMES:
        return tls if tls is not None else TlsOptions.load()
    if tls is not None:
        secure = {v: k for k, v in SECURE_SCHEMES.items()}[scheme]
        raise ValueError(f"server URL {url!r}: TLS options (tls_ca, tls_cert, tls_key) need a "
                         f"TLS URL: {secure}://host:port")
    return None


def _read(named: tuple[str, Path], marker: bytes, expected: str) -> bytes:
    option, path = named
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ValueError(f"{option} {path}: cannot read it ({exc.strerror or exc})") from None
    if marker not in data:
        raise ValueError(f"{option} {path}: not PEM (expected '{expected}')")
    return data


def _certificates(named: tuple[str, Path]) -> bytes:
    """The file's PEM certificates, each checked to parse (loaded as trust anchors)."""
    pem = _read(named, b"-----BEGIN CERTIFICATE-----", "-----BEGIN CERTIFICATE-----")
    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_verify_locations(
            cadata=pem.decode("ascii", "replace"))
    except ssl.SSLError as exc:
        raise ValueError(f"{named[0]} {named[1]}: not a readable PEM certificate "
                         f"({_why(exc)})") from None
    return pem


def _why(exc: ssl.SSLError) -> str:
    return re.sub(r"\s*\(_ssl\.c:\d+\)$", "", exc.reason or str(exc))


_CLOSED = ("socket closed", "server disconnected", "connection reset", "unexpected eof",
           "eof occurred")


def hint(url: str, detail: str) -> str:
    """What a failed connection's ``detail`` suggests about TLS ("" when nothing): the
    handshake's failures name their cause; a server that closes the connection at once
    may speak TLS to a plain client, or want a client certificate."""
    scheme = url.partition("://")[0].lower()
    text = detail.lower()
    closed = any(marker in text for marker in _CLOSED)
    if scheme in SECURE_SCHEMES:
        if "certificate_verify_failed" in text or "certificate verify failed" in text:
            return ("; the server's certificate is not signed by a CA this client trusts: "
                    "pass tls_ca= (or set ADAMSERVE_TLS_CA) to the CA's PEM file")
        if "wrong_version_number" in text or "wrong version number" in text:
            return f"; the server does not speak TLS on this port: try {SECURE_SCHEMES[scheme]}://"
        if closed:
            return ("; the server closed the TLS connection: it may want a client certificate "
                    "signed by its CA (tls_cert= and tls_key=, or ADAMSERVE_TLS_CERT and "
                    "ADAMSERVE_TLS_KEY)")
    elif closed:
        secure = {plain: tls for tls, plain in SECURE_SCHEMES.items()}.get(scheme)
        if secure is not None:
            return f"; if the server speaks TLS, use {secure}://"
    return ""
