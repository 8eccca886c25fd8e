"""A stand-in for ``torch.optim.Optimizer`` where torch is not installed (NumPy mode).

It keeps the same attributes and hook machinery (``param_groups``, ``defaults``,
``state``, step / state-dict / load-state-dict hooks with removable handles, the
step wrapper that runs the step hooks) so :class:`~adamserve_client.optim.RemoteOptimizer`
has one code path with or without torch.
"""

from __future__ import annotations

import functools
import itertools
from collections import OrderedDict, defaultdict
from collections.abc import Callable, Iterable
from typing import Any

__all__ = ["OptimizerBase", "RemovableHandle", "hooked_load", "hooked_state_dict"]

_ids = itertools.count()


def hooked_state_dict(opt: Any, build: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """``build()``'s state_dict between ``opt``'s state-dict hooks, as torch runs them (a
    post hook may return a replacement)."""
    for pre_hook in opt._optimizer_state_dict_pre_hooks.values():
        pre_hook(opt)
    sd = build()
    for post_hook in opt._optimizer_state_dict_post_hooks.values():
        result = post_hook(opt, sd)
        if result is not None:
            sd = result
    return sd


def hooked_load(opt: Any, state_dict: Any, load: Callable[[dict[str, Any]], None]) -> None:
    """``load`` the state_dict between ``opt``'s load hooks, as torch runs them (a pre
    hook may return a replacement)."""
    sd = dict(state_dict)
    for pre_hook in opt._optimizer_load_state_dict_pre_hooks.values():
        result = pre_hook(opt, sd)
        if result is not None:
            sd = result
    load(sd)
    for post_hook in opt._optimizer_load_state_dict_post_hooks.values():
        post_hook(opt)


class RemovableHandle:
    """Removes one hook from the dict it was registered in (like torch's handle)."""

    def __init__(self, hooks: OrderedDict[int, Any]) -> None:
        self._hooks = hooks
        self.id = next(_ids)

    def remove(self) -> None:
        self._hooks.pop(self.id, None)

    def __enter__(self) -> RemovableHandle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()


def _hook_step(func: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        self: OptimizerBase = args[0]
        for pre_hook in list(self._optimizer_step_pre_hooks.values()):
            result = pre_hook(self, args, kwargs)
            if result is not None:
                if not (isinstance(result, tuple) and len(result) == 2):
                    raise RuntimeError(f"{func} must return None or a tuple of "
                                       f"(new_args, new_kwargs), but got {result}.")
                args, kwargs = result
        out = func(*args, **kwargs)
        for post_hook in list(self._optimizer_step_post_hooks.values()):
            post_hook(self, args, kwargs)
        return out

    wrapper.hooked = True  # type: ignore[attr-defined]
    return wrapper


class OptimizerBase:
    """The parts of ``torch.optim.Optimizer`` that the remote optimizer relies on."""

    def __init__(self, params: Iterable[Any], defaults: dict[str, Any]) -> None:
        self.defaults = defaults
        self._optimizer_step_pre_hooks: OrderedDict[int, Callable[..., Any]] = OrderedDict()
        self._optimizer_step_post_hooks: OrderedDict[int, Callable[..., Any]] = OrderedDict()
        self._optimizer_state_dict_pre_hooks: OrderedDict[int, Callable[..., Any]] = (
            OrderedDict())
        self._optimizer_state_dict_post_hooks: OrderedDict[int, Callable[..., Any]] = (
            OrderedDict())
        self._optimizer_load_state_dict_pre_hooks: OrderedDict[int, Callable[..., Any]] = (
            OrderedDict())
        self._optimizer_load_state_dict_post_hooks: OrderedDict[int, Callable[..., Any]] = (
            OrderedDict())
        cls = type(self)
        if not getattr(cls.step, "hooked", False):  # type: ignore[attr-defined]
            setattr(cls, "step", _hook_step(cls.step))  # type: ignore[attr-defined]  # noqa: B010
        self.state: defaultdict[Any, dict[str, Any]] = defaultdict(dict)
        self.param_groups: list[dict[str, Any]] = []
        groups = list(params)
        if not groups:
            raise ValueError("optimizer got an empty parameter list")
        if not isinstance(groups[0], dict):
            groups = [{"params": groups}]
        for group in groups:
            self.add_param_group(group)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        raise NotImplementedError

    def zero_grad(self, set_to_none: bool = True) -> None:
        """NumPy arrays carry no gradient: nothing to reset."""

    @staticmethod
    def _register(hooks: OrderedDict[int, Any], hook: Any, prepend: bool = False
                  ) -> RemovableHandle:
        handle = RemovableHandle(hooks)
        hooks[handle.id] = hook
        if prepend:
            hooks.move_to_end(handle.id, last=False)
        return handle

    def register_step_pre_hook(self, hook: Callable[..., Any]) -> RemovableHandle:
        return self._register(self._optimizer_step_pre_hooks, hook)

    def register_step_post_hook(self, hook: Callable[..., Any]) -> RemovableHandle:
        return self._register(self._optimizer_step_post_hooks, hook)

    def register_state_dict_pre_hook(self, hook: Callable[..., Any],
                                     prepend: bool = False) -> RemovableHandle:
        return self._register(self._optimizer_state_dict_pre_hooks, hook, prepend)

    def register_state_dict_post_hook(self, hook: Callable[..., Any],
                                      prepend: bool = False) -> RemovableHandle:
        return self._register(self._optimizer_state_dict_post_hooks, hook, prepend)

    def register_load_state_dict_pre_hook(self, hook: Callable[..., Any],
                                          prepend: bool = False) -> RemovableHandle:
        return self._register(self._optimizer_load_state_dict_pre_hooks, hook, prepend)

    def register_load_state_dict_post_hook(self, hook: Callable[..., Any],
                                           prepend: bool = False) -> RemovableHandle:
        return self._register(self._optimizer_load_state_dict_post_hooks, hook, prepend)

    def __repr__(self) -> str:
        text = type(self).__name__ + " ("
        for i, group in enumerate(self.param_groups):
            text += f"\nParameter Group {i}\n"
            for key in sorted(group):
                if key != "params":
                    text += f"    {key}: {group[key]}\n"
        return text + ")"
