"""The two-phase shard exchange, the client's side (docs/exchange.md has the server's).

A sharded step needs quantities over the whole model where the non-finite check,
``max_grad_norm`` (global or per tensor) or LAMB's trust ratio is on: no shard
sees more than its pieces. Such a session's shard sessions are created with
``Workers.exchange`` (synchronous, no straggler timeout) and every step runs in
two phases; the client is the only party that talks to every shard, so it carries
the sums from one to the others. What each worker's client does, per step:

1. **Push.** To every shard in parallel, a ``Push`` of its pieces of the gradient
   (``require_all``; the worker's ``(worker_id, sequence)``; ``base_step``: the
   step every shard was last seen at, so that a shard at another step refuses the
   push and nothing is applied). A shard closes the round once its ``count``
   workers pushed, stages the mean gradient, and answers ``status.pending`` with
   ``status.exchange.grad_sumsq`` (per tensor of the shard) and
   ``status.round.round_id``. A shard that applied this push before answers
   ``duplicate``.
2. **Sums.** Per model tensor, the sum of its pieces' ``grad_sumsq``, added in shard
   order (so every worker gets the same float64 numbers), and their total
   (``math.fsum``). A NaN or Inf anywhere makes the total non-finite: every shard
   then skips the step, as one server would.
3. **Commit.** To every shard, ``Commit`` with the staged step (``step + 1``), per
   shard tensor the sum of its whole model tensor, the total, that shard's
   ``round_id`` (a late commit of an earlier round is never applied to a newer
   one) and the parameters' datatype (or ``skip_params`` for a push). Each shard
   decides skip and clipping from the sums exactly as one server would and
   answers the step's status and parameters.
4. **LAMB** commits twice: the first commit answers ``pending`` with
   ``exchange.param_sumsq`` and ``exchange.update_sumsq`` per tensor; the client
   totals them per model tensor as in 2 and commits again with them, and the
   shards apply the trust ratio of each whole tensor.

With several workers every one of them relays the same sums; a shard applies the
first commit of a step and answers later (and repeated) ones with the same
outcome, so no worker is special and a lost answer may be committed again. Where
only some shards answer ``duplicate`` (a resent push some shards applied), or
only some are done after the second commit (another worker's second commit got
there first), the worker that committed there holds every shard's sums and
commits on the rest too: this client waits for that step with ``Pull(min_step)``.
Shards found at different steps (a shard restored alone from an older
checkpoint) refuse to step (``SHARDS_DIVERGED``) until
:meth:`~adamserve_client.transports.sharded.ShardedTransport.restore_checkpoint`.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Protocol, TypeVar

import numpy as np

from adamserve_client.transports import _codec
from adamserve_client.transports.base import (
    Sender,
    SessionInfo,
    StepResult,
    Transport,
    WireTensor,
)
from adamserve_client.transports.layout import ShardPlan

__all__ = ["Shards", "exchange_step", "totals"]

T = TypeVar("T")


class Shards(Protocol):
    """What the exchange needs of the sharded transport that runs it."""

    def each(self, fn: Callable[[int, Transport], T]) -> list[T]:
        """``fn`` on every shard in parallel, in shard order."""
        ...

    def pull(self, session_id: str, names: Sequence[str] | None = None,
             datatype: str = "FP32", *, min_step: int = 0,
             wait: float | None = None,
             rows: Mapping[str, Sequence[int] | np.ndarray] | None = None) -> list[WireTensor]:
        ...

    def describe(self, session_id: str) -> SessionInfo:
        ...

    def merge(self, session_id: str, plan: ShardPlan,
              results: Sequence[StepResult]) -> StepResult:
        """One result from every shard's (raises where they are at different steps)."""
        ...

    def seen(self, session_id: str, step: int) -> None:
        """Every shard of the session is at ``step`` now."""
        ...


def totals(plan: ShardPlan, per_shard: Sequence[Sequence[float]]) -> list[float]:
    """Per model tensor, the sum of its pieces' numbers, added in shard order."""
    out = [0.0] * len(plan.tensors)
    for shard, values in zip(plan.shards, per_shard, strict=True):
        if len(values) != len(shard):
            raise _codec.bad_response(f"a shard answered {len(values)} sums for its "
                                      f"{len(shard)} tensors")
        for p, v in zip(shard, values, strict=True):
            out[p.parent] += v
    return out


def exchange_step(shards: Shards, session_id: str, plan: ShardPlan,
                  grads: Sequence[Sequence[WireTensor]], *, sender: Sender | None,
                  base_step: int, return_datatype: str | None, lamb: bool,
                  rows: Mapping[str, np.ndarray] | None = None) -> StepResult:
    """One two-phase step: ``grads`` the pieces of the gradient per shard;
    ``return_datatype`` None: a push (no parameters back). ``rows``: of these tensors
    only these rows come back (pulled after the commits, which then return none)."""
    staged = shards.each(lambda i, t: t.push(session_id, grads[i], require_all=True,
                                             sender=sender, base_step=base_step))

    def fetch(min_step: int = 0) -> list[WireTensor]:
        if not return_datatype:
            return []
        if not rows:
            return shards.pull(session_id, datatype=return_datatype, min_step=min_step)
        whole = [t.name for t in plan.tensors if t.name not in rows]
        if not whole:  # rows only: an empty list of names asks for no whole tensor
            return shards.pull(session_id, datatype=return_datatype, min_step=min_step,
                               rows=rows)
        return shards.pull(session_id, whole, return_datatype, min_step=min_step, rows=rows)

    if all(r.duplicate for r in staged):  # applied before: answer like one server
        return dataclasses.replace(shards.merge(session_id, plan, staged),
                                   params=tuple(fetch()))
    if any(r.duplicate for r in staged):
        # a resent push that some shards applied already: whoever committed there
        # holds every shard's sums and commits on the rest too, so wait for that
        target = max(r.step for r in staged if r.duplicate)
        return StepResult(shards.describe(session_id).step, params=tuple(fetch(target)),
                          duplicate=True)
    steps = {r.step for r in staged}
    if len(steps) != 1:
        shards.merge(session_id, plan, staged)  # raises: different steps
    target = steps.pop() + 1
    sums = totals(plan, [r.exchange.grad_sumsq for r in staged])
    total = math.fsum(sums)
    rounds = [r.round for r in staged]

    def mine(i: int, values: Sequence[float]) -> list[float]:
        return [values[p.parent] for p in plan.shards[i]]

    answer = None if rows else return_datatype  # rows: pulled after
    results = shards.each(lambda i, t: t.commit(
        session_id, target, mine(i, sums), total, round_id=rounds[i],
        return_datatype=answer))
    if lamb and all(r.pending for r in results):
        psq = totals(plan, [r.exchange.param_sumsq for r in results])
        usq = totals(plan, [r.exchange.update_sumsq for r in results])
        results = shards.each(lambda i, t: t.commit(
            session_id, target, mine(i, sums), total, param_sumsq=mine(i, psq),
            update_sumsq=mine(i, usq), round_id=rounds[i], return_datatype=answer))
    elif any(r.pending for r in results):
        # LAMB: another worker's second commit reached some shards first; it
        # commits the others too, so wait for the step there
        done = next(r for r in results if not r.pending)
        shards.seen(session_id, done.step)
        return dataclasses.replace(done, params=tuple(fetch(target)), nonfinite=())
    merged = shards.merge(session_id, plan, results)
    if rows and return_datatype:
        return dataclasses.replace(merged, params=tuple(fetch(target)))
    return merged
