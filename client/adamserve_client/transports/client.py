"""The session operations, once, over any :class:`~adamserve_client.transports.base.Wire`.

:class:`Client` turns each :class:`~adamserve_client.transports.base.Transport`
operation into one v2 RPC (``create_session`` is ``CreateSession``, ``describe``
is ``GetSession``, ``list_sessions`` follows ``ListSessions``' pages) and its
answer back into the client's dataclasses (:mod:`~adamserve_client.transports.messages`).
It says which calls must not run twice (creating a session, growing it, a step
or push without a :class:`~adamserve_client.transports.base.Sender`), so that a
wire retries those only where the request never reached the server.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from google.protobuf.message import Message

from adamserve_client.tensors import DATATYPES, row_bytes
from adamserve_client.transports import _codec
from adamserve_client.transports import messages as m
from adamserve_client.transports.base import (
    Blob,
    CheckpointInfo,
    HyperValue,
    RegionInfo,
    RegionRef,
    Reply,
    Sender,
    SessionInfo,
    SessionSpec,
    StateDict,
    StepResult,
    TensorSpec,
    Transport,
    Wire,
    WireTensor,
)
from adamserve_proto.v2 import optimizer_pb2 as pb

__all__ = ["Client"]


def _session(response: Message | None) -> SessionInfo:
    """The ``session`` of a response (most RPCs answer the changed session)."""
    if response is None:
        raise _codec.bad_response("the server answered no session")
    return m.session_info(m.field_of(response, "session"))


class Client(Transport):
    """The session operations on the one server ``wire`` talks to; closing the client
    closes the wire."""

    def __init__(self, wire: Wire) -> None:
        self.wire = wire
        self.url = wire.url
        self.timeout = wire.timeout

    def _status(self, reply: Reply, method: str) -> StepResult:
        if reply.message is None or not reply.message.HasField("status"):
            raise _codec.bad_response(f"the {method} answer holds no status", self.url)
        return m.step_result(m.field_of(reply.message, "status"), reply.tensors)

    # -- sessions ---------------------------------------------------------------

    def create_session(self, spec: SessionSpec,
                       initial: Sequence[WireTensor] = ()) -> SessionInfo:
        request = pb.CreateSessionRequest(spec=m.session_spec(spec))
        return _session(self.wire.stream("CreateSession", request, initial,
                                         idempotent=False).message)

    def add_tensors(self, session_id: str, tensors: Sequence[TensorSpec],
                    group: Mapping[str, HyperValue] | None = None,
                    initial: Sequence[WireTensor] = ()) -> SessionInfo:
        spec = pb.AddTensorsSpec(session_id=session_id, tensors=m.tensor_specs(tensors))
        if group is not None:
            spec.new_group.CopyFrom(m.group_message(group))
        reply = self.wire.stream("AddTensors", pb.AddTensorsRequest(spec=spec), initial,
                                 idempotent=False)
        return _session(reply.message)

    def set_parameters(self, session_id: str, values: Sequence[WireTensor]) -> SessionInfo:
        # repeating it writes the same values: safe to retry
        reply = self.wire.stream("SetParameters", pb.SetParametersRequest(session_id=session_id),
                                 values)
        return _session(reply.message)

    def describe(self, session_id: str) -> SessionInfo:
        return _session(self.wire.unary("GetSession",
                                        pb.GetSessionRequest(session_id=session_id)))

    def list_sessions(self, *, page_size: int = 0) -> list[SessionInfo]:
        out: list[SessionInfo] = []
        token = ""
        while True:
            page: Any = self.wire.unary("ListSessions", pb.ListSessionsRequest(
                page_size=page_size, page_token=token))
            out.extend(m.session_info(s) for s in page.sessions)
            token = page.next_page_token
            if not token:
                return out

    def delete_session(self, session_id: str) -> None:
        self.wire.unary("DeleteSession", pb.DeleteSessionRequest(session_id=session_id))

    # -- steps ------------------------------------------------------------------

    @staticmethod
    def _header(session_id: str, return_datatype: str, require_all: bool,
                sender: Sender | None, base_step: int | None,
                gradients_region: RegionRef | None = None, gradients_datatype: str = "FP32",
                params_region: RegionRef | None = None) -> pb.StepHeader:
        header = pb.StepHeader(session_id=session_id, return_datatype=return_datatype,
                               require_all=require_all)
        if sender is not None:
            header.worker_id, header.sequence = sender.worker, sender.sequence
        if base_step is not None:
            header.base_step = base_step
        if gradients_region is not None:
            header.gradients_region.CopyFrom(m.region_ref_message(gradients_region))
            header.gradients_datatype = gradients_datatype
        if params_region is not None:
            header.params_region.CopyFrom(m.region_ref_message(params_region))
        return header

    def step(self, session_id: str, gradients: Sequence[WireTensor], *,
             return_datatype: str = "FP32", require_all: bool = False,
             sender: Sender | None = None, base_step: int | None = None,
             gradients_region: RegionRef | None = None, gradients_datatype: str = "FP32",
             params_region: RegionRef | None = None, return_rows: bool = False) -> StepResult:
        """... ``return_rows``: of each gradient sent row-sparse, only those rows of its
        parameter come back (row-sparse), the other tensors whole."""
        header = self._header(session_id, return_datatype, require_all, sender, base_step,
                              gradients_region, gradients_datatype, params_region)
        header.return_rows = return_rows
        # a sender's step is applied once however often it is sent: safe to retry
        reply = self.wire.stream("Step", pb.StepRequest(header=header), gradients,
                                 idempotent=sender is not None)
        return self._status(reply, "Step")

    def push(self, session_id: str, gradients: Sequence[WireTensor], *,
             require_all: bool = False, sender: Sender | None = None,
             base_step: int | None = None, gradients_region: RegionRef | None = None,
             gradients_datatype: str = "FP32") -> StepResult:
        header = self._header(session_id, "", require_all, sender, base_step,
                              gradients_region, gradients_datatype)
        reply = self.wire.stream("Push", pb.PushRequest(header=header), gradients,
                                 idempotent=sender is not None)
        return self._status(reply, "Push")

    def pull(self, session_id: str, names: Sequence[str] | None = None,
             datatype: str = "FP32", *, min_step: int = 0,
             wait: float | None = None,
             rows: Mapping[str, Sequence[int] | np.ndarray] | None = None) -> list[WireTensor]:
        """... ``wait`` None or 0: as long as the call's timeout allows. ``rows``: only
        these rows of these tensors (row-sparse), after the whole tensors of ``names``."""
        if datatype not in DATATYPES:
            raise ValueError(f"datatype {datatype!r}: expected one of {', '.join(DATATYPES)}")
        request = pb.PullRequest(session_id=session_id, names=list(names or ()),
                                 datatype=datatype, min_step=min_step,
                                 rows=[pb.RowSelection(name=n, rows=row_bytes(r))
                                       for n, r in (rows or {}).items()])
        if wait:
            request.timeout.CopyFrom(m.duration(wait, "wait"))
        return list(self.wire.stream("Pull", request).tensors)

    def commit(self, session_id: str, step: int, tensor_sumsq: Sequence[float],
               total_sumsq: float, *, param_sumsq: Sequence[float] = (),
               update_sumsq: Sequence[float] = (), round_id: int = 0,
               return_datatype: str | None = "FP32") -> StepResult:
        request = pb.CommitRequest(
            session_id=session_id, step=step, tensor_sumsq=list(tensor_sumsq),
            total_sumsq=total_sumsq, param_sumsq=list(param_sumsq),
            update_sumsq=list(update_sumsq), round_id=round_id,
            return_datatype=return_datatype or "", skip_params=return_datatype is None)
        # a commit repeated is answered with the same outcome: safe to retry
        return self._status(self.wire.stream("Commit", request), "Commit")

    def set_workers(self, session_id: str, count: int) -> SessionInfo:
        return _session(self.wire.unary("SetWorkers", pb.SetWorkersRequest(
            session_id=session_id, count=count)))

    # -- hyperparameters, schedule, state ----------------------------------------

    def set_hyperparameters(self, session_id: str, group: int,
                            changes: Mapping[str, HyperValue]) -> SessionInfo:
        return _session(self.wire.unary("SetHyperparameters", pb.SetHyperparametersRequest(
            session_id=session_id, group=group, changes=m.group_message(changes))))

    def set_schedule(self, session_id: str, schedule: Mapping[str, Any] | None) -> SessionInfo:
        request = pb.SetScheduleRequest(session_id=session_id)
        if schedule is not None:
            request.schedule.CopyFrom(m.schedule_message(schedule))
        return _session(self.wire.unary("SetSchedule", request))

    def export_state(self, session_id: str, native: bool = False) -> StateDict:
        form = pb.STATE_FORMAT_NATIVE if native else pb.STATE_FORMAT_UNSPECIFIED
        blob = self.wire.stream("ExportState",
                                pb.ExportStateRequest(session_id=session_id, format=form)).blob
        # the arrays are views of the blob: writable ones (torch warns of read-only memory)
        return _codec.decode_state(blob if isinstance(blob, bytearray) else bytearray(blob))

    def import_state(self, session_id: str, state: Mapping[str, Any]) -> SessionInfo:
        reply = self.wire.stream("ImportState", pb.ImportStateRequest(session_id=session_id),
                                 Blob(_codec.encode_state(state)))
        return _session(reply.message)

    # -- checkpoints --------------------------------------------------------------

    def checkpoint(self, session_id: str) -> CheckpointInfo:
        response = self.wire.unary("Checkpoint", pb.CheckpointRequest(session_id=session_id))
        return m.checkpoint_info(m.field_of(response, "checkpoint"))

    def list_checkpoints(self, session_id: str) -> list[int]:
        response = self.wire.unary("ListCheckpoints",
                                   pb.ListCheckpointsRequest(session_id=session_id))
        return [int(s) for s in m.field_of(response, "steps")]

    def restore_checkpoint(self, session_id: str, step: int) -> SessionInfo:
        return _session(self.wire.unary("RestoreCheckpoint", pb.RestoreCheckpointRequest(
            session_id=session_id, step=step)))

    # -- same-host shared memory -------------------------------------------------

    def register_shared_memory(self, name: str, key: str, byte_size: int) -> RegionInfo:
        # registering the same again is answered with the region: safe to retry
        response = self.wire.unary("RegisterSharedMemory", pb.RegisterSharedMemoryRequest(
            region=m.region_message(RegionInfo(name, key, byte_size))))
        return m.region_info(m.field_of(response, "region"))

    def unregister_shared_memory(self, name: str) -> None:
        self.wire.unary("UnregisterSharedMemory", pb.UnregisterSharedMemoryRequest(name=name))

    def list_shared_memory(self) -> list[RegionInfo]:
        response = self.wire.unary("ListSharedMemory", pb.ListSharedMemoryRequest())
        return [m.region_info(r) for r in m.field_of(response, "regions")]

    def close(self) -> None:
        self.wire.close()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.url!r})"
