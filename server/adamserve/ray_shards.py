"""adamserve shards on a Ray cluster: each shard a named, detached Ray actor running a Server.

``up(3)`` starts actors ``adamserve-shard-0`` .. ``adamserve-shard-2`` in the Ray
namespace ``adamserve``; each runs the usual gRPC and HTTP server
(:class:`adamserve.app.Server`) on free ports of the node it lands on, with its own
data directory ``<data_dir>/<name>/shard-<i>`` and a checkpoint every
``checkpoint_every`` steps. The actors are detached, so they outlive the process that
started them, and restartable without limit: when a shard's process dies, Ray starts
the actor again and its ``__init__`` restores every session from that shard's last
checkpoints, on new ports (ask :func:`addresses` again) unless ``grpc_port`` and
``http_port`` fix them.

``data_dir`` is a path on the node where the shard runs, not on the caller's
machine. On a cluster of several nodes a restarted shard may land on another node,
so it must be a shared file system mounted at the same path on every node (or a
node-local path, accepting that a shard moved to another node starts empty).

Ray is an optional dependency (``pip install 'adamserve[ray]'``); it is imported only
when a function here is called.
"""

from __future__ import annotations

import logging
import os
import re
import socket
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypedDict

from adamserve import malloc
from adamserve.app import Server, Settings

__all__ = ["NAMESPACE", "SHARD_SETTINGS", "Shard", "ShardAddress", "addresses", "down", "up"]

NAMESPACE = "adamserve"
# Settings that up() sets itself, per shard; any other Settings field may be passed on.
SHARD_SETTINGS = frozenset({"host", "grpc_port", "http_port", "flight_port", "device",
                            "data_dir", "checkpoint_every", "ports_file"})
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
_WILDCARD = ("0.0.0.0", "::", "")

log = logging.getLogger("adamserve.ray")


class ShardAddress(TypedDict):
    shard: int
    grpc: str  # grpc://host:port (grpcs:// with TLS)
    http: str  # http://host:port (https://)
    flight: str  # flight://host:port (flight+tls://); "" without Flight (flight_port 0)


@dataclass(frozen=True)
class ShardConfig:
    """What a shard's actor is created with; Ray keeps it and reuses it on restart."""

    index: int
    data_dir: str
    device: str
    checkpoint_every: int
    host: str | None = None  # None: the node's IP address
    grpc_port: int = 0  # 0: any free port, a new one after each restart
    http_port: int = 0
    flight_port: int = 0
    settings: dict[str, Any] = field(default_factory=dict)


def _ray() -> Any:
    try:
        import ray
    except ImportError as exc:
        raise RuntimeError("adamserve on Ray needs Ray: pip install 'adamserve[ray]'") from exc
    return ray


def _url(scheme: str, host: str, port: int) -> str:
    return f"{scheme}://[{host}]:{port}" if ":" in host else f"{scheme}://{host}:{port}"


class Shard:
    """One adamserve server inside a Ray actor (wrapped with ``ray.remote`` by :func:`up`).

    Everything happens in ``__init__``, because that is what Ray runs again when it
    restarts the actor: a restarted shard restores every session from its checkpoints.
    """

    def __init__(self, config: ShardConfig) -> None:
        ray = _ray()
        settings = Settings(**{
            **config.settings,
            "host": config.host or ray.util.get_node_ip_address(),
            "grpc_port": config.grpc_port, "http_port": config.http_port,
            "flight_port": config.flight_port, "device": config.device,
            "data_dir": Path(config.data_dir), "checkpoint_every": config.checkpoint_every})
        if settings.token == "":  # as `adamserve serve`: an empty token means none
            settings.token = None
        logging.basicConfig(level=settings.log_level.upper(),
                            format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        self.index = config.index
        malloc.keep_large_blocks()  # the actor's process is the server's
        self.server = Server(settings)
        self.server.start()
        # a wildcard bind is reachable at the node's address; advertise that
        self.host = (ray.util.get_node_ip_address() if settings.host in _WILDCARD
                     else settings.host)
        log.info("shard %d (pid %d) serving %s", self.index, os.getpid(), self.address())

    def address(self) -> ShardAddress:
        tls = self.server.tls is not None  # the client's TLS schemes
        return {"shard": self.index,
                "grpc": _url("grpcs" if tls else "grpc", self.host, self.server.grpc_port),
                "http": _url("https" if tls else "http", self.host, self.server.http_port),
                "flight": (_url("flight+tls" if tls else "flight", self.host,
                                self.server.flight_port) if self.server.flight_port else "")}

    def pid(self) -> int:
        """The actor's process id on its node (for operators: profilers, kill -9 drills)."""
        return os.getpid()

    def stop(self) -> None:
        """Drain both transports and checkpoint every session with unsaved steps."""
        self.server.stop()


def _actor_name(name: str, index: int) -> str:
    return f"{name}-shard-{index}"


def _reachable(address: str, timeout: float = 10.0) -> None:
    """Fail fast: ray.init retries an unreachable cluster for many minutes."""
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit() or "://" in host:
        return  # "auto", a ray:// client address, ...: left to Ray
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout).close()
    except OSError as exc:
        raise ConnectionError(f"no Ray cluster at {address}: {exc}") from None


def _connect(address: str | None) -> Any:
    ray = _ray()
    if not ray.is_initialized():
        if address is not None:
            _reachable(address)
        ray.init(address=address or "auto", namespace=NAMESPACE,
                 logging_level=logging.WARNING, log_to_driver=False)
    return ray


def _shard_indices(ray: Any, name: str) -> list[int]:
    pattern = re.compile(re.escape(name) + r"-shard-(\d+)")
    found = []
    for actor in ray.util.list_named_actors(all_namespaces=True):
        m = pattern.fullmatch(actor["name"])
        if m is not None and actor["namespace"] == NAMESPACE:
            found.append(int(m.group(1)))
    return sorted(found)


def up(shards: int, *, name: str = "adamserve", num_gpus_per_shard: float = 0,
       num_cpus_per_shard: float = 0.5, address: str | None = None,
       data_dir: str | Path = "data", checkpoint_every: int = 100, host: str | None = None,
       grpc_port: int = 0, http_port: int = 0, flight_port: int = 0,
       settings: Mapping[str, Any] | None = None,
       timeout: float = 300.0) -> list[ShardAddress]:
    """Start shards 0 .. ``shards``-1 (those already running are kept) and return their addresses.

    ``address``: the Ray cluster (None: ``auto``, the one this machine belongs to).
    ``data_dir``: root of the shards' data directories, a path on the nodes (see the
    module's docstring); a relative path is taken from the current directory.
    ``host``: the address the shards bind to (None: their node's IP address;
    ``0.0.0.0``: every interface, advertised as the node's IP address).
    ``grpc_port``, ``http_port``: shard i listens on ``grpc_port + i`` and
    ``http_port + i``, so a shard restarted on the same node is back at the same
    address; 0: any free port, new after each restart. ``flight_port``: shard i
    serves Arrow Flight on ``flight_port + i``; 0: no Flight.
    ``num_gpus_per_shard`` > 0 puts each shard's state on its GPU (CuPy). ``settings``:
    other :class:`~adamserve.app.Settings` fields, such as ``token`` or
    ``max_state_bytes``. A running shard keeps the options it was started with:
    :func:`down` it first to change them.
    """
    if shards < 1:
        raise ValueError(f"shards must be at least 1, got {shards}")
    if not _NAME.fullmatch(name):
        raise ValueError(f"name {name!r}: use letters, digits, '_', '.', '-'")
    if checkpoint_every < 0:
        raise ValueError(f"checkpoint_every must be >= 0, got {checkpoint_every}")
    for flag, port in (("grpc_port", grpc_port), ("http_port", http_port),
                       ("flight_port", flight_port)):
        if not (port == 0 or 0 < port <= 65536 - shards):
            raise ValueError(f"{flag} {port}: 0, or room for {shards} ports up to 65535")
    extra = dict(settings or {})
    if fixed := sorted(SHARD_SETTINGS & extra.keys()):
        raise ValueError(f"settings {fixed} are set by up() itself")
    Settings(**extra)  # refuse a bad value here, not in every actor
    root = Path(data_dir).expanduser().resolve() / name
    device = "cuda" if num_gpus_per_shard > 0 else "cpu"
    ray = _connect(address)
    have = ray.cluster_resources()
    for resource, per_shard in (("GPU", num_gpus_per_shard), ("CPU", num_cpus_per_shard)):
        if per_shard * shards > have.get(resource, 0):  # an autoscaler may still add nodes
            log.warning("%d shards need %g %s; the cluster has %g now: some wait for more",
                        shards, per_shard * shards, resource, have.get(resource, 0))
    actor_cls = ray.remote(Shard)
    handles = [
        actor_cls.options(
            name=_actor_name(name, i), namespace=NAMESPACE, get_if_exists=True,
            lifetime="detached", max_restarts=-1, max_task_retries=-1,
            num_cpus=num_cpus_per_shard, num_gpus=num_gpus_per_shard,
            scheduling_strategy="SPREAD",
        ).remote(ShardConfig(i, str(root / f"shard-{i}"), device, checkpoint_every, host,
                             grpc_port + i if grpc_port else 0,
                             http_port + i if http_port else 0,
                             flight_port + i if flight_port else 0, extra))
        for i in range(shards)]
    result: list[ShardAddress] = ray.get([h.address.remote() for h in handles], timeout=timeout)
    return result


def addresses(name: str = "adamserve", *, address: str | None = None,
              timeout: float = 300.0) -> list[ShardAddress]:
    """The addresses of the running shards named ``name``, by shard index.

    A shard that Ray is restarting answers once it has restored its sessions.
    """
    ray = _connect(address)
    handles = [ray.get_actor(_actor_name(name, i), namespace=NAMESPACE)
               for i in _shard_indices(ray, name)]
    result: list[ShardAddress] = ray.get([h.address.remote() for h in handles], timeout=timeout)
    return result


def down(name: str = "adamserve", *, address: str | None = None,
         timeout: float = 60.0) -> list[int]:
    """Stop the shards named ``name``: each checkpoints its sessions, then its actor is killed.

    The data directories stay, so a later :func:`up` with the same name and
    ``data_dir`` resumes every session. Returns the indices of the shards stopped.
    """
    ray = _connect(address)
    indices = _shard_indices(ray, name)
    handles = [ray.get_actor(_actor_name(name, i), namespace=NAMESPACE) for i in indices]
    stops = [h.stop.remote() for h in handles]  # all drain at once
    deadline = time.monotonic() + timeout
    for i, h, ref in zip(indices, handles, stops, strict=True):
        try:
            ray.get(ref, timeout=max(0.0, deadline - time.monotonic()))
        except Exception as exc:  # killed anyway: its last checkpoints are what survives
            log.warning("shard %d did not stop cleanly: %s", i, exc)
        ray.kill(h, no_restart=True)
    while _shard_indices(ray, name) and time.monotonic() < deadline:
        time.sleep(0.1)  # ray.kill returns before the name is released
    return indices
