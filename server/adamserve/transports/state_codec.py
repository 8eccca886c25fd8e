"""The wire form of a torch-format state_dict, shared by both transports.

The blob's layout (tensors ``state.<index>.<slot>``, the metadata's ``param_groups``
and scalars) is :mod:`adamserve_proto.state_blob`'s, the client's too; its bytes here
are the safetensors library's, which reads a blob of any safetensors dtype.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
from safetensors.numpy import load as st_load
from safetensors.numpy import save as st_save

from adamserve_proto import state_blob


def encode_state(sd: Mapping[str, Any]) -> bytes:
    tensors, metadata = state_blob.state_parts(sd)
    # (ascontiguousarray makes a 0-d array 1-d: the shape is put back)
    arrays = {k: np.ascontiguousarray(v).reshape(np.shape(v)) for k, v in tensors.items()}
    return bytes(st_save(arrays, metadata=metadata))


def decode_state(blob: bytes) -> dict[str, Any]:
    """Parse the blob; raises ValueError with what was wrong."""
    header, _ = state_blob.read_header(blob)
    try:
        tensors = st_load(blob)
    except Exception as exc:  # safetensors raises its own error type
        raise ValueError(f"state blob: not a readable safetensors file ({exc})") from None
    return state_blob.state_dict(tensors, header.get("__metadata__"))
