"""Muon for the matrices and AdamW for the rest, as one optimizer (docs/muon-adamw.md).

``MuonWithAdamW(groups, server=..., session="run1")`` takes parameter groups that each
name their algorithm, as the community's ``MuonWithAuxAdam`` does: ``use_muon=True``
groups are stepped by ``torch.optim.Muon`` (2-D parameters only), ``use_muon=False``
groups by ``torch.optim.AdamW``, each with that class's keys and defaults.

It is two remote optimizers, one per algorithm (:class:`~adamserve_client.optim.Muon`
and :class:`~adamserve_client.optim.AdamW`, sessions ``<session>.muon`` and
``<session>.adamw`` on one connection), whose ``param_groups`` are the very dicts in
this optimizer's ``param_groups``: what a torch LR scheduler (or the user) writes into
a group is what the next step sends, as for any remote optimizer. ``state``,
``state_dict()`` and ``load_state_dict()`` speak for all the parameters, indexed in
this optimizer's group order, in torch's format.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Iterable, Mapping
from copy import deepcopy
from typing import TYPE_CHECKING, Any

from adamserve_client import errors, validation
from adamserve_client._optimizer_base import hooked_load, hooked_state_dict
from adamserve_client._params import sparse_message
from adamserve_client._session import Server, connect_server
from adamserve_client._state_dict import import_rows, match, packed_groups
from adamserve_client._torch import is_tensor, torch
from adamserve_client.optim import AdamW, Muon, RemoteOptimizer
from adamserve_client.param_state import ParamState
from adamserve_client.transports import SessionInfo, Transport
from adamserve_client.transports.base import CheckpointInfo, StateDict, Workers
from adamserve_proto.algorithms import ALGORITHMS, AlgorithmDef

if TYPE_CHECKING:
    from torch.optim import Optimizer as _Base
else:
    try:
        from torch.optim import Optimizer as _Base
    except ImportError:  # NumPy mode: the class exists, constructing it says why not
        from adamserve_client._optimizer_base import OptimizerBase as _Base

__all__ = ["MuonWithAdamW"]

_KEY = "use_muon"
# in the order the steps run; the suffix of each session's name
_ALGORITHMS = ("muon", "adamw")
_CLASSES: dict[str, type[RemoteOptimizer]] = {"muon": Muon, "adamw": AdamW}
# group keys that are no algorithm's: torch's (param_names; initial_lr, which an LR
# scheduler resumed with last_epoch needs) and the choice itself; never sent
_PASSED = frozenset({"params", "param_names", "initial_lr", _KEY})


def _group_defaults(algo: AlgorithmDef) -> dict[str, Any]:
    """The keys of a group of torch's class for ``algo``, with that class's defaults."""
    return {**algo.defaults, **{k: algo.switch_default(k) for k in sorted(algo.switches)}}


_DEFAULTS = {name: _group_defaults(ALGORITHMS[name]) for name in _ALGORITHMS}
_TITLE = {"muon": "Muon", "adamw": "AdamW"}


def _close_all(inners: Mapping[str, RemoteOptimizer], transport: Transport,
               owns: bool) -> None:
    """Finalizer: the inner optimizers first (their anonymous sessions are deleted over
    the connection), then the connection."""
    for inner in list(inners.values()):
        with contextlib.suppress(Exception):  # the server may be gone already
            inner.close()
    if owns:
        with contextlib.suppress(Exception):
            transport.close()


class MuonWithAdamW(_Base):
    """``torch.optim.Muon`` on the groups with ``use_muon=True`` and ``torch.optim.AdamW``
    on the others, on an adamserve server, as one ``torch.optim.Optimizer``.

    ``params``: parameter groups (dicts), each with ``params`` and ``use_muon``, and any
    of that algorithm's keys (Muon: lr, weight_decay, momentum, nesterov,
    ns_coefficients, eps, ns_steps, adjust_lr_fn; AdamW: lr, betas, eps, weight_decay,
    amsgrad, maximize, foreach, capturable, differentiable, fused,
    decoupled_weight_decay); a key left out takes torch's default for that class.
    ``initial_lr`` and ``param_names`` pass through, as in torch.

    The keyword arguments are :class:`~adamserve_client.optim.RemoteOptimizer`'s, for
    both sessions: ``session="run1"`` names them ``run1.muon`` and ``run1.adamw`` (an
    algorithm without groups has none), and a later optimizer with the same name attaches
    to both; without a name both are anonymous. ``schedule`` and ``workers`` apply to
    each session.

    ``muon`` and ``adamw`` are the two inner optimizers (None for an algorithm without
    groups), for what concerns one session (``last_step``, ``session_id``).
    """

    def __init__(self, params: Iterable[dict[str, Any]], *, server: Server = None,
                 session: str | None = None, token: str | None = None,
                 wire_dtype: str | None = None, master_dtype: str | None = None,
                 schedule: Mapping[str, Any] | None = None, timeout: float | None = None,
                 workers: int | Workers | None = None, worker_id: str | None = None,
                 shared_memory: bool | None = None) -> None:
        if torch is None:
            raise ImportError("MuonWithAdamW needs torch (its parameters are torch tensors); "
                              "without it, pair adamserve_client.Muon and "
                              "adamserve_client.AdamW")
        if is_tensor(params):
            raise TypeError("params argument given to the optimizer should be an iterable of "
                            f"Tensors or dicts, but got {torch.typename(params)}")
        groups = list(params)
        for g, group in enumerate(groups):
            if not isinstance(group, dict):
                raise TypeError(
                    f"MuonWithAdamW takes parameter groups, dicts with 'params' and "
                    f"'{_KEY}' (True: Muon, for 2-D matrices; False: AdamW), but params[{g}] "
                    f"is {type(group).__name__}")
        self._inners: dict[str, RemoteOptimizer] = {}
        self._created: set[str] = set()  # the sessions this optimizer made (not attached to)
        self._routes: list[str] = []  # the algorithm of each group, fixed when it is added
        self._building = True
        super().__init__(groups, {})  # checks and fills every group (add_param_group)
        self._building = False
        # torch's defaultdict(dict), read from the two sessions instead
        self.state = ParamState(  # type: ignore[assignment]
            self._all_params, self._server_state)
        self._name = session
        self._options: dict[str, Any] = {
            "wire_dtype": wire_dtype, "master_dtype": master_dtype, "schedule": schedule,
            "workers": workers, "worker_id": worker_id, "shared_memory": shared_memory}
        self._transport, self._owns = connect_server(server, token, timeout)
        self._closed = False
        try:
            for algo in _ALGORITHMS:
                mine = [grp for grp, route in zip(self.param_groups, self._routes, strict=True)
                        if route == algo]
                if mine:
                    self._open(algo, mine)
        except BaseException:
            self._abandon()
            raise
        self._finalizer = weakref.finalize(self, _close_all, self._inners, self._transport,
                                           self._owns)

    # -- the two sessions --------------------------------------------------------------

    @property
    def muon(self) -> RemoteOptimizer | None:
        """The optimizer of the Muon groups (None: there are none)."""
        return self._inners.get("muon")

    @property
    def adamw(self) -> RemoteOptimizer | None:
        """The optimizer of the AdamW groups (None: there are none)."""
        return self._inners.get("adamw")

    @property
    def session_ids(self) -> dict[str, str]:
        """Each algorithm's session id."""
        return {algo: inner.session_id for algo, inner in self._inners.items()}

    @property
    def transport(self) -> Transport:
        """The connection both sessions use."""
        return self._transport

    def _open(self, algo: str, groups: list[dict[str, Any]]) -> None:
        """Create (or attach to) ``algo``'s session with ``groups``, the dicts of our
        ``param_groups`` (the inner optimizer's groups are those same objects)."""
        name = None if self._name is None else f"{self._name}.{algo}"
        existed = False
        if name is not None:
            try:
                self._transport.describe(name)
                existed = True
            except errors.NotFound:
                pass
        self._inners[algo] = _CLASSES[algo](groups, server=self._transport, session=name,
                                            **self._options)
        if not existed:
            self._created.add(algo)

    def _abandon(self) -> None:
        """Construction failed: delete the sessions it created (not those it attached
        to), close the connection if it is ours."""
        for algo, inner in self._inners.items():
            with contextlib.suppress(Exception):
                inner.close(delete=algo in self._created or None)
        self._inners.clear()
        if self._owns:
            self._transport.close()

    def _checked(self) -> list[tuple[str, RemoteOptimizer]]:
        """The inner optimizers, once sure each still steps the groups it was given."""
        if len(self.param_groups) != len(self._routes):
            raise ValueError(f"MuonWithAdamW has {len(self._routes)} parameter groups but "
                             f"param_groups holds {len(self.param_groups)}: add groups with "
                             "add_param_group")
        for g, (group, algo) in enumerate(zip(self.param_groups, self._routes, strict=True)):
            if group.get(_KEY) is not (algo == "muon"):
                raise ValueError(f"param_groups[{g}]: {_KEY} was {algo == 'muon'} when the "
                                 f"group was added and is now {group.get(_KEY)!r}; a group's "
                                 "algorithm is fixed (make a new optimizer to change it)")
        for algo, inner in self._inners.items():
            ours = [grp for grp, route in zip(self.param_groups, self._routes, strict=True)
                    if route == algo]
            if len(ours) != len(inner.param_groups) or any(
                    a is not b for a, b in zip(ours, inner.param_groups, strict=True)):
                raise ValueError("MuonWithAdamW's param_groups were replaced by other dicts; "
                                 "change the groups in place (group['lr'] = ...), as LR "
                                 "schedulers do")
        return [(algo, self._inners[algo]) for algo in _ALGORITHMS if algo in self._inners]

    # -- groups ------------------------------------------------------------------------

    def _prepare(self, g: int, group: dict[str, Any]) -> str:
        """Check group ``g``'s choice and keys and fill in its algorithm's defaults (as
        torch's class would); returns the algorithm."""
        if _KEY not in group:
            raise ValueError(f"param_groups[{g}] has no '{_KEY}': each group says which "
                             f"algorithm steps it, {_KEY}=True (Muon, for 2-D matrices) or "
                             f"{_KEY}=False (AdamW, for the rest)")
        choice = group[_KEY]
        if not isinstance(choice, bool):
            raise TypeError(f"param_groups[{g}]: {_KEY} must be True or False, got "
                            f"{choice!r}")
        algo, other = ("muon", "adamw") if choice else ("adamw", "muon")
        unknown = sorted(set(group) - _PASSED - set(_DEFAULTS[algo]))
        if unknown:
            hint = ""
            if set(unknown) <= set(_DEFAULTS[other]):
                hint = f" ({'those are' if len(unknown) > 1 else 'that is'} {_TITLE[other]}'s)"
            raise ValueError(
                f"param_groups[{g}] ({_KEY}={choice}, {_TITLE[algo]}): unknown key(s) "
                f"{', '.join(map(repr, unknown))}{hint}; {_TITLE[algo]} takes "
                f"{', '.join(sorted(_DEFAULTS[algo]))}")
        for key, value in _DEFAULTS[algo].items():
            group.setdefault(key, value)
        # torch checks its constructor's arguments; here each group is its own defaults
        validation.check_constructor(algo, {k: group[k] for k in _DEFAULTS[algo]})
        return algo

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a parameter group (with its ``use_muon``); after construction its
        algorithm's session grows with it (or is made, for its first group)."""
        if not isinstance(param_group, dict):
            raise TypeError(f"param_group must be a dict, but got {type(param_group)}")
        g = len(self.param_groups)
        algo = self._prepare(g, param_group)
        super().add_param_group(param_group)  # torch's checks: tensors, leaves, duplicates
        try:
            if algo == "muon":
                validation.check_params("muon", param_group["params"])
            if not self._building:
                inner = self._inners.get(algo)
                if inner is None:
                    self._open(algo, [param_group])
                else:
                    inner.add_param_group(param_group)
                self.state.invalidate()  # type: ignore[attr-defined]
            self._routes.append(algo)
        except BaseException:
            del self.param_groups[g:]  # the optimizer stays as it was
            raise

    def _all_params(self) -> list[Any]:
        return [p for group in self.param_groups for p in group["params"]]

    def _indices(self, algo: str) -> list[int]:
        """Our index (state_dict's) of each of ``algo``'s parameters, in its order."""
        out: list[int] = []
        start = 0
        for group, route in zip(self.param_groups, self._routes, strict=True):
            n = len(group["params"])
            if route == algo:
                out.extend(range(start, start + n))
            start += n
        return out

    def params_changed(self, params: Iterable[Any] | None = None) -> None:
        """Say that ``params`` (default: all) were changed in a way the optimizer cannot
        see (see :meth:`RemoteOptimizer.params_changed`)."""
        if params is None:
            for inner in self._inners.values():
                inner.params_changed()
            return
        given = list(params)
        ids = {id(x[1] if isinstance(x, tuple) else x) for x in given}
        known = {id(p) for p in self._all_params()}
        if not ids <= known:
            raise ValueError("params_changed: some of the given tensors are not parameters "
                             "of this optimizer")
        for inner in self._inners.values():
            mine = {id(p) for grp in inner.param_groups for p in grp["params"]}
            picked = [x for x in given if id(x[1] if isinstance(x, tuple) else x) in mine]
            if picked:
                inner.params_changed(picked)

    # -- steps -------------------------------------------------------------------------

    def step(self, closure: Any = None) -> Any:
        """One step of both algorithms on their servers' sessions (Muon's first); returns
        ``closure()``'s loss (or None). Everything checked before either step is sent:
        torch's refusals and the hyperparameters changed since the last step."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        inners = self._checked()
        for algo, inner in inners:
            members = [p for grp in inner.param_groups for p in grp["params"]]
            message = sparse_message(algo, _TITLE[algo])
            if message is not None and any(p.grad is not None and p.grad.is_sparse
                                           for p in members):
                raise RuntimeError(message)
            validation.check_step(algo, inner.param_groups, members)
        for _, inner in inners:
            # a refused change fails here, before either session has stepped
            inner._session.sync_hyperparameters(inner.param_groups)
        try:
            for _, inner in inners:
                inner.step()
        finally:
            self.state.invalidate()  # type: ignore[attr-defined]
        return loss

    # -- state_dict --------------------------------------------------------------------

    def _server_state(self) -> dict[int, dict[str, Any]]:
        """Every parameter's state by our index, from both sessions."""
        state: dict[int, dict[str, Any]] = {}
        for algo, inner in self._inners.items():
            index = self._indices(algo)
            for i, entry in inner.state_dict()["state"].items():
                state[index[i]] = entry
        return dict(sorted(state.items()))

    def state_dict(self) -> StateDict:
        """Both sessions' state in torch.optim's format: ``state`` by the index of each
        parameter in ``param_groups`` order (Muon's ``momentum_buffer``; AdamW's
        ``step``, ``exp_avg``, ``exp_avg_sq``), ``param_groups`` with their ``use_muon``."""
        def build() -> StateDict:
            self._checked()
            return {"state": self._server_state(),
                    "param_groups": packed_groups(self.param_groups)}

        return hooked_state_dict(self, build)

    def load_state_dict(self, state_dict: StateDict) -> None:
        """Load a state_dict of this class (its groups each with the same ``use_muon`` as
        ours) into both sessions, and its hyperparameters into ``param_groups``. Both
        halves are checked before either is sent."""
        hooked_load(self, state_dict, self._load)

    def _load(self, sd: StateDict) -> None:
        self._checked()
        saved = list(sd["param_groups"])
        saved_state: Mapping[Any, Any] = sd["state"]
        if len(saved) != len(self.param_groups):
            raise ValueError(f"loaded state dict has {len(saved)} parameter groups; this "
                             f"optimizer has {len(self.param_groups)}")
        parts: dict[str, StateDict] = {a: {"state": {}, "param_groups": []}
                                       for a in self._inners}
        for g, (theirs, algo) in enumerate(zip(saved, self._routes, strict=True)):
            if _KEY not in theirs:
                raise ValueError(f"loaded param_groups[{g}] has no '{_KEY}': expected a "
                                 "state_dict of MuonWithAdamW")
            if theirs[_KEY] is not (algo == "muon"):
                raise ValueError(f"loaded param_groups[{g}] has {_KEY}={theirs[_KEY]!r}; "
                                 f"this optimizer's group {g} has {_KEY}={algo == 'muon'}")
            parts[algo]["param_groups"].append(theirs)
            for pid in theirs["params"]:
                if pid in saved_state:
                    parts[algo]["state"][pid] = saved_state[pid]
        for algo, inner in self._inners.items():  # what each load would refuse, first
            part = deepcopy(parts[algo]["param_groups"])
            ids = match(inner._params, inner.param_groups, part)
            import_rows(inner._params, parts[algo]["state"], ids, inner._session.algo)
        try:
            for algo, inner in self._inners.items():
                inner.load_state_dict(parts[algo])
        finally:
            # the inner optimizers' new groups (the loaded ones, with our parameters) are
            # ours, in our order
            position = dict.fromkeys(self._inners, 0)
            groups = []
            for algo in self._routes:
                groups.append(self._inners[algo].param_groups[position[algo]])
                position[algo] += 1
            self.param_groups = groups
            self.state.invalidate()  # type: ignore[attr-defined]

    # -- the sessions, directly --------------------------------------------------------

    def describe(self) -> dict[str, SessionInfo]:
        """Each session's view (see :meth:`RemoteOptimizer.describe`), by algorithm."""
        self._checked()
        return {algo: inner.describe() for algo, inner in self._inners.items()}

    def checkpoint(self) -> dict[str, CheckpointInfo]:
        """Write a durable checkpoint of both sessions now, by algorithm."""
        self._checked()
        return {algo: inner.checkpoint() for algo, inner in self._inners.items()}

    def restore_checkpoint(self, step: int | None = None) -> int:
        """Roll both sessions back to their checkpoints of ``step`` (default: the newest
        step both hold) and pull their parameters; returns the step."""
        held = {algo: set(inner.transport.list_checkpoints(inner.session_id))
                for algo, inner in self._inners.items()}
        if step is None:
            common = set.intersection(*held.values()) if held else set()
            if not common:
                raise errors.FailedPrecondition(
                    f"sessions {sorted(self.session_ids.values())} have no checkpoint of the "
                    "same step to restore")
            step = max(common)
        lacking = [self._inners[a].session_id for a, steps in held.items() if step not in steps]
        if lacking:
            raise errors.FailedPrecondition(f"session(s) {lacking} have no checkpoint of step "
                                            f"{step}")
        for inner in self._inners.values():
            inner.restore_checkpoint(step)
        self.state.invalidate()  # type: ignore[attr-defined]
        return step

    def set_schedule(self, schedule: Mapping[str, Any] | None) -> dict[str, SessionInfo]:
        """Replace (None: remove) the server-side learning-rate schedule of both."""
        return {algo: inner.set_schedule(schedule) for algo, inner in self._inners.items()}

    def pull(self) -> None:
        """Overwrite the local parameters with both sessions' master weights."""
        for inner in self._inners.values():
            inner.pull()
        self.state.invalidate()  # type: ignore[attr-defined]

    def close(self, delete: bool | None = None) -> None:
        """Release the connection; ``delete`` both sessions (default: only anonymous ones)."""
        if self._closed:
            return
        self._closed = True
        self._finalizer.detach()
        try:
            for inner in self._inners.values():
                inner.close(delete)
        finally:
            if self._owns:
                self._transport.close()

    def __enter__(self) -> MuonWithAdamW:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
