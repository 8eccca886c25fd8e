"""Small steps as one ``StepUnary`` message each way: the lowest latency, for the wires
that carry the RPC as one message (gRPC; Flight, as an action).

A wire asks :meth:`SmallSteps.header` whether a step goes this way, serialises the
request its own way, and hands the call to :meth:`SmallSteps.send`. The server refuses
a session whose parameters do not fit one reply (UNARY_TOO_LARGE) before touching it,
so the step then goes over the wire's stream, and so do that session's later steps.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, cast

from google.protobuf.message import Message

from adamserve_client import errors
from adamserve_client.transports.base import Reply, WireTensor
from adamserve_proto.v2 import optimizer_pb2 as pb

__all__ = ["UNARY_BYTES", "SmallSteps", "unary_request"]

# Steps whose gradients fit in this many bytes go as one StepUnary message.
UNARY_BYTES = 1 << 20


def unary_request(header: pb.StepHeader, gradients: Sequence[WireTensor]
                  ) -> pb.StepUnaryRequest:
    """A small step as one StepUnary message (protobuf copies the bytes: they are few)."""
    return pb.StepUnaryRequest(header=header, gradients=[
        pb.TensorChunk(name=t.name, shape=list(t.shape), datatype=t.datatype,
                       data=bytes(t.data), row_sparse=t.rows is not None,
                       rows=bytes(t.rows or b"")) for t in gradients])


class SmallSteps:
    """The sessions of one wire whose steps need the stream."""

    def __init__(self) -> None:
        self.stream_only: set[str] = set()

    def header(self, request: Message, gradients: Sequence[WireTensor]) -> pb.StepHeader | None:
        """The header of a Step (its stream's first message) to send as StepUnary, or
        None where it goes over the stream."""
        header = cast(pb.StepRequest, request).header
        size = sum(memoryview(t.data).nbytes for t in gradients)
        if header.session_id in self.stream_only or size > UNARY_BYTES:
            return None
        return header

    def send(self, header: pb.StepHeader, call: Callable[[], Any]) -> Reply | None:
        """Run ``call`` (it sends the StepUnary request and returns its response); None
        where the session needs the stream after all."""
        try:
            resp = call()
        except (errors.InvalidArgument, errors.ServerError) as exc:
            # refused before anything changed: a server without StepUnary, or a session
            # whose parameters do not fit one reply
            if exc.code == "unimplemented" or exc.reason == "UNARY_TOO_LARGE":
                self.stream_only.add(header.session_id)
                return None
            raise
        params = [WireTensor(p.name, tuple(p.shape), p.datatype or "FP32", p.data,
                             p.rows if p.row_sparse else None) for p in resp.params]
        return Reply(pb.StepResponse(status=resp.status), params)
