"""Tenant names and the qualified session ids that keep tenants apart.

Every tenant has its own namespace of session ids: tenants ``a`` and ``b`` may both
have a session ``run1``. Inside the server a session is known by its *qualified*
id, ``<tenant>~<id>``, or the bare id for the default tenant ``""`` (the one a
server without keys, or with a single ``--token``, has: its checkpoints keep the
names they always had). ``~`` is in neither alphabet, so the split is unambiguous.
The qualified id names the session's checkpoint directory and its log lines; a
tenant only ever sees its bare ids, an admin sees (and may address) the qualified
ids of other tenants' sessions.
"""

from __future__ import annotations

import re

SEPARATOR = "~"
TENANT = re.compile(r"[a-z0-9][a-z0-9_-]{0,63}")


def check_tenant(tenant: str) -> None:
    if tenant and not TENANT.fullmatch(tenant):
        raise ValueError(f"tenant {tenant[:80]!r}: expected 1-64 lowercase letters, digits, "
                         "'_' or '-', starting with a letter or digit")


def qualified(tenant: str, session_id: str) -> str:
    """The server-wide id of ``tenant``'s session ``session_id``. A bare id never holds
    the separator: else ``("", "a~x")`` would name tenant a's session."""
    if SEPARATOR in session_id:
        raise ValueError(f"session id {session_id[:80]!r}: expected 1-128 characters of "
                         "letters, digits, '.', '_' or '-', starting with a letter or digit")
    return f"{tenant}{SEPARATOR}{session_id}" if tenant else session_id


def split(qualified_id: str) -> tuple[str, str]:
    """(tenant, bare id) of a qualified id."""
    tenant, sep, bare = qualified_id.partition(SEPARATOR)
    return (tenant, bare) if sep else ("", qualified_id)


def shown(qualified_id: str, viewer_tenant: str) -> str:
    """The id ``viewer_tenant`` knows the session by: bare for its own sessions, qualified
    for another tenant's (only an admin ever sees those)."""
    tenant, bare = split(qualified_id)
    return bare if tenant == viewer_tenant else qualified_id
