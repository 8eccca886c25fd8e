"""gRPC transport: ``build_grpc_server`` serves an OptimizerService as ``adamserve.v1.Optimizer``."""

from adamserve.transports.grpc.server import build_grpc_server

__all__ = ["build_grpc_server"]
