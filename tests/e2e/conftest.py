"""A real ``adamserve serve`` process on 127.0.0.1 with port 0, for restart and crash tests."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest


class ServerProcess:
    def __init__(self, data_dir: Path, *extra: str) -> None:
        self.data_dir = data_dir
        self.extra = extra
        self.proc: subprocess.Popen[bytes] | None = None
        self.http_url = ""
        self.grpc_target = ""
        self.log = data_dir.parent / f"server-{data_dir.name}.log"

    def start(self, timeout: float = 60.0) -> ServerProcess:
        ports = self.data_dir.parent / f"ports-{self.data_dir.name}.json"
        ports.unlink(missing_ok=True)
        cmd = [sys.executable, "-m", "adamserve.cli", "serve", "--grpc-port", "0",
               "--http-port", "0", "--flight-port", "0", "--data-dir", str(self.data_dir), "--ports-file", str(ports),
               *self.extra]
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + timeout
        while not ports.exists():
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n"
                                   + self.log.read_text()[-3000:])
            if time.monotonic() > deadline:
                self.kill()
                raise RuntimeError("server did not start:\n" + self.log.read_text()[-3000:])
            time.sleep(0.02)
        p = json.loads(ports.read_text())
        self.http_url = f"http://127.0.0.1:{p['http']}"
        self.grpc_target = f"127.0.0.1:{p['grpc']}"
        return self

    def client(self) -> httpx.Client:
        return httpx.Client(base_url=self.http_url, timeout=30.0)

    def terminate(self, timeout: float = 60.0) -> int:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(30)


@pytest.fixture
def server_factory(tmp_path: Path) -> Iterator[type[ServerProcess]]:
    started: list[ServerProcess] = []

    class Tracked(ServerProcess):
        def start(self, timeout: float = 60.0) -> ServerProcess:
            started.append(self)
            return super().start(timeout)

    yield Tracked
    for s in started:
        s.kill()
