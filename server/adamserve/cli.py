"""Composition root: settings -> backend -> store -> service -> transports.

``adamserve serve`` runs the gRPC and HTTP transports over one service until
SIGTERM or SIGINT, then checkpoints every session with unsaved steps and exits.
Every flag can also be set as an environment variable ``ADAMSERVE_<NAME>``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import threading
from pathlib import Path
from typing import Any

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from adamserve import __version__
from adamserve.engine.backend import Backend, select_backend
from adamserve.service import OptimizerService
from adamserve.sessions.checkpoints import CheckpointStore
from adamserve.sessions.store import Limits, SessionStore
from adamserve.transports.grpc.server import build_grpc_server
from adamserve.transports.http.app import HttpServerThread, create_app

log = logging.getLogger("adamserve")


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="ADAMSERVE_")

    host: str = "127.0.0.1"
    grpc_port: int = Field(50051, ge=0, le=65535)
    http_port: int = Field(8000, ge=0, le=65535)
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


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="adamserve", description="adamserve " + __version__)
    sub = ap.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="run the gRPC and HTTP server")
    for name, field in Settings.model_fields.items():
        flag = "--" + name.replace("_", "-")
        helptext = field.description or f"(env ADAMSERVE_{name.upper()})"
        serve.add_argument(flag, dest=name, default=None, help=helptext)
    return ap


def load_settings(argv: list[str] | None = None) -> Settings:
    args = _parser().parse_args(argv)
    given: dict[str, Any] = {k: v for k, v in vars(args).items()
                             if k != "command" and v is not None}
    if given.get("data_dir") in ("", "none"):
        given["data_dir"] = None
    settings = Settings(**given)
    if settings.token == "":  # an empty ADAMSERVE_TOKEN means no token, not an empty one
        settings.token = None
    return settings


class Server:
    """Both transports over one service; ``stop`` drains and checkpoints."""

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
            checkpoint_every_seconds=settings.checkpoint_interval)
        self._stop = threading.Event()
        self.grpc_port = 0
        self.http_port = 0

    def start(self) -> None:
        s = self.settings
        restored = self.service.start()
        if restored:
            log.info("restored %d sessions from %s", len(restored), s.data_dir)
        self.grpc, self.grpc_port = build_grpc_server(self.service, s.host, s.grpc_port, s.token)
        self.http = HttpServerThread(create_app(self.service, s.token), s.host, s.http_port)
        self.http_port = self.http.start()
        log.info("adamserve %s listening: grpc %s:%d, http http://%s:%d (backend %s, data %s)",
                 __version__, s.host, self.grpc_port, s.host, self.http_port,
                 self.service.store.backend.name, s.data_dir or "none: checkpoints off")
        if s.ports_file is not None:
            tmp = s.ports_file.with_suffix(".tmp")
            tmp.write_text(json.dumps({"grpc": self.grpc_port, "http": self.http_port,
                                       "pid": os.getpid()}))
            tmp.replace(s.ports_file)
        if s.checkpoint_interval > 0:
            threading.Thread(target=self._checkpoint_loop, daemon=True,
                             name="checkpoints").start()

    def _checkpoint_loop(self) -> None:
        period = min(1.0, self.settings.checkpoint_interval / 4)
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
        n = self.service.checkpoint_all()
        log.info("stopped; checkpointed %d sessions", n)

    def wait(self) -> None:
        self._stop.wait()


def main(argv: list[str] | None = None) -> int:
    settings = load_settings(argv)
    logging.basicConfig(level=settings.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    server = Server(settings)
    server.start()
    done = threading.Event()

    def on_signal(signum: int, _frame: object) -> None:
        log.info("received %s: draining and checkpointing", signal.Signals(signum).name)
        done.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    done.wait()
    server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
