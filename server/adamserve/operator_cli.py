"""``adamserve sessions ...``: an operator's view of a running server, over its HTTP API.

``list``, ``describe``, ``delete``, ``checkpoint``, ``export`` (the state_dict blob of
``GET /v2/sessions/{id}/state``, to a file) and ``import`` (a blob back, ``PUT``). The
key is ``ADAMSERVE_TOKEN``'s (never a flag: a command line is visible to every user of
the host); ``--server`` names the server (default the local one's default HTTP port).
Tables go to stdout; progress of exports and imports (bytes done / total) and errors to
stderr, an error in one line with a non-zero status.

Only the standard library (``http.client``), and none of the server's modules: the
command answers at once, and it speaks the HTTP contract any client sees.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import os
import ssl
import sys
import time
import urllib.parse
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, NoReturn

__all__ = ["DEFAULT_SERVER", "Progress", "add_parser", "main", "table"]

DEFAULT_SERVER = "http://127.0.0.1:8000"  # serve's --host and --http-port defaults
TOKEN_ENV = "ADAMSERVE_TOKEN"
SERVER_ENV = "ADAMSERVE_SERVER"
CHUNK = 1 << 20
PAGE = 1000  # the server's largest page
TENSORS_SHOWN = 20


class CommandError(Exception):
    """What went wrong, as the one line the command ends with."""


# -- output --------------------------------------------------------------------------


def human_bytes(n: int) -> str:
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            return f"{int(size)} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    raise AssertionError("unreachable")


def table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """Columns padded to their widest cell, numbers right-aligned."""
    widths = [max([len(h), *(len(r[i]) for r in rows)]) for i, h in enumerate(headers)]
    numeric = [bool(rows) and all(_numeric(r[i]) for r in rows) for i in range(len(headers))]

    def line(cells: Sequence[str]) -> str:
        return "  ".join(c.rjust(w) if num else c.ljust(w)
                         for c, w, num in zip(cells, widths, numeric, strict=True)).rstrip()

    return "\n".join([line(headers), *(line(r) for r in rows)])


def _numeric(cell: str) -> bool:
    return cell == "-" or cell.replace(".", "", 1).isdigit() or (
        cell.split(" ")[0].replace(".", "", 1).isdigit() and cell.endswith("B"))


class Progress:
    """Bytes done of a total on a terminal (redrawn at most 10 times a second); elsewhere
    silent until :meth:`done`'s one line."""

    def __init__(self, what: str, total: int | None, stream: IO[str] | None = None,
                 tty: bool | None = None) -> None:
        self.what = what
        self.total = total
        self.stream = stream if stream is not None else sys.stderr
        self.tty = self.stream.isatty() if tty is None else tty
        self.count = 0
        self.began = time.monotonic()
        self._drawn = 0.0

    def advance(self, n: int) -> None:
        self.count += n
        now = time.monotonic()
        if self.tty and now - self._drawn >= 0.1:
            self._drawn = now
            self._draw()

    def _draw(self) -> None:
        if self.total:
            share = min(self.count / self.total, 1.0)
            bar = "#" * int(share * 30)
            text = (f"{self.what} [{bar:<30}] {human_bytes(self.count)} / "
                    f"{human_bytes(self.total)} {share:4.0%}")
        else:
            text = f"{self.what} {human_bytes(self.count)}"
        self.stream.write("\r" + text)
        self.stream.flush()

    def done(self, summary: str) -> None:
        if self.tty:
            self._draw()
            self.stream.write("\n")
        seconds = time.monotonic() - self.began
        self.stream.write(f"{summary}: {human_bytes(self.count)} in {seconds:.1f} s\n")
        self.stream.flush()


# -- the wire --------------------------------------------------------------------------


@dataclass
class Server:
    url: str
    token: str | None
    timeout: float
    context: ssl.SSLContext | None = None

    def __post_init__(self) -> None:
        url = self.url if "://" in self.url else "http://" + self.url
        parts = urllib.parse.urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise CommandError(f"--server {self.url!r}: expected http://HOST:PORT or "
                               "https://HOST:PORT")
        self.scheme = parts.scheme
        self.host = parts.hostname
        try:
            self.port = parts.port or (443 if parts.scheme == "https" else 80)
        except ValueError as exc:
            raise CommandError(f"--server {self.url!r}: {exc}") from None
        self.base = parts.path.rstrip("/")
        self.url = f"{parts.scheme}://{parts.netloc}{self.base}"

    def connect(self) -> http.client.HTTPConnection:
        if self.scheme == "https":
            return http.client.HTTPSConnection(self.host, self.port, timeout=self.timeout,
                                               context=self.context)
        return http.client.HTTPConnection(self.host, self.port, timeout=self.timeout)

    def headers(self, **extra: str) -> dict[str, str]:
        out = {"Accept": "application/json", "User-Agent": "adamserve-sessions", **extra}
        if self.token:
            out["Authorization"] = f"Bearer {self.token}"
        return out

    @contextlib.contextmanager
    def call(self, method: str, path: str, body: Any = None,
             headers: dict[str, str] | None = None) -> Iterator[http.client.HTTPResponse]:
        """One request; the response, once its status is a success (else CommandError)."""
        conn = self.connect()
        try:
            try:
                # BrokenPipe, ConnectionReset: the server answered before reading the whole
                # body (a refusal): read why
                with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                    conn.request(method, self.base + path, body=body,
                                 headers=self.headers(**(headers or {})))
                response = conn.getresponse()
                if response.status >= 400:
                    raise CommandError(_refusal(response))
            except ConnectionRefusedError as exc:
                raise CommandError(f"cannot reach {self.url}: {_reason(exc)} (is the server "
                                   "running? --server names it)") from None
            except (OSError, http.client.HTTPException) as exc:
                raise CommandError(f"{self.url}: {_reason(exc)}") from None
            yield response
        finally:
            conn.close()

    def read(self, response: http.client.HTTPResponse, n: int = -1) -> bytes:
        """``n`` more bytes of ``response`` (-1: the rest); b"" at its end."""
        try:
            return response.read(n) if n >= 0 else response.read()
        except (OSError, http.client.HTTPException) as exc:
            raise CommandError(f"{self.url}: the answer broke off: {_reason(exc)}") from None

    def json(self, method: str, path: str) -> Any:
        with self.call(method, path) as response:
            data = self.read(response)
        try:
            return json.loads(data) if data else None
        except ValueError:
            raise CommandError(f"{self.url}: not the adamserve HTTP API (the answer to "
                               f"{method} {path} is not JSON)") from None


def _reason(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc) or type(exc).__name__


def _refusal(response: http.client.HTTPResponse) -> str:
    raw = response.read(64 << 10)
    try:
        body = json.loads(raw)
        message, reason = str(body.get("error", "")), str(body.get("reason", ""))
    except (ValueError, AttributeError):
        message, reason = raw.decode("utf-8", "replace").strip()[:300], ""
    text = f"{response.status} {reason or response.reason}: {message}".rstrip(": ")
    if response.status == 401:
        text += f" (set {TOKEN_ENV} to the key)"
    return text


def _path(session_id: str, tail: str = "") -> str:
    return "/v2/sessions/" + urllib.parse.quote(session_id, safe="~") + tail


# -- the commands ----------------------------------------------------------------------


def _enum(value: Any, prefix: str) -> str:
    text = str(value or "")
    return text[len(prefix):].lower() if text.startswith(prefix) else text.lower() or "-"


def _shown_id(s: dict[str, Any]) -> str:
    tenant = s.get("tenant") or ""
    sid = str(s.get("session_id", ""))
    return sid if not tenant or "~" in sid else f"{tenant}~{sid}"


def _workers(w: dict[str, Any]) -> str:
    count = int(w.get("count") or 1)
    mode = _enum(w.get("mode"), "WORKER_MODE_")
    return "1" if count <= 1 else f"{count} {mode}"


def _row(s: dict[str, Any]) -> list[str]:
    checkpointed = s.get("checkpointed_step")
    return [_shown_id(s), _enum(s.get("algorithm"), "ALGORITHM_"),
            _enum(s.get("dtype"), "STATE_DTYPE_"), str(int(s.get("step") or 0)),
            str(len(s.get("tensors") or [])), human_bytes(int(s.get("state_bytes") or 0)),
            "-" if checkpointed is None else str(int(checkpointed)),
            _workers(s.get("workers") or {}), _enum(s.get("backend"), "BACKEND_")]


HEADERS = ("SESSION", "ALGORITHM", "DTYPE", "STEP", "TENSORS", "STATE", "CHECKPOINTED",
           "WORKERS", "BACKEND")


def _list(server: Server, args: argparse.Namespace) -> None:
    sessions: list[dict[str, Any]] = []
    token = ""
    while True:
        query = urllib.parse.urlencode({"page_size": PAGE, "page_token": token})
        page = server.json("GET", f"/v2/sessions?{query}")
        sessions += page.get("sessions") or []
        token = page.get("next_page_token") or ""
        if not token:
            break
    if args.json:
        print(json.dumps(sessions, indent=2))
    elif sessions:
        print(table(HEADERS, [_row(s) for s in sessions]))
    else:
        print("no sessions", file=sys.stderr)


def _group_values(group: dict[str, Any]) -> str:
    items = [f"{k}={v}" for k, v in sorted((group.get("values") or {}).items())]
    items += [f"{k}={'true' if v else 'false'}" for k, v in sorted(
        (group.get("flags") or {}).items())]
    items += [f"{k}={v}" for k, v in sorted((group.get("names") or {}).items())]
    items += [f"{k}=None" for k in group.get("unset") or []]
    return " ".join(items) or "-"


def _describe(server: Server, args: argparse.Namespace) -> None:
    s = server.json("GET", _path(args.session_id))
    if args.json:
        print(json.dumps(s, indent=2))
        return
    row = dict(zip(HEADERS, _row(s), strict=True))
    fields = [("session", row["SESSION"]), ("algorithm", row["ALGORITHM"]),
              ("dtype", row["DTYPE"]), ("step", row["STEP"]),
              ("state", f"{row['STATE']} ({int(s.get('state_bytes') or 0)} bytes)"),
              ("checkpointed step", row["CHECKPOINTED"]), ("workers", row["WORKERS"]),
              ("backend", row["BACKEND"]),
              ("lr", ", ".join(f"{x:g}" for x in s.get("lr") or []) or "-"),
              ("max grad norm", str(s.get("max_grad_norm", "-"))),
              ("skip non-finite", "yes" if s.get("skip_nonfinite") else "no")]
    if s.get("schedule"):
        fields.append(("schedule", json.dumps(s["schedule"])))
    if s.get("labels"):
        fields.append(("labels", " ".join(f"{k}={v}" for k, v in sorted(
            s["labels"].items()))))
    width = max(len(k) for k, _ in fields)
    for key, value in fields:
        print(f"{key + ':':<{width + 1}} {value}")
    print()
    groups = s.get("groups") or []
    print(table(("GROUP", "HYPERPARAMETERS"),
                [[str(i), _group_values(g)] for i, g in enumerate(groups)]))
    print()
    tensors = s.get("tensors") or []
    shown = tensors if args.all_tensors else tensors[:TENSORS_SHOWN]
    print(table(("TENSOR", "SHAPE", "GROUP"),
                [[str(t.get("name")), "x".join(str(d) for d in t.get("shape") or []) or
                  "scalar", str(int(t.get("group") or 0))] for t in shown]))
    if len(shown) < len(tensors):
        print(f"... and {len(tensors) - len(shown)} more (--all-tensors shows them)")


def _delete(server: Server, args: argparse.Namespace) -> None:
    if not args.yes:
        if not sys.stdin.isatty():
            raise CommandError(f"deleting {args.session_id!r} removes its state and its "
                               "checkpoints: pass --yes")
        answer = input(f"delete session {args.session_id!r} and its checkpoints? [y/N] ")
        if answer.strip().lower() not in ("y", "yes"):
            raise CommandError("not deleted")
    with server.call("DELETE", _path(args.session_id)) as response:
        server.read(response)
    print(f"deleted session {args.session_id}")


def _checkpoint(server: Server, args: argparse.Namespace) -> None:
    info = server.json("POST", _path(args.session_id, "/checkpoint"))
    print(f"checkpointed session {args.session_id} at step {int(info.get('step') or 0)}: "
          f"{info.get('path')} ({human_bytes(int(info.get('size_bytes') or 0))})")


def _export(server: Server, args: argparse.Namespace) -> None:
    to_stdout = str(args.file) == "-"
    target = Path(args.file)
    part = target.with_name(target.name + ".part")
    with server.call("GET", _path(args.session_id, "/state"),
                     headers={"Accept": "application/octet-stream"}) as response:
        length = response.getheader("Content-Length")
        progress = Progress(f"export {args.session_id}",
                            int(length) if length and length.isdigit() else None)
        try:
            with (contextlib.nullcontext(sys.stdout.buffer) if to_stdout
                  else open(part, "wb")) as out:
                while chunk := server.read(response, CHUNK):
                    out.write(chunk)
                    progress.advance(len(chunk))
        except BaseException:
            if not to_stdout:
                part.unlink(missing_ok=True)
            raise
    if progress.total is not None and progress.count != progress.total:
        part.unlink(missing_ok=True)
        raise CommandError(f"the server sent {progress.count} of {progress.total} bytes")
    if not to_stdout:
        part.replace(target)  # a file named FILE is always a whole export
    progress.done(f"exported session {args.session_id} to {args.file}")


def _import(server: Server, args: argparse.Namespace) -> None:
    path = Path(args.file)
    try:
        handle = open(path, "rb")  # noqa: SIM115 (closed below, after the request)
    except OSError as exc:
        raise CommandError(f"{path}: {_reason(exc)}") from None
    with handle:
        size = os.fstat(handle.fileno()).st_size
        progress = Progress(f"import {args.session_id}", size)

        def chunks() -> Iterator[bytes]:
            while chunk := handle.read(CHUNK):
                progress.advance(len(chunk))
                yield chunk

        with server.call("PUT", _path(args.session_id, "/state"), body=chunks(),
                         headers={"Content-Type": "application/octet-stream",
                                  "Content-Length": str(size)}) as response:
            info = json.loads(server.read(response) or b"{}")
    progress.done(f"imported {path} into session {args.session_id} (step "
                  f"{int(info.get('step') or 0)})")


COMMANDS = {"list": _list, "describe": _describe, "delete": _delete,
            "checkpoint": _checkpoint, "export": _export, "import": _import}


# -- arguments -------------------------------------------------------------------------


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: {message} (see {self.prog} --help)\n")


def add_parser(sub: argparse._SubParsersAction[Any]) -> argparse.ArgumentParser:
    """The ``sessions`` command, under ``sub`` (an ``add_subparsers()`` of ``adamserve``)."""
    common = _Parser(add_help=False)
    common.add_argument("--server", metavar="URL",
                        default=os.environ.get(SERVER_ENV) or DEFAULT_SERVER,
                        help=f"the server's HTTP URL (default {DEFAULT_SERVER}; env "
                             f"{SERVER_ENV}); the key is read from {TOKEN_ENV}")
    common.add_argument("--ca-file", type=Path, default=None, metavar="PATH",
                        help="PEM CA certificates to verify an https:// server with "
                             "(default: the system's)")
    common.add_argument("--client-cert", type=Path, default=None, metavar="PATH",
                        help="PEM certificate (and key, or see --client-key) for a server "
                             "that asks for one (mutual TLS)")
    common.add_argument("--client-key", type=Path, default=None, metavar="PATH",
                        help="its PEM private key, when not in --client-cert's file")
    common.add_argument("--timeout", type=float, default=60.0, metavar="SECONDS",
                        help="seconds to wait for the server at each step (default 60)")
    sessions: argparse.ArgumentParser = sub.add_parser("sessions", help="list, describe, delete, checkpoint, export "
                              "or import sessions of a running server (over HTTP)",
                              description="An operator's commands, over a running server's "
                                          f"HTTP API; the key is {TOKEN_ENV}'s.")
    cmd = sessions.add_subparsers(dest="sessions_command", required=True, metavar="COMMAND")
    ls = cmd.add_parser("list", parents=[common], help="every session, one row each")
    ls.add_argument("--json", action="store_true", help="the server's JSON, not a table")
    describe = cmd.add_parser("describe", parents=[common], help="one session in full")
    describe.add_argument("session_id")
    describe.add_argument("--json", action="store_true", help="the server's JSON")
    describe.add_argument("--all-tensors", action="store_true",
                          help=f"every tensor (default: the first {TENSORS_SHOWN})")
    delete = cmd.add_parser("delete", parents=[common],
                            help="delete a session, its state and its checkpoints")
    delete.add_argument("session_id")
    delete.add_argument("--yes", action="store_true", help="do not ask")
    checkpoint = cmd.add_parser("checkpoint", parents=[common],
                                help="write a durable checkpoint now")
    checkpoint.add_argument("session_id")
    export = cmd.add_parser("export", parents=[common],
                            help="the session's torch-format state_dict blob, to a file")
    export.add_argument("session_id")
    export.add_argument("file", help="where to write it (-: stdout)")
    imp = cmd.add_parser("import", parents=[common],
                         help="a state_dict blob (from export) into an existing session")
    imp.add_argument("session_id")
    imp.add_argument("file")
    return sessions


def _context(args: argparse.Namespace) -> ssl.SSLContext | None:
    if not str(args.server).startswith("https://"):
        return None
    try:
        context = ssl.create_default_context(
            cafile=str(args.ca_file) if args.ca_file else None)
        if args.client_cert:
            context.load_cert_chain(str(args.client_cert),
                                    str(args.client_key) if args.client_key else None)
    except (OSError, ssl.SSLError) as exc:
        raise CommandError(f"TLS files: {_reason(exc)}") from None
    return context


def main(argv: Sequence[str]) -> int:
    """``adamserve sessions ARGV...``: 0 when done, 1 on an error (one line), 2 on bad
    arguments."""
    top = _Parser(prog="adamserve")
    add_parser(top.add_subparsers(dest="command", required=True))
    args = top.parse_args(["sessions", *argv])
    prog = f"adamserve sessions {args.sessions_command}"
    try:
        server = Server(args.server, os.environ.get(TOKEN_ENV) or None, args.timeout,
                        _context(args))
        COMMANDS[args.sessions_command](server, args)
    except CommandError as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"\n{prog}: interrupted", file=sys.stderr)
        return 130
    except OSError as exc:  # a local file: the export's target, stdout closed, ...
        where = f"{exc.filename}: " if exc.filename else ""
        print(f"{prog}: {where}{_reason(exc)}", file=sys.stderr)
        return 1
    return 0
