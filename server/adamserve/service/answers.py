"""What a round answers its pushes and commits (see ``docs/exchange.md``)."""

from __future__ import annotations

from adamserve.errors import Aborted
from adamserve.service.tensors import encode_params
from adamserve.service.types import StepResult, TensorChunk
from adamserve.sessions import meta
from adamserve.sessions.coordinator import Round
from adamserve.sessions.rounds import Outcome
from adamserve.sessions.session import Session


def answer(session: Session, r: Round | Outcome, return_datatype: str | None) -> StepResult:
    """Round ``r``'s answer (its lock held): pending with the sums the next commit needs
    while it waits for one, else its outcome and the parameters after it; Aborted if
    it failed. An :class:`Outcome` stands for a round that ended."""
    o = r if isinstance(r, Outcome) else r.outcome
    assert o is not None
    if o.error is not None:
        raise Aborted(o.error, reason="ROUND_ABORTED", metadata=meta(session.id, step=o.step))
    if isinstance(r, Round) and r.staged:  # waiting for its commit
        lamb = r.lamb
        return StepResult(
            session.opt.step_count, False, None, (), pending=True,
            contributors=o.contributors, missing=o.missing, round=r.id,
            grad_sumsq=tuple(float(x) for x in r.grad_sumsq) if lamb is None and
            r.grad_sumsq is not None else (),
            param_sumsq=tuple(float(x) for x in lamb.param_sumsq) if lamb else (),
            update_sumsq=tuple(float(x) for x in lamb.update_sumsq) if lamb else ())
    params: list[TensorChunk] = []
    if return_datatype and isinstance(r, Round) and r.owed.get(return_datatype):
        # its waiting workers share one encoding of the step's parameters (kept until
        # the last has collected it), not one copy each
        kept = r.kept.get(return_datatype)
        if kept is None:
            kept = r.kept[return_datatype] = encode_params(session.opt, None, return_datatype)
        params = kept
    elif return_datatype:
        params = encode_params(session.opt, None, return_datatype)
    return StepResult(o.step if not o.skipped else o.step - 1, o.skipped, o.grad_norm,
                      o.nonfinite, params, contributors=o.contributors, missing=o.missing,
                      round=o.round)


def staged_sums(r: Round) -> StepResult:
    """A shard's answer to a push into round ``r``, once the round was staged: its
    per-tensor sums of squares, for the commit (also after the commit landed)."""
    o = r.outcome
    assert o is not None and r.grad_sumsq is not None
    return StepResult(r.step - 1, False, None, (), pending=True, contributors=o.contributors,
                      missing=o.missing, grad_sumsq=tuple(float(x) for x in r.grad_sumsq),
                      round=r.id)
