"""Sessions: the state a server keeps, and the rules that keep it consistent.

``session`` (one optimizer and its invariants), ``store`` (the registry and the memory
caps), ``coordinator`` (the rounds of several workers, with explicit states),
``checkpoints`` (the files) and ``checkpoint_policy`` (when they are written),
``pushlog`` (exactly-once pushes), ``rounds`` (the workers' configuration).
"""

from __future__ import annotations


def meta(session_id: str, **more: object) -> dict[str, str]:
    """An error's metadata: the session it is about, and whatever else names the case."""
    return {"session_id": session_id, **{k: str(v) for k, v in more.items()}}
