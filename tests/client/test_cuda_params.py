"""Parameters on a CUDA device, staged through pinned host memory, against the same run
on the CPU. No server here: an in-memory Transport (momentum SGD in NumPy) stands in,
so this file needs only the client, torch and a GPU. The CPU half always runs; the
CUDA half is skipped, saying so, where torch sees no GPU.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pytest
import torch

import adamserve_client as ac
from adamserve_client import tensors
from adamserve_client.transports import (
    CheckpointInfo,
    SessionInfo,
    SessionSpec,
    StepResult,
    TensorSpec,
    Transport,
    WireTensor,
)

DEVICES = ["cpu", pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(
    not torch.cuda.is_available(), reason="torch sees no CUDA device")])]


class MemoryTransport(Transport):
    """One process's sessions, updated by m = 0.9 m + g; p -= lr m (slot 'exp_avg')."""

    url = "memory://"

    def __init__(self) -> None:
        self.sessions: dict[str, dict[str, Any]] = {}

    def _info(self, sid: str) -> SessionInfo:
        s = self.sessions[sid]
        spec: SessionSpec = s["spec"]
        return SessionInfo(sid, spec.algorithm, "float32", s["step"], spec.tensors,
                           tuple(s["groups"]), tuple(float(g["lr"]) for g in s["groups"]),
                           None, None, False, True, 0, -1, "memory")

    def create_session(self, spec: SessionSpec, initial: Sequence[WireTensor] = ()
                       ) -> SessionInfo:
        params = {t.name: np.zeros(t.shape, np.float32) for t in spec.tensors}
        for w in initial:
            tensors.decode_into(params[w.name], w.data, w.datatype)
        self.sessions[spec.session_id] = {
            "spec": spec, "params": params, "groups": [dict(g) for g in spec.groups],
            "m": {n: np.zeros_like(p) for n, p in params.items()}, "steps": dict.fromkeys(
                params, 0), "step": 0}
        return self._info(spec.session_id)

    def add_tensors(self, session_id: str, tensors_: Sequence[TensorSpec],
                    group: Mapping[str, Any] | None = None,
                    initial: Sequence[WireTensor] = ()) -> SessionInfo:
        s = self.sessions[session_id]
        if group is not None:
            s["groups"].append(dict(group))
        s["spec"] = dataclasses.replace(s["spec"], tensors=(*s["spec"].tensors, *tensors_))
        for t in tensors_:
            s["params"][t.name] = np.zeros(t.shape, np.float32)
            s["m"][t.name] = np.zeros(t.shape, np.float32)
            s["steps"][t.name] = 0
        for w in initial:
            tensors.decode_into(s["params"][w.name], w.data, w.datatype)
        return self._info(session_id)

    def set_parameters(self, session_id: str, values: Sequence[WireTensor]) -> SessionInfo:
        for w in values:
            tensors.decode_into(self.sessions[session_id]["params"][w.name], w.data, w.datatype)
        return self._info(session_id)

    def _out(self, sid: str, datatype: str) -> list[WireTensor]:
        return [WireTensor(n, p.shape, datatype, tensors.encode(p, datatype))
                for n, p in self.sessions[sid]["params"].items()]

    def step(self, session_id: str, gradients: Sequence[WireTensor], *,
             return_datatype: str = "FP32", require_all: bool = False,
             sender: Any = None, base_step: int | None = None) -> StepResult:
        s = self.sessions[session_id]
        groups = {t.name: t.group for t in s["spec"].tensors}
        for w in gradients:
            g = np.zeros(w.shape, np.float32)
            tensors.decode_into(g, w.data, w.datatype)
            s["m"][w.name] = 0.9 * s["m"][w.name] + g
            s["params"][w.name] -= np.float32(s["groups"][groups[w.name]]["lr"]) * s["m"][w.name]
            s["steps"][w.name] += 1
        s["step"] += 1
        return StepResult(s["step"], False, None, (), tuple(self._out(session_id,
                                                                      return_datatype)))

    def push(self, session_id: str, gradients: Sequence[WireTensor], *,
             require_all: bool = False, sender: Any = None,
             base_step: int | None = None) -> StepResult:
        r = self.step(session_id, gradients)
        return StepResult(r.step, r.skipped, r.grad_norm, r.nonfinite)

    def pull(self, session_id: str, names: Sequence[str] | None = None,
             datatype: str = "FP32", *, min_step: int = 0,
             wait: float | None = None) -> list[WireTensor]:
        return [w for w in self._out(session_id, datatype) if not names or w.name in names]

    # one worker, one server: nothing to commit, no workers, no checkpoints
    def commit(self, *args: Any, **kwargs: Any) -> StepResult:
        raise NotImplementedError

    def set_workers(self, session_id: str, count: int) -> SessionInfo:
        raise NotImplementedError

    def list_checkpoints(self, session_id: str) -> list[int]:
        raise NotImplementedError

    def restore_checkpoint(self, session_id: str, step: int) -> SessionInfo:
        raise NotImplementedError

    def set_hyperparameters(self, session_id: str, group: int,
                            changes: Mapping[str, Any]) -> SessionInfo:
        self.sessions[session_id]["groups"][group].update(changes)
        return self._info(session_id)

    def set_schedule(self, session_id: str, schedule: Mapping[str, Any] | None) -> SessionInfo:
        return self._info(session_id)

    def export_state(self, session_id: str) -> dict[str, Any]:
        s = self.sessions[session_id]
        names = [t.name for t in s["spec"].tensors]
        return {"state": {i: {"step": float(s["steps"][n]), "exp_avg": s["m"][n].copy()}
                          for i, n in enumerate(names) if s["steps"][n]},
                "param_groups": [{**g, "params": [i for i, t in enumerate(s["spec"].tensors)
                                                  if t.group == k],
                                  "param_names": [t.name for t in s["spec"].tensors
                                                  if t.group == k]}
                                 for k, g in enumerate(s["groups"])]}

    def import_state(self, session_id: str, state: Mapping[str, Any]) -> SessionInfo:
        s = self.sessions[session_id]
        for g in state["param_groups"]:
            for i, name in zip(g["params"], g["param_names"], strict=True):
                entry = state["state"].get(i)
                s["m"][name] = (np.zeros_like(s["m"][name]) if entry is None
                                else np.asarray(entry["exp_avg"], np.float32).copy())
                s["steps"][name] = 0 if entry is None else int(entry["step"])
        return self._info(session_id)

    def checkpoint(self, session_id: str) -> CheckpointInfo:
        return CheckpointInfo(session_id, self.sessions[session_id]["step"], "", 0)

    def describe(self, session_id: str) -> SessionInfo:
        if session_id not in self.sessions:
            raise ac.NotFound(f"session {session_id!r} not found")
        return self._info(session_id)

    def list_sessions(self) -> list[SessionInfo]:
        return [self._info(s) for s in sorted(self.sessions)]

    def delete_session(self, session_id: str) -> None:
        self.sessions.pop(session_id, None)

    def close(self) -> None:
        pass


def run(device: str, wire: str, dtype: torch.dtype = torch.float32, steps: int = 6
        ) -> tuple[list[torch.Tensor], dict[str, Any], MemoryTransport]:
    g = torch.Generator().manual_seed(0)
    params = [torch.randn(s, generator=g).to(device=device, dtype=dtype)
              for s in [(64, 33), (33,), (3, 1, 5)]]
    transport = MemoryTransport()
    opt = ac.Adam([{"params": params[:2]}, {"params": params[2:], "lr": 0.05}], lr=0.01,
                  server=transport, session="s", wire_dtype=wire)
    for k in range(steps):
        for i, p in enumerate(params):
            grad = torch.randn(p.shape[::-1], generator=g).to(device=device, dtype=dtype)
            p.grad = grad.transpose(0, -1) if grad.dim() > 1 else grad  # non-contiguous too
            if k % 3 == 2 and i == 1:
                p.grad = None
        opt.step()
        opt.param_groups[1]["lr"] *= 0.5
    sd = opt.state_dict()
    return params, sd, transport


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("wire", ["float32", "bfloat16"])
def test_device_parameters_match_the_cpu(device: str, wire: str) -> None:
    ref, ref_sd, _ = run("cpu", wire)
    got, sd, transport = run(device, wire)
    for a, b in zip(got, ref, strict=True):
        assert a.device.type == device
        torch.testing.assert_close(a.cpu(), b, rtol=0, atol=0)
    for k, entry in ref_sd["state"].items():
        assert sd["state"][k]["exp_avg"].device.type == device
        torch.testing.assert_close(sd["state"][k]["exp_avg"].cpu(), entry["exp_avg"])
        assert sd["state"][k]["step"].device.type == "cpu"  # as torch keeps it
    # a state_dict of device tensors loads back (values moved to the host for the wire)
    opt = ac.Adam([{"params": got[:2]}, {"params": got[2:]}], server=transport, session="s")
    opt.load_state_dict(sd)
    assert transport.sessions["s"]["steps"]["param.1"] == 4


@pytest.mark.parametrize("device", DEVICES)
def test_bfloat16_parameters(device: str) -> None:
    params, _, transport = run(device, "float32", dtype=torch.bfloat16, steps=3)
    master = transport.sessions["s"]["params"]
    for i, p in enumerate(params):
        assert p.dtype == torch.bfloat16
        expected = torch.from_numpy(master[f"param.{i}"]).to(torch.bfloat16)
        torch.testing.assert_close(p.cpu(), expected, rtol=0, atol=0)
    assert math.isfinite(float(params[0].float().sum()))


@pytest.mark.parametrize("device", DEVICES)
def test_add_param_group_of_device_parameters(device: str) -> None:
    g = torch.Generator().manual_seed(1)
    a = torch.randn(8, 5, generator=g).to(device)
    b = torch.randn(7, 3, generator=g).to(device).t()  # non-contiguous
    b0 = b.cpu().numpy().copy()
    transport = MemoryTransport()
    opt = ac.Adam([a], lr=0.01, server=transport, session="s", wire_dtype="bfloat16")
    a.grad = torch.ones_like(a)
    opt.step()
    opt.add_param_group({"params": [b], "lr": 0.1})
    s = transport.sessions["s"]
    assert [(t.name, t.shape, t.group) for t in s["spec"].tensors] == [
        ("param.0", (8, 5), 0), ("param.1", (3, 7), 1)]
    assert s["groups"][1]["lr"] == 0.1 and s["step"] == 1
    np.testing.assert_array_equal(s["params"]["param.1"], b0)  # sent in the master dtype
    a.grad, b.grad = None, torch.ones_like(b)
    opt.step()
    np.testing.assert_allclose(s["params"]["param.1"], b0 - np.float32(0.1), rtol=0, atol=1e-6)
    expected = torch.from_numpy(s["params"]["param.1"]).to(torch.bfloat16).float()
    assert b.device.type == device
    torch.testing.assert_close(b.cpu(), expected, rtol=0, atol=0)
