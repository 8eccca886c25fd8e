"""One session over N adamserve servers: the model's tensors split across shards.

:class:`ShardedTransport` is a :class:`~adamserve_client.transports.Transport` made
of transports, one per shard, so an optimizer uses it like any other
(``server=[url, url, ...]`` builds one). Each shard is an ordinary server holding
an ordinary session under the same id.

**Layout** (:mod:`~adamserve_client.transports.layout`): the model's tensors, in
order, cut into N contiguous ranges of about equal size, large tensors split
between shards. Every shard session carries the labels ``adamserve.shard``
(``<index>/<count>``) and ``adamserve.layout`` (the layout's digest), checked when
a client attaches.

**Steps.** Where the update is elementwise and needs no whole-gradient quantity
(``skip_nonfinite=False``, no ``max_grad_norm``, not LAMB), every shard applies
its part at once, in parallel. Otherwise the shard sessions are created with
``Workers.exchange`` and a step runs in two phases
(:mod:`~adamserve_client.transports.exchange`): the shards report sums of
squares, the client adds them up and commits them, and each shard decides
exactly as one server would.

**Shared memory.** A region (on this host, as every shard server must be) is
registered on every shard, under one name. The shards' pieces, in shard order,
are the model's tensors in order, so the model's packed gradients (or parameters)
in a region are the shards' packed pieces back to back: each shard's step names
its slice of the one place (:func:`shard_places`). Sessions whose step exchanges
sums (see above) take no regions yet: their commits carry the parameters.

**Checkpoints.** Shards checkpoint on their own (every N steps, at the same
steps, or on :meth:`checkpoint`); a sharded checkpoint of step t is complete when
every shard holds one of step t. :meth:`list_checkpoints` returns those steps and
:meth:`restore_checkpoint` rolls every shard back to one, so a restore never
mixes steps.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np

from adamserve_client import errors, tensors
from adamserve_client.tensors import row_bytes
from adamserve_client.transports.base import (
    CheckpointInfo,
    HyperValue,
    RegionInfo,
    RegionRef,
    RoundInfo,
    Sender,
    SessionInfo,
    SessionSpec,
    StateDict,
    StepResult,
    TensorSpec,
    Transport,
    WireTensor,
)
from adamserve_client.transports.exchange import exchange_step
from adamserve_client.transports.layout import (
    DEFAULT_SPLIT_ELEMENTS,
    Piece,
    ShardPlan,
    by_rows,
    dense_pieces,
    join,
    plan_from_sessions,
    plan_shards,
    split,
)
from adamserve_proto.algorithms import ALGORITHMS, qualified
from adamserve_proto.state_blob import SCALAR_SLOTS

__all__ = ["Piece", "ShardPlan", "ShardedTransport", "plan_shards", "shard_places"]

T = TypeVar("T")

SHARD_LABEL = "adamserve.shard"
LAYOUT_LABEL = "adamserve.layout"
AGREE_SECONDS = 5.0  # how long a pull waits for shards one commit apart to agree


@dataclass
class _Session:
    plan: ShardPlan
    exchange: bool
    lamb: bool
    steps: tuple[int, ...]  # each shard's step when last seen

    @property
    def step(self) -> int:
        """The step each push names (a shard at another step refuses it)."""
        return min(self.steps)


@dataclass(frozen=True)
class _Places:
    """A step's shared-memory places, as its caller gave them (the whole model's)."""

    gradients: RegionRef | None
    datatype: str
    params: RegionRef | None


def _kept_whole(algorithm: str, semantics: str = "torch") -> Callable[[TensorSpec], bool] | None:
    """Which tensors a plan must not split: every one of Adafactor's (its step size and
    update clipping are norms over the whole tensor, its factored statistics means over
    whole rows and columns), of Muon's (its matrices are orthogonalised whole) and of
    optax's LAMB and Adafactor (their trust ratio and clipping norms are the tensor's; the
    two-phase exchange splits torch's LAMB only)."""
    row = ALGORITHMS.get(qualified(algorithm.strip().lower(), semantics))
    if row is not None and row.runs in ("adafactor", "muon", "optax.lamb", "optax.adafactor"):
        return lambda t: True
    return None


def _take_rows(w: WireTensor, ids: np.ndarray) -> WireTensor:
    """Rows ``ids`` of whole tensor ``w``, as a row-sparse tensor."""
    values = np.frombuffer(w.data, dtype=np.uint8).reshape(w.shape[0], -1)[ids]
    return WireTensor(w.name, w.shape, w.datatype, values.tobytes(), ids.tobytes())


def _reorder(w: WireTensor, ids: np.ndarray) -> WireTensor:
    """Row-sparse ``w`` (rows from several shards, in shard order) in the order ``ids``
    asked for them."""
    got = np.frombuffer(w.rows or b"", dtype="<i8")
    if np.array_equal(got, ids):
        return w
    where = {int(r): k for k, r in enumerate(got)}
    values = np.frombuffer(w.data, dtype=np.uint8).reshape(len(got), -1)
    order = [where[int(r)] for r in ids]
    return WireTensor(w.name, w.shape, w.datatype, values[order].tobytes(), ids.tobytes())


def _cut_by_rows(algorithm: str) -> Callable[[TensorSpec], bool] | None:
    """Which tensors a plan cuts only between rows: SparseAdam's (a shard steps the rows
    of a row-sparse gradient it holds, whole) and Adagrad's (it takes row-sparse
    gradients too)."""
    if algorithm.strip().lower() in ("sparse_adam", "adagrad"):
        return lambda t: True
    return None


def _needs_exchange(algorithm: str, max_grad_norm: float | None, skip_nonfinite: bool) -> bool:
    return algorithm.strip().lower() == "lamb" or max_grad_norm is not None or skip_nonfinite


def shard_places(plan: ShardPlan, place: RegionRef, datatype: str) -> list[RegionRef]:
    """Per shard, its slice of ``place`` (the model's tensors packed in order, as
    ``datatype``): the shards' pieces, in shard order, are the model's flat order."""
    size = tensors.itemsize(datatype)
    starts = [0]
    for j in range(len(plan.tensors)):
        starts.append(starts[-1] + plan.numel(j))
    if place.byte_size != starts[-1] * size:
        raise errors.InvalidArgument(
            f"region {place.region!r}: {place.byte_size} bytes for the session's "
            f"{starts[-1]} elements as {datatype} ({starts[-1] * size} bytes)",
            reason="INVALID_ARGUMENT")
    out = []
    at = 0  # the next flat element, in model order
    for shard in plan.shards:
        first = at
        for p in shard:
            if starts[p.parent] + p.start != at:
                raise ValueError(f"the shard plan is not in the model's flat order at "
                                 f"{p.spec.name!r}")
            at += p.end - p.start
        out.append(RegionRef(place.region, place.offset + first * size, (at - first) * size))
    return out


class ShardedTransport(Transport):
    """A transport to one session spread over ``shards`` (one transport per server, in
    shard order). ``split_elements``: tensors of at least this many elements may be
    split across shards. Closing it closes the shard transports."""

    def __init__(self, shards: Sequence[Transport], *,
                 split_elements: int = DEFAULT_SPLIT_ELEMENTS) -> None:
        if not shards:
            raise ValueError("a sharded transport needs at least one shard")
        self.shards = list(shards)
        self.url = ",".join(t.url for t in self.shards)
        self.split_elements = split_elements
        self._pool = ThreadPoolExecutor(max_workers=len(self.shards),
                                        thread_name_prefix="adamserve-shard")
        self._sessions: dict[str, _Session] = {}

    # -- plumbing --------------------------------------------------------------

    def each(self, fn: Callable[[int, Transport], T]) -> list[T]:
        """``fn`` on every shard in parallel; the first shard's error if any failed."""
        futures = [self._pool.submit(fn, i, t) for i, t in enumerate(self.shards)]
        results: list[T] = []
        error: BaseException | None = None
        for f in futures:
            try:
                results.append(f.result())
            except BaseException as exc:  # wait for every shard before raising
                error = error or exc
        if error is not None:
            raise error
        return results

    def _session(self, session_id: str) -> _Session:
        s = self._sessions.get(session_id)
        if s is None:
            self._merge_info(session_id, self.each(lambda i, t: t.describe(session_id)))
            s = self._sessions[session_id]
        return s

    def _merge_info(self, session_id: str, infos: Sequence[SessionInfo]) -> SessionInfo:
        """One description of the sharded session (and its plan, cached)."""
        digests = {info.labels.get(LAYOUT_LABEL) for info in infos}
        for i, info in enumerate(infos):
            want = f"{i}/{len(infos)}"
            if info.labels.get(SHARD_LABEL) != want or len(digests) != 1:
                raise errors.FailedPrecondition(
                    f"session {session_id!r} on {self.shards[i].url} is shard "
                    f"{info.labels.get(SHARD_LABEL, '(none: not sharded)')}, expected {want} "
                    f"of one layout: list the servers in their shard order",
                    reason="SHARD_ORDER", metadata={"session_id": session_id,
                                                    "shard": self.shards[i].url})
        plan = plan_from_sessions(infos)
        first = infos[0]
        steps = tuple(i.step for i in infos)
        self._sessions[session_id] = _Session(plan, first.workers.exchange,
                                              first.algorithm.strip().lower() == "lamb"
                                              and first.semantics == "torch",
                                              steps)
        labels = {k: v for k, v in first.labels.items() if k not in (SHARD_LABEL, LAYOUT_LABEL)}
        return dataclasses.replace(
            first, tensors=plan.tensors, step=min(i.step for i in infos),
            state_bytes=sum(i.state_bytes for i in infos),
            moment_bytes=sum(i.moment_bytes for i in infos),
            bytes_per_parameter=sum(i.bytes_per_parameter * i.numel for i in infos)
            / max(1, sum(i.numel for i in infos)),
            checkpointed_step=min(i.checkpointed_step for i in infos),
            workers=dataclasses.replace(first.workers, exchange=False), labels=labels)

    def _diverged(self, session_id: str, steps: Sequence[int]) -> errors.FailedPrecondition:
        at = ", ".join(f"{t.url}: {n}" for t, n in zip(self.shards, steps, strict=True))
        return errors.FailedPrecondition(
            f"the shards of session {session_id!r} are at different steps ({at}; a shard "
            "restarted from an older checkpoint?): restore_checkpoint() rolls them back to "
            "the newest step they all hold", reason="SHARDS_DIVERGED",
            metadata={"session_id": session_id, "steps": ",".join(map(str, steps))})

    def merge(self, session_id: str, plan: ShardPlan,
              results: Sequence[StepResult]) -> StepResult:
        """One result from every shard's: the model's tensors joined, the tensors named
        as the model's."""
        steps = [r.step for r in results]
        if len(set(steps)) != 1:
            raise self._diverged(session_id, steps)
        parent_of = {p.spec.name: plan.tensors[p.parent].name
                     for shard in plan.shards for p in shard}
        nonfinite = tuple(dict.fromkeys(parent_of.get(n, n) for r in results
                                        for n in r.nonfinite))
        first = results[0]
        if not any(r.pending for r in results):
            self.seen(session_id, first.step)
        return StepResult(
            step=first.step, skipped=any(r.skipped for r in results),
            grad_norm=first.grad_norm, nonfinite=nonfinite,
            params=tuple(join(plan, [r.params for r in results])),
            duplicate=all(r.duplicate for r in results),
            pending=any(r.pending for r in results),
            workers=RoundInfo(
                contributors=min(r.contributors for r in results),
                missing=tuple(sorted({m for r in results for m in r.missing})),
                staleness=max(r.staleness for r in results)))

    def seen(self, session_id: str, step: int) -> None:
        known = self._sessions.get(session_id)
        if known is not None:
            known.steps = (step,) * len(self.shards)

    # -- sessions ---------------------------------------------------------------

    def create_session(self, spec: SessionSpec,
                       initial: Sequence[WireTensor] = ()) -> SessionInfo:
        if len(self.shards) > 1 and (spec.workers.mode == "async"
                                     or spec.workers.straggler_timeout > 0):
            # each shard would decide on its own (what is too stale, when time is up)
            # and the shards could apply different steps
            raise ValueError("a session over several shards runs synchronous rounds without a "
                             "straggler timeout: mode 'async' and straggler_timeout need one "
                             "server")
        plan = plan_shards(spec.tensors, len(self.shards), self.split_elements,
                           whole=_kept_whole(spec.algorithm, spec.semantics), rows=_cut_by_rows(spec.algorithm))
        exchange = _needs_exchange(spec.algorithm, spec.max_grad_norm, spec.skip_nonfinite)
        workers = dataclasses.replace(spec.workers, exchange=exchange)
        values = split(plan, initial)
        n = len(self.shards)

        def create(i: int, t: Transport) -> SessionInfo:
            return t.create_session(dataclasses.replace(
                spec, tensors=tuple(p.spec for p in plan.shards[i]), workers=workers,
                labels={**spec.labels, SHARD_LABEL: f"{i}/{n}", LAYOUT_LABEL: plan.digest}),
                values[i])

        futures = [self._pool.submit(create, i, t) for i, t in enumerate(self.shards)]
        infos: list[SessionInfo] = []
        failures: list[BaseException] = []
        made: list[Transport] = []
        for t, f in zip(self.shards, futures, strict=True):
            try:
                infos.append(f.result())
                made.append(t)
            except BaseException as exc:
                failures.append(exc)
        if failures and all(isinstance(f, errors.AlreadyExists) for f in failures):
            # another worker of the job creates the same session at the same time: keep
            # ours, wait until every shard has one, and attach like the others
            self._await_shards(spec.session_id)
            raise failures[0]
        if failures:
            for t in made:  # leave no shard session behind a refused create
                with contextlib.suppress(errors.AdamserveError):
                    t.delete_session(spec.session_id)
            raise failures[0]
        return self._merge_info(spec.session_id, infos)

    def _await_shards(self, session_id: str, seconds: float = 30.0) -> None:
        """Wait until every shard holds ``session_id`` (NotFound after ``seconds``)."""
        deadline = time.monotonic() + seconds
        while True:
            try:
                self.each(lambda i, t: t.describe(session_id))
                return
            except errors.NotFound:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)

    def add_tensors(self, session_id: str, tensors: Sequence[TensorSpec],
                    group: Mapping[str, HyperValue] | None = None,
                    initial: Sequence[WireTensor] = ()) -> SessionInfo:
        raise errors.FailedPrecondition(
            f"session {session_id!r} is sharded and cannot grow: create it with every "
            "parameter group (its layout across the shards is fixed at creation)",
            reason="SESSION_SHARDED", metadata={"session_id": session_id})

    def describe(self, session_id: str) -> SessionInfo:
        return self._merge_info(session_id, self.each(lambda i, t: t.describe(session_id)))

    def list_sessions(self, *, page_size: int = 0) -> list[SessionInfo]:
        """The sharded sessions (those of the first shard labelled as shards)."""
        ids = [s.session_id for s in self.shards[0].list_sessions(page_size=page_size)
               if SHARD_LABEL in s.labels]
        return [self.describe(sid) for sid in ids]

    def delete_session(self, session_id: str) -> None:
        self._sessions.pop(session_id, None)
        self.each(lambda i, t: t.delete_session(session_id))

    # -- steps ------------------------------------------------------------------

    def step(self, session_id: str, gradients: Sequence[WireTensor], *,
             return_datatype: str = "FP32", require_all: bool = False,
             sender: Sender | None = None, base_step: int | None = None,
             gradients_region: RegionRef | None = None, gradients_datatype: str = "FP32",
             params_region: RegionRef | None = None, return_rows: bool = False) -> StepResult:
        return self._step(session_id, gradients, return_datatype, sender, base_step,
                          _Places(gradients_region, gradients_datatype, params_region),
                          return_rows)

    def push(self, session_id: str, gradients: Sequence[WireTensor], *,
             require_all: bool = False, sender: Sender | None = None,
             base_step: int | None = None, gradients_region: RegionRef | None = None,
             gradients_datatype: str = "FP32") -> StepResult:
        return self._step(session_id, gradients, None, sender, base_step,
                          _Places(gradients_region, gradients_datatype, None))

    def _step(self, session_id: str, gradients: Sequence[WireTensor],
              return_datatype: str | None, sender: Sender | None,
              base_step: int | None, places: _Places, return_rows: bool = False) -> StepResult:
        s = self._session(session_id)
        plan = s.plan
        if len(set(s.steps)) > 1:  # as last described: a commit may have landed since
            self.describe(session_id)
            s = self._sessions[session_id]
        if len(set(s.steps)) > 1:
            raise self._diverged(session_id, s.steps)
        if base_step is None:
            base_step = s.step  # a shard at another step refuses the push: nothing applied
        given = {w.name for w in gradients}
        absent = [t.name for t in plan.tensors if t.name not in given]
        if absent and places.gradients is None:
            # checked before any shard is pushed: all or none take the step
            raise ValueError(
                "a sharded session steps every tensor at once (each shard takes every step): "
                f"no gradient for {', '.join(absent[:8])} (frozen or unused parameters: give "
                "the optimizer only those that train, "
                "[p for p in model.parameters() if p.requires_grad])")
        grads = split(plan, gradients)
        # rows back only where every piece of a row-sparse gradient went as rows
        rows_back = return_rows and not dense_pieces(plan, gradients)
        if (places.gradients or places.params) and s.exchange:
            raise errors.FailedPrecondition(
                f"session {session_id!r} is sharded with whole-model checks (skip_nonfinite, "
                "max_grad_norm or LAMB): its shards exchange sums and commit, and a commit "
                "takes no shared-memory region; send the step over the wire",
                reason="SESSION_SHARDED", metadata={"session_id": session_id})
        g_refs: list[RegionRef | None] = [None] * len(self.shards)
        p_refs: list[RegionRef | None] = [None] * len(self.shards)
        if places.gradients is not None:
            g_refs = list(shard_places(plan, places.gradients, places.datatype))
        if places.params is not None and return_datatype is not None:
            p_refs = list(shard_places(plan, places.params, return_datatype))
        if not s.exchange:
            if return_datatype is None:
                results = self.each(lambda i, t: t.push(
                    session_id, grads[i], require_all=True, sender=sender, base_step=base_step,
                    gradients_region=g_refs[i], gradients_datatype=places.datatype))
            else:
                rtype = return_datatype
                results = self.each(lambda i, t: t.step(
                    session_id, grads[i], return_datatype=rtype, require_all=True,
                    sender=sender, base_step=base_step, gradients_region=g_refs[i],
                    gradients_datatype=places.datatype, params_region=p_refs[i],
                    return_rows=rows_back))
            return self.merge(session_id, plan, results)
        rows = {w.name: np.frombuffer(w.rows, dtype="<i8") for w in gradients
                if w.rows is not None} if rows_back else None
        return exchange_step(self, session_id, plan, grads, sender=sender,
                             base_step=base_step, return_datatype=return_datatype,
                             lamb=s.lamb, rows=rows)

    def pull(self, session_id: str, names: Sequence[str] | None = None,
             datatype: str = "FP32", *, min_step: int = 0,
             wait: float | None = None,
             rows: Mapping[str, Sequence[int] | np.ndarray] | None = None) -> list[WireTensor]:
        """The model's parameters, joined from the shards. Shards last seen at different
        steps (a commit still reaching some of them) are given a few seconds to agree,
        so the parts come from one step. ``rows``: from the shards that hold them."""
        s = self._session(session_id)
        plan = s.plan
        if not min_step and len(set(s.steps)) > 1:
            with contextlib.suppress(errors.DeadlineExceeded):  # diverged: take what is
                return self.pull(session_id, names, datatype, min_step=max(s.steps),
                                 wait=AGREE_SECONDS, rows=rows)
        if rows:
            whole = self.pull(session_id, names, datatype, min_step=min_step,
                              wait=wait) if names else []
            return whole + self._pull_rows(session_id, plan, rows, datatype, min_step, wait)
        wanted = set(names) if names else None
        if wanted is not None:
            unknown = sorted(wanted - {t.name for t in plan.tensors})
            if unknown:
                raise ValueError(f"tensors not in the sharded session: {', '.join(unknown)}")
        local = [[p.spec.name for p in shard
                  if wanted is None or plan.tensors[p.parent].name in wanted]
                 for shard in plan.shards]
        parts = self.each(lambda i, t: t.pull(session_id, local[i], datatype,
                                               min_step=min_step, wait=wait)
                           if local[i] else [])
        joined = {w.name: w for w in join(plan, parts)}
        order = list(names) if names else [t.name for t in plan.tensors]
        return [joined[n] for n in order]

    def _pull_rows(self, session_id: str, plan: ShardPlan,
                   rows: Mapping[str, Sequence[int] | np.ndarray], datatype: str,
                   min_step: int, wait: float | None) -> list[WireTensor]:
        """Rows of tensors, each asked of the shard that holds it (a piece cut inside its
        rows: the tensor pulled whole and its rows taken here)."""
        names = {t.name: j for j, t in enumerate(plan.tensors)}
        asks: list[dict[str, np.ndarray]] = [{} for _ in plan.shards]
        whole: list[str] = []
        picked: dict[str, np.ndarray] = {}
        for name, wanted in rows.items():
            if name not in names:
                raise ValueError(f"tensors not in the sharded session: {name}")
            j = names[name]
            picked[name] = ids = np.frombuffer(row_bytes(wanted), dtype="<i8")
            pieces = [(i, p) for i, shard in enumerate(plan.shards) for p in shard
                      if p.parent == j]
            if not all(by_rows(plan, p) or (p.start, p.end) == (0, plan.numel(j))
                       for _, p in pieces):
                whole.append(name)
                continue
            width = math.prod(plan.tensors[j].shape[1:])
            for i, p in pieces:
                lo, hi = p.start // width, p.end // width
                mine = ids[(ids >= lo) & (ids < hi)]
                if len(mine):
                    asks[i][p.spec.name] = mine - lo
        parts = self.each(lambda i, t: t.pull(session_id, [], datatype, min_step=min_step,
                                               wait=wait, rows=asks[i]) if asks[i] else [])
        got = {w.name: w for w in join(plan, parts)}
        out = []
        for w in (self.pull(session_id, whole, datatype, min_step=min_step, wait=wait)
                  if whole else []):
            out.append(_take_rows(w, picked[w.name]))
        for name in rows:
            if name in whole:
                continue
            out.append(_reorder(got[name], picked[name]) if name in got else WireTensor(
                name, plan.tensors[names[name]].shape, datatype, b"", b""))
        order = list(rows)
        return sorted(out, key=lambda w: order.index(w.name))

    def commit(self, session_id: str, step: int, tensor_sumsq: Sequence[float],
               total_sumsq: float, *, param_sumsq: Sequence[float] = (),
               update_sumsq: Sequence[float] = (), round_id: int = 0,
               return_datatype: str | None = "FP32") -> StepResult:
        raise errors.FailedPrecondition(
            "commit belongs to one shard's session: the sharded transport commits its steps "
            "itself (use step or push)", reason="SESSION_SHARDED",
            metadata={"session_id": session_id})

    # -- hyperparameters, workers, schedule ------------------------------------------

    def set_parameters(self, session_id: str, values: Sequence[WireTensor]) -> SessionInfo:
        parts = split(self._session(session_id).plan, values)
        # a shard none of whose tensors changed is not called
        infos = self.each(lambda i, t: t.set_parameters(session_id, parts[i]) if parts[i]
                           else t.describe(session_id))
        return self._merge_info(session_id, infos)

    def set_hyperparameters(self, session_id: str, group: int,
                            changes: Mapping[str, HyperValue]) -> SessionInfo:
        return self._merge_info(session_id, self.each(
            lambda i, t: t.set_hyperparameters(session_id, group, changes)))

    def set_schedule(self, session_id: str, schedule: Mapping[str, Any] | None) -> SessionInfo:
        return self._merge_info(session_id, self.each(
            lambda i, t: t.set_schedule(session_id, schedule)))

    def set_workers(self, session_id: str, count: int) -> SessionInfo:
        """The new count on every shard, or on none: a shard that refuses (it holds pushes
        of an open round) puts the others back to their count."""
        before = self.each(lambda i, t: t.describe(session_id))
        futures = [self._pool.submit(t.set_workers, session_id, count) for t in self.shards]
        infos: list[SessionInfo] = []
        failure: BaseException | None = None
        for f in futures:
            try:
                infos.append(f.result())
            except BaseException as exc:
                failure = failure or exc
        if failure is not None:
            for t, old in zip(self.shards, before, strict=True):
                with contextlib.suppress(errors.AdamserveError):
                    t.set_workers(session_id, old.workers.count)
            raise failure
        return self._merge_info(session_id, infos)

    # -- same-host shared memory ---------------------------------------------------

    def register_shared_memory(self, name: str, key: str, byte_size: int) -> RegionInfo:
        """The region on every shard, or on none: the shards that registered it drop
        it again when another refuses."""
        futures = [self._pool.submit(t.register_shared_memory, name, key, byte_size)
                   for t in self.shards]
        infos: list[RegionInfo] = []
        made: list[Transport] = []
        failure: BaseException | None = None
        for t, f in zip(self.shards, futures, strict=True):
            try:
                infos.append(f.result())
                made.append(t)
            except BaseException as exc:
                failure = failure or exc
        if failure is not None:
            for t in made:
                with contextlib.suppress(errors.AdamserveError):
                    t.unregister_shared_memory(name)
            raise failure
        return infos[0]

    def unregister_shared_memory(self, name: str) -> None:
        self.each(lambda i, t: t.unregister_shared_memory(name))

    def list_shared_memory(self) -> list[RegionInfo]:
        """The regions every shard holds."""
        per_shard = self.each(lambda i, t: t.list_shared_memory())
        common = set(per_shard[0]).intersection(*per_shard[1:])
        return [r for r in per_shard[0] if r in common]

    @property
    def timeout(self) -> float | None:
        """The longest call timeout of the shards' transports (None: one has none)."""
        limits: list[float] = []
        for t in self.shards:
            limit = getattr(t, "timeout", None)
            if limit is None:
                return None
            limits.append(float(limit))
        return max(limits)

    # -- state and checkpoints -----------------------------------------------------

    def export_state(self, session_id: str, native: bool = False) -> StateDict:
        """The state_dict of the whole model: each tensor's slots joined from its pieces
        (torch's form only: a piece's stored moments have its own block scales)."""
        if native:
            raise ValueError("a sharded session exports its state in torch's form only; "
                             "export each shard's native state from its own server")
        plan = self._session(session_id).plan
        parts = self.each(lambda i, t: t.export_state(session_id))
        pieces: dict[int, list[tuple[Piece, dict[str, Any]]]] = {}
        for shard, sd in zip(plan.shards, parts, strict=True):
            by_name = {p.spec.name: p for p in shard}
            for g in sd["param_groups"]:
                for idx, name in zip(g["params"], g["param_names"], strict=True):
                    found = sd["state"].get(idx)
                    if found is not None:
                        pieces.setdefault(by_name[name].parent, []).append((by_name[name],
                                                                            found))
        state: dict[int, dict[str, Any]] = {}
        for j, got in sorted(pieces.items()):
            got.sort(key=lambda pe: pe[0].start)
            shape = plan.tensors[j].shape
            entry: dict[str, Any] = {}
            whole = len(got) == 1 and got[0][0].spec.name == plan.tensors[j].name
            for key, value in got[0][1].items():
                # the scalars are the same on every piece (they step together); a whole
                # tensor's slots are as its shard keeps them (Adafactor's factored shapes)
                if key in SCALAR_SLOTS or whole:
                    entry[key] = value
                else:
                    arrays = [np.asarray(e[key]).reshape(-1) for _, e in got]
                    entry[key] = np.concatenate(arrays).reshape(shape)
            state[j] = entry
        groups = []
        for g_index, g in enumerate(parts[0]["param_groups"]):
            members = [j for j, t in enumerate(plan.tensors) if t.group == g_index]
            hyper = {k: v for k, v in g.items() if k not in ("params", "param_names")}
            groups.append({**hyper, "params": members,
                           "param_names": [plan.tensors[j].name for j in members]})
        return {"state": state, "param_groups": groups}

    def import_state(self, session_id: str, state: Mapping[str, Any]) -> SessionInfo:
        """Split a whole-model state_dict (keyed as :meth:`export_state` writes it, or by
        ``param_names``) into the shards' pieces."""
        plan = self._session(session_id).plan
        index = {t.name: j for j, t in enumerate(plan.tensors)}
        parent_of: dict[Any, int] = {}
        for g in state["param_groups"]:
            names = g.get("param_names")
            for k, idx in enumerate(g["params"]):
                if names is not None:
                    if names[k] not in index:
                        raise ValueError(f"state_dict: tensor {names[k]!r} is not in the "
                                         "session")
                    parent_of[idx] = index[names[k]]
                else:
                    parent_of[idx] = int(idx)
        entries = {parent_of[idx]: e for idx, e in state["state"].items() if idx in parent_of}
        # every shard takes the model's step, also one whose pieces have no state yet
        step_count = int(max((float(e.get("step", 0)) for e in entries.values()), default=0))

        def shard_state(i: int) -> dict[str, Any]:
            shard = plan.shards[i]
            sd_state: dict[int, dict[str, Any]] = {}
            for k, p in enumerate(shard):
                e = entries.get(p.parent)
                if e is None:
                    continue
                whole = p.spec.name == plan.tensors[p.parent].name  # slots as they are
                sd_state[k] = {key: v if key in SCALAR_SLOTS or whole else np.asarray(
                    v).reshape(-1)[p.start:p.end].reshape(p.spec.shape) for key, v in e.items()}
            groups = []
            for g_index, g in enumerate(state["param_groups"]):
                mine = [k for k, p in enumerate(shard) if p.spec.group == g_index]
                hyper = {k: v for k, v in g.items() if k not in ("params", "param_names")}
                groups.append({**hyper, "params": mine,
                               "param_names": [shard[k].spec.name for k in mine]})
            return {"state": sd_state, "param_groups": groups, "step_count": step_count}

        return self._merge_info(session_id, self.each(
            lambda i, t: t.import_state(session_id, shard_state(i))))

    def checkpoint(self, session_id: str) -> CheckpointInfo:
        """A checkpoint on every shard; complete (and returned) only if all hold one step."""
        infos = self.each(lambda i, t: t.checkpoint(session_id))
        steps = sorted({c.step for c in infos})
        if len(steps) != 1:
            raise errors.FailedPrecondition(
                f"the shards of session {session_id!r} checkpointed different steps "
                f"({', '.join(map(str, steps))}): the sharded checkpoint is not complete; a "
                "step was in flight on some shards (checkpoint between steps)",
                reason="CHECKPOINT_INCOMPLETE", metadata={"session_id": session_id})
        return CheckpointInfo(session_id, steps[0], ";".join(c.path for c in infos),
                              sum(c.bytes for c in infos))

    def list_checkpoints(self, session_id: str) -> list[int]:
        """Steps of the complete sharded checkpoints: those every shard holds."""
        per_shard = self.each(lambda i, t: set(t.list_checkpoints(session_id)))
        return sorted(set.intersection(*per_shard))

    def restore_checkpoint(self, session_id: str, step: int) -> SessionInfo:
        return self._merge_info(session_id, self.each(
            lambda i, t: t.restore_checkpoint(session_id, step)))

    def close(self) -> None:
        self.each(lambda i, t: t.close())
        self._pool.shutdown(wait=False)

    def __repr__(self) -> str:
        return f"ShardedTransport({[t.url for t in self.shards]!r})"
