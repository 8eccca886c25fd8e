"""The server composed: settings -> backend -> store -> service -> the transports
(gRPC, HTTP and, unless its port is 0, Arrow Flight).

:class:`Server` is what ``adamserve serve`` runs and what each Ray shard runs
(:mod:`adamserve.ray_shards`); both build it from :class:`Settings`.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from adamserve import __version__
from adamserve.engine.backend import Backend, select_backend
from adamserve.service import OptimizerService
from adamserve.sessions.checkpoints import CheckpointStore
from adamserve.sessions.store import Limits, SessionStore
from adamserve.transports.flight import FlightServerThread
from adamserve.transports.grpc.server import build_grpc_server
from adamserve.transports.http.app import HttpServerThread, create_app

__all__ = ["Server", "Settings", "default_state_cap"]

log = logging.getLogger("adamserve")


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="ADAMSERVE_")

    host: str = "127.0.0.1"
    grpc_port: int = Field(50051, ge=0, le=65535)
    http_port: int = Field(8000, ge=0, le=65535)
    flight_port: int = Field(8815, ge=0, le=65535,
                             description="Arrow Flight port (0: no Flight service)")
    http_body_timeout: float = Field(
        60.0, gt=0, description="seconds an HTTP request body may send nothing before it "
                                "is refused (400)")
    allow_shared_memory: bool = Field(
        False, description="let clients on this host register shared-memory regions for "
                           "their steps (docs/data-plane.md)")
    device: str = Field("cpu", pattern="^(auto|cpu|cuda)$")
    data_dir: Path | None = Path("data")
    checkpoint_every: int = Field(0, ge=0, description="checkpoint each session every N steps")
    checkpoint_interval: float = Field(0.0, ge=0, description="... and every N seconds")
    keep_checkpoints: int = Field(3, ge=1)
    max_state_bytes: int | None = Field(None, ge=0)
    max_session_bytes: int | None = Field(None, ge=0)
    token: str | None = None
    ports_file: Path | None = None
    log_level: str = "INFO"


def default_state_cap(backend: Backend) -> int:
    """80% of the device's memory: sessions past it are refused rather than OOM-killed."""
    return int(backend.memory_bytes() * 0.8)


class Server:
    """The transports over one service; ``stop`` drains and checkpoints."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        backend = select_backend(settings.device)
        checkpoints = (CheckpointStore(settings.data_dir, keep=settings.keep_checkpoints)
                       if settings.data_dir is not None else None)
        cap = settings.max_state_bytes
        if cap is None:
            cap = default_state_cap(backend)
            log.info("max state bytes: %d (80%% of memory; set --max-state-bytes to change)", cap)
        store = SessionStore(backend, checkpoints, Limits(cap, settings.max_session_bytes))
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
        restored = self.service.start()
        if restored:
            log.info("restored %d sessions from %s", len(restored), s.data_dir)
        self.grpc, self.grpc_port = build_grpc_server(self.service, s.host, s.grpc_port, s.token)
        self.http = HttpServerThread(
            create_app(self.service, s.token, body_idle_timeout=s.http_body_timeout),
            s.host, s.http_port)
        self.http_port = self.http.start()
        if s.flight_port:
            self.flight = FlightServerThread(self.service, s.host, s.flight_port, s.token)
            self.flight_port = self.flight.start()
        log.info("adamserve %s listening: grpc %s:%d, http http://%s:%d, flight %s "
                 "(backend %s, data %s)", __version__, s.host, self.grpc_port, s.host,
                 self.http_port, self.flight.url if self.flight else "off",
                 self.service.store.backend.name, s.data_dir or "none: checkpoints off")
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

    def stop(self) -> None:
        self._stop.set()
        self.service.ready = False
        self.grpc.stop(grace=5).wait()
        self.http.stop()
        if self.flight is not None:
            self.flight.stop()
        self.service.shared_memory.close()
        n = self.service.checkpoint_all()
        log.info("stopped; checkpointed %d sessions", n)

    def wait(self) -> None:
        self._stop.wait()
