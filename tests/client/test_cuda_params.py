"""Parameters on a CUDA device, staged through pinned host memory, against the same run
on the CPU. No server here: an in-memory Wire (momentum SGD in NumPy, answering the v2
messages the client sends) stands in under the client's own session operations, so this
file needs only the client, torch and a GPU. The CPU half always runs; the CUDA half is
skipped, saying so, where torch sees no GPU.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch
from google.protobuf.message import Message

import adamserve_client as ac
from adamserve_client import tensors
from adamserve_client.transports import Client, TensorSpec, Wire, WireTensor
from adamserve_client.transports._codec import decode_state, encode_state
from adamserve_client.transports.base import Blob, Payload, Reply
from adamserve_client.transports.messages import group_message, tensor_specs
from adamserve_proto.convert import torch_group
from adamserve_proto.rpc import RPCS
from adamserve_proto.v2 import optimizer_pb2 as pb

DEVICES = ["cpu", pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(
    not torch.cuda.is_available(), reason="torch sees no CUDA device")])]


class MemoryWire(Wire):
    """One process's sessions, updated by m = 0.9 m + g; p -= lr m (slot 'exp_avg').

    The seam is two methods: whatever an optimizer does reaches it as v2 messages."""

    url = "memory://"
    timeout = None

    def __init__(self) -> None:
        self.sessions: dict[str, dict[str, Any]] = {}

    def _session(self, sid: str) -> pb.Session:
        if sid not in self.sessions:
            raise ac.NotFound(f"session {sid!r} not found", reason="SESSION_NOT_FOUND")
        s = self.sessions[sid]
        return pb.Session(session_id=sid, algorithm=s["algorithm"], step=s["step"],
                          tensors=tensor_specs(s["tensors"]),
                          groups=[group_message(g) for g in s["groups"]],
                          lr=[float(g["lr"]) for g in s["groups"]], skip_nonfinite=True)

    def _add(self, s: dict[str, Any], specs: Any, initial: Any) -> None:
        for t in specs:
            spec = TensorSpec(t.name, tuple(t.shape), t.group)
            s["tensors"].append(spec)
            s["params"][t.name] = np.zeros(spec.shape, np.float32)
            s["m"][t.name] = np.zeros(spec.shape, np.float32)
            s["steps"][t.name] = 0
        for w in initial:
            tensors.decode_into(s["params"][w.name], w.data, w.datatype)

    def _out(self, sid: str, datatype: str, names: Any = ()) -> list[WireTensor]:
        return [WireTensor(n, p.shape, datatype or "FP32", tensors.encode(p, datatype or "FP32"))
                for n, p in self.sessions[sid]["params"].items() if not names or n in names]

    def _step(self, header: pb.StepHeader, gradients: Any) -> pb.StepStatus:
        s = self.sessions[header.session_id]
        groups = {t.name: t.group for t in s["tensors"]}
        for w in gradients:
            g = np.zeros(w.shape, np.float32)
            tensors.decode_into(g, w.data, w.datatype)
            s["m"][w.name] = 0.9 * s["m"][w.name] + g
            s["params"][w.name] -= np.float32(s["groups"][groups[w.name]]["lr"]) * s["m"][w.name]
            s["steps"][w.name] += 1
        s["step"] += 1
        return pb.StepStatus(step=s["step"])

    def _export(self, sid: str) -> bytes:
        s = self.sessions[sid]
        names = [t.name for t in s["tensors"]]
        return encode_state({
            "state": {i: {"step": float(s["steps"][n]), "exp_avg": s["m"][n].copy()}
                      for i, n in enumerate(names) if s["steps"][n]},
            "param_groups": [{**g, "params": [i for i, t in enumerate(s["tensors"])
                                              if t.group == k],
                              "param_names": [t.name for t in s["tensors"] if t.group == k]}
                             for k, g in enumerate(s["groups"])]})

    def _import(self, sid: str, blob: Blob) -> None:
        s = self.sessions[sid]
        state = decode_state(blob.data)
        for g in state["param_groups"]:
            for i, name in zip(g["params"], g["param_names"], strict=True):
                entry = state["state"].get(i)
                s["m"][name] = (np.zeros_like(s["m"][name]) if entry is None
                                else np.asarray(entry["exp_avg"], np.float32).copy())
                s["steps"][name] = 0 if entry is None else int(entry["step"])

    def unary(self, method: str, request: Any, *, idempotent: bool = True) -> Message:
        sid = request.session_id
        if method == "SetHyperparameters":
            self.sessions[sid]["groups"][request.group].update(
                torch_group(request.changes, "changes"))
        elif method == "Checkpoint":
            return pb.CheckpointResponse(checkpoint=pb.CheckpointInfo(
                session_id=sid, step=self.sessions[sid]["step"]))
        elif method == "ListSessions":
            return pb.ListSessionsResponse(sessions=[self._session(s) for s in
                                                     sorted(self.sessions)])
        elif method == "DeleteSession":
            self.sessions.pop(sid, None)
            return pb.DeleteSessionResponse()
        elif method not in ("GetSession", "SetSchedule"):
            raise NotImplementedError(method)  # one worker, one server: no workers, commits
        return RPCS[method].response_type(session=self._session(sid))

    def stream(self, method: str, request: Any, payload: Payload = (), *,
               idempotent: bool = True) -> Reply:
        handlers: dict[str, Callable[[], Reply]] = {
            "CreateSession": lambda: self._create(request.spec, payload),
            "AddTensors": lambda: self._grow(request.spec, payload),
            "Step": lambda: Reply(pb.StepResponse(status=self._step(request.header, payload)),
                                  self._out(request.header.session_id,
                                            request.header.return_datatype)),
            "Push": lambda: Reply(pb.PushResponse(status=self._step(request.header, payload))),
            "Pull": lambda: Reply(None, self._out(request.session_id, request.datatype,
                                                  request.names)),
            "ExportState": lambda: Reply(None, blob=self._export(request.session_id)),
        }
        if method in handlers:
            return handlers[method]()
        if method == "SetParameters":
            for w in payload:
                tensors.decode_into(self.sessions[request.session_id]["params"][w.name],
                                    w.data, w.datatype)
        elif method == "ImportState":
            self._import(request.session_id, payload)
        else:
            raise NotImplementedError(method)
        return Reply(RPCS[method].response_type(session=self._session(request.session_id)))

    def _create(self, spec: pb.SessionSpec, initial: Any) -> Reply:
        s = self.sessions[spec.session_id] = {
            "algorithm": spec.algorithm, "tensors": [], "params": {}, "m": {}, "steps": {},
            "groups": [torch_group(g, "groups") for g in spec.groups],
            "step": 0}
        self._add(s, spec.tensors, initial)
        return Reply(pb.CreateSessionResponse(session=self._session(spec.session_id)))

    def _grow(self, spec: pb.AddTensorsSpec, initial: Any) -> Reply:
        s = self.sessions[spec.session_id]
        if spec.HasField("new_group"):
            s["groups"].append(torch_group(spec.new_group, "new_group"))
        self._add(s, spec.tensors, initial)
        return Reply(pb.AddTensorsResponse(session=self._session(spec.session_id)))

    def close(self) -> None:
        pass


def run(device: str, wire: str, dtype: torch.dtype = torch.float32, steps: int = 6
        ) -> tuple[list[torch.Tensor], dict[str, Any], MemoryWire]:
    g = torch.Generator().manual_seed(0)
    params = [torch.randn(s, generator=g).to(device=device, dtype=dtype)
              for s in [(64, 33), (33,), (3, 1, 5)]]
    transport = MemoryWire()
    opt = ac.Adam([{"params": params[:2]}, {"params": params[2:], "lr": 0.05}], lr=0.01,
                  server=Client(transport), session="s", wire_dtype=wire)
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
    opt = ac.Adam([{"params": got[:2]}, {"params": got[2:]}], server=Client(transport),
                  session="s")
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
    transport = MemoryWire()
    opt = ac.Adam([a], lr=0.01, server=Client(transport), session="s", wire_dtype="bfloat16")
    a.grad = torch.ones_like(a)
    opt.step()
    opt.add_param_group({"params": [b], "lr": 0.1})
    s = transport.sessions["s"]
    assert [(t.name, t.shape, t.group) for t in s["tensors"]] == [
        ("param.0", (8, 5), 0), ("param.1", (3, 7), 1)]
    assert s["groups"][1]["lr"] == 0.1 and s["step"] == 1
    np.testing.assert_array_equal(s["params"]["param.1"], b0)  # sent in the master dtype
    a.grad, b.grad = None, torch.ones_like(b)
    opt.step()
    np.testing.assert_allclose(s["params"]["param.1"], b0 - np.float32(0.1), rtol=0, atol=1e-6)
    expected = torch.from_numpy(s["params"]["param.1"]).to(torch.bfloat16).float()
    assert b.device.type == device
    torch.testing.assert_close(b.cpu(), expected, rtol=0, atol=0)
