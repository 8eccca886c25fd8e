"""Property-based fuzzing of the HTTP API from its own OpenAPI document (schemathesis).

Cases are generated from the live server's /openapi.json, positive (fitting the
schema) and negative (breaking it), and sent to the real uvicorn server. The one
property checked: no request, however malformed, gets a 5xx. About half the cases
aim at an existing session so they get past the 404. Schedules (typed, as the
proto's oneof) are fuzzed too; the store has a small memory cap so a generated
shape cannot allocate much.

A second server has tenants: the fuzzer holds tenant B's key and aims half its cases
at tenant A's session, which must come through unchanged.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("schemathesis")

import httpx
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis.checks import not_a_server_error

from adamserve.engine.kernels_cpu import CpuBackend
from adamserve.engine.optimizer import TensorSpec
from adamserve.service import Access, OptimizerService
from adamserve.service.access import hash_key
from adamserve.sessions.checkpoints import CheckpointStore
from adamserve.sessions.session import SessionConfig
from adamserve.sessions.store import Limits, SessionStore
from adamserve.transports.http import HttpServerThread, create_app

SESSION = "fz"
CONFIG = SessionConfig("adam", (TensorSpec("w", (2, 3)), TensorSpec("b", (3,))))


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, OptimizerService]]:
    data_dir: Path = tmp_path_factory.mktemp("fuzz")
    store = SessionStore(CpuBackend(), CheckpointStore(data_dir), Limits(max_state_bytes=16 << 20))
    service = OptimizerService(store)
    service.start()
    with HttpServerThread(create_app(service, max_body_bytes=1 << 20)) as http:
        yield http.url, service


@settings(max_examples=100, deadline=None, database=None, derandomize=True,
          suppress_health_check=list(HealthCheck))
@given(data=st.data())
def test_no_server_errors(server: tuple[str, OptimizerService], data: st.DataObject) -> None:
    url, service = server
    schema = _schema(url)
    case = data.draw(schema, label="case")
    if SESSION not in [s.id for s in service.store.all()]:
        service.create(SESSION, CONFIG)
    if "session_id" in (case.path_parameters or {}) and data.draw(st.booleans(), label="ours"):
        case.path_parameters["session_id"] = SESSION
    case.call_and_validate(base_url=url, checks=[not_a_server_error], timeout=30)


_STRATEGIES: dict[str, st.SearchStrategy[Any]] = {}


def _schema(url: str, headers: dict[str, str] | None = None) -> st.SearchStrategy[Any]:
    """All operations, positive and negative (built once per server)."""
    if url not in _STRATEGIES:
        httpx.get(url + "/healthz").raise_for_status()
        ops = schemathesis.openapi.from_url(url + "/openapi.json", headers=headers or {})
        _STRATEGIES[url] = st.one_of(
            ops.as_strategy(generation_mode=schemathesis.GenerationMode.POSITIVE),
            ops.as_strategy(generation_mode=schemathesis.GenerationMode.NEGATIVE))
    return _STRATEGIES[url]


KEY_A, KEY_B = "key-of-tenant-a-" + "a" * 32, "key-of-tenant-b-" + "b" * 32


@pytest.fixture(scope="module")
def tenants(tmp_path_factory: pytest.TempPathFactory
            ) -> Iterator[tuple[str, OptimizerService, str]]:
    """A server with tenants a and b; a's session SESSION, and its fingerprint."""
    data_dir: Path = tmp_path_factory.mktemp("fuzz-tenants")
    access = Access.from_mapping({"keys": [
        {"name": "a", "tenant": "a", "role": "read-write", "sha256": hash_key(KEY_A)},
        {"name": "b", "tenant": "b", "role": "read-write", "sha256": hash_key(KEY_B)}]})
    store = SessionStore(CpuBackend(), CheckpointStore(data_dir), Limits(max_state_bytes=16 << 20))
    service = OptimizerService(store)
    service.start()
    a = access.authenticate(f"Bearer {KEY_A}")
    assert a is not None
    service.create(SESSION, CONFIG, caller=a)
    service.checkpoint(SESSION, caller=a)
    fingerprint = str(service.store.get(f"a~{SESSION}").fingerprint())
    with HttpServerThread(create_app(service, max_body_bytes=1 << 20, access=access)) as http:
        yield http.url, service, fingerprint
    assert str(service.store.get(f"a~{SESSION}").fingerprint()) == fingerprint
    # the fuzzer got past the key (negative cases may break the header itself: 401) and
    # met a's session as a missing one
    assert 200 in _SEEN and 404 in _SEEN, _SEEN


_SEEN: set[int] = set()


@settings(max_examples=60, deadline=None, database=None, derandomize=True,
          suppress_health_check=list(HealthCheck))
@given(data=st.data())
def test_another_tenant_cannot_touch_a_session(
        tenants: tuple[str, OptimizerService, str], data: st.DataObject) -> None:
    url, service, fingerprint = tenants
    case = data.draw(_schema(url, {"authorization": f"Bearer {KEY_B}"}), label="case")
    if "session_id" in (case.path_parameters or {}) and data.draw(st.booleans(), label="a's"):
        case.path_parameters["session_id"] = SESSION
    response = case.call_and_validate(base_url=url, checks=[not_a_server_error], timeout=30,
                                      headers={"authorization": f"Bearer {KEY_B}"})
    _SEEN.add(response.status_code)
    assert str(service.store.get(f"a~{SESSION}").fingerprint()) == fingerprint
    assert service.store.get(f"a~{SESSION}").opt.step_count == 0
