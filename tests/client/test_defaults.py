"""The torch-signature classes: torch's arguments, and every default from the one table.

``adamserve_proto.algorithms`` holds each algorithm's hyperparameters and defaults
(the server's engine reads the same table). Here: each class's signature is
torch.optim's (names, kinds, order, default values and their types) followed by the
adamserve options, and each default is the table's, so the table is torch's.
"""

from __future__ import annotations

import inspect
from typing import Any

import pytest

import adamserve_client as ac
from adamserve_proto.algorithms import ALGORITHMS, CHOICES, SWITCHES, TUPLES

torch = pytest.importorskip("torch")

CLASSES = {"Adam": "adam", "AdamW": "adamw", "NAdam": "nadam", "RAdam": "radam",
           "Adamax": "adamax", "Adagrad": "adagrad", "RMSprop": "rmsprop", "LAMB": "lamb",
           "Muon": "muon", "Adafactor": "adafactor"}
# what the classes add to torch's arguments, all keyword-only and None by default
OPTIONS = ("server", "session", "token", "wire_dtype", "master_dtype", "schedule", "timeout",
           "workers", "worker_id", "shared_memory")
# and, where the moments may be kept narrow, state_dtype
NARROW = {"Adam", "AdamW", "NAdam", "RAdam", "Adamax", "LAMB"}


def options(name: str) -> list[str]:
    return [*OPTIONS, "state_dtype"] if name in NARROW else list(OPTIONS)


def _arguments(cls: type) -> list[tuple[str, Any, Any, type]]:
    """(name, kind, default, type of the default) of each argument but ``params``."""
    return [(p.name, p.kind, p.default, type(p.default))
            for p in inspect.signature(cls).parameters.values() if p.name != "params"]


@pytest.mark.parametrize("name", [n for n in CLASSES if n != "LAMB"])
def test_signature_is_torchs_then_the_options(name: str) -> None:
    ours = _arguments(getattr(ac, name))
    theirs = _arguments(getattr(torch.optim, name))
    assert ours[:len(theirs)] == theirs
    assert [a[0] for a in ours[len(theirs):]] == options(name)


@pytest.mark.parametrize("name", [n for n in CLASSES if n != "LAMB"])
def test_the_table_names_torchs_class_and_the_switches_it_takes(name: str) -> None:
    row = ALGORITHMS[CLASSES[name]]
    theirs = {a[0] for a in _arguments(getattr(torch.optim, name))}
    ours = {a[0] for a in _arguments(getattr(ac, name))}
    assert row.torch_class == name
    assert row.switches == theirs & set(SWITCHES) == ours & set(SWITCHES)


@pytest.mark.parametrize("name", list(CLASSES))
def test_every_default_is_the_tables(name: str) -> None:
    row = ALGORITHMS[CLASSES[name]]
    for arg, kind, default, _ in _arguments(getattr(ac, name)):
        if arg in options(name):
            assert kind is inspect.Parameter.KEYWORD_ONLY and default is None, arg
            continue
        table = row.defaults if arg in row.defaults else SWITCHES
        assert arg in table, f"{name}({arg}=...) has no row in the table"
        assert default is table[arg], arg
    # and no hyperparameter of the table's row is missing from the signature, but
    # AdamW's decoupled_weight_decay, which torch's AdamW sets and does not take
    args = {a[0] for a in _arguments(getattr(ac, name))}
    missing = set(row.defaults) - args
    assert missing == ({"decoupled_weight_decay"} if name == "AdamW" else set())


def test_lamb_defaults_are_optaxs() -> None:
    # optax.lamb(learning_rate, b1=0.9, b2=0.999, eps=1e-6, eps_root=0.0, weight_decay=0.0)
    assert dict(ALGORITHMS["lamb"].defaults) == {
        "lr": 1e-3, "betas": (0.9, 0.999), "eps": 1e-6, "weight_decay": 0.0,
        "maximize": False, "bias_correction": True}


def test_aliases_run_their_algorithm_with_the_option_set() -> None:
    amsgrad = ALGORITHMS["amsgrad"]
    assert (amsgrad.runs, dict(amsgrad.options)) == ("adam", {"amsgrad": True})
    assert dict(amsgrad.defaults) == {**ALGORITHMS["adam"].defaults, "amsgrad": True}
    # optax's nadam and nadamw are its adam and adamw with nesterov, as optax writes them
    assert {row.name: (row.runs, dict(row.options)) for row in ALGORITHMS.values()
            if row.runs != row.name and row.name != "amsgrad"} == {
        "optax.nadam": ("optax.adam", {"nesterov": True}),
        "optax.nadamw": ("optax.adamw", {"nesterov": True})}


def test_the_engine_reads_the_same_table() -> None:
    alg = pytest.importorskip("adamserve.engine.algorithms")
    for row in ALGORITHMS.values():
        if row.name != row.runs:
            assert alg.ALIASES[row.name] == (alg.Algorithm(row.runs), dict(row.options))
            continue
        spec = alg.SPECS[alg.Algorithm(row.name)]
        flat = dict(spec.defaults)
        wire = row.wire_defaults()
        for name, members in TUPLES.items():  # the engine keeps a tuple's members
            if isinstance(wire.get(name), tuple):
                kept = tuple(flat.pop(m) for m in members)  # None as NaN (Adafactor's eps1)
                assert [None if v != v else v for v in kept] == list(wire.pop(name)), name
        for key, choices in CHOICES.items():  # and a choice's index (Muon's adjust_lr_fn)
            if key in wire:
                assert choices[int(flat.pop(key))] == wire.pop(key), key
        # a nullable number's None (optax.adafactor's learning_rate, ...) kept as NaN
        assert {k: None if k in row.nullable and v != v else v for k, v in flat.items()} == (
            wire), row.name
        assert all(type(flat[k]) is type(v) for k, v in wire.items() if v is not None), row.name
