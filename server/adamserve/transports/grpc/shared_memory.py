"""The shared-memory RPCs of the gRPC servicer (RegisterSharedMemory, ...)."""

from __future__ import annotations

import grpc

from adamserve import errors
from adamserve.service import OptimizerService
from adamserve_proto.v2 import optimizer_pb2 as pb


def _disabled() -> errors.FailedPrecondition:
    return errors.FailedPrecondition(
        "this server does not take shared-memory regions (start it with "
        "--allow-shared-memory)", reason="SHARED_MEMORY_DISABLED")


class SharedMemoryMethods:
    """RegisterSharedMemory, UnregisterSharedMemory and ListSharedMemory."""

    service: OptimizerService

    def RegisterSharedMemory(self, request: pb.RegisterSharedMemoryRequest,
                             context: grpc.ServicerContext
                             ) -> pb.RegisterSharedMemoryResponse:
        raise _disabled()

    def UnregisterSharedMemory(self, request: pb.UnregisterSharedMemoryRequest,
                               context: grpc.ServicerContext
                               ) -> pb.UnregisterSharedMemoryResponse:
        raise _disabled()

    def ListSharedMemory(self, request: pb.ListSharedMemoryRequest,
                         context: grpc.ServicerContext) -> pb.ListSharedMemoryResponse:
        raise _disabled()
