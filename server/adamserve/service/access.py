"""Who may do what: API keys naming a tenant and a role, per-tenant quotas, and the
admission every transport runs before a call may hold a thread (docs/security.md).

* :class:`Access` is built once per server from the auth file (``--auth-file``, TOML;
  keys stored as their SHA-256), or from a single ``--token`` (the default tenant,
  admin role: the shorthand for a server with one user), or from nothing (no
  authentication: every caller is :data:`LOCAL`).
* A :class:`Caller` is what a transport hands the service with every call: the
  tenant, the role and the quotas. Sessions live in their tenant's namespace
  (:mod:`adamserve.sessions.names`), so another tenant's session is simply not
  there: NOT_FOUND, the same message and the same code path as a session that
  never existed.
* :meth:`Access.admit` spends one request of the tenant's requests-per-second
  bucket; :meth:`Access.enter` / :meth:`Access.leave` count its calls in flight.
  Both refuse with :class:`~adamserve.errors.TooManyRequests` and a retry hint.
"""

from __future__ import annotations

import enum
import functools
import hashlib
import logging
import math
import threading
import time
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar, cast

from adamserve.errors import InvalidArgument, PermissionDenied, ServiceError, TooManyRequests
from adamserve.sessions import names
from adamserve.sessions.store import Limits

log = logging.getLogger("adamserve.access")
audit_log = logging.getLogger("adamserve.audit")


class Role(enum.Enum):
    ADMIN = "admin"            # every tenant's sessions, and its own
    READ_WRITE = "read-write"  # its tenant's sessions: create, step, change, delete
    READ_ONLY = "read-only"    # its tenant's sessions: describe, pull, export, list


@dataclass(frozen=True)
class Quotas:
    """A tenant's limits; None: only the server's own."""

    max_state_bytes: int | None = None
    max_sessions: int | None = None
    max_streams: int | None = None  # calls in flight at once, on all transports together
    requests_per_second: float | None = None

    @staticmethod
    def from_toml(where: str, d: Mapping[str, Any]) -> Quotas:
        known = {"max_state_bytes": int, "max_sessions": int, "max_streams": int,
                 "requests_per_second": float}
        unknown = set(d) - set(known)
        if unknown:
            raise ValueError(f"{where}: unknown quota {sorted(unknown)[0]!r}; expected "
                             f"some of {sorted(known)}")
        out: dict[str, Any] = {}
        for k, kind in known.items():
            if k not in d:
                continue
            v = d[k]
            if isinstance(v, bool) or not isinstance(v, int | float) or not (
                    math.isfinite(v) and v > 0) or (kind is int and not isinstance(v, int)):
                raise ValueError(f"{where}: {k} = {v!r}; expected a positive "
                                 f"{'integer' if kind is int else 'number'}")
            out[k] = kind(v)
        return Quotas(**out)


@dataclass(frozen=True)
class Caller:
    """The identity a call runs as."""

    tenant: str
    role: Role
    name: str  # the key's (or certificate's) name, for audit lines; never the key
    quotas: Quotas = field(default_factory=Quotas)

    @property
    def admin(self) -> bool:
        return self.role is Role.ADMIN

    def require_write(self, action: str, target: str = "-") -> None:
        """Refuse a change (``action`` on ``target``) for a read-only key."""
        if self.role is Role.READ_ONLY:
            audit(self, action, target, "denied: read-only role")
            raise PermissionDenied(f"{action}: the key {self.name!r} is read-only; this "
                                   "needs a read-write or admin key",
                                   metadata={"role": self.role.value})

    def resolve(self, session_id: str) -> str:
        """The qualified id of the session this caller means by ``session_id``: its own
        tenant's (also written ``<its tenant>~<id>``, as listings show it); an admin may
        also name another tenant's as ``<tenant>~<id>``."""
        try:
            if names.SEPARATOR in session_id:
                tenant, bare = names.split(session_id)
                if self.admin or (tenant == self.tenant and tenant):
                    names.check_tenant(tenant)
                    return names.qualified(tenant, bare)
            return names.qualified(self.tenant, session_id)
        except ValueError as exc:
            raise InvalidArgument(str(exc)) from None


# Calls made inside the server process and every call to a server without keys.
LOCAL = Caller("", Role.ADMIN, "local")


def audit(caller: Caller, action: str, session_id: str, outcome: str) -> None:
    """One line per security-relevant event: who (tenant, key name), what, on which
    session, and how it ended. Never a key or a payload."""
    audit_log.info("tenant=%s key=%s action=%s session=%s outcome=%s",
                   caller.tenant or "-", caller.name, action, session_id, outcome)


F = TypeVar("F", bound=Callable[..., Any])


def audited(action: str) -> Callable[[F], F]:
    """Audit a service method taking ``(self, session_id, ..., caller=)``: one line when
    it ends, with its outcome (ok, or the refusal's reason)."""

    def wrap(fn: F) -> F:
        @functools.wraps(fn)
        def run(self: Any, session_id: str, *args: Any, **kwargs: Any) -> Any:
            caller = kwargs.get("caller", LOCAL)
            try:
                out = fn(self, session_id, *args, **kwargs)
            except ServiceError as exc:
                if exc.reason != "PERMISSION_DENIED":  # require_write audited it already
                    audit(caller, action, session_id, f"refused: {exc.reason}")
                raise
            except Exception:
                audit(caller, action, session_id, "failed: internal error")
                raise
            audit(caller, action, session_id, "ok")
            return out

        return cast(F, run)

    return wrap


def hash_key(key: str) -> str:
    """The form a key is stored in: keys are random 256-bit strings, so one SHA-256 is
    enough (nothing to brute-force, unlike a password)."""
    return hashlib.sha256(key.encode()).hexdigest()


class _Bucket:
    """A token bucket: ``rate`` requests per second, bursts of up to ``rate`` (at least 1)."""

    def __init__(self, rate: float) -> None:
        self.rate = rate
        self.capacity = max(1.0, rate)
        self.tokens = self.capacity
        self.stamp = time.monotonic()

    def take(self) -> float:
        """0 when a request may go now (and spend it), else seconds until one may."""
        now = time.monotonic()
        self.tokens = min(self.capacity, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return 0.0
        return (1.0 - self.tokens) / self.rate


# Calls in flight a tenant may hold when its quotas do not say: below the gRPC pool's
# 1,024 threads, so no one tenant can take every thread.
DEFAULT_MAX_STREAMS = 256
# Calls in flight to the services open without a key (health), all callers together.
OPEN_MAX_STREAMS = 64
# How long a refused caller is told to wait for a slot in flight to free.
STREAM_RETRY_AFTER = 1.0


class Access:
    """The server's keys and its per-tenant admission. Thread-safe."""

    def __init__(self, keys: Mapping[str, Caller] | None = None,
                 certificates: Mapping[str, Caller] | None = None,
                 default_max_streams: int = DEFAULT_MAX_STREAMS,
                 tenants: Mapping[str, Quotas] | None = None) -> None:
        # sha256 hex of a key -> its caller; None: no authentication at all
        self._keys = dict(keys) if keys is not None else None
        self._certificates = dict(certificates or {})
        self.default_max_streams = default_max_streams
        self.tenants = dict(tenants or {})
        self._lock = threading.Lock()
        self._buckets: dict[str, _Bucket] = {}
        self._in_flight: dict[str, int] = {}

    # -- construction ------------------------------------------------------------

    @staticmethod
    def open() -> Access:
        """No authentication: every call is :data:`LOCAL`."""
        return Access()

    @staticmethod
    def single(token: str | None, default_max_streams: int = DEFAULT_MAX_STREAMS) -> Access:
        """``ADAMSERVE_TOKEN``: one key, the default tenant, admin (as before tenants)."""
        if token is None:
            return Access(default_max_streams=default_max_streams)
        if not token:
            raise ValueError("token: expected a non-empty string, or None for no "
                             "authentication")
        return Access({hash_key(token): Caller("", Role.ADMIN, "token")},
                      default_max_streams=default_max_streams)

    @staticmethod
    def from_file(path: Path, token: str | None = None,
                  default_max_streams: int = DEFAULT_MAX_STREAMS) -> Access:
        """The auth file (docs/security.md); ``token`` adds the single-tenant key."""
        try:
            data = tomllib.loads(path.read_text())
        except OSError as exc:
            raise ValueError(f"auth file {path}: cannot read it ({exc.strerror})") from None
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            raise ValueError(f"auth file {path}: not valid TOML ({exc})") from None
        return Access.from_mapping(data, str(path), token, default_max_streams)

    @staticmethod
    def from_mapping(data: Mapping[str, Any], where: str = "auth file",
                     token: str | None = None,
                     default_max_streams: int = DEFAULT_MAX_STREAMS) -> Access:
        unknown = set(data) - {"tenants", "keys", "certificates", "defaults"}
        if unknown:
            raise ValueError(f"{where}: unknown table {sorted(unknown)[0]!r}; expected "
                             "[tenants.<name>], [[keys]], [[certificates]], [defaults]")
        tenants: dict[str, Quotas] = {}
        for tenant, quotas in _table(data, "tenants", where).items():
            _check_tenant(tenant, f"{where}: [tenants.{tenant}]")
            tenants[tenant] = Quotas.from_toml(f"{where}: [tenants.{tenant}]",
                                               _table(quotas, "", f"[tenants.{tenant}]"))
        defaults = _table(data, "defaults", where)
        if set(defaults) - {"max_streams"}:
            raise ValueError(f"{where}: [defaults] takes max_streams only")
        max_streams = defaults.get("max_streams", default_max_streams)
        if isinstance(max_streams, bool) or not isinstance(max_streams, int) or max_streams < 1:
            raise ValueError(f"{where}: [defaults] max_streams = {max_streams!r}; expected a "
                             "positive integer")
        keys: dict[str, Caller] = {}
        for i, entry in enumerate(_entries(data, "keys", where)):
            at = f"{where}: [[keys]] #{i + 1}"
            digest = entry.get("sha256")
            if not isinstance(digest, str) or len(digest) != 64 or not all(
                    c in "0123456789abcdef" for c in digest):
                raise ValueError(f"{at}: sha256 must be the key's SHA-256 as 64 lowercase hex "
                                 "digits (`adamserve keys new` prints it)")
            if digest in keys:
                raise ValueError(f"{at}: the same key is listed twice")
            keys[digest] = _caller(entry, at, tenants, {"sha256"})
        certificates: dict[str, Caller] = {}
        for i, entry in enumerate(_entries(data, "certificates", where)):
            at = f"{where}: [[certificates]] #{i + 1}"
            cn = entry.get("common_name")
            if not isinstance(cn, str) or not cn:
                raise ValueError(f"{at}: common_name must be the client certificate's "
                                 "subject common name")
            certificates[cn] = _caller(entry, at, tenants, {"common_name"}, default_name=cn)
        if token:
            keys[hash_key(token)] = Caller("", Role.ADMIN, "token", tenants.get("", Quotas()))
        if not keys and not certificates:
            raise ValueError(f"{where}: no [[keys]] or [[certificates]]: nobody could call")
        return Access(keys, certificates, max_streams, tenants)

    def tenant_limits(self) -> dict[str, Limits]:
        """The store's share of the quotas: each tenant's state bytes and sessions."""
        return {t: Limits(max_state_bytes=q.max_state_bytes, max_sessions=q.max_sessions)
                for t, q in self.tenants.items()
                if q.max_state_bytes is not None or q.max_sessions is not None}

    # -- identity ----------------------------------------------------------------

    @property
    def required(self) -> bool:
        """Whether calls need a key (or a named certificate)."""
        return self._keys is not None

    @property
    def names_certificates(self) -> bool:
        return bool(self._certificates)

    def authenticate(self, authorization: bytes | str | None) -> Caller | None:
        """The caller an ``Authorization`` value (``Bearer <key>``) names, or None."""
        if self._keys is None:
            return LOCAL
        if authorization is None:
            return None
        raw = authorization.encode() if isinstance(authorization, str) else authorization
        scheme, _, credential = raw.partition(b" ")
        if scheme.lower() != b"bearer":
            return None
        # Looking up the key's digest leaks, at most, how a wrong guess's digest compares
        # with stored ones: nothing that brings a guess closer to a key.
        return self._keys.get(hashlib.sha256(credential.strip()).hexdigest())

    def certificate_caller(self, common_name: str | None) -> Caller | None:
        """The caller a verified client certificate names (mutual TLS), or None."""
        if common_name is None:
            return None
        return self._certificates.get(common_name)

    # -- admission ---------------------------------------------------------------

    def admit(self, caller: Caller) -> None:
        """Spend one request of the tenant's rate; TooManyRequests when it is spent."""
        rate = caller.quotas.requests_per_second
        if rate is None:
            return
        with self._lock:
            bucket = self._buckets.get(caller.tenant)
            if bucket is None or bucket.rate != rate:
                bucket = self._buckets[caller.tenant] = _Bucket(rate)
            wait = bucket.take()
        if wait:
            raise TooManyRequests(
                f"tenant {caller.tenant or '(default)'!r}: more than {rate:g} requests per "
                f"second; retry in {wait:.2f} s", retry_after=wait,
                metadata={"limit": "requests_per_second", "retry_after_s": f"{wait:.3f}"})

    def enter(self, caller: Caller | None) -> None:
        """Count one more call in flight for ``caller``'s tenant (None: a call to an open
        service); TooManyRequests when the tenant has as many as it may."""
        key, cap = self._slot(caller)
        with self._lock:
            n = self._in_flight.get(key, 0)
            if n >= cap:
                who = "calls without a key" if caller is None else (
                    f"tenant {caller.tenant or '(default)'!r}")
                raise TooManyRequests(
                    f"{who}: {cap} calls in flight already, the most allowed; retry when "
                    "one has ended", reason="TOO_MANY_STREAMS", retry_after=STREAM_RETRY_AFTER,
                    metadata={"limit": "max_streams", "max_streams": str(cap)})
            self._in_flight[key] = n + 1

    def leave(self, caller: Caller | None) -> None:
        key, _ = self._slot(caller)
        with self._lock:
            n = self._in_flight.get(key, 0) - 1
            if n > 0:
                self._in_flight[key] = n
            else:
                self._in_flight.pop(key, None)

    def in_flight(self, caller: Caller | None) -> int:
        with self._lock:
            return self._in_flight.get(self._slot(caller)[0], 0)

    def _slot(self, caller: Caller | None) -> tuple[str, int]:
        if caller is None:
            return "\0open", OPEN_MAX_STREAMS
        return "t:" + caller.tenant, caller.quotas.max_streams or self.default_max_streams


def _table(data: Mapping[str, Any], name: str, where: str) -> Mapping[str, Any]:
    value = data.get(name, {}) if name else data
    if not isinstance(value, Mapping):
        raise ValueError(f"{where}: {name or 'the entry'} must be a table")
    return value


def _entries(data: Mapping[str, Any], name: str, where: str) -> list[Mapping[str, Any]]:
    value = data.get(name, [])
    if not isinstance(value, list) or not all(isinstance(e, Mapping) for e in value):
        raise ValueError(f"{where}: {name} must be an array of tables ([[{name}]])")
    return value


def _check_tenant(tenant: str, where: str) -> None:
    try:
        names.check_tenant(tenant)
    except ValueError as exc:
        raise ValueError(f"{where}: {exc}") from None


def _caller(entry: Mapping[str, Any], at: str, tenants: Mapping[str, Quotas],
            own: set[str], default_name: str | None = None) -> Caller:
    unknown = set(entry) - own - {"name", "tenant", "role"}
    if unknown:
        raise ValueError(f"{at}: unknown field {sorted(unknown)[0]!r}; expected name, "
                         f"tenant, role, {', '.join(sorted(own))}")
    tenant = entry.get("tenant", "")
    if not isinstance(tenant, str):
        raise ValueError(f"{at}: tenant must be a string")
    _check_tenant(tenant, at)
    role_name = entry.get("role")
    try:
        role = Role(role_name)
    except ValueError:
        raise ValueError(f"{at}: role = {role_name!r}; expected one of "
                         f"{[r.value for r in Role]}") from None
    name = entry.get("name", default_name)
    if not isinstance(name, str) or not name or len(name) > 128:
        raise ValueError(f"{at}: name must be a string of 1-128 characters (it names the "
                         "key in audit lines)")
    return Caller(tenant, role, name, tenants.get(tenant, Quotas()))
