"""The ``adamserve`` command: argument parsing over :mod:`adamserve.app`.

``adamserve serve`` runs the gRPC and HTTP transports over one service until
SIGTERM or SIGINT, then checkpoints every session with unsaved steps and exits.
Every flag can also be set as an environment variable ``ADAMSERVE_<NAME>``.

``adamserve ray up|addresses|down`` runs shards of the same server as Ray actors
(:mod:`adamserve.ray_shards`; needs the ``ray`` extra, imported only then).
"""

from __future__ import annotations

import argparse
import json
import logging
import secrets
import signal
import sys
import threading
from collections.abc import Collection
from typing import Any

from pydantic import ValidationError

from adamserve import __version__, malloc, ray_shards
from adamserve.app import Server, Settings, default_state_cap
from adamserve.service.access import Role, hash_key
from adamserve.sessions import names

__all__ = ["Server", "Settings", "default_state_cap", "load_settings", "main"]

log = logging.getLogger("adamserve")


def _settings_flags(parser: argparse.ArgumentParser, skip: frozenset[str] = frozenset(),
                    passed_on: bool = False) -> None:
    for name, field in Settings.model_fields.items():
        if name in skip:
            continue
        if name in ENVIRONMENT_ONLY:
            parser.add_argument("--" + name.replace("_", "-"), action=_EnvironmentOnly,
                                help=f"not a flag: set ADAMSERVE_{name.upper()} (a command "
                                     "line is visible to every user of the host)")
            continue
        flag = "--" + name.replace("_", "-")
        # a shard reads the environment of its own node, not of this process
        env = f"env ADAMSERVE_{name.upper()}" + (" on the shards' nodes" if passed_on else "")
        helptext = field.description or f"({env})"
        if field.annotation is bool:  # a switch: --allow-shared-memory
            parser.add_argument(flag, dest=name, default=None, action="store_const",
                                const="true", help=helptext)
        else:
            parser.add_argument(flag, dest=name, default=None, help=helptext)


# Secrets: read from the environment (or a file), never from argv, which every user of
# the host can read in /proc/<pid>/cmdline.
ENVIRONMENT_ONLY = frozenset({"token"})


class _EnvironmentOnly(argparse.Action):
    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace,
                 values: Any, option_string: str | None = None) -> None:
        name = self.dest
        parser.error(f"{option_string}: a secret on the command line is visible to every user "
                     f"of this host (/proc/<pid>/cmdline); set ADAMSERVE_{name.upper()} in the "
                     "environment instead, or give keys in an --auth-file")


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="adamserve", description="adamserve " + __version__)
    sub = ap.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="run the gRPC and HTTP server")
    _settings_flags(serve)

    ray = sub.add_parser("ray", help="run shards of the server as Ray actors (the ray extra)")
    ray_sub = ray.add_subparsers(dest="ray_command", required=True)
    common = argparse.ArgumentParser(add_help=False)
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
    given = _given(args, Settings.model_fields)
    if given.get("data_dir") in ("", "none"):
        given["data_dir"] = None
    settings = Settings(**given)
    if settings.token == "":  # an empty ADAMSERVE_TOKEN means no token, not an empty one
        settings.token = None
    return settings


def _print_shards(shards: list[ray_shards.ShardAddress]) -> None:
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


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "ray":
        return _ray(args)
    if args.command == "keys":
        return _new_key(args)
    try:
        settings = _serve_settings(args)
    except ValidationError as exc:  # one line per bad setting, not a traceback
        for err in exc.errors():
            where = ".".join(str(x) for x in err["loc"])
            print(f"adamserve serve: {where + ': ' if where else ''}{err['msg']}",
                  file=sys.stderr)
        return 2
    logging.basicConfig(level=settings.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    malloc.keep_large_blocks()
    try:
        server = Server(settings)
        server.start()
    except (ValueError, OSError) as exc:  # a bad file or a busy port: say which, in one line
        print(f"adamserve serve: {exc}", file=sys.stderr)
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


if __name__ == "__main__":
    sys.exit(main())
