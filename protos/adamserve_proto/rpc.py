"""The RPC table of ``adamserve_proto.v2.OptimizerService``, read from its descriptor.

One row per RPC, in the order the .proto declares them: whether the request and
the response stream, the request and response message classes, and the method
path. The server registers its handlers from it and the client builds its stubs
from it, so neither spells out a method's shape a second time.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Literal

from google.protobuf import message_factory
from google.protobuf.descriptor import MethodDescriptor, ServiceDescriptor
from google.protobuf.message import Message

from adamserve_proto.v2 import optimizer_pb2 as pb

__all__ = ["RPCS", "SERVICE", "SERVICE_NAME", "Kind", "Rpc", "kind"]

# The gRPC name of each (request streaming, response streaming) pair: the method of a
# grpc.Channel that makes the stub, and the suffix of grpc's *_rpc_method_handler.
Kind = Literal["unary_unary", "unary_stream", "stream_unary", "stream_stream"]

SERVICE: ServiceDescriptor = pb.DESCRIPTOR.services_by_name["OptimizerService"]
SERVICE_NAME: str = SERVICE.full_name  # "adamserve_proto.v2.OptimizerService"


@dataclass(frozen=True)
class Rpc:
    """One RPC of the service."""

    name: str  # "Step"
    request_streaming: bool
    response_streaming: bool
    request_type: type[Message]
    response_type: type[Message]

    @property
    def path(self) -> str:
        """The method's path on the wire: ``/adamserve_proto.v2.OptimizerService/Step``."""
        return f"/{SERVICE_NAME}/{self.name}"

    @property
    def kind(self) -> Kind:
        """``"stream_stream"`` for Step, ``"unary_unary"`` for GetSession..."""
        return kind(self.request_streaming, self.response_streaming)


_KINDS: dict[tuple[bool, bool], Kind] = {
    (False, False): "unary_unary", (False, True): "unary_stream",
    (True, False): "stream_unary", (True, True): "stream_stream"}


def kind(request_streaming: bool, response_streaming: bool) -> Kind:
    """The gRPC name of an RPC's shape: ``kind(True, True) == "stream_stream"``."""
    return _KINDS[(bool(request_streaming), bool(response_streaming))]


def _row(method: MethodDescriptor) -> Rpc:
    return Rpc(name=method.name,
               request_streaming=bool(method.client_streaming),
               response_streaming=bool(method.server_streaming),
               request_type=message_factory.GetMessageClass(method.input_type),
               response_type=message_factory.GetMessageClass(method.output_type))


# name -> Rpc, every RPC of the service in declaration order.
RPCS: Mapping[str, Rpc] = MappingProxyType({m.name: _row(m) for m in SERVICE.methods})
