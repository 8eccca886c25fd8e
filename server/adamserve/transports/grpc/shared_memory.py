"""The shared-memory RPCs of the gRPC servicer (RegisterSharedMemory, ...): each the
service's call of that name (docs/shared-memory.md), for the caller's tenant."""

from __future__ import annotations

import grpc

from adamserve import errors
from adamserve.service import Caller, OptimizerService
from adamserve.transports import convert
from adamserve_proto.v2 import optimizer_pb2 as pb


class SharedMemoryMethods:
    """RegisterSharedMemory, UnregisterSharedMemory and ListSharedMemory."""

    service: OptimizerService

    def caller(self, context: grpc.ServicerContext) -> Caller:
        raise NotImplementedError  # the servicer's

    def RegisterSharedMemory(self, request: pb.RegisterSharedMemoryRequest,
                             context: grpc.ServicerContext
                             ) -> pb.RegisterSharedMemoryResponse:
        if not request.HasField("region"):
            raise errors.InvalidArgument("RegisterSharedMemory: the request names no region")
        r = convert.region_info(request.region)
        info = self.service.register_shared_memory(r.name, r.key, r.byte_size,
                                                   caller=self.caller(context))
        return pb.RegisterSharedMemoryResponse(region=convert.region_message(info))

    def UnregisterSharedMemory(self, request: pb.UnregisterSharedMemoryRequest,
                               context: grpc.ServicerContext
                               ) -> pb.UnregisterSharedMemoryResponse:
        self.service.unregister_shared_memory(request.name, caller=self.caller(context))
        return pb.UnregisterSharedMemoryResponse()

    def ListSharedMemory(self, request: pb.ListSharedMemoryRequest,
                         context: grpc.ServicerContext) -> pb.ListSharedMemoryResponse:
        regions = self.service.list_shared_memory(caller=self.caller(context))
        return pb.ListSharedMemoryResponse(regions=[convert.region_message(i) for i in regions])
