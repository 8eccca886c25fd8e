"""The server process's logging: one handler on stderr, plain lines or JSON objects.

uvicorn's loggers are the HTTP transport's here: ``uvicorn.error`` (which carries
uvicorn's routine info lines, not only errors) logs as ``adamserve.http``, its info
lines demoted to debug (the start-up line says what they say); ``uvicorn.access``, the
optional access log, as ``adamserve.http.access``. Each JSON line is one object:
``time``, ``level``, ``logger``, ``message`` (``exception`` when there is a
traceback; an access line adds ``client``, ``method``, ``path``, ``status``).
"""

from __future__ import annotations

import json
import logging
import sys
from datetime import UTC, datetime
from typing import Any, Literal

__all__ = ["ACCESS_LOGGER", "FORMATS", "HTTP_LOGGER", "JsonFormatter", "configure"]

Format = Literal["plain", "json"]
FORMATS: tuple[Format, ...] = ("plain", "json")

HTTP_LOGGER = "adamserve.http"
ACCESS_LOGGER = "adamserve.http.access"
PLAIN = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class JsonFormatter(logging.Formatter):
    """One JSON object per record (and per line: newlines in a message are escaped)."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            out.update(fields)
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


class _Renamed(logging.Filter):
    """Records of one of uvicorn's loggers, under adamserve's name for it."""

    def __init__(self, name: str, demote_info: bool = False) -> None:
        super().__init__()
        self.target = name
        self.demote_info = demote_info

    def filter(self, record: logging.LogRecord) -> bool:
        record.name = self.target
        if self.demote_info and record.levelno == logging.INFO:
            record.levelno, record.levelname = logging.DEBUG, "DEBUG"
        if self.target == ACCESS_LOGGER and isinstance(record.args, tuple) and len(
                record.args) == 5:  # uvicorn's: client, method, path, HTTP version, status
            client, method, path, _version, status = record.args
            record.fields = {"client": client, "method": method, "path": path,
                             "status": status}
        return record.levelno >= logging.getLogger(self.target).getEffectiveLevel()


class _Handler(logging.StreamHandler):  # type: ignore[type-arg]
    """The handler :func:`configure` installs (and replaces when called again)."""


def configure(level: str = "INFO", fmt: Format = "plain") -> None:
    """Send every log record at ``level`` or above to stderr, as ``fmt`` lines.

    A second call reconfigures. Like ``logging.basicConfig``, it leaves the root logger
    alone when someone else has given it handlers (a process embedding the server, a
    test runner). uvicorn's access log is on when its server is built with
    ``access_log=True``; the filters here only name and shape its lines.
    """
    root = logging.getLogger()
    ours = [h for h in root.handlers if isinstance(h, _Handler)]
    if ours or not root.handlers:
        for old in ours:
            root.removeHandler(old)
        handler = _Handler(sys.stderr)
        handler.setFormatter(JsonFormatter() if fmt == "json" else logging.Formatter(PLAIN))
        root.addHandler(handler)
        root.setLevel(level.upper())
    for name, target, demote in (("uvicorn.error", HTTP_LOGGER, True),
                                 ("uvicorn.access", ACCESS_LOGGER, False)):
        logger = logging.getLogger(name)
        for f in logger.filters[:]:
            if isinstance(f, _Renamed):
                logger.removeFilter(f)
        logger.addFilter(_Renamed(target, demote))
    # uvicorn's "uvicorn" logger is the parent of both: no handler of its own (log_config
    # is None), so everything reaches the root handler once
