"""The layout of the state blob: a torch-format state_dict as one safetensors file.

Tensors ``state.<index>.<slot>`` (the native form's stored moments
``state.<index>.<slot>.<part>``: ``codes`` and ``scale``, or ``bf16``); the file's ``__metadata__`` holds ``{"adamserve":
"state_dict/1", "json": <JSON>}`` where the JSON carries ``param_groups`` (betas as a
list), the per-parameter scalars (``step``, ``mu_product``: :data:`SCALAR_SLOTS`) and,
for one shard's part of a sharded state, the model's ``step_count``. Any language with
a safetensors reader (or 30 lines of code: an 8-byte length, a JSON header, raw
little-endian bytes) can read and write it. Never pickle.

Both sides use it: :func:`state_parts` says what a blob of a state_dict holds,
:func:`read_header` finds a blob's header and :func:`state_dict` reads the parts
back, checked. The tensors' bytes are each side's own (the server's the safetensors
library, which reads every dtype; the client's written by hand, without the
dependency).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from adamserve_proto.algorithms import TUPLES

__all__ = ["SCALAR_SLOTS", "TAG", "read_header", "state_dict", "state_parts"]

TAG = "state_dict/1"
# Entries of a parameter's state that are numbers, not tensors.
SCALAR_SLOTS = frozenset({"step", "mu_product"})


def state_parts(sd: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, str]]:
    """A state_dict as its blob holds it: the tensors by name (the values as given:
    each side's writer makes arrays of them) and the safetensors metadata."""
    tensors: dict[str, Any] = {}
    scalars: dict[str, dict[str, float]] = {}
    for idx, entry in sd["state"].items():
        for key, value in entry.items():
            if key in SCALAR_SLOTS:
                scalars.setdefault(str(int(idx)), {})[key] = float(value)
            else:
                tensors[f"state.{int(idx)}.{key}"] = value
    groups = [{k: list(v) if isinstance(v, tuple) else v for k, v in g.items()}
              for g in sd["param_groups"]]
    body: dict[str, Any] = {"param_groups": groups, "scalars": scalars}
    if "step_count" in sd:  # one shard's part of a sharded state: the model's step
        body["step_count"] = int(sd["step_count"])
    return tensors, {"adamserve": TAG, "json": json.dumps(body)}


def read_header(blob: bytes | bytearray | memoryview) -> tuple[dict[str, Any], int]:
    """A safetensors blob's JSON header and the offset its tensors' data starts at;
    ValueError for a blob too short for its header, or a header that is not JSON."""
    view = memoryview(blob).cast("B")
    if len(view) < 8:
        raise ValueError("state blob: expected a safetensors file, got fewer than 8 bytes")
    n = int.from_bytes(view[:8], "little")
    if n > len(view) - 8:
        raise ValueError(f"state blob: header claims {n} bytes, the blob has {len(view) - 8}")
    try:
        header = json.loads(bytes(view[8:8 + n]))
    except (ValueError, RecursionError) as exc:
        raise ValueError(f"state blob: not a readable safetensors file ({exc})") from None
    if not isinstance(header, dict):
        raise ValueError("state blob: not a readable safetensors file (its header is not "
                         "a JSON object)")
    return header, 8 + n


def state_dict(tensors: Mapping[str, Any], metadata: object) -> dict[str, Any]:
    """The state_dict of a blob's tensors (by name) and metadata, state by index
    (betas and torch's other tuples tuples again); ValueError saying what is wrong."""
    if not isinstance(metadata, Mapping) or metadata.get("adamserve") != TAG:
        raise ValueError(f"state blob: metadata 'adamserve' must be {TAG!r}")
    try:
        body = json.loads(metadata["json"])
        groups = body["param_groups"]
        scalars = body.get("scalars", {})
        if not isinstance(groups, list) or not isinstance(scalars, dict):
            raise TypeError("param_groups must be a list and scalars an object")
    except (KeyError, ValueError, TypeError, AttributeError, RecursionError) as exc:
        raise ValueError(f"state blob: bad metadata json ({exc})") from None
    state: dict[int, dict[str, Any]] = {}
    for key, arr in tensors.items():
        parts = key.split(".")
        if len(parts) not in (3, 4) or parts[0] != "state" or not parts[1].isdigit():
            raise ValueError(f"state blob: tensor {key!r} is not named state.<index>.<slot> "
                             "(or state.<index>.<slot>.<part>, the native form's)")
        state.setdefault(int(parts[1]), {})[".".join(parts[2:])] = arr
    for idx, entry in scalars.items():
        if not str(idx).isdigit() or not isinstance(entry, dict):
            raise ValueError(f"state blob: bad scalars entry {idx!r}")
        state.setdefault(int(idx), {}).update(entry)
    for g in groups:  # torch's tuples (betas, Adafactor's eps, ...) again
        for key in TUPLES:
            if isinstance(g, dict) and isinstance(g.get(key), list):
                g[key] = tuple(g[key])
    out: dict[str, Any] = {"state": dict(sorted(state.items())), "param_groups": groups}
    if "step_count" in body:  # the session's step, when no tensor's state says it
        out["step_count"] = body["step_count"]
    return out
