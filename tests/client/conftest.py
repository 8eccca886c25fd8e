"""One real server for the client tests: an OptimizerService behind every transport.

gRPC (build_grpc_server), HTTP (uvicorn in a thread) and Arrow Flight
(FlightServerThread) listen on 127.0.0.1 with port 0 over the same service, as
``adamserve serve`` runs them. Tests are parametrized over the three URLs and use
fresh session ids.

The server is imported inside the fixture, not at the top: test_cuda_params.py
runs on a GPU machine where only the client and torch are installed.
"""

from __future__ import annotations

import contextlib
import itertools
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

TRANSPORTS = ("grpc", "http", "flight")


@dataclass
class Live:
    urls: dict[str, str]
    service: Any  # adamserve.service.OptimizerService
    data_dir: Path


@contextmanager
def _server(data_dir: Path) -> Iterator[Live]:
    from adamserve.engine.kernels_cpu import CpuBackend
    from adamserve.service import OptimizerService
    from adamserve.sessions.checkpoints import CheckpointStore
    from adamserve.sessions.store import Limits, SessionStore
    from adamserve.transports.flight import FlightServerThread
    from adamserve.transports.grpc import build_grpc_server
    from adamserve.transports.http import HttpServerThread, create_app

    store = SessionStore(CpuBackend(), CheckpointStore(data_dir), Limits(max_state_bytes=1 << 30))
    service = OptimizerService(store)
    service.start()
    grpc_server, grpc_port = build_grpc_server(service, port=0)
    http = HttpServerThread(create_app(service))
    http.start()
    flight = FlightServerThread(service)
    flight.start()
    yield Live({"grpc": f"grpc://127.0.0.1:{grpc_port}", "http": http.url, "flight": flight.url},
               service, data_dir)
    flight.stop()
    http.stop()
    grpc_server.stop(None)


@pytest.fixture(scope="session")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Live]:
    with _server(tmp_path_factory.mktemp("client-server")) as server:
        yield server


@pytest.fixture(scope="session")
def shard_servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[Live]]:
    """Three more servers, for sharded sessions (the ``live`` one is the reference)."""
    with contextlib.ExitStack() as stack:
        yield [stack.enter_context(_server(tmp_path_factory.mktemp(f"shard{i}")))
               for i in range(3)]


@pytest.fixture(params=TRANSPORTS)
def url(request: pytest.FixtureRequest, live: Live) -> str:
    """The server's URL, once per transport."""
    return str(live.urls[request.param])


_ids = itertools.count()


@pytest.fixture
def sid(request: pytest.FixtureRequest) -> str:
    """A session id no other test uses."""
    return re.sub(r"[^A-Za-z0-9._-]", "-", f"t{next(_ids)}-{request.node.name}")[:120]


@pytest.fixture(scope="session")
def shm_servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[Live]]:
    """Three servers like ``live`` that take shared-memory regions (as with
    ``--allow-shared-memory``): one for single-server sessions, two more for shards."""
    with contextlib.ExitStack() as stack:
        servers = [stack.enter_context(_server(tmp_path_factory.mktemp(f"shm{i}")))
                   for i in range(3)]
        for server in servers:
            server.service.allow_shared_memory = True
        yield servers
