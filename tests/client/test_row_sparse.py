"""Row-sparse gradients on every wire (gRPC, HTTP, Flight) against a real server.

A row-sparse gradient carries some rows of a tensor; to a dense algorithm the rows not
sent are zero, so a step from it must equal the step from the dense gradient with
zeros there (bit for bit: the same kernel on the same numbers). The reply can carry
only the rows sent (``return_rows``) and a pull can ask for rows. Bad rows are refused
with the reason, and a refused step changes nothing. Rounds of several workers and
sharded sessions take them too.
"""

from __future__ import annotations

import re
from typing import Any

import httpx
import numpy as np
import pytest

from adamserve_client import errors
from adamserve_client.transports import SessionSpec, TensorSpec, WireTensor, connect
from adamserve_client.transports.base import Workers
from adamserve_client.transports.layout import plan_shards
from adamserve_client.transports.sharded import ShardedTransport

ROWS, WIDTH = 40, 3
SPECS = (TensorSpec("emb", (ROWS, WIDTH)), TensorSpec("bias", (5,)))


def _initial() -> list[WireTensor]:
    rng = np.random.default_rng(0)
    return [WireTensor(t.name, t.shape, "FP32",
                       rng.standard_normal(t.shape).astype("<f4").tobytes()) for t in SPECS]


def _rows(ids: list[int], seed: int = 1) -> tuple[np.ndarray, np.ndarray]:
    rows = np.array(ids, dtype="<i8")
    values = np.random.default_rng(seed).standard_normal((len(ids), WIDTH)).astype("<f4")
    return rows, values


def _sparse(rows: np.ndarray, values: np.ndarray, name: str = "emb") -> WireTensor:
    return WireTensor(name, (ROWS, WIDTH), "FP32", values.tobytes(), rows.tobytes())


def _dense(rows: np.ndarray, values: np.ndarray) -> WireTensor:
    full = np.zeros((ROWS, WIDTH), "<f4")
    full[rows] = values
    return WireTensor("emb", (ROWS, WIDTH), "FP32", full.tobytes())


def _bias(seed: int) -> WireTensor:
    g = np.random.default_rng(seed).standard_normal(5).astype("<f4")
    return WireTensor("bias", (5,), "FP32", g.tobytes())


def _values(w: WireTensor) -> np.ndarray:
    return np.frombuffer(w.data, "<f4").copy()


def _by_name(params: Any) -> dict[str, WireTensor]:
    return {w.name: w for w in params}


def _create(t: Any, sid: str, algorithm: str = "adam", **kw: Any) -> None:
    t.create_session(SessionSpec(sid, algorithm, SPECS, **kw), _initial())


def test_a_row_sparse_step_equals_the_dense_step_with_zeros(url: str, sid: str) -> None:
    with connect(url) as t:
        _create(t, sid + "d")
        _create(t, sid + "s")
        for step, ids in enumerate([[3, 7, 9], [], [0, 39, 7, 12]]):
            rows, values = _rows(ids, step)
            dense = t.step(sid + "d", [_dense(rows, values), _bias(step)])
            sparse = t.step(sid + "s", [_sparse(rows, values), _bias(step)])
            assert sparse.step == dense.step == step + 1
            assert sparse.grad_norm == pytest.approx(dense.grad_norm)
            d, s = _by_name(dense.params), _by_name(sparse.params)
            for name in ("emb", "bias"):
                assert s[name].rows is None
                np.testing.assert_array_equal(_values(s[name]), _values(d[name]))


def test_the_reply_and_a_pull_carry_only_the_rows_asked_for(url: str, sid: str) -> None:
    with connect(url) as t:
        _create(t, sid)
        rows, values = _rows([5, 2, 30])
        whole = _by_name(t.pull(sid))["emb"]
        r = t.step(sid, [_sparse(rows, values), _bias(0)], return_rows=True)
        got = _by_name(r.params)
        assert got["bias"].rows is None and len(_values(got["bias"])) == 5  # sent dense
        assert np.frombuffer(got["emb"].rows, "<i8").tolist() == [2, 5, 30]  # sorted
        after = _by_name(t.pull(sid))["emb"]
        np.testing.assert_array_equal(
            _values(got["emb"]).reshape(3, WIDTH),
            _values(after).reshape(ROWS, WIDTH)[[2, 5, 30]])
        assert not np.array_equal(_values(after), _values(whole))
        pulled = t.pull(sid, rows={"emb": [39, 0, 5]})
        assert [w.name for w in pulled] == ["emb"]
        assert np.frombuffer(pulled[0].rows, "<i8").tolist() == [39, 0, 5]
        np.testing.assert_array_equal(_values(pulled[0]).reshape(3, WIDTH),
                                      _values(after).reshape(ROWS, WIDTH)[[39, 0, 5]])
        both = t.pull(sid, ["bias"], rows={"emb": [1]})
        assert [(w.name, w.rows is None) for w in both] == [("bias", True), ("emb", False)]


BAD = {
    "a row out of range": ([3, 40], "row 40 is out of range; expected rows in [0, 40)"),
    "a negative row": ([-1], "row -1 is out of range"),
    "a row twice": ([4, 8, 4], "row 4 is sent twice"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_rows_are_refused_and_change_nothing(url: str, sid: str, case: str) -> None:
    ids, message = BAD[case]
    with connect(url) as t:
        _create(t, sid)
        before = t.pull(sid)
        rows = np.array(ids, "<i8")
        values = np.ones((len(ids), WIDTH), "<f4")
        with pytest.raises(errors.InvalidArgument, match=re.escape(message)):
            t.step(sid, [_sparse(rows, values), _bias(0)])
        assert t.describe(sid).step == 0
        for a, b in zip(t.pull(sid), before, strict=True):
            np.testing.assert_array_equal(_values(a), _values(b))


def test_values_of_the_wrong_row_width_are_refused(live: Any, sid: str) -> None:
    """Checked by the client before sending, and by the server for any client."""
    with connect(live.urls["grpc"]) as t:
        _create(t, sid)
        rows = np.array([1, 2], "<i8")
        wrong = WireTensor("emb", (ROWS, WIDTH), "FP32", np.ones(5, "<f4").tobytes(),
                           rows.tobytes())
        with pytest.raises(ValueError, match="2 rows of shape \\[3\\]"):
            t.step(sid, [wrong])
    response = httpx.post(f"{live.urls['http']}/v2/sessions/{sid}/step", json={
        "gradients": [{"name": "emb", "shape": [ROWS, WIDTH], "rows": [1, 2],
                       "data": [1.0] * 5}]})
    assert response.status_code == 400
    assert "data has 5 values; 2 rows of shape [40, 3] need 6" in response.text


def test_rows_of_a_scalar_and_row_sparse_parameters_are_refused(live: Any, sid: str) -> None:
    base = live.urls["http"] + f"/v2/sessions/{sid}"
    with connect(live.urls["grpc"]) as t:
        t.create_session(SessionSpec(sid, "adam", (*SPECS, TensorSpec("s", ()))))
    scalar = httpx.post(base + "/step", json={
        "gradients": [{"name": "s", "shape": [], "rows": [0], "data": [1.0]}]})
    assert scalar.status_code == 400 and "a scalar has no rows" in scalar.text
    params = httpx.put(base + "/params", json={
        "values": [{"name": "emb", "shape": [ROWS, WIDTH], "rows": [0], "data": [1.0] * 3}]})
    assert params.status_code == 400
    assert "row-sparse chunks carry gradients (Step, Push) only" in params.text
    assert int(httpx.get(base).json()["step"]) == 0


def test_curl_sends_rows_as_json_numbers(live: Any, sid: str) -> None:
    """The HTTP API's JSON form: rows and their values as numbers, rows back too."""
    with connect(live.urls["grpc"]) as t:
        _create(t, sid)
    base = live.urls["http"] + f"/v2/sessions/{sid}"
    r = httpx.post(base + "/step", json={
        "gradients": [{"name": "emb", "shape": [ROWS, WIDTH], "rows": [7, 1],
                       "data": [0.5] * 6}], "return_rows": True})
    assert r.status_code == 200, r.text
    emb = next(p for p in r.json()["params"] if p["name"] == "emb")
    assert emb["rows"] == [1, 7] and len(emb["data"]) == 6
    pulled = httpx.post(base + "/pull", json={"rows": [{"name": "emb", "rows": [7]}]}).json()
    assert pulled["params"][0]["rows"] == [7]
    assert pulled["params"][0]["data"] == emb["data"][3:]


def test_a_large_row_sparse_step_goes_in_several_messages(url: str, sid: str) -> None:
    """Beyond one message (and the small-step path): whole rows per chunk."""
    n, width = 4096, 512  # 8 MiB of float32 rows
    with connect(url) as t:
        t.create_session(SessionSpec(sid, "adam", (TensorSpec("big", (n, width)),)))
        twin = sid + "-dense"
        t.create_session(SessionSpec(twin, "adam", (TensorSpec("big", (n, width)),)))
        rows = np.arange(0, n, 2, dtype="<i8")
        values = np.random.default_rng(3).standard_normal((len(rows), width)).astype("<f4")
        full = np.zeros((n, width), "<f4")
        full[rows] = values
        sparse = t.step(sid, [WireTensor("big", (n, width), "FP32", values.tobytes(),
                                         rows.tobytes())], return_rows=True)
        dense = t.step(twin, [WireTensor("big", (n, width), "FP32", full.tobytes())])
        got = sparse.params[0]
        assert np.array_equal(np.frombuffer(got.rows, "<i8"), rows)
        np.testing.assert_array_equal(
            _values(got).reshape(-1, width), _values(dense.params[0]).reshape(n, width)[rows])


def test_rounds_of_row_sparse_pushes_take_the_mean(live: Any, sid: str) -> None:
    """Two workers' row-sparse pushes: the step of the mean, rows one did not send
    counting as zero (as two dense pushes with zeros there)."""
    with connect(live.urls["grpc"]) as t:
        _create(t, sid + "s", workers=Workers(count=2))
        _create(t, sid + "d", workers=Workers(count=2))
        a, b = _rows([1, 2], 1), _rows([2, 9], 2)
        for rows, values in (a, b):
            t.push(sid + "s", [_sparse(rows, values), _bias(0)])
            t.push(sid + "d", [_dense(rows, values), _bias(0)])
        s, d = t.pull(sid + "s", min_step=1), t.pull(sid + "d", min_step=1)
        for x, y in zip(s, d, strict=True):
            np.testing.assert_array_equal(_values(x), _values(y))


@pytest.mark.parametrize("skip_nonfinite", [True, False], ids=["two-phase", "direct"])
def test_sharded_sessions_route_rows_to_their_shards(shard_servers: list[Any], live: Any,
                                                     sid: str, skip_nonfinite: bool) -> None:
    """Adagrad (which torch steps from sparse gradients) over three shards cut between
    rows: each shard gets the rows it holds; the model equals one server's. With
    skip_nonfinite the shards' steps are two-phase (sums exchanged, then committed)."""
    plan = plan_shards(SPECS, 3, split_elements=8, rows=lambda t: True)
    emb = [p for shard in plan.shards for p in shard if p.parent == 0]
    assert len(emb) == 3 and all(p.spec.shape[1:] == (WIDTH,) for p in emb)
    assert all(p.start % WIDTH == 0 for p in emb)
    sharded = ShardedTransport([connect(s.urls["grpc"]) for s in shard_servers],
                               split_elements=8)
    with connect(live.urls["flight"]) as one, sharded:
        _create(sharded, sid, "adagrad", skip_nonfinite=skip_nonfinite)
        _create(one, sid, "adagrad", skip_nonfinite=skip_nonfinite)
        for step, ids in enumerate([[0, 13, 39], [20], []]):
            rows, values = _rows(ids, step)
            got = sharded.step(sid, [_sparse(rows, values), _bias(step)], return_rows=True)
            ref = one.step(sid, [_sparse(rows, values), _bias(step)], return_rows=True)
            g, r = _by_name(got.params), _by_name(ref.params)
            assert np.frombuffer(g["emb"].rows, "<i8").tolist() == sorted(ids)
            np.testing.assert_array_equal(_values(g["emb"]), _values(r["emb"]))
        for x, y in zip(sharded.pull(sid), one.pull(sid), strict=True):
            np.testing.assert_array_equal(_values(x), _values(y))
        pulled = sharded.pull(sid, rows={"emb": [39, 0, 20]})
        assert np.frombuffer(pulled[0].rows, "<i8").tolist() == [39, 0, 20]
        np.testing.assert_array_equal(
            _values(pulled[0]),
            _values(_by_name(one.pull(sid))["emb"]).reshape(ROWS, WIDTH)[[39, 0, 20]].ravel())


def test_a_pull_asks_for_each_row_once(url: str, sid: str) -> None:
    """A pull's answer is never larger than the session: repeated rows, or a tensor
    named twice, are refused."""
    with connect(url) as t:
        _create(t, sid)
        with pytest.raises(errors.InvalidArgument, match="row 3 is asked for twice"):
            t.pull(sid, rows={"emb": [3, 1, 3]})
    if url.startswith("http"):
        r = httpx.post(f"{url}/v2/sessions/{sid}/pull", json={
            "rows": [{"name": "emb", "rows": [1]}, {"name": "emb", "rows": [2]}]})
        assert r.status_code == 400 and "named twice" in r.text


def test_a_tensor_of_no_rows_steps_and_pulls_row_sparse(url: str, sid: str) -> None:
    with connect(url) as t:
        t.create_session(SessionSpec(sid, "sparse_adam", (TensorSpec("e", (0, 3)),
                                                          TensorSpec("f", (4, 3)))))
        empty = WireTensor("e", (0, 3), "FP32", b"", b"")
        rows, values = _rows([2])
        r = t.step(sid, [empty, WireTensor("f", (4, 3), "FP32", values.tobytes(),
                                           rows.tobytes())], return_rows=True)
        got = _by_name(r.params)
        assert r.step == 1 and got["e"].rows == b"" and got["e"].data == b""
        assert np.frombuffer(got["f"].rows, "<i8").tolist() == [2]
        assert t.pull(sid, rows={"e": []})[0].data == b""
        assert t.describe(sid).step == 1
