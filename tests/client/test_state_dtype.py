"""Narrow moments (``state_dtype="bfloat16"`` / ``"int8"``) through the client, on every
transport against one real server.

Each algorithm that keeps narrow moments trains 20 steps beside a float32-state twin
and stays close to it (the quantisation's error, not a different rule); ``describe()``
reports the bytes the moments really take; the torch-format state_dict is dequantised
and loads into torch.optim, a torch state_dict loaded into an int8 session is
quantised, the native form round-trips exactly, a session grows, and what cannot be
kept narrow is refused with a message naming it.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch

import adamserve_client as ac
from adamserve.engine import quantize
from tests.client.conftest import Live

SHAPES = [(64, 80), (300,)]  # 5120 elements (quantised) and 300 (kept float32)
STEPS = 20

# (client class, its arguments): every algorithm that keeps narrow moments
CASES: dict[str, tuple[type[Any], dict[str, Any]]] = {
    "adam": (ac.Adam, {"lr": 1e-2}),
    "adamw": (ac.AdamW, {"lr": 1e-2, "weight_decay": 0.1}),
    "amsgrad": (ac.Adam, {"lr": 1e-2, "amsgrad": True}),
    "nadam": (ac.NAdam, {"lr": 1e-2}),
    "radam": (ac.RAdam, {"lr": 1e-2}),
    "adamax": (ac.Adamax, {"lr": 1e-2}),
    "lamb": (ac.LAMB, {"lr": 1e-2, "weight_decay": 0.01}),
}
# the largest |p - p_float32| over the largest |p_float32 - p_0| after STEPS steps
DRIFT = {"bfloat16": 0.02, "int8": 0.1}


def make_params(seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=g) for s in SHAPES]


def train(cls: type[Any], kwargs: dict[str, Any], url: str, state_dtype: str | None,
          steps: int = STEPS) -> tuple[list[torch.Tensor], Any]:
    params = make_params()
    opt = cls(params, server=url, state_dtype=state_dtype, **kwargs)
    for step in range(steps):
        g = torch.Generator().manual_seed(100 + step)
        for p in params:
            p.grad = torch.randn(p.shape, generator=g) * (1 + step % 3)
        opt.step()
    return params, opt


@pytest.mark.parametrize("state_dtype", ["bfloat16", "int8"])
@pytest.mark.parametrize("name", list(CASES))
def test_close_to_float32_state(name: str, state_dtype: str, url: str) -> None:
    cls, kwargs = CASES[name]
    start = make_params()
    plain, popt = train(cls, kwargs, url, None)
    narrow, nopt = train(cls, kwargs, url, state_dtype)
    try:
        for p0, p, q in zip(start, plain, narrow, strict=True):
            moved = float((p - p0).abs().max())
            assert moved > 1e-3
            drift = float((q - p).abs().max()) / moved
            assert drift <= DRIFT[state_dtype], (name, state_dtype, drift)
        info = nopt.describe()
        assert info.state_dtype == state_dtype and popt.describe().state_dtype == "float32"
    finally:
        popt.close()
        nopt.close()


def test_bytes_per_parameter(live: Live) -> None:
    """Adam's moments: 8 bytes a parameter in float32, 4 in bfloat16, about 2.03 in int8
    (one code each, a float32 scale per 256), the master's 4 beside them."""
    n = 1 << 20
    p = torch.zeros(n)
    seen = {}
    for state_dtype in ("float32", "bfloat16", "int8"):
        opt = ac.Adam([p], server=live.urls["grpc"], state_dtype=state_dtype)
        try:
            info = opt.describe()
            seen[state_dtype] = (info.moment_bytes / n, info.bytes_per_parameter)
        finally:
            opt.close()
    assert seen["float32"] == (8.0, 12.0)
    assert seen["bfloat16"][0] <= 4.1 and seen["bfloat16"][1] <= 8.1
    assert seen["int8"][0] <= 2.1 and seen["int8"][1] <= 6.1


def test_state_dict_dequantised_loads_into_torch(url: str) -> None:
    """The torch-format state_dict holds float32 moments of torch's shapes: torch.optim
    loads it and steps on from it like the server does."""
    params, opt = train(ac.AdamW, {"lr": 1e-2}, url, "int8", steps=3)
    try:
        sd = opt.state_dict()
        for entry in sd["state"].values():
            for slot in ("exp_avg", "exp_avg_sq"):
                assert entry[slot].dtype == torch.float32
        mirror = [p.detach().clone().requires_grad_() for p in params]
        ref = torch.optim.AdamW(mirror, lr=1e-2)
        ref.load_state_dict(sd)
        for p, q in zip(params, mirror, strict=True):
            p.grad = torch.ones_like(p)
            q.grad = torch.ones_like(q)
        opt.step()
        ref.step()
        for p, q in zip(params, mirror, strict=True):
            # the server's moments are requantised after the step; torch's stay float32
            assert torch.allclose(p, q.detach(), atol=2e-3)
    finally:
        opt.close()


def test_torch_state_dict_quantised_on_import(live: Live) -> None:
    """A torch state_dict loaded into an int8 session is quantised: exported again, each
    moment is the block-wise quantisation of the one loaded."""
    params = make_params()
    ref = torch.optim.Adam([p.clone().requires_grad_() for p in params], lr=1e-2)
    for group in ref.param_groups:
        for p in group["params"]:
            p.grad = torch.randn(p.shape)
    ref.step()
    opt = ac.Adam(params, server=live.urls["http"], lr=1e-2, state_dtype="int8")
    try:
        opt.load_state_dict(ref.state_dict())
        back = opt.state_dict()["state"]
        for i in range(len(SHAPES)):
            for slot in ("exp_avg", "exp_avg_sq"):
                given = ref.state_dict()["state"][i][slot].numpy().reshape(-1)
                got = back[i][slot].numpy().reshape(-1)
                if given.size < quantize.MIN_QUANTIZED:
                    np.testing.assert_array_equal(got, given)  # small tensors: float32
                    continue
                codes, scales = quantize.quantize_tensor_ref(given, slot == "exp_avg")
                want = quantize.dequantize_tensor_ref(codes, scales, slot == "exp_avg")
                np.testing.assert_array_equal(got, want)
    finally:
        opt.close()


@pytest.mark.parametrize("state_dtype", ["bfloat16", "int8"])
def test_native_export_round_trips(state_dtype: str, live: Live) -> None:
    """The native form keeps the stored moments (codes and scales, or bfloat16 bits):
    imported into a fresh session of the same state dtype they are the same bytes."""
    _, opt = train(ac.Adam, {"lr": 1e-2}, live.urls["grpc"], state_dtype, steps=3)
    other = ac.Adam(make_params(1), server=live.urls["grpc"], lr=1e-2, state_dtype=state_dtype)
    try:
        native = opt.transport.export_state(opt.session_id, native=True)
        entry = native["state"][0]
        if state_dtype == "int8":
            assert entry["exp_avg.codes"].dtype == np.uint8
            assert entry["exp_avg.codes"].shape == SHAPES[0]
            assert entry["exp_avg.scale"].shape == (-(-64 * 80 // quantize.QBLOCK),)
            assert native["state"][1]["exp_avg"].dtype == np.float32  # a small tensor
        else:
            assert entry["exp_avg.bf16"].dtype == np.uint16
        other.transport.import_state(other.session_id, native)
        again = other.transport.export_state(other.session_id, native=True)
        for i, e in native["state"].items():
            for key, value in e.items():
                np.testing.assert_array_equal(np.asarray(again["state"][i][key]),
                                              np.asarray(value), err_msg=key)
    finally:
        opt.close()
        other.close()


def test_checkpoint_keeps_the_stored_form(live: Live) -> None:
    """A checkpoint holds the codes and scales: restored, the session's state is the
    same bytes (its fingerprint), its native export unchanged."""
    params, opt = train(ac.Adam, {"lr": 1e-2}, live.urls["grpc"], "int8", steps=3)
    try:
        sid = opt.session_id
        with live.service.store.locked(sid) as s:
            before = s.fingerprint()
        native = opt.transport.export_state(sid, native=True)
        opt.checkpoint()
        for p in params:
            p.grad = torch.ones_like(p)
        opt.step()
        assert opt.restore_checkpoint() == 3
        with live.service.store.locked(sid) as s:
            assert s.fingerprint() == before
            assert s.opt.state_dtype == "int8"
        again = opt.transport.export_state(sid, native=True)
        for key, value in native["state"][0].items():
            np.testing.assert_array_equal(np.asarray(again["state"][0][key]), value)
    finally:
        opt.close()


def test_grows_keeping_its_codes(live: Live) -> None:
    params, opt = train(ac.Adam, {"lr": 1e-2}, live.urls["grpc"], "int8", steps=2)
    try:
        before = opt.transport.export_state(opt.session_id, native=True)["state"][0]
        extra = torch.zeros(5000, requires_grad=True)
        opt.add_param_group({"params": [extra]})
        after = opt.transport.export_state(opt.session_id, native=True)["state"][0]
        for key in before:
            np.testing.assert_array_equal(np.asarray(after[key]), np.asarray(before[key]))
        for p in [*params, extra]:
            p.grad = torch.ones_like(p)
        opt.step()
        assert float(extra.detach().abs().max()) > 0
    finally:
        opt.close()


@pytest.mark.parametrize(("make", "message"), [
    (lambda url: ac.Adam(make_params(), server=url, state_dtype="int8",
                         master_dtype="float64"), "needs a float32 master"),
    (lambda url: ac.RemoteOptimizer(make_params(), "adagrad", server=url, state_dtype="int8"),
     "adagrad keeps its state in the master dtype"),
    (lambda url: ac.RemoteOptimizer(make_params(), "rmsprop", server=url,
                                    state_dtype="bfloat16"), "rmsprop keeps its state"),
])
def test_refused(make: Any, message: str, url: str) -> None:
    with pytest.raises(ac.errors.InvalidArgument, match=message):
        make(url)


def test_unknown_state_dtype_refused_by_the_client(live: Live) -> None:
    with pytest.raises(ValueError, match="state_dtype 'int4': expected one of"):
        ac.Adam(make_params(), server=live.urls["grpc"], state_dtype="int4")


@pytest.mark.parametrize(("body", "message"), [
    ({"state_dtype": "STATE_DTYPE_INT4"}, "unknown StateDtype 'STATE_DTYPE_INT4'"),
    ({"state_dtype": "STATE_DTYPE_INT8", "algorithm": "ALGORITHM_ADAGRAD"},
     "state_dtype int8: kept for"),
    ({"state_dtype": "STATE_DTYPE_BFLOAT16", "dtype": "STATE_DTYPE_FLOAT64"},
     "needs a float32 master"),
    ({"dtype": "STATE_DTYPE_INT8"}, "dtype: expected float32 or float64"),
    ({"state_dtype": "STATE_DTYPE_FLOAT64"}, "kept in the master dtype"),
])
def test_http_refusals_name_the_field(body: dict[str, Any], message: str, live: Live) -> None:
    """Over raw HTTP: a 400 whose message names what was wrong, and no session."""
    import httpx

    spec = {"session_id": "narrow-refused", "algorithm": "ALGORITHM_ADAM",
            "tensors": [{"name": "w", "shape": [8]}], **body}
    r = httpx.post(live.urls["http"] + "/v2/sessions", json=spec)
    assert r.status_code == 400, r.text
    assert message in r.text
    assert httpx.get(live.urls["http"] + "/v2/sessions/narrow-refused").status_code == 404


def test_http_describe_and_native_export(live: Live) -> None:
    import httpx

    base = live.urls["http"] + "/v2/sessions"
    spec = {"session_id": "narrow-http", "algorithm": "ALGORITHM_ADAMW",
            "state_dtype": "STATE_DTYPE_INT8", "tensors": [{"name": "w", "shape": [8192]}]}
    r = httpx.post(base, json=spec)
    assert r.status_code == 201, r.text
    try:
        info = r.json()
        assert info["state_dtype"] == "STATE_DTYPE_INT8"
        assert info["semantics"] == "SEMANTICS_TORCH"
        assert info["moment_bytes"] == 2 * (8192 + 4 * 32) + 16 * 3 * 1  # codes, scales, table
        assert 6.0 < info["bytes_per_parameter"] <= 6.1
        native = httpx.get(base + "/narrow-http/state", params={"format": "STATE_FORMAT_NATIVE"})
        assert native.status_code == 200 and b"state_dict/1" in native.content
        bad = httpx.get(base + "/narrow-http/state", params={"format": "STATE_FORMAT_ZIP"})
        assert bad.status_code in (400, 422) and "STATE_FORMAT_ZIP" in bad.text
    finally:
        httpx.delete(base + "/narrow-http")


@pytest.mark.parametrize("state_dtype", ["bfloat16", "int8"])
def test_import_turning_amsgrad_on_refuses_non_finite_moments(state_dtype: str,
                                                              live: Live) -> None:
    """A state_dict whose groups turn amsgrad on brings a slot the session does not hold
    yet: its NaN is refused like any moment's, and nothing changes."""
    params = make_params()
    ref = torch.optim.Adam([p.clone().requires_grad_() for p in params], lr=1e-2, amsgrad=True)
    for p in ref.param_groups[0]["params"]:
        p.grad = torch.randn(p.shape)
    ref.step()
    sd = ref.state_dict()
    sd["state"][0]["max_exp_avg_sq"][0, 0] = float("nan")
    opt = ac.Adam(params, server=live.urls["grpc"], lr=1e-2, state_dtype=state_dtype)
    try:
        before = opt.state_dict()
        with pytest.raises(ac.errors.InvalidArgument, match="max_exp_avg_sq holds NaN or Inf"):
            opt.load_state_dict(sd)
        assert opt.state_dict()["param_groups"][0]["amsgrad"] is False
        assert opt.state_dict()["state"] == before["state"]
    finally:
        opt.close()
