"""The service layer: the operations both transports expose, on domain types only.

``api`` (:class:`OptimizerService`: orchestration and validation), ``types`` (the
domain types: :class:`TensorChunk`, :class:`SessionInfo`, :class:`StepResult`),
``tensors`` (chunks checked and decoded into a session's layout, parameters encoded),
``waits`` (requests that wait for a step, and their bounds), ``access`` (who may do
what: keys, tenants, roles, quotas: :class:`Access`, :class:`Caller`), ``shared_memory`` (the
same-host regions a step may read its gradients from and write its parameters to:
:class:`RegionRef`, :class:`RegionInfo`). The rules a session keeps live one layer
down, in :mod:`adamserve.sessions`.
"""

from adamserve.service.access import LOCAL, Access, Caller, Role
from adamserve.service.api import OptimizerService
from adamserve.service.shared_memory import RegionInfo, RegionRef
from adamserve.service.types import SessionInfo, StepResult, TensorChunk
from adamserve.service.waits import MAX_WAIT, MAX_WAITERS
from adamserve.sessions.pushlog import PushId

__all__ = ["LOCAL", "MAX_WAIT", "MAX_WAITERS", "Access", "Caller", "OptimizerService", "PushId",
           "RegionInfo", "RegionRef", "Role", "SessionInfo", "StepResult", "TensorChunk"]
