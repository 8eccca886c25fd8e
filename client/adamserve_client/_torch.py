"""torch when it is installed, else None (NumPy mode): the one place the client asks.

Also the few questions about a value that depend on it: is it a torch tensor, its
shape, whether it holds float64, and the torch dtype of each wire datatype.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import torch
else:
    try:
        import torch
    except ImportError:  # NumPy mode only
        torch = None

__all__ = ["HAVE_TORCH", "TORCH_DTYPES", "is_float64", "is_tensor", "shape", "torch"]

HAVE_TORCH = torch is not None

# wire datatype -> the torch dtype that holds it (empty without torch)
TORCH_DTYPES: dict[str, Any] = {}
if torch is not None:
    TORCH_DTYPES = {"FP32": torch.float32, "FP64": torch.float64, "FP16": torch.float16,
                    "BF16": torch.bfloat16}


def is_tensor(x: Any) -> bool:
    return torch is not None and isinstance(x, torch.Tensor)


def is_float64(x: Any) -> bool:
    return bool(x.dtype == torch.float64) if is_tensor(x) else np.asarray(x).dtype == np.float64


def shape(x: Any) -> tuple[int, ...]:
    return tuple(int(d) for d in x.shape)
