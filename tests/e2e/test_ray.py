"""adamserve shards on a real local Ray cluster: up, a crashed shard comes back from its
checkpoint, addresses, up again (nothing new), down.

The cluster is ``ray start --head --block`` on this machine with 2 CPUs, in a temp dir
of its own; every process it started is ended at teardown, whatever happened.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from adamserve.engine.optimizer import FlatOptimizer, Layout
from adamserve.engine.optimizer import TensorSpec as EngineTensor
from adamserve_client.tensors import decode, encode
from adamserve_client.transports import SessionSpec, TensorSpec, WireTensor, connect

ray = pytest.importorskip("ray", reason="Ray is not installed (pip install 'adamserve[ray]')")

SHAPES = {"w": (16, 8), "b": (8,)}
NAME = "t"  # the shards' actors: t-shard-0, t-shard-1
SHARD_LINE = re.compile(r"^shard (\d+) (grpc://\S+) (http://\S+)$", re.M)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "ADAMSERVE_"))}
    env["RAY_USAGE_STATS_ENABLED"] = "0"
    env["PYTHONUNBUFFERED"] = "1"
    return env


def _descendants(root: int) -> list[int]:
    """``root`` and every process below it (read from /proc)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat[stat.rindex(")") + 2:].split()[1])
        children.setdefault(ppid, []).append(int(entry.name))
    found, todo = [], [root]
    while todo:
        pid = todo.pop()
        found.append(pid)
        todo.extend(children.get(pid, ()))
    return found


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2] != "Z"


@dataclass
class Cluster:
    address: str
    log: Path


@pytest.fixture(scope="module")
def ray_cluster() -> Iterator[Cluster]:
    ray_bin = Path(sys.executable).with_name("ray")
    if not ray_bin.exists():
        pytest.skip(f"no ray command beside {sys.executable}")
    temp = Path(tempfile.mkdtemp(prefix="asr", dir="/tmp"))  # short: Ray's sockets live here
    log = temp / "start.log"
    port = _free_port()
    cmd = [str(ray_bin), "start", "--head", "--block", "--node-ip-address=127.0.0.1",
           f"--port={port}", "--num-cpus=2", "--num-gpus=0", "--include-dashboard=false",
           "--disable-usage-stats", f"--temp-dir={temp}", "--object-store-memory=100000000",
           f"--ray-client-server-port={_free_port()}", f"--dashboard-port={_free_port()}",
           f"--dashboard-agent-listen-port={_free_port()}"]
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=_env(),
                                start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while b"Ray runtime started" not in log.read_bytes():
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail("ray start failed:\n" + log.read_text()[-3000:])
            time.sleep(0.1)
        yield Cluster(f"127.0.0.1:{port}", log)
    finally:
        if ray.is_initialized():
            ray.shutdown()
        pids = _descendants(proc.pid)  # ray start, GCS, raylet, agents, the shards' workers
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
        # Ray's daemons take over 10 s to stop on SIGTERM; this cluster's state is scrap
        deadline = time.monotonic() + 2
        while any(_alive(p) for p in pids) and time.monotonic() < deadline:
            time.sleep(0.1)
        for pid in pids:
            if _alive(pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        proc.wait(30)
        shutil.rmtree(temp, ignore_errors=True)


def _adamserve_ray(*args: str) -> str:
    r = subprocess.run([sys.executable, "-m", "adamserve.cli", "ray", *args], env=_env(),
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, (f"adamserve ray {' '.join(args)}: {r.returncode}\n"
                               f"stdout:\n{r.stdout[-2000:]}\nstderr:\n{r.stderr[-4000:]}")
    return r.stdout


def _shards(out: str) -> list[tuple[int, str, str]]:
    shards = [(int(i), g, h) for i, g, h in SHARD_LINE.findall(out)]
    assert f"ADAMSERVE_SHARDS={','.join(g for _, g, _ in shards)}" in out.splitlines()
    return shards


def _crash(cluster: Cluster, actor_name: str) -> tuple[object, int]:
    """kill -9 an actor's process, as a crash looks to Ray; returns the actor and the pid."""
    if not ray.is_initialized():
        ray.init(address=cluster.address, namespace="adamserve", log_to_driver=False)
    actor = ray.get_actor(actor_name)
    pid: int = ray.get(actor.pid.remote(), timeout=30)
    os.kill(pid, signal.SIGKILL)
    return actor, pid


def _actors(name: str) -> list[str]:
    return [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
            if a["name"].startswith(f"{name}-shard-")]


def _params(tensors: list[WireTensor] | tuple[WireTensor, ...]) -> np.ndarray:
    by_name = {t.name: decode(t.data, t.datatype).reshape(t.shape) for t in tensors}
    return np.concatenate([by_name[k].ravel() for k in SHAPES])


def _wire(arrays: dict[str, np.ndarray]) -> list[WireTensor]:
    return [WireTensor(k, SHAPES[k], "FP32", encode(arrays[k], "FP32")) for k in SHAPES]


def test_a_crashed_shard_comes_back_from_its_checkpoint(
        ray_cluster: Cluster, tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    p0 = {k: rng.standard_normal(s).astype(np.float32) for k, s in SHAPES.items()}
    grads = [{k: rng.standard_normal(s).astype(np.float32) for k, s in SHAPES.items()}
             for _ in range(4)]
    local = FlatOptimizer("adamw", Layout(tuple(EngineTensor(k, s) for k, s in SHAPES.items())),
                          [{"lr": 0.01}], params=np.concatenate([p0[k].ravel() for k in SHAPES]))
    data = tmp_path / "data"
    where = ["--name", NAME, "--address", ray_cluster.address]
    up = [*where, "--shards", "2", "--data-dir", str(data), "--checkpoint-every", "1",
          "--host", "127.0.0.1"]

    shards = _shards(_adamserve_ray("up", *up))
    assert [i for i, _, _ in shards] == [0, 1]
    assert len({g for _, g, _ in shards} | {h for _, _, h in shards}) == 4

    spec = SessionSpec("s1", "adamw", tuple(TensorSpec(k, s) for k, s in SHAPES.items()),
                       ({"lr": 0.01},))
    with connect(shards[1][1], timeout=30) as t:
        t.create_session(spec, _wire(p0))
        for g in grads[:3]:
            t.step("s1", _wire(g))
            local.grad[:] = np.concatenate([g[k].ravel() for k in SHAPES])
            local.step()
        before = _params(t.pull("s1"))
        assert t.describe("s1").checkpointed_step == 3
    np.testing.assert_array_equal(before, local.param)

    actor, pid = _crash(ray_cluster, f"{NAME}-shard-1")
    after = _shards(_adamserve_ray("addresses", *where))  # waits for the restart
    assert after[0] == shards[0]  # the other shard is untouched
    assert after[1][0] == 1 and after[1][1:] != shards[1][1:]  # new process, new ports
    assert ray.get(actor.pid.remote(), timeout=30) != pid
    with connect(after[1][1], timeout=30) as t:
        assert t.describe("s1").step == 3
        np.testing.assert_array_equal(_params(t.pull("s1")), before)
        r = t.step("s1", _wire(grads[3]))
        local.grad[:] = np.concatenate([grads[3][k].ravel() for k in SHAPES])
        local.step()
        assert r.step == 4
        np.testing.assert_array_equal(_params(r.params), local.param)
    with connect(after[0][2], timeout=30) as t:
        assert t.list_sessions() == []  # sessions live on the shard they were created on

    assert _shards(_adamserve_ray("up", *up)) == after  # up again: the same shards

    assert "stopped 2 shards" in _adamserve_ray("down", *where)
    assert _actors(NAME) == []
    assert (data / NAME / "shard-1" / "sessions" / "s1").is_dir()  # down keeps the data


def test_with_fixed_ports_a_restarted_shard_keeps_its_address(
        ray_cluster: Cluster, tmp_path: Path) -> None:
    where = ["--name", "fixed", "--address", ray_cluster.address]
    grpc_port, http_port = _free_port(), _free_port()
    up = _shards(_adamserve_ray(
        "up", *where, "--shards", "1", "--data-dir", str(tmp_path), "--checkpoint-every", "1",
        "--host", "127.0.0.1", "--grpc-port", str(grpc_port), "--http-port", str(http_port)))
    assert up == [(0, f"grpc://127.0.0.1:{grpc_port}", f"http://127.0.0.1:{http_port}")]
    w = np.arange(6, dtype=np.float32)
    with connect(up[0][1], timeout=30) as t:  # one connection across the restart
        t.create_session(SessionSpec("s", "adam", (TensorSpec("w", (6,)),)),
                         [WireTensor("w", (6,), "FP32", encode(w, "FP32"))])
        t.step("s", [WireTensor("w", (6,), "FP32", encode(np.ones(6, np.float32), "FP32"))])
        before = t.pull("s")[0].data
        _crash(ray_cluster, "fixed-shard-0")
        assert _shards(_adamserve_ray("addresses", *where)) == up
        assert t.describe("s").step == 1
        assert t.pull("s")[0].data == before
    assert "stopped 1 shards" in _adamserve_ray("down", *where)
    assert _actors("fixed") == []
