"""The ``adamserve`` command: argument parsing over :mod:`adamserve.app`.

``adamserve serve`` runs the gRPC and HTTP transports over one service until
SIGTERM or SIGINT, then checkpoints every session with unsaved steps and exits.
Every flag can also be set as an environment variable ``ADAMSERVE_<NAME>``.

``adamserve ray up|addresses|down`` runs shards of the same server as Ray actors
(:mod:`adamserve.ray_shards`; needs the ``ray`` extra, imported only then).

``adamserve sessions list|describe|delete|checkpoint|export|import`` talks to a
running server over its HTTP API (:mod:`adamserve.operator_cli`).

The server's modules are imported only once the command is known: ``serve`` sets
numba's cache directory first (:mod:`adamserve.warmup`; numba reads it at import),
and ``sessions`` needs none of them.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import secrets
import signal
import sys
import threading
import typing
from collections.abc import Collection
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

from adamserve import __version__, operator_cli, warmup

if TYPE_CHECKING:
    from adamserve.app import Settings
    from adamserve.ray_shards import ShardAddress

__all__ = ["load_settings", "main"]

_FROM_APP = frozenset({"Server", "Settings", "default_state_cap"})


def __getattr__(name: str) -> Any:
    """``Server``, ``Settings`` and ``default_state_cap``, as this module always offered
    them: imported when first asked for (they import numba, which must wait for the cache
    directory)."""
    if name in _FROM_APP:
        from adamserve import app

        return getattr(app, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

log = logging.getLogger("adamserve")


class _Parser(argparse.ArgumentParser):
    """Bad arguments end with one line (which, and where --help is), not the usage."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: {message} (see {self.prog} --help)\n")


def _shown_default(value: Any) -> str:
    if value is None:
        return "none"
    if isinstance(value, bool):
        return "on" if value else "off"
    return str(value)


def _metavar(field: Any) -> str:
    kinds = set(typing.get_args(field.annotation)) or {field.annotation}
    for kind, metavar in ((Path, "PATH"), (int, "N"), (float, "SECONDS")):
        if kind in kinds:
            return metavar
    return "HOST" if field.annotation is str else "VALUE"


def _settings_flags(parser: argparse.ArgumentParser, skip: frozenset[str] = frozenset(),
                    passed_on: bool = False) -> None:
    from adamserve.app import Settings

    for name, field in Settings.model_fields.items():
        if name in skip:
            continue
        flag = "--" + name.replace("_", "-")
        if name in ENVIRONMENT_ONLY:
            parser.add_argument(flag, action=_EnvironmentOnly,
                                help=f"not a flag: set ADAMSERVE_{name.upper()} (a command "
                                     "line is visible to every user of the host)")
            continue
        # a shard reads the environment of its own node, not of this process
        nodes = " on the shards' nodes" if passed_on else ""
        env = f"env ADAMSERVE_{name.upper()}{nodes}"
        text = (field.description or "").replace("%", "%%")  # argparse %-formats help
        choices = typing.get_args(field.annotation) if typing.get_origin(
            field.annotation) is typing.Literal else None
        helptext = f"{text}; default {_shown_default(field.default)}, {env}".lstrip("; ")
        if field.annotation is bool and field.default:  # on unless switched off
            parser.add_argument("--no-" + name.replace("_", "-"), dest=name, default=None,
                                action="store_const", const="false",
                                help=f"turn off: {text}; default on, env "
                                     f"ADAMSERVE_{name.upper()}=false{nodes}")
        elif field.annotation is bool:  # a switch: --allow-shared-memory
            parser.add_argument(flag, dest=name, default=None, action="store_const",
                                const="true", help=helptext)
        else:
            upper = choices is not None and all(str(c).isupper() for c in choices)
            parser.add_argument(flag, dest=name, default=None, help=helptext,
                                choices=choices, metavar=None if choices else _metavar(field),
                                type=str.upper if upper else str)  # --log-level debug


# Secrets: read from the environment (or a file), never from argv, which every user of
# the host can read in /proc/<pid>/cmdline.
ENVIRONMENT_ONLY = frozenset({"token"})


class _EnvironmentOnly(argparse.Action):
    def __init__(self, option_strings: list[str], dest: str, **kwargs: Any) -> None:
        super().__init__(option_strings, dest, nargs="?", **kwargs)

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace,
                 values: Any, option_string: str | None = None) -> None:
        name = self.dest
        parser.error(f"{option_string}: a secret on the command line is visible to every user "
                     f"of this host (/proc/<pid>/cmdline); set ADAMSERVE_{name.upper()} in the "
                     "environment instead, or give keys in an --auth-file")


def _parser() -> argparse.ArgumentParser:
    from adamserve import ray_shards
    from adamserve.service.access import Role

    ap = _Parser(prog="adamserve", description="adamserve " + __version__)
    ap.add_argument("--version", action="version", version=f"adamserve {__version__}")
    sub = ap.add_subparsers(dest="command", required=True, metavar="COMMAND")
    serve = sub.add_parser("serve", help="run the gRPC, HTTP and Flight server",
                           description="Serve until SIGTERM or SIGINT, then checkpoint every "
                                       "session with unsaved steps. Every flag is also an "
                                       "environment variable, ADAMSERVE_<FLAG>.")
    _settings_flags(serve)
    operator_cli.add_parser(sub)

    ray = sub.add_parser("ray", help="run shards of the server as Ray actors (the ray extra)")
    ray_sub = ray.add_subparsers(dest="ray_command", required=True)
    common = _Parser(add_help=False)
    common.add_argument("--name", default="adamserve",
                        help="the shards' actors are NAME-shard-<i> (default adamserve)")
    common.add_argument("--address", default=None,
                        help="the Ray cluster, host:port (default: auto, this machine's)")
    up = ray_sub.add_parser("up", parents=[common], help="start shards; keep running ones")
    up.add_argument("--shards", type=int, required=True)
    up.add_argument("--num-gpus-per-shard", type=float, default=0.0,
                    help="> 0: each shard keeps its state on its GPU (default 0: CPU)")
    up.add_argument("--num-cpus-per-shard", type=float, default=0.5)
    up.add_argument("--data-dir", default="data",
                    help="root of the shards' data directories, a path on the Ray nodes: "
                         "<data-dir>/<name>/shard-<i> (default ./data)")
    up.add_argument("--checkpoint-every", type=int, default=100,
                    help="checkpoint each session every N steps (default 100)")
    up.add_argument("--host", default=None,
                    help="address the shards bind to (default: their node's IP address)")
    for wire in ("grpc", "http"):
        up.add_argument(f"--{wire}-port", type=int, default=0,
                        help=f"shard i serves {wire} on this port + i, also after a restart "
                             "(default 0: any free port, a new one after each restart)")
    up.add_argument("--flight-port", type=int, default=0,
                    help="shard i serves Arrow Flight on this port + i (default 0: no Flight)")
    _settings_flags(up, skip=ray_shards.SHARD_SETTINGS, passed_on=True)
    keys = sub.add_parser("keys", help="make API keys for an --auth-file (docs/security.md)")
    keys_sub = keys.add_subparsers(dest="keys_command", required=True)
    new = keys_sub.add_parser("new", help="print a new random key and the [[keys]] entry "
                                          "that stores its hash")
    new.add_argument("--tenant", default="", help="the tenant the key acts for (default: the "
                                                  "default tenant)")
    new.add_argument("--role", required=True, choices=[r.value for r in Role])
    new.add_argument("--name", required=True, help="names the key in audit lines")
    ray_sub.add_parser("addresses", parents=[common], help="print the running shards' addresses")
    ray_sub.add_parser("down", parents=[common],
                       help="checkpoint and stop the shards (their data directories stay)")
    return ap


def _given(args: argparse.Namespace, names: Collection[str]) -> dict[str, Any]:
    return {k: v for k, v in vars(args).items() if k in names and v is not None}


def load_settings(argv: list[str] | None = None) -> Settings:
    return _serve_settings(_parser().parse_args(argv))


def _serve_settings(args: argparse.Namespace) -> Settings:
    from adamserve.app import Settings

    given = _given(args, Settings.model_fields)
    for name in ("data_dir", "cache_dir"):
        if given.get(name) in ("", "none"):
            given[name] = None
    settings = Settings(**given)
    if settings.token == "":  # an empty ADAMSERVE_TOKEN means no token, not an empty one
        settings.token = None
    return settings


def _print_shards(shards: list[ShardAddress]) -> None:
    for s in shards:
        print(f"shard {s['shard']} {s['grpc']} {s['http']}" + (f" {s['flight']}"
                                                              if s["flight"] else ""))
    print("ADAMSERVE_SHARDS=" + ",".join(s["grpc"] for s in shards))


def _ray(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        _ray_command(args)
    except Exception as exc:  # Ray's errors carry the shard's own traceback: print that only
        print(f"adamserve ray {args.ray_command}: {exc}", file=sys.stderr)
        return 1
    return 0


def _ray_command(args: argparse.Namespace) -> None:
    from adamserve import ray_shards
    from adamserve.app import Settings

    if args.ray_command == "up":
        extra = _given(args, Settings.model_fields.keys() - ray_shards.SHARD_SETTINGS)
        _print_shards(ray_shards.up(
            args.shards, name=args.name, num_gpus_per_shard=args.num_gpus_per_shard,
            num_cpus_per_shard=args.num_cpus_per_shard, address=args.address,
            data_dir=args.data_dir, checkpoint_every=args.checkpoint_every, host=args.host,
            grpc_port=args.grpc_port, http_port=args.http_port, flight_port=args.flight_port,
            settings=extra))
    elif args.ray_command == "addresses":
        _print_shards(ray_shards.addresses(args.name, address=args.address))
    else:
        stopped = ray_shards.down(args.name, address=args.address)
        print(f"stopped {len(stopped)} shards" + (f": {stopped}" if stopped else ""))


def _new_key(args: argparse.Namespace) -> int:
    """A random 256-bit key, printed once; the auth file keeps only its SHA-256."""
    from adamserve.service.access import hash_key
    from adamserve.sessions import names

    try:
        names.check_tenant(args.tenant)
    except ValueError as exc:
        print(f"adamserve keys new: {exc}", file=sys.stderr)
        return 2
    key = secrets.token_urlsafe(32)
    print(f"# the key (give it to its user; it is not stored anywhere): {key}")
    print("[[keys]]")
    print(f"name = {json.dumps(args.name)}")
    print(f"tenant = {json.dumps(args.tenant)}")
    print(f"role = {json.dumps(args.role)}")
    print(f"sha256 = \"{hash_key(key)}\"")
    return 0


def _cache_dir(argv: list[str]) -> Path | None:
    """``serve``'s --cache-dir (or ADAMSERVE_CACHE_DIR), read before the full parser: that
    one imports the server's modules, and numba with them."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--cache-dir", default=os.environ.get("ADAMSERVE_CACHE_DIR"))
    value = pre.parse_known_args(argv)[0].cache_dir
    return None if value in (None, "", "none") else Path(value)


def _bad_settings(exc: Exception) -> None:
    """One line per bad setting (a pydantic ValidationError), naming its flag and variable."""
    from pydantic import ValidationError

    assert isinstance(exc, ValidationError)
    for err in exc.errors():
        name = ".".join(str(x) for x in err["loc"])
        where = f"--{name.replace('_', '-')} (ADAMSERVE_{name.upper()}): " if name else ""
        got = "" if not name or name in ENVIRONMENT_ONLY else f", got {err.get('input')!r}"
        print(f"adamserve serve: {where}{err['msg']}{got}", file=sys.stderr)


def _serve(args: argparse.Namespace, cache: warmup.CacheDir) -> int:
    from pydantic import ValidationError

    from adamserve import logs, malloc
    from adamserve.app import Server

    try:
        settings = _serve_settings(args)
    except ValidationError as exc:  # one line per bad setting, not a traceback
        _bad_settings(exc)
        return 2
    logs.configure(settings.log_level, settings.log_format)
    if not cache.applied:
        log.debug("kernel cache: the kernels were imported before main(): numba keeps the "
                  "directory it had")
    elif cache.problem:
        log.warning("kernel cache: %s; using %s", cache.problem, cache.path)
    elif cache.source == warmup.CACHE_ENV and settings.cache_dir is not None:
        log.warning("NUMBA_CACHE_DIR=%s is set: it wins over --cache-dir %s", cache.path,
                    settings.cache_dir)
    malloc.keep_large_blocks()
    try:
        server = Server(settings)
        server.start()
    except (ValueError, OSError, RuntimeError) as exc:
        # a bad file, a busy port, an unreadable data directory: say which, in one line
        print(f"adamserve serve: {_one_line(exc)}", file=sys.stderr)
        return 1
    done = threading.Event()

    def on_signal(signum: int, _frame: object) -> None:
        log.info("received %s: draining and checkpointing", signal.Signals(signum).name)
        done.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    done.wait()
    # not 0 when a session's unsaved changes could not be saved: supervisors should know
    return 1 if server.stop().failed else 0


def _one_line(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror:  # not "[Errno 13] ..."
        text = exc.strerror
        if exc.filename is not None and str(exc.filename) not in text:
            text += f": {exc.filename}"
    else:
        text = str(exc)
    return " ".join(text.split()) or type(exc).__name__


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["sessions"]:  # an HTTP client: none of the server's modules
        return operator_cli.main(argv[1:])
    # numba reads its cache directory when it is imported, which the parser's imports do
    cache = warmup.configure_cache(_cache_dir(argv[1:])) if argv[:1] == ["serve"] else None
    args = _parser().parse_args(argv)
    if args.command == "ray":
        return _ray(args)
    if args.command == "keys":
        return _new_key(args)
    return _serve(args, cache or warmup.configure_cache(_cache_dir(argv)))


if __name__ == "__main__":
    sys.exit(main())
