"""Python client for adamserve, shaped like torch.optim.

``adamserve_client.AdamW(model.parameters(), lr=3e-4, server="grpc://host:50051")``
drops in for ``torch.optim.AdamW``: the optimizer state and the update live on an
adamserve server. NumPy arrays work as parameters too, with or without torch.

The pieces: :mod:`adamserve_client.optim` (the optimizers),
:mod:`adamserve_client.transports` (``connect(url)``: gRPC or HTTP, the same
methods), :mod:`adamserve_client.errors` (exceptions carrying the server's message),
:mod:`adamserve_client.shared_memory` (``shared_memory=True``: steps through a region
on the server's host instead of the socket).
"""

from adamserve_client import errors
from adamserve_client.errors import (
    Aborted,
    AdamserveError,
    AlreadyExists,
    DeadlineExceeded,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
    ServerError,
    Unauthenticated,
    Unavailable,
)
from adamserve_client.muon_adamw import MuonWithAdamW
from adamserve_client.optim import (
    LAMB,
    Adafactor,
    Adagrad,
    Adam,
    Adamax,
    AdamW,
    AdamWScheduleFree,
    Muon,
    NAdam,
    RAdam,
    RAdamScheduleFree,
    RemoteOptimizer,
    RMSprop,
    SparseAdam,
)
from adamserve_client.transports import Transport, connect
from adamserve_client.transports.base import Workers
from adamserve_client.transports.sharded import ShardedTransport

__all__ = [
    "LAMB",
    "Aborted",
    "Adafactor",
    "Adagrad",
    "Adam",
    "AdamW",
    "AdamWScheduleFree",
    "Adamax",
    "AdamserveError",
    "AlreadyExists",
    "DeadlineExceeded",
    "FailedPrecondition",
    "InvalidArgument",
    "Muon",
    "MuonWithAdamW",
    "NAdam",
    "NotFound",
    "PermissionDenied",
    "RAdam",
    "RAdamScheduleFree",
    "RMSprop",
    "RemoteOptimizer",
    "ResourceExhausted",
    "ServerError",
    "ShardedTransport",
    "SparseAdam",
    "Transport",
    "Unauthenticated",
    "Unavailable",
    "Workers",
    "connect",
    "errors",
]
