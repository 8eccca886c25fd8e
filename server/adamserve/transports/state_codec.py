"""The wire form of a torch-format state_dict, shared by both transports.

One safetensors blob: tensors ``state.<index>.<slot>``; its ``__metadata__`` holds
``{"adamserve": "state_dict/1", "json": <JSON>}`` where the JSON carries
``param_groups`` and the per-parameter scalars (``step``, ``mu_product``). Any
language with a safetensors reader (or 30 lines of code: an 8-byte length, a JSON
header, raw little-endian bytes) can read and write it. Never pickle.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import numpy as np
from safetensors.numpy import load as st_load
from safetensors.numpy import save as st_save

TAG = "state_dict/1"


def encode_state(sd: Mapping[str, Any]) -> bytes:
    tensors: dict[str, np.ndarray[Any, Any]] = {}
    scalars: dict[str, dict[str, float]] = {}
    for idx, entry in sd["state"].items():
        for key, value in entry.items():
            if isinstance(value, np.ndarray):
                tensors[f"state.{int(idx)}.{key}"] = np.ascontiguousarray(value).reshape(value.shape)
            else:
                scalars.setdefault(str(int(idx)), {})[key] = float(value)
    groups = [{k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items()}
              for g in sd["param_groups"]]
    body: dict[str, Any] = {"param_groups": groups, "scalars": scalars}
    if "step_count" in sd:
        body["step_count"] = sd["step_count"]
    meta = json.dumps(body)
    return bytes(st_save(tensors, metadata={"adamserve": TAG, "json": meta}))


def decode_state(blob: bytes) -> dict[str, Any]:
    """Parse the blob; raises ValueError with what was wrong."""
    if len(blob) < 8:
        raise ValueError("state blob: expected a safetensors file, got fewer than 8 bytes")
    header_len = int.from_bytes(blob[:8], "little")
    if header_len > len(blob) - 8:
        raise ValueError(f"state blob: header claims {header_len} bytes, the blob has "
                         f"{len(blob) - 8}")
    try:
        header = json.loads(blob[8:8 + header_len])
        tensors = st_load(blob)
    except Exception as exc:  # safetensors raises its own error type
        raise ValueError(f"state blob: not a readable safetensors file ({exc})") from None
    meta = header.get("__metadata__") if isinstance(header, dict) else None
    if not isinstance(meta, dict) or meta.get("adamserve") != TAG:
        raise ValueError(f"state blob: metadata 'adamserve' must be {TAG!r}")
    try:
        body = json.loads(meta["json"])
        groups = body["param_groups"]
        scalars = body.get("scalars", {})
        if not isinstance(groups, list) or not isinstance(scalars, dict):
            raise TypeError("param_groups must be a list and scalars an object")
    except (KeyError, ValueError, TypeError, AttributeError, RecursionError) as exc:
        raise ValueError(f"state blob: bad metadata json ({exc})") from None
    state: dict[int, dict[str, Any]] = {}
    for key, arr in tensors.items():
        parts = key.split(".")
        if len(parts) != 3 or parts[0] != "state" or not parts[1].isdigit():
            raise ValueError(f"state blob: tensor {key!r} is not named state.<index>.<slot>")
        state.setdefault(int(parts[1]), {})[parts[2]] = arr
    for idx, entry in scalars.items():
        if not str(idx).isdigit() or not isinstance(entry, dict):
            raise ValueError(f"state blob: bad scalars entry {idx!r}")
        state.setdefault(int(idx), {}).update(entry)
    for g in groups:
        if isinstance(g, dict) and isinstance(g.get("betas"), list):
            g["betas"] = tuple(g["betas"])
    out: dict[str, Any] = {"state": state, "param_groups": groups}
    if "step_count" in body:  # the session's step, when no tensor's state says it
        out["step_count"] = body["step_count"]
    return out
