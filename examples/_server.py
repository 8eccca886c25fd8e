"""Run ``adamserve serve`` in a subprocess for the examples (free ports, optional data dir),
or use the server the command line (``--server``) or ``$ADAMSERVE_URL`` names."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from pathlib import Path

# The help of every example's --server: says when the example starts a server itself.
SERVER_HELP = ("an adamserve URL (grpc://, http://, flight://); default $ADAMSERVE_URL. "
               "With neither, the example starts its own server (adamserve serve on free "
               "ports of 127.0.0.1) and stops it at the end")


def given_url(server: str | None) -> str | None:
    """The server the user named: ``--server``, else ``$ADAMSERVE_URL``, else None."""
    return server or os.environ.get("ADAMSERVE_URL") or None


def server_or_own(server: str | None, transport: str = "grpc") -> AbstractContextManager[str]:
    """The URL of the server the user named, or of one started here for the block."""
    url = given_url(server)
    return nullcontext(url) if url else adamserve_server(transport)


@contextmanager
def adamserve_server(transport: str = "grpc", data_dir: Path | None = None,
                     *extra: str) -> Iterator[str]:
    """Start a server, yield its URL for ``transport`` ("grpc" or "http"), stop it with
    SIGTERM (which checkpoints every session when there is a data directory)."""
    with tempfile.TemporaryDirectory(prefix="adamserve-example-") as tmp:
        ports = Path(tmp) / "ports.json"
        cmd = [sys.executable, "-m", "adamserve.cli", "serve", "--grpc-port", "0",
               "--http-port", "0", "--flight-port", "0", "--data-dir", str(data_dir) if data_dir else "none",
               "--ports-file", str(ports), "--log-level", "WARNING", *extra]
        proc = subprocess.Popen(cmd, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        try:
            deadline = time.monotonic() + 60
            while not ports.exists():
                if proc.poll() is not None:
                    raise RuntimeError(
                        f"the server exited with status {proc.returncode}: starting one needs "
                        "the server's packages (pip install -e '.[examples]'); or name a "
                        "running server with --server URL or $ADAMSERVE_URL")
                if time.monotonic() > deadline:
                    raise RuntimeError("the server did not start within 60 s")
                time.sleep(0.02)
            port = json.loads(ports.read_text())[transport]
            yield f"{transport}://127.0.0.1:{port}"
        finally:
            proc.terminate()
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
