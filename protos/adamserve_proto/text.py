"""User-supplied text as error messages show it (both sides, and the shared
conversions, echo what a client sent)."""

from __future__ import annotations


def shown(value: object, limit: int = 64) -> str:
    """``value`` as an error message shows what a client sent: its repr, cut to about
    ``limit`` characters with an ellipsis and the whole length, so that a 10 kB name
    (or a 400-digit number) echoed back stays a line."""
    if isinstance(value, str | bytes):
        if len(value) <= limit:
            return repr(value)
        unit = "characters" if isinstance(value, str) else "bytes"
        return f"{value[:limit]!r}... ({len(value)} {unit})"
    try:
        text = repr(value)
    except ValueError:  # an int past Python's str() digit limit
        return f"<an integer of {value.bit_length()} bits>" if isinstance(value, int) else "<?>"
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"
