"""adamserve_client.optax: optax's aliases through a real server, against optax on jax's CPU.

Each of the nine aliases, float32 and float64 (jax with x64 on), 30 steps of NumPy
parameters in two groups of different hyperparameters (optax.multi_transform on the
oracle's side, its update under jax.jit), over gRPC; Adafactor's None values and
Adam over HTTP and Arrow Flight too. Then the constructors' signatures (optax's names,
defaults and keyword-only arguments) and what the client refuses before any call.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest

from adamserve_client import optax as remote
from tests.client.conftest import Live

jax = pytest.importorskip("jax", reason="jax is the oracle of semantics='optax'")
jnp = pytest.importorskip("jax.numpy")
optax = pytest.importorskip("optax")

STEPS = 30
TOL = {"float32": 1e-5, "float64": 1e-12}
TENSORS = (("w", (130, 160), 0), ("b", (7,), 0), ("t", (140, 3, 129), 1), ("k", (3, 4, 5), 1))
ALIASES = ("adam", "adamw", "nadam", "nadamw", "radam", "amsgrad", "adamax", "lamb",
           "adafactor")

# (alias, group 0, group 1): non-default hyperparameters, different per group
CASES: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {
    "adam": ({"learning_rate": 3e-3, "eps_root": 1e-6},
             {"learning_rate": 1e-2, "b1": 0.8, "nesterov": True, "mu_dtype": "float32"}),
    "adamw": ({"learning_rate": 3e-3, "weight_decay": 0.05},
              {"learning_rate": 1e-2, "nesterov": True, "eps_root": 1e-8}),
    "nadam": ({"learning_rate": 3e-3}, {"learning_rate": 1e-2, "b2": 0.99}),
    "nadamw": ({"learning_rate": 3e-3, "weight_decay": 0.1}, {"learning_rate": 1e-2}),
    "radam": ({"learning_rate": 3e-3}, {"learning_rate": 1e-2, "b2": 0.99, "nesterov": True}),
    "amsgrad": ({"learning_rate": 3e-3, "eps_root": 1e-8},
                {"learning_rate": 1e-2, "bias_correction_nu": False}),
    "adamax": ({"learning_rate": 3e-3}, {"learning_rate": 1e-2, "b1": 0.8}),
    "lamb": ({"learning_rate": 3e-3, "weight_decay": 0.01}, {"learning_rate": 1e-2}),
    "adafactor": ({"learning_rate": 1e-2, "momentum": 0.9, "weight_decay_rate": 1e-3},
                  {"learning_rate": 3e-2, "clipping_threshold": None,
                   "multiply_by_parameter_scale": False}),
}


@pytest.fixture(params=["float32", "float64"])
def dtype(request: pytest.FixtureRequest) -> Iterator[str]:
    """The parameters' dtype (the session's), with jax's x64 mode on for float64."""
    x64 = bool(jax.config.jax_enable_x64)
    jax.config.update("jax_enable_x64", request.param == "float64")
    try:
        yield str(request.param)
    finally:
        jax.config.update("jax_enable_x64", x64)


def _oracle(alias: str, group: dict[str, Any]) -> Any:
    args = {k: getattr(jnp, v) if k in ("mu_dtype", "dtype_momentum") and v else v
            for k, v in group.items()}
    return getattr(optax, alias)(**args)


def _run(alias: str, groups: tuple[dict[str, Any], dict[str, Any]], dtype: str,
         url: str, sid: str) -> float:
    """Both optimizers 30 steps on the same gradients; the largest parameter difference."""
    rng = np.random.default_rng(len(alias))
    ours = {n: rng.standard_normal(s).astype(dtype) for n, s, _ in TENSORS}
    params = {n: jnp.asarray(v) for n, v in ours.items()}
    members = [[ours[n] for n, _, g in TENSORS if g == i] for i in (0, 1)]
    make = getattr(remote, alias)
    first = {k: v for k, v in groups[0].items() if k != "learning_rate"}
    opt = make([{"params": members[0], **first}, {"params": members[1], **groups[1]}],
               groups[0].get("learning_rate"), server=url, session=sid)
    tx = optax.multi_transform({f"g{i}": _oracle(alias, groups[i]) for i in (0, 1)},
                               {n: f"g{g}" for n, _, g in TENSORS})
    state = tx.init(params)
    update = jax.jit(tx.update)
    try:
        for _ in range(STEPS):
            grads = {n: rng.standard_normal(s).astype(dtype) for n, s, _ in TENSORS}
            opt.step([grads[n] for n, _, g in sorted(TENSORS, key=lambda t: t[2])])
            updates, state = update({n: jnp.asarray(v) for n, v in grads.items()}, state,
                                    params)
            params = optax.apply_updates(params, updates)
        assert opt.describe().step == STEPS
    finally:
        opt.close(delete=True)
    return max(float(np.abs(ours[n] - np.asarray(params[n])).max()) for n in ours)


@pytest.mark.parametrize("alias", ALIASES)
def test_alias_equals_optax_over_grpc(alias: str, dtype: str, live: Live, sid: str) -> None:
    diff = _run(alias, CASES[alias], dtype, live.urls["grpc"], sid)
    print(f"optax.{alias} {dtype} through the server: max |ours - optax| = {diff:.2e}")
    assert diff <= TOL[dtype], f"{alias} {dtype}: {diff:.3e}"


@pytest.mark.parametrize("transport", ["http", "flight"])
@pytest.mark.parametrize("alias", ["adam", "adafactor"])
def test_other_transports(alias: str, transport: str, live: Live, sid: str) -> None:
    """Adafactor's None values (its defaults: learning_rate, momentum, weight_decay_rate)
    travel as unset on every wire; here with the parameter scale off (steps of RMS 1)."""
    groups = ({"multiply_by_parameter_scale": False},
              {"clipping_threshold": None, "learning_rate": 1e-2}) \
        if alias == "adafactor" else CASES[alias]
    x64 = bool(jax.config.jax_enable_x64)
    jax.config.update("jax_enable_x64", False)
    try:
        diff = _run(alias, groups, "float32", live.urls[transport], sid)
    finally:
        jax.config.update("jax_enable_x64", x64)
    assert diff <= TOL["float32"], f"{alias} over {transport}: {diff:.3e}"


@pytest.mark.parametrize("alias", ALIASES)
def test_signatures_are_optaxs(alias: str) -> None:
    theirs = [p for p in inspect.signature(getattr(optax, alias)).parameters.values()
              if p.name not in ("mask", "weight_decay_mask")]
    ours = list(inspect.signature(getattr(remote, alias)).parameters.values())
    assert ours[0].name == "params"
    assert [p.name for p in ours[1:len(theirs) + 1]] == [p.name for p in theirs]
    for a, b in zip(ours[1:], theirs, strict=False):
        assert a.kind == b.kind, a.name
        expected = b.default
        if a.name in ("mu_dtype", "dtype_momentum") and expected is not None:
            expected = jnp.dtype(expected).name
        assert a.default == expected, a.name
    assert [p.name for p in ours[len(theirs) + 1:]] == ["server", "options"]


def test_what_the_client_refuses_before_any_call() -> None:
    w = np.zeros((2, 2), np.float32)
    with pytest.raises(TypeError, match="learning_rate"):
        remote.adam([w])
    with pytest.raises(TypeError, match="adam\\(\\) got an unexpected keyword argument 'foreach'"):
        remote.adam([w], 1e-3, foreach=True)
    with pytest.raises(ValueError, match="state_dtype='bfloat16'"):
        remote.adam([w], 1e-3, mu_dtype=jnp.bfloat16)
    with pytest.raises(ValueError, match="mu_dtype: expected None, 'float32' or 'float64'"):
        remote.amsgrad([w], 1e-3, mu_dtype="float16")
    with pytest.raises(ValueError, match=r"unknown hyperparameter.*'lr'"):
        remote.lamb([w], 1e-3, lr=1e-3)


def test_a_dtype_object_is_sent_by_name(live: Live, sid: str) -> None:
    w = np.ones((2, 2), np.float32)
    opt = remote.adam([w], 1e-2, mu_dtype=jnp.float32, server=live.urls["grpc"], session=sid)
    try:
        assert opt.param_groups[0]["mu_dtype"] == "float32"
        opt.step([np.ones((2, 2), np.float32)])
        assert opt.state_dict()["state"][0]["mu"].shape == (2, 2)
    finally:
        opt.close(delete=True)
