"""adamserve_proto.convert: the conversions both sides share, on their own."""

from __future__ import annotations

import math
from typing import Any

import pytest
from google.protobuf import json_format
from google.protobuf.duration_pb2 import Duration

from adamserve_proto import convert
from adamserve_proto.algorithms import join_betas, split_betas, wire_value
from adamserve_proto.v2 import optimizer_pb2 as pb


def test_short_names_both_ways() -> None:
    for enum in (convert.ALGORITHM, convert.STATE_DTYPE, convert.WORKER_MODE,
                 convert.STRAGGLER_POLICY, convert.BACKEND, convert.ANNEAL_STRATEGY):
        for short in enum.shorts:
            assert enum.short(enum.number(short, "f"), "f") == short
    assert convert.ALGORITHM.number(" AdamW ", "algorithm") == pb.ALGORITHM_ADAMW
    assert convert.STATE_DTYPE.short(0, "dtype") == "float32"  # UNSPECIFIED: the default
    assert convert.BACKEND.number("", "backend") == pb.BACKEND_UNSPECIFIED
    with pytest.raises(ValueError, match=r"^algorithm: unknown algorithm 'sgd'; expected one "
                                         r"of adam, adamw, amsgrad"):
        convert.ALGORITHM.number("sgd", "algorithm")
    with pytest.raises(ValueError, match=r"^dtype: unknown state dtype 'int4'"):
        convert.STATE_DTYPE.number("int4", "dtype")
    with pytest.raises(ValueError, match=r"^algorithm: not set \(ALGORITHM_UNSPECIFIED\)"):
        convert.ALGORITHM.short(0, "algorithm")
    with pytest.raises(ValueError, match=r"^workers.mode: unknown WorkerMode value 9"):
        convert.WORKER_MODE.short(9, "workers.mode")


def test_durations() -> None:
    assert convert.duration(2.25) == Duration(seconds=2, nanos=250_000_000)
    assert convert.seconds(Duration(seconds=2, nanos=250_000_000), "t") == 2.25
    with pytest.raises(ValueError, match=r"^t: negative duration"):
        convert.seconds(convert.duration(-1.0), "t")
    with pytest.raises(ValueError, match=r"^w: expected a finite number of seconds"):
        convert.duration(math.inf, "w")


def test_groups_and_betas() -> None:
    torch_style = {"lr": 0.01, "betas": (0.8, 0.9), "amsgrad": True}
    msg = convert.group_message(torch_style)
    assert dict(msg.values) == {"lr": 0.01, "beta1": 0.8, "beta2": 0.9}
    assert dict(msg.flags) == {"amsgrad": True}
    assert convert.group_dict(msg, "g") == {"beta1": 0.8, "beta2": 0.9, "lr": 0.01,
                                            "amsgrad": True}
    assert convert.torch_group(msg, "g") == {"betas": (0.8, 0.9), "lr": 0.01, "amsgrad": True}
    assert join_betas({"beta1": 0.5}) == {"beta1": 0.5}  # a change of one of them only
    assert split_betas(join_betas({"beta1": 0.5, "beta2": 0.6})) == {"beta1": 0.5,
                                                                       "beta2": 0.6}
    with pytest.raises(ValueError, match=r"only betas and eps .* may be a pair"):
        convert.group_message({"lr": (1.0, 2.0)})
    # Muon's: a triple split, a choice by name (Group.names), None as Group.unset
    muon = {"ns_coefficients": (3.0, -3.0, 1.0), "adjust_lr_fn": "original", "nesterov": True}
    msg = convert.group_message(muon)
    assert dict(msg.values) == {"ns_a": 3.0, "ns_b": -3.0, "ns_c": 1.0}
    assert dict(msg.names) == {"adjust_lr_fn": "original"} and list(msg.unset) == []
    assert convert.torch_group(msg, "g") == muon
    msg = convert.group_message({"adjust_lr_fn": None})
    assert list(msg.unset) == ["adjust_lr_fn"] and not msg.names
    assert convert.group_dict(msg, "g") == {"adjust_lr_fn": None}
    with pytest.raises(ValueError, match=r"^g: adjust_lr_fn given twice \(in names or unset"):
        convert.group_dict(pb.Group(names={"adjust_lr_fn": "original"},
                                    unset=["adjust_lr_fn"]), "g")
    with pytest.raises(ValueError, match=r"^g: lr given both as a value and as a flag"):
        convert.group_dict(pb.Group(values={"lr": 1.0}, flags={"lr": True}), "g")


def test_wire_values() -> None:
    np = pytest.importorskip("numpy")
    assert wire_value("amsgrad", np.bool_(True)) is True
    assert wire_value("lr", 1) == 1.0 and type(wire_value("lr", 1)) is float
    assert wire_value("betas", [0.9, 0.99]) == (0.9, 0.99)
    with pytest.raises(ValueError, match=r"hyperparameter 'lr': expected a number"):
        wire_value("lr", "fast")


def test_schedules_are_checked_and_come_back_with_every_key() -> None:
    msg = convert.schedule_message({"kind": "one_cycle", "total_steps": 10,
                                    "anneal_strategy": "linear", "max_lr": None})
    assert convert.schedule_dict(msg) == {
        "kind": "one_cycle", "total_steps": 10, "max_lr": None, "pct_start": 0.3,
        "anneal_strategy": "linear", "div_factor": 25.0, "final_div_factor": 1e4,
        "three_phase": False, "cycle_momentum": True, "base_momentum": 0.85,
        "max_momentum": 0.95}
    for bad, message in [
            ([1], r"^schedule: expected a mapping"),
            ({"kind": "cyclic"}, r"^schedule.kind: expected one of 'constant'"),
            ({"kind": "step", "size": 3}, r"^schedule.size: unknown key for kind 'step'"),
            ({"kind": "step", "step_size": "x"}, r"^schedule.step_size: 'x' is not a valid"),
            ({"kind": "one_cycle", "total_steps": 3, "anneal_strategy": "exp"},
             r"^schedule.anneal_strategy: unknown anneal strategy 'exp'"),
            ({"kind": "join", "schedules": [{"kind": "nope"}], "milestones": []},
             r"^schedule.schedules\[0\].kind: expected one of")]:
        with pytest.raises(ValueError, match=message):
            convert.schedule_message(bad)
    with pytest.raises(ValueError, match=r"^schedule.join.schedules\[0\]: no kind set"):
        convert.schedule_dict(pb.Schedule(join=pb.JoinSchedule(schedules=[pb.Schedule()])))


def _protobufs(msg: Any, defaults: bool) -> dict[str, Any]:
    """protobuf's own JSON, with its int64 strings and quoted non-finite floats read back."""
    out: dict[str, Any] = json_format.MessageToDict(
        msg, preserving_proto_field_name=True, always_print_fields_with_no_presence=defaults)
    parsed = type(msg)()
    json_format.ParseDict(out, parsed)
    assert parsed == msg
    return out


@pytest.mark.parametrize("defaults", [True, False])
def test_json_is_protobufs_with_numbers(defaults: bool) -> None:
    status = pb.StepStatus(step=3, grad_norm=math.inf, nonfinite=["w"],
                           round=pb.RoundStatus(round_id=2**40, missing_workers=["b"]))
    session = pb.Session(session_id="s", algorithm=pb.ALGORITHM_ADAM, step=0,
                         groups=[pb.Group(values={"lr": 0.1}, flags={"amsgrad": False})],
                         workers=pb.Workers(count=2, straggler_timeout=Duration(seconds=1)),
                         schedule=pb.Schedule(cosine=pb.CosineSchedule(total_steps=4)))
    header = pb.StepHeader(session_id="s", require_all=False, sequence=0)
    for msg in (status, session, header):
        ours = convert.message_json(msg, defaults=defaults)
        theirs = _protobufs(msg, defaults)
        assert set(ours) == set(theirs), msg
        back = type(msg)()
        convert.parse_json(ours, back, "m")  # NaN and the infinities as numbers
        assert back == msg
    assert convert.message_json(status)["round"]["round_id"] == 2**40
    assert convert.message_json(header, defaults=False) == {"session_id": "s"}
    with pytest.raises(ValueError, match=r"^m: "):
        convert.parse_json({"step": "x"}, pb.StepStatus(), "m")
