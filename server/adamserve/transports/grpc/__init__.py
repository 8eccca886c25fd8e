"""gRPC transport: ``build_grpc_server`` serves an OptimizerService as ``adamserve_proto.v2.OptimizerService``."""

from adamserve.transports.grpc.server import build_grpc_server

__all__ = ["build_grpc_server"]
