"""``opt.state``: each parameter's optimizer state, read from the server when asked.

torch.optim keeps ``state[p]`` (a dict of tensors such as ``exp_avg`` and ``step``) on
the optimizer; code that inspects moments reads it. Here the state lives on the
server, so the first read after a step fetches every parameter's state in one call
and keeps it until the state can change again (the next step, a load_state_dict, a
restore). Writes stay local: they change this copy, not the server's state (use
``load_state_dict`` for that), as they would change a copy of torch's.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, MutableMapping, Sequence
from typing import Any

__all__ = ["ParamState"]

# Index of a parameter -> its state entry, as torch.optim's state_dict()["state"].
Fetch = Callable[[], dict[int, dict[str, Any]]]


class ParamState(MutableMapping[Any, dict[str, Any]]):
    """A mapping from parameter (by identity, as torch keys it) to its state dict.

    ``params``: returns the optimizer's parameters in state_dict index order;
    ``fetch``: the server's state by index. A parameter with no state yet maps to an
    empty dict, as in torch's ``defaultdict(dict)``.
    """

    def __init__(self, params: Callable[[], Sequence[Any]], fetch: Fetch) -> None:
        self._params = params
        self._fetch = fetch
        self._cache: dict[int, dict[str, Any]] | None = None  # id(param) -> state
        self._ids: set[int] = set()  # the parameters' ids when the cache was filled

    def invalidate(self) -> None:
        """The server's state (or the parameters) may have changed: the next read
        fetches it again."""
        self._cache = None

    def _entries(self) -> dict[int, dict[str, Any]]:
        if self._cache is None:
            params = self._params()
            by_index = self._fetch()
            self._cache = {id(params[i]): entry for i, entry in by_index.items()}
            self._ids = {id(p) for p in params}
        return self._cache

    def _check(self, key: Any) -> int:
        self._entries()
        if id(key) not in self._ids:
            raise KeyError("not a parameter of this optimizer")
        return id(key)

    def __getitem__(self, key: Any) -> dict[str, Any]:
        entries = self._entries()
        return entries.setdefault(self._check(key), {})

    def __setitem__(self, key: Any, value: dict[str, Any]) -> None:
        self._entries()[self._check(key)] = value

    def __delitem__(self, key: Any) -> None:
        del self._entries()[self._check(key)]

    def __contains__(self, key: object) -> bool:
        return id(key) in self._entries() and id(key) in self._ids

    def __iter__(self) -> Iterator[Any]:
        entries = self._entries()
        return iter([p for p in self._params() if id(p) in entries])

    def __len__(self) -> int:
        entries = self._entries()
        return sum(1 for p in self._params() if id(p) in entries)

    def __repr__(self) -> str:
        return f"ParamState({len(self)} parameters with state)"
