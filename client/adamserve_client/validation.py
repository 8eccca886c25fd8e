"""torch.optim's argument checks, raised in the client before any network call.

Filled in to match torch 2.13's ``torch/optim/*.py`` exactly (exception types and
messages), so code that catches torch's errors catches ours.

:func:`check_constructor` repeats the constructors' checks in torch's order, on the
caller's own objects (so a message such as ``Invalid learning rate: tensor(-0.0010)``
prints the value exactly as torch does, and a value torch cannot compare fails with
the same ``TypeError``). :func:`check_step` repeats what a CPU (or CUDA) ``step()``
of torch refuses for the implementation switches (``foreach``, ``fused``,
``capturable``, ``differentiable``): it follows torch's choice of implementation per
parameter group (``fused`` → ``foreach`` → the single-tensor loop, ``foreach=None``
defaulting as ``_default_to_fused_or_foreach`` does) and raises the first error that
implementation raises, group by group, parameter by parameter.

The schedule-free pair follows facebookresearch's schedulefree instead, whose
constructors check nothing (the server refuses what it cannot run, naming the key):
:func:`check_mode` raises the package's ``Exception`` for a step outside train mode.
optax's aliases (the ``optax.<alias>`` rows) check nothing either when they are built;
here only what the wire could not carry: a torch switch (optax's ``TypeError`` for an
unexpected keyword) and a dtype that is not a name the server takes.

Two approximations, both for groups that override a switch of the defaults: torch
turns autograd on during ``step()`` from ``defaults["differentiable"]`` (the groups are
all check_step sees, so each group's own flag stands for it), and Adagrad checks the
device and dtype of ``fused`` parameters once per optimizer (here: every step, with the
same verdict, since a parameter's device and dtype do not change).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from adamserve_client._torch import is_tensor, torch
from adamserve_proto.algorithms import ALGORITHMS, CHOICES, OPTAX_DTYPES, SWITCHES

__all__ = ["check_constructor", "check_mode", "check_params", "check_step"]

# the client's key -> the class name it follows, torch.optim's or the oracle's (for
# TypeError messages); LAMB has none
_CLASS = {row.name: row.class_name for row in ALGORITHMS.values() if row.class_name}
# the rows whose steps follow torch.optim's implementations (check_step)
_TORCH = frozenset(row.name for row in ALGORITHMS.values() if row.torch_class)
# implementation switches of torch.optim that a torch class does not take: passing one
# (possible through the generic RemoteOptimizer) is torch's TypeError
_NOT_ACCEPTED = {name: tuple(k for k in SWITCHES if k not in ALGORITHMS[name].switches)
                 for name in _CLASS}

_LEAF_IN_PLACE = "a leaf Variable that requires grad is being used in an in-place operation."
_FOREACH_AUTOGRAD = "_foreach ops don't support autograd"
_TENSOR_LR_FOREACH = "lr as a Tensor is not supported for capturable=False and foreach=True"
# schedulefree's step() outside train mode (it raises a bare Exception)
_NOT_TRAINING = ("Optimizer was not in train mode when step is called. Please insert .train() "
                 "and .eval() calls on the optimizer. See documentation for details.")


# -- construction ------------------------------------------------------------------------


def check_constructor(algorithm: str, hyper: Mapping[str, Any]) -> None:
    """Raise what ``torch.optim.<algorithm>(params, **hyper)`` raises in its constructor.

    ``algorithm``: the client's key (adam, amsgrad, adamw, nadam, radam, adamax, adagrad,
    rmsprop, lamb); ``hyper``: the defaults merged with the caller's keyword arguments,
    under torch's names (including foreach, fused, capturable, differentiable).

    torch checks ``fused`` against ``foreach``/``differentiable`` after it has taken the
    parameters; here they come last too, but before the parameters are looked at.
    """
    if algorithm.startswith("optax."):
        _optax(algorithm, hyper)
        return
    for key in _NOT_ACCEPTED.get(algorithm, ()):
        if key in hyper:
            raise TypeError(f"{_CLASS[algorithm]}.__init__() got an unexpected keyword "
                            f"argument '{key}'")
    if algorithm in ("adam", "amsgrad", "adamw"):
        _adam(hyper)
    elif algorithm in ("nadam", "radam", "adamax", "lamb"):
        _adam_family(algorithm, hyper)
    elif algorithm == "adagrad":
        _adagrad(hyper)
    elif algorithm == "rmsprop":
        _rmsprop(hyper)
    elif algorithm == "muon":
        _muon(hyper)
    elif algorithm == "adafactor":
        _adafactor(hyper)
    elif algorithm == "sparse_adam":
        _sparse_adam(hyper)


def _optax(algorithm: str, hyper: Mapping[str, Any]) -> None:
    """optax's aliases: no torch switch (optax's TypeError for an unexpected keyword), and a
    dtype (mu_dtype, dtype_momentum) by one of the names the server takes."""
    alias = algorithm.partition(".")[2]
    for key in SWITCHES:
        if key in hyper:
            raise TypeError(f"{alias}() got an unexpected keyword argument '{key}'")
    for key, value in hyper.items():
        if CHOICES.get(key) is not OPTAX_DTYPES or value in OPTAX_DTYPES:
            continue
        if value == "bfloat16":
            raise ValueError(f"{key} 'bfloat16': bfloat16 moments are the session's "
                             "state_dtype='bfloat16', not an accumulator dtype; expected None, "
                             "'float32' or 'float64'")
        raise ValueError(f"{key}: expected None, 'float32' or 'float64' (a dtype's name), got "
                         f"{value!r}")


def _sparse_adam(hyper: Mapping[str, Any]) -> None:
    """torch/optim/sparse_adam.py, SparseAdam.__init__: lr and eps strictly positive."""
    lr, eps, betas = hyper["lr"], hyper["eps"], hyper["betas"]
    _tensor_lr(lr)
    if not 0.0 < lr:  # noqa: SIM300 (torch's comparison, as it fails)
        raise ValueError(f"Invalid learning rate: {lr}")
    if not 0.0 < eps:  # noqa: SIM300
        raise ValueError(f"Invalid epsilon value: {eps}")
    _betas(betas)


def _nonnegative(x: Any) -> bool:
    """torch's ``0.0 <= x``, written so (not ``x >= 0.0``): a value that cannot be
    compared fails with the same TypeError as in torch."""
    return bool(0.0 <= x)  # noqa: SIM300


def _tensor_lr(lr: Any) -> None:
    if is_tensor(lr) and lr.numel() != 1:
        raise ValueError("Tensor lr must be 1-element")


def _lr_eps(lr: Any, eps: Any) -> None:
    if not _nonnegative(lr):
        raise ValueError(f"Invalid learning rate: {lr}")
    if not _nonnegative(eps):
        raise ValueError(f"Invalid epsilon value: {eps}")


def _betas(betas: Any) -> None:
    if not 0.0 <= betas[0] < 1.0:
        raise ValueError(f"Invalid beta parameter at index 0: {betas[0]}")
    if not 0.0 <= betas[1] < 1.0:
        raise ValueError(f"Invalid beta parameter at index 1: {betas[1]}")


def _betas_wd(betas: Any, weight_decay: Any) -> None:
    _betas(betas)
    if not _nonnegative(weight_decay):
        raise ValueError(f"Invalid weight_decay value: {weight_decay}")


def _fused(hyper: Mapping[str, Any]) -> None:
    if hyper.get("fused"):
        if hyper.get("differentiable", False):
            raise RuntimeError("`fused` does not support `differentiable`")
        if hyper.get("foreach"):
            raise RuntimeError("`fused` and `foreach` cannot be `True` together.")


def _adam(hyper: Mapping[str, Any]) -> None:
    """torch/optim/adam.py, Adam.__init__ (AdamW calls it)."""
    lr, betas = hyper["lr"], hyper["betas"]
    foreach, capturable = hyper.get("foreach"), hyper.get("capturable", False)
    if is_tensor(lr):
        if foreach and not capturable:
            raise ValueError(_TENSOR_LR_FOREACH)
        if lr.numel() != 1:
            raise ValueError("Tensor lr must be 1-element")
    _lr_eps(lr, hyper["eps"])
    _betas_wd(betas, hyper["weight_decay"])
    if not ((isinstance(betas[0], float) and isinstance(betas[1], float))
            or (is_tensor(betas[0]) and is_tensor(betas[1]))):
        raise ValueError("betas must be either both floats or both Tensors")
    for i in (0, 1):
        if is_tensor(betas[i]):
            if not capturable and foreach:
                raise ValueError(f"betas[{i}] as a Tensor is not supported for "
                                 "capturable=False and foreach=True")
            if betas[i].numel() != 1:
                raise ValueError(f"Tensor betas[{i}] must be 1-element")
    _fused(hyper)


def _adam_family(algorithm: str, hyper: Mapping[str, Any]) -> None:
    """NAdam, RAdam, Adamax (and LAMB, which has no torch class: Adam's numeric checks)."""
    _tensor_lr(hyper["lr"])
    _lr_eps(hyper["lr"], hyper["eps"])
    _betas_wd(hyper["betas"], hyper["weight_decay"])
    if algorithm == "nadam" and not _nonnegative(hyper["momentum_decay"]):
        raise ValueError(f"Invalid momentum_decay value: {hyper['momentum_decay']}")


def _adagrad(hyper: Mapping[str, Any]) -> None:
    """torch/optim/adagrad.py, Adagrad.__init__."""
    lr = hyper["lr"]
    _tensor_lr(lr)
    if not _nonnegative(lr):
        raise ValueError(f"Invalid learning rate: {lr}")
    if not _nonnegative(hyper["lr_decay"]):
        raise ValueError(f"Invalid lr_decay value: {hyper['lr_decay']}")
    if not _nonnegative(hyper["weight_decay"]):
        raise ValueError(f"Invalid weight_decay value: {hyper['weight_decay']}")
    if not _nonnegative(hyper["initial_accumulator_value"]):
        raise ValueError("Invalid initial_accumulator_value value: "
                         f"{hyper['initial_accumulator_value']}")
    if not _nonnegative(hyper["eps"]):
        raise ValueError(f"Invalid epsilon value: {hyper['eps']}")
    _fused(hyper)


def _rmsprop(hyper: Mapping[str, Any]) -> None:
    """torch/optim/rmsprop.py, RMSprop.__init__."""
    _tensor_lr(hyper["lr"])
    _lr_eps(hyper["lr"], hyper["eps"])
    if not _nonnegative(hyper["momentum"]):
        raise ValueError(f"Invalid momentum value: {hyper['momentum']}")
    if not _nonnegative(hyper["weight_decay"]):
        raise ValueError(f"Invalid weight_decay value: {hyper['weight_decay']}")
    if not _nonnegative(hyper["alpha"]):
        raise ValueError(f"Invalid alpha value: {hyper['alpha']}")


def _adafactor(hyper: Mapping[str, Any]) -> None:
    """torch/optim/_adafactor.py, Adafactor.__init__."""
    lr, eps, d = hyper["lr"], hyper["eps"], hyper["d"]
    _tensor_lr(lr)
    if not _nonnegative(lr):
        raise ValueError(f"Learning rate should be >= 0 but is: {lr}")
    if not bool(0.0 >= hyper["beta2_decay"]):  # noqa: SIM300 - torch's operand order
        raise ValueError(f"beta2_decay should be <= 0 but is: {hyper['beta2_decay']}")
    if eps[0] is not None and not _nonnegative(eps[0]):
        raise ValueError(f"epsilon1 should be >= 0 but is: {eps[0]}")
    if not _nonnegative(eps[1]):
        raise ValueError(f"epsilon2 should be >= 0 but is: {eps[1]}")
    if not bool(1.0 <= d):  # noqa: SIM300
        raise ValueError(f"Clipping threshold d should be >= 1 but is: {d}")
    if not _nonnegative(hyper["weight_decay"]):
        raise ValueError(f"weight_decay should be >= 0 but is: {hyper['weight_decay']}")


def _muon(hyper: Mapping[str, Any]) -> None:
    """torch/optim/_muon.py, Muon.__init__; and, earlier than torch (which raises it at the
    first step), its refusal of 100 Newton-Schulz steps or more: the server holds no
    session it could not step."""
    lr = hyper["lr"]
    _tensor_lr(lr)
    if not _nonnegative(lr):
        raise ValueError(f"Learning rate should be >= 0 but is: {lr}")
    if not _nonnegative(hyper["momentum"]):
        raise ValueError(f"momentum should be >= 0 but is: {hyper['momentum']}")
    if not _nonnegative(hyper["weight_decay"]):
        raise ValueError(f"weight decay should be >= 0 but is: {hyper['weight_decay']}")
    fn = hyper["adjust_lr_fn"]
    if fn is not None and fn not in ["original", "match_rms_adamw"]:
        raise ValueError(f"Adjust learning rate function {fn} is not supported")
    if hyper["ns_steps"] >= 100:
        raise ValueError("Number of steps must be less than 100 for computational efficiency")


def check_params(algorithm: str, params: Sequence[Any]) -> None:
    """What torch's constructor raises for its parameters once the groups are built:
    Muon's refusal of a parameter that is not 2-D (no-op for the other algorithms)."""
    if algorithm != "muon":
        return
    for p in params:
        if p.ndim != 2:
            size = p.size() if is_tensor(p) else p.shape
            raise ValueError("Muon only supports 2D parameters whereas we found a parameter "
                             f"with size: {size}")


# -- step --------------------------------------------------------------------------------


def check_mode(algorithm: str, groups: Sequence[Mapping[str, Any]]) -> None:
    """What schedulefree's ``step()`` raises first: the bare ``Exception`` when param group
    0 is not in train mode (no-op for the algorithms without a train mode)."""
    if "train_mode" in ALGORITHMS[algorithm].group_state and not groups[0]["train_mode"]:
        raise Exception(_NOT_TRAINING)


def _capturable_devices(supports_xla: bool) -> list[str]:
    """torch.optim.optimizer._get_capturable_supported_devices."""
    backend = torch._C._get_privateuse1_backend_name() if torch is not None else "privateuseone"
    return ["cuda", "xpu", "hpu", backend, *(["xla"] if supports_xla else [])]


def _foreach_devices() -> list[str]:
    """torch.utils._foreach_utils._get_foreach_kernels_supported_devices."""
    backend = torch._C._get_privateuse1_backend_name() if torch is not None else "privateuseone"
    return ["cuda", "xpu", "mtia", backend]


def _fused_devices() -> list[str]:
    """torch.utils._foreach_utils._get_fused_kernels_supported_devices."""
    backend = torch._C._get_privateuse1_backend_name() if torch is not None else "privateuseone"
    return ["mps", "cuda", "xpu", "hpu", "cpu", "mtia", backend]


def _device(p: Any) -> str:
    """The device type a parameter is on (NumPy arrays: the CPU)."""
    return str(p.device.type) if is_tensor(p) else "cpu"


def _has_grad(p: Any) -> bool:
    """Whether torch's step takes ``p`` (NumPy arrays get their gradients in step())."""
    return not is_tensor(p) or p.grad is not None


def _leaf_requiring_grad(p: Any) -> bool:
    return is_tensor(p) and bool(p.requires_grad) and bool(p.is_leaf)


def _default_foreach(params: Sequence[Any], differentiable: bool) -> bool:
    """torch.optim.optimizer._default_to_fused_or_foreach(params, differentiable, False)[1]."""
    if differentiable:
        return False
    supported = _foreach_devices()
    plain = (torch.Tensor, torch.nn.Parameter) if torch is not None else ()
    return all(type(p) in plain and _device(p) in supported for p in params)


def _check_fused_device(p: Any) -> None:
    """torch.optim.optimizer._device_dtype_check_for_fused."""
    supported = _fused_devices()
    floating = bool(p.is_floating_point()) if is_tensor(p) else True
    if not (_device(p) in supported and floating):
        dtype = p.dtype
        raise RuntimeError("`fused=True` requires all the params to be floating point Tensors "
                           f"of supported devices: {supported} but {dtype} and {_device(p)}")


def _capturable_error(algorithm: str, supports_xla: bool, foreach: bool) -> AssertionError:
    devices = _capturable_devices(supports_xla)
    if algorithm == "nadam":
        what = "params, mu_products, and state_steps" if foreach else (
            "params, mu_products and state_steps")
    else:
        what = "params and state_steps"
    return AssertionError(f"If capturable=True, {what} must be on supported devices: "
                          f"{devices}.")


def _single_tensor(algorithm: str, group: Mapping[str, Any], params: Sequence[Any]) -> None:
    """The single-tensor loops: the capturable device check, then (autograd on, as torch
    turns it on for differentiable=True) the first in-place update of a leaf parameter."""
    capturable = algorithm != "adagrad" and group.get("capturable", False)
    differentiable = group.get("differentiable", False)
    supported = _capturable_devices(True)
    for p in params:
        if capturable and _device(p) not in supported:
            raise _capturable_error(algorithm, True, foreach=False)
        if differentiable and _leaf_requiring_grad(p):
            raise RuntimeError(_LEAF_IN_PLACE)


def _step_adam(algorithm: str, group: Mapping[str, Any], params: Sequence[Any]) -> None:
    """Adam._init_group, then adam() and its _fused/_multi_tensor/_single_tensor paths."""
    fused, foreach = group.get("fused"), group.get("foreach")
    capturable = group.get("capturable", False)
    differentiable = group.get("differentiable", False)
    lr = group["lr"]
    for p in params:
        if fused:
            _check_fused_device(p)
        if foreach and is_tensor(lr) and not capturable:
            raise RuntimeError(_TENSOR_LR_FOREACH)
    if fused is None and foreach is None:
        foreach = _default_foreach(params, differentiable)
        if foreach and is_tensor(lr) and not capturable:
            foreach = False
    if fused:
        if params and differentiable:
            raise RuntimeError("Adam with fused=True does not support differentiable=True")
    elif foreach:
        if not params:
            return
        if is_tensor(lr):
            if not capturable:
                raise RuntimeError(_TENSOR_LR_FOREACH)
            if lr.numel() != 1:
                raise ValueError("Tensor lr must be 1-element")
        for i, beta in enumerate(group["betas"], start=1):
            if is_tensor(beta):
                if not capturable:
                    raise ValueError(f"beta{i} as a Tensor is not supported for "
                                     "capturable=False and foreach=True")
                if beta.numel() != 1:
                    raise ValueError(f"Tensor beta{i} must be 1-element")
        if capturable and not all(_device(p) in _capturable_devices(False) for p in params):
            raise _capturable_error(algorithm, False, foreach=True)
        if differentiable:
            raise AssertionError(_FOREACH_AUTOGRAD)
    else:
        _single_tensor(algorithm, group, params)


def _step_other(algorithm: str, group: Mapping[str, Any], params: Sequence[Any]) -> None:
    """NAdam, RAdam, Adamax, RMSprop and Adagrad: their functional dispatch and the
    preambles of their foreach (and Adagrad's fused) implementations."""
    foreach = group.get("foreach")
    differentiable = group.get("differentiable", False)
    fused = group.get("fused") if algorithm == "adagrad" else None
    if fused:
        for p in params[:1]:  # Adagrad checks the first parameter with a gradient
            _check_fused_device(p)
    if foreach is None and (algorithm != "adagrad" or fused is None):
        foreach = _default_foreach(params, differentiable)
    if fused:
        if params and differentiable:
            raise RuntimeError("adagrad with fused=True does not support differentiable=True")
    elif foreach:
        # Adamax and Adagrad refuse autograd before they look for parameters
        if differentiable and (params or algorithm in ("adamax", "adagrad")):
            raise AssertionError(_FOREACH_AUTOGRAD)
        if params and algorithm != "adagrad" and group.get("capturable", False):
            xla = algorithm == "rmsprop"
            if not all(_device(p) in _capturable_devices(xla) for p in params):
                raise _capturable_error(algorithm, xla, foreach=True)
    else:
        _single_tensor(algorithm, group, params)


def _needs_check(group: Mapping[str, Any]) -> bool:
    """Whether any switch of the group can make torch's step refuse it (the fast path)."""
    if group.get("capturable") or group.get("fused") or group.get("differentiable"):
        return True
    # foreach (also the default, on CUDA) refuses Tensor lr and betas without capturable
    return group.get("foreach", None) is not False and (
        is_tensor(group.get("lr")) or any(is_tensor(b) for b in group.get("betas", ())))


def check_step(algorithm: str, groups: Sequence[Mapping[str, Any]], params: Sequence[Any]) -> None:
    """Raise what torch raises at the first ``step()`` on the CPU for these groups and
    parameters (for example ``capturable=True`` with CPU tensors).

    ``params``: every parameter, in group order (each group's own ``params`` list is
    used; ``params`` stands for a group without one). A torch parameter takes part when
    its ``.grad`` is set, as in torch; a NumPy array always does. A group whose switches
    are all off (and whose lr and betas are not Tensors) costs one look.
    """
    if algorithm not in _TORCH or not ALGORITHMS[algorithm].switches:
        return  # LAMB, schedule-free: no torch implementation to follow; Muon: no switches
    for group in groups:
        if not _needs_check(group):
            continue
        members = group.get("params", params)
        with_grad = [p for p in members if _has_grad(p)]
        if algorithm in ("adam", "amsgrad", "adamw"):
            _step_adam(algorithm, group, with_grad)
        else:
            _step_other(algorithm, group, with_grad)
