"""The server composed: settings -> backend -> store -> service -> the transports
(gRPC, HTTP and, unless its port is 0, Arrow Flight).

:class:`Server` is what ``adamserve serve`` runs and what each Ray shard runs
(:mod:`adamserve.ray_shards`); both build it from :class:`Settings`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from adamserve import __version__, logs, warmup
from adamserve.engine.backend import Backend, select_backend
from adamserve.service import Access, OptimizerService
from adamserve.sessions.checkpoint_policy import Saved
from adamserve.sessions.checkpoints import CheckpointStore
from adamserve.sessions.store import Limits, SessionStore
from adamserve.transports.flight import FlightServerThread
from adamserve.transports.grpc.server import build_grpc_server
from adamserve.transports.http.app import HttpServerThread, create_app
from adamserve.transports.tls import load as load_tls

__all__ = ["Server", "Settings", "default_state_cap"]

log = logging.getLogger("adamserve")


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="ADAMSERVE_")

    host: str = Field("127.0.0.1", description="the address every port listens on (0.0.0.0: "
                                               "every interface; give keys and TLS first)")
    grpc_port: int = Field(50051, ge=0, le=65535, description="gRPC port (0: a free one)")
    http_port: int = Field(8000, ge=0, le=65535, description="HTTP port (0: a free one)")
    flight_port: int = Field(8815, ge=0, le=65535,
                             description="Arrow Flight port (0: no Flight service)")
    http_body_timeout: float = Field(
        60.0, gt=0, description="seconds an HTTP request body may send nothing before it "
                                "is refused (400)")
    http_header_timeout: float = Field(
        20.0, gt=0, description="seconds an HTTP connection has to send a request's headers "
                                "(from its first byte, or from the connection); then it is "
                                "closed (408)")
    http_keepalive_timeout: float = Field(
        5.0, gt=0, description="seconds an idle HTTP keep-alive connection is kept open")
    http_max_buffered_bytes: int = Field(
        1 << 30, ge=1 << 20, description="bytes of request bodies the HTTP server holds at "
                                         "once, all requests together (a JSON body counts 16 "
                                         "times its size, its parsed form); past it, 429")
    allow_shared_memory: bool = Field(
        False, description="let clients on this host register shared-memory regions for "
                           "their steps (docs/data-plane.md)")
    device: Literal["auto", "cpu", "cuda"] = Field(
        "cpu", description="where sessions' state lives (auto: the GPU when CuPy sees one)")
    data_dir: Path | None = Field(
        Path("data"), description="checkpoints; every session is restored from here at start "
                                  "(none: no checkpoints)")
    checkpoint_every: int = Field(0, ge=0, description="checkpoint each session every N steps")
    checkpoint_interval: float = Field(0.0, ge=0, description="... and every N seconds")
    keep_checkpoints: int = Field(3, ge=1, description="checkpoints kept per session, the "
                                                       "newest")
    max_state_bytes: int | None = Field(
        None, ge=0, description="cap on all sessions' state (none: 80% of the device's memory)")
    max_session_bytes: int | None = Field(None, ge=0,
                                          description="cap on any one session's state")
    token: str | None = Field(
        None, description="one key for the default tenant, admin role (env ADAMSERVE_TOKEN "
                          "only: a command line is visible to every user of the host)")
    auth_file: Path | None = Field(
        None, description="TOML file of hashed API keys, each naming a tenant, a role and "
                          "the tenant's quotas (docs/security.md)")
    max_streams_per_tenant: int = Field(
        256, ge=1, description="calls in flight a tenant may hold at once, all transports "
                               "together, unless the auth file says otherwise")
    ports_file: Path | None = Field(
        None, description="once serving, write the ports bound here (JSON: grpc, http, "
                          "flight, pid)")
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field(
        "INFO", description="the least severe log lines written")
    log_format: logs.Format = Field(
        "plain", description="log lines as text, or one JSON object each (time, level, "
                             "logger, message)")
    access_log: bool = Field(
        False, description="log every HTTP request (client, method, path, status; never "
                           "headers or bodies) as adamserve.http.access")
    cache_dir: Path | None = Field(
        None, description="compiled kernels go in <cache-dir>/numba (none: "
                          "$XDG_CACHE_HOME/adamserve, else ~/.cache/adamserve; "
                          "NUMBA_CACHE_DIR, when set, wins)")
    warmup: bool = Field(
        True, description="compile the kernels of a first create and step in the background "
                          "at start-up")
    tls_cert: Path | None = Field(
        None, description="PEM certificate chain: every port (gRPC, HTTP, Flight) serves "
                          "TLS only (with --tls-key)")
    tls_key: Path | None = Field(None, description="PEM private key of --tls-cert (unencrypted)")
    tls_client_ca: Path | None = Field(
        None, description="PEM CA certificates: mutual TLS, every client must present a "
                          "certificate they signed (with --tls-cert and --tls-key)")

    @field_validator("log_level", mode="before")
    @classmethod
    def _level_upper(cls, value: object) -> object:
        return value.upper() if isinstance(value, str) else value

    @field_validator("tls_cert", "tls_key", "tls_client_ca", mode="before")
    @classmethod
    def _empty_is_none(cls, value: object) -> object:
        return None if value == "" else value  # an empty ADAMSERVE_TLS_* means unset

    @model_validator(mode="after")
    def _tls_complete(self) -> Settings:
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("--tls-cert and --tls-key go together: give both (TLS on every "
                             "port) or neither")
        if self.tls_client_ca is not None and self.tls_cert is None:
            raise ValueError("--tls-client-ca (mutual TLS) needs --tls-cert and --tls-key")
        return self


def default_state_cap(backend: Backend) -> int:
    """80% of the device's memory: sessions past it are refused rather than OOM-killed."""
    return int(backend.memory_bytes() * 0.8)


@contextlib.contextmanager
def _data_dir(path: Path | None) -> Iterator[None]:
    """An OSError inside names the data directory it is about (one line at start-up)."""
    try:
        yield
    except OSError as exc:
        if path is None or exc.strerror is None:
            raise
        where = f": {exc.filename}" if exc.filename is not None else ""
        raise OSError(exc.errno, f"data directory {path}: {exc.strerror}{where}") from exc


class Server:
    """The transports over one service; ``stop`` drains and checkpoints."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        # read once, before anything starts: a bad file stops the server with one line
        self.tls = (load_tls(settings.tls_cert, settings.tls_key, settings.tls_client_ca)
                    if settings.tls_cert is not None and settings.tls_key is not None else None)
        # read once, before anything starts: a bad file stops the server with one line
        self.access = (Access.from_file(settings.auth_file, settings.token,
                                        settings.max_streams_per_tenant)
                       if settings.auth_file is not None
                       else Access.single(settings.token, settings.max_streams_per_tenant))
        backend = select_backend(settings.device)
        with _data_dir(settings.data_dir):
            checkpoints = (CheckpointStore(settings.data_dir, keep=settings.keep_checkpoints)
                           if settings.data_dir is not None else None)
        cap = settings.max_state_bytes
        if cap is None:
            cap = default_state_cap(backend)
            log.info("max state bytes: %d (80%% of memory; set --max-state-bytes to change)", cap)
        store = SessionStore(backend, checkpoints, Limits(cap, settings.max_session_bytes),
                             self.access.tenant_limits())
        self.service = OptimizerService(
            store, checkpoint_every_steps=settings.checkpoint_every,
            checkpoint_every_seconds=settings.checkpoint_interval,
            allow_shared_memory=settings.allow_shared_memory)
        self._stop = threading.Event()
        self.grpc_port = 0
        self.http_port = 0
        self.flight_port = 0
        self.flight: FlightServerThread | None = None

    def start(self) -> None:
        s = self.settings
        if s.warmup:  # first: it overlaps the restore and the transports' start
            warmup.start(self.service.store.backend, self._stop)
        with _data_dir(s.data_dir):
            restored = self.service.start()
        if restored:
            log.info("restored %d sessions from %s", len(restored), s.data_dir)
        self.grpc, self.grpc_port = build_grpc_server(self.service, s.host, s.grpc_port,
                                                      tls=self.tls, access=self.access)
        try:
            try:
                self.http = HttpServerThread(
                    create_app(self.service, body_idle_timeout=s.http_body_timeout,
                               access=self.access,
                               max_buffered_bytes=s.http_max_buffered_bytes),
                    s.host, s.http_port, tls=self.tls, header_timeout=s.http_header_timeout,
                    keepalive_timeout=s.http_keepalive_timeout, access_log=s.access_log)
            except OSError as exc:  # the bind's own error names no address
                raise OSError(exc.errno, f"HTTP: cannot listen on {s.host}:{s.http_port} "
                                         f"({exc.strerror or exc})") from None
            self.http_port = self.http.start()
            if s.flight_port:
                self.flight = FlightServerThread(self.service, s.host, s.flight_port,
                                                 tls=self.tls, access=self.access)
                self.flight_port = self.flight.start()
        except BaseException:  # a port that would not open: close the ones that did
            self._stop.set()
            self.grpc.stop(grace=None)
            if getattr(self, "http", None) is not None:
                self.http.stop()
            raise
        log.info("adamserve %s listening on gRPC %s://%s:%d, HTTP %s, Flight %s; backend %s; "
                 "%s", __version__, "grpcs" if self.tls else "grpc", s.host, self.grpc_port,
                 self.http.url, self.flight.url if self.flight else "off",
                 self.service.store.backend.name,
                 f"data directory {s.data_dir.resolve()}" if s.data_dir is not None
                 else "no data directory (checkpoints off)")
        if s.ports_file is not None:
            tmp = s.ports_file.with_suffix(".tmp")
            tmp.write_text(json.dumps({"grpc": self.grpc_port, "http": self.http_port,
                                       "flight": self.flight_port, "pid": os.getpid()}))
            tmp.replace(s.ports_file)
        period = self.service.policy.period
        if period is not None:
            threading.Thread(target=self._checkpoint_loop, args=(period,), daemon=True,
                             name="checkpoints").start()
        threading.Thread(target=self._rounds_loop, daemon=True, name="rounds").start()

    def _rounds_loop(self) -> None:
        """Straggler timeouts, also of rounds no worker waits on; shared-memory regions
        whose clients went away."""
        while not self._stop.wait(0.2):
            try:
                self.service.expire_rounds()
            except Exception:
                log.exception("ending rounds past their straggler timeout failed")
            try:
                self.service.sweep_shared_memory()  # regions of clients that went away
            except Exception:
                log.exception("sweeping shared-memory regions failed")

    def _checkpoint_loop(self, period: float) -> None:
        """The policy's timer: sessions due for a periodic checkpoint, every ``period`` s."""
        while not self._stop.wait(period):
            try:
                self.service.checkpoint_due()
            except Exception:
                log.exception("periodic checkpoint failed")

    def stop(self) -> Saved:
        """Stop serving, then checkpoint every session with unsaved changes; what was
        saved and what could not be."""
        self._stop.set()
        self.service.ready = False
        self.grpc.stop(grace=5).wait()
        self.http.stop()
        if self.flight is not None:
            self.flight.stop()
        self.service.shared_memory.close()
        done = self.service.checkpoint_all()
        if done.failed:  # each failure was logged with its reason
            log.error("stopped; checkpointed %d sessions; could not save %d (their unsaved "
                      "changes are lost): %s", len(done.saved), len(done.failed),
                      ", ".join(sorted(done.failed)))
        else:
            log.info("stopped; checkpointed %d sessions", len(done.saved))
        return done

    def wait(self) -> None:
        self._stop.wait()
