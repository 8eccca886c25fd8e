"""Failing disks: a data directory that refuses a write or a read answers UNAVAILABLE /
503 (DATA_DIR_UNAVAILABLE) naming what failed relative to the data directory, and
changes nothing; DELETE removes memory and disk or neither; SIGTERM tries every
session and names those it could not save; an edited manifest is refused.

Every failure is a real OSError. In process: a session's checkpoint directory replaced
by a regular file (ENOTDIR), its LATEST by a directory (EISDIR). In a subprocess server
run as an unprivileged user (``nobody`` when the tests run as root, whom permissions do
not stop): a data directory made read-only with chmod (EACCES).
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest
from prometheus_client import REGISTRY

from adamserve.engine.kernels_cpu import CpuBackend
from adamserve.engine.optimizer import TensorSpec
from adamserve.service import OptimizerService
from adamserve.sessions.checkpoints import CheckpointStore
from adamserve.sessions.session import SessionConfig
from adamserve.sessions.store import SessionStore
from adamserve.transports.grpc import build_grpc_server
from adamserve.transports.http import HttpServerThread, create_app
from adamserve_proto.v2 import optimizer_pb2 as pb
from adamserve_proto.v2 import optimizer_pb2_grpc as pb_grpc
from tests.sessions.support import gradients
from tests.transports.test_grpc import expect

CONFIG = SessionConfig("adam", (TensorSpec("w", (4,)),))
GRADS = gradients(shapes={"w": (4,)})
SPEC = {"algorithm": "ALGORITHM_ADAM", "tensors": [{"name": "w", "shape": [4]}]}
GRAD = {"gradients": [{"name": "w", "shape": [4], "datatype": "FP32",
                       "data": [0.5, -1.0, 2.0, 0.25]}]}


def _service(data: Path, **every: float) -> OptimizerService:
    svc = OptimizerService(SessionStore(CpuBackend(), CheckpointStore(data)),
                           checkpoint_every_steps=int(every.get("steps", 0)),
                           checkpoint_every_seconds=every.get("seconds", 0.0))
    svc.start()
    return svc


@dataclass
class Live:
    data: Path
    service: OptimizerService
    http: httpx.Client
    stub: pb_grpc.OptimizerServiceStub

    def sdir(self, sid: str) -> Path:
        return self.data / "sessions" / sid

    def create(self, sid: str, steps: int = 0) -> None:
        r = self.http.post("/v2/sessions", json={"session_id": sid, **SPEC})
        assert r.status_code == 201, r.text
        for _ in range(steps):
            self.step(sid)

    def step(self, sid: str) -> int:
        r = self.http.post(f"/v2/sessions/{sid}/step", json=GRAD)
        assert r.status_code == 200, r.text
        return int(r.json()["step"])

    def state(self, sid: str) -> tuple[int, int, str]:
        """What a refused request must leave as it was: step, last checkpoint, numbers."""
        session = self.service.store.get(sid)
        return session.opt.step_count, session.checkpointed_step, session.fingerprint()


@pytest.fixture
def live(tmp_path: Path) -> Iterator[Live]:
    data = tmp_path / "data"
    service = _service(data)
    grpc_server, port = build_grpc_server(service, port=0)
    http = HttpServerThread(create_app(service))
    http.start()
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    with httpx.Client(base_url=http.url, timeout=30) as client:
        yield Live(data, service, client, pb_grpc.OptimizerServiceStub(channel))
    channel.close()
    grpc_server.stop(None)
    http.stop()


def refused_503(r: httpx.Response, base: Path, *needles: str) -> str:
    """A 503 DATA_DIR_UNAVAILABLE whose message names the case and no absolute path."""
    assert r.status_code == 503, r.text
    body = r.json()
    assert body["reason"] == "DATA_DIR_UNAVAILABLE" and body["code"] == "unavailable", body
    for needle in needles:
        assert needle in body["error"], (needle, body["error"])
    assert str(base) not in r.text and str(base.resolve()) not in r.text
    return str(body["error"])


def refused_unavailable(call: Any, base: Path, *needles: str) -> None:
    details = expect(call, grpc.StatusCode.UNAVAILABLE, *needles, reason="DATA_DIR_UNAVAILABLE")
    assert str(base) not in details and str(base.resolve()) not in details


def _metric(name: str) -> float:
    value = REGISTRY.get_sample_value(name)
    assert value is not None, name
    return value


# -- the wires ----------------------------------------------------------------------


def test_checkpoint_replies_name_the_checkpoint_relative_to_the_data_directory(
        live: Live) -> None:
    live.create("s", steps=1)
    r = live.http.post("/v2/sessions/s/checkpoint")
    assert r.status_code == 200, r.text
    path = r.json()["path"]
    reply = live.stub.Checkpoint(pb.CheckpointRequest(session_id="s"))
    for p in (path, reply.checkpoint.path):
        assert p.startswith("sessions/s/ckpt-000000000001-") and not Path(p).is_absolute()
        assert (live.data / p / "manifest.json").is_file()
    assert path != reply.checkpoint.path and str(live.data) not in r.text


def test_a_checkpoint_the_disk_refuses_is_unavailable_and_changes_nothing(live: Live) -> None:
    live.create("s", steps=2)
    sdir = live.sdir("s")
    sdir.write_text("a file where the session's checkpoint directory belongs")
    before = live.state("s")
    message = refused_503(live.http.post("/v2/sessions/s/checkpoint"), live.data,
                          "data directory not writable: writing the checkpoint of session "
                          "'s' at step 2 (sessions/s/", "Not a directory")
    assert message.endswith(": Not a directory)")
    refused_unavailable(lambda: live.stub.Checkpoint(pb.CheckpointRequest(session_id="s")),
                        live.data, "data directory not writable", "Not a directory")
    refused_503(live.http.get("/v2/sessions/s/checkpoints"), live.data,
                "data directory not readable: listing the checkpoints of session 's'")
    assert live.state("s") == before and live.service.store.get("s").dirty
    assert live.step("s") == 3  # the session goes on
    sdir.unlink()  # the disk is back
    r = live.http.post("/v2/sessions/s/checkpoint")
    assert r.status_code == 200 and r.json()["step"] == 3, r.text
    assert live.service.store.get("s").checkpointed_step == 3


def test_a_restore_the_disk_refuses_is_unavailable_and_keeps_every_checkpoint(
        live: Live) -> None:
    live.create("s", steps=1)
    live.http.post("/v2/sessions/s/checkpoint").raise_for_status()
    live.step("s")
    live.http.post("/v2/sessions/s/checkpoint").raise_for_status()
    live.step("s")
    sdir = live.sdir("s")
    (sdir / "LATEST").unlink()
    (sdir / "LATEST").mkdir()  # renaming the new LATEST over it: EISDIR
    before, files = live.state("s"), sorted(os.listdir(sdir))
    refused_503(live.http.post("/v2/sessions/s/restore", json={"step": 1}), live.data,
                "data directory not writable: restoring session 's' to its checkpoint of "
                "step 1", "Is a directory")
    refused_unavailable(lambda: live.stub.RestoreCheckpoint(
        pb.RestoreCheckpointRequest(session_id="s", step=1)), live.data, "Is a directory")
    # the later checkpoint, set aside for the restore, was put back; memory is as it was
    assert sorted(os.listdir(sdir)) == files and live.state("s") == before
    assert live.http.get("/v2/sessions/s/checkpoints").json()["steps"] == [1, 2]
    assert live.step("s") == 4
    (sdir / "LATEST").rmdir()
    r = live.http.post("/v2/sessions/s/restore", json={"step": 1})
    assert r.status_code == 200 and r.json()["step"] == 1, r.text
    assert live.http.get("/v2/sessions/s/checkpoints").json()["steps"] == [1]
    assert not [n for n in os.listdir(sdir) if n.startswith(".tmp-")]


def test_a_deleted_session_never_comes_back(tmp_path: Path) -> None:
    svc = _service(tmp_path)
    svc.create("gone", CONFIG)
    svc.checkpoint("gone")
    svc.create("kept", CONFIG)
    svc.checkpoint("kept")
    svc.delete("gone")
    assert not (tmp_path / "sessions" / "gone").exists()
    # a crash between setting a delete's files aside and removing them
    root = tmp_path / "sessions"
    svc.checkpoint("kept")
    shutil.copytree(root / "kept", root / ".tmp-deleted-kept-1")
    os.rename(root / "kept", root / ".tmp-deleted-kept-2")
    restarted = _service(tmp_path)
    assert restarted.list() == []
    assert os.listdir(root) == []  # the leftovers were swept


# -- the automatic triggers ---------------------------------------------------------


def _records(caplog: pytest.LogCaptureFixture, level: int, needle: str) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.levelno == level and needle in r.getMessage()]


def test_a_failing_disk_fails_no_step_and_is_logged_once_until_it_recovers(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, "adamserve.checkpoints")
    svc = _service(tmp_path, steps=1)
    svc.create("s", CONFIG)
    svc.step("s", GRADS)
    sdir = tmp_path / "sessions" / "s"
    shutil.rmtree(sdir)
    sdir.write_text("not a directory")
    failures = _metric("adamserve_checkpoint_failures_total")
    for want in (2, 3, 4):
        assert svc.step("s", GRADS).step == want  # applied, in memory
    assert svc.describe("s").checkpointed_step == 1
    logged = _records(caplog, logging.ERROR, "automatic checkpoint of session s failed")
    assert len(logged) == 1 and "data directory not writable" in logged[0], logged
    assert _metric("adamserve_checkpoint_failures_total") == failures + 3
    assert _metric("adamserve_checkpoint_failing_sessions") == 1
    sdir.unlink()
    assert svc.step("s", GRADS).step == 5 and svc.list_checkpoints("s") == [5]
    assert _records(caplog, logging.INFO, "checkpoints of session s succeed again")
    assert _metric("adamserve_checkpoint_failing_sessions") == 0
    sdir.rename(tmp_path / "moved")
    sdir.write_text("broken again")
    svc.step("s", GRADS)
    svc.step("s", GRADS)
    assert len(_records(caplog, logging.ERROR, "automatic checkpoint of session s")) == 2
    svc.delete("s")  # deleting a failing session leaves the gauge
    assert _metric("adamserve_checkpoint_failing_sessions") == 0


def test_the_periodic_checkpoint_on_a_failing_disk_logs_once(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, "adamserve.checkpoints")
    svc = _service(tmp_path, seconds=0.01)
    svc.create("s", CONFIG)
    (tmp_path / "sessions" / "s").write_text("not a directory")
    for _ in range(3):
        svc.step("s", GRADS)
        time.sleep(0.02)
        assert svc.checkpoint_due() == 0
    assert len(_records(caplog, logging.ERROR, "periodic checkpoint of session s failed")) == 1
    (tmp_path / "sessions" / "s").unlink()
    time.sleep(0.02)
    assert svc.checkpoint_due() == 1 and svc.list_checkpoints("s") == [3]


def test_on_stop_every_session_is_tried_and_those_not_saved_are_named(tmp_path: Path) -> None:
    svc = _service(tmp_path)
    for sid in ("s1", "s2", "s3"):
        svc.create(sid, CONFIG)
        svc.step(sid, GRADS)
    (tmp_path / "sessions" / "s1").write_text("not a directory")
    done = svc.checkpoint_all()
    assert done.saved == ("s2", "s3") and list(done.failed) == ["s1"]
    assert "data directory not writable" in done.failed["s1"]
    (tmp_path / "sessions" / "s1").unlink()
    restarted = _service(tmp_path)
    assert [(s.id, s.step) for s in restarted.list()] == [("s2", 1), ("s3", 1)]


# -- the manifest's digest ----------------------------------------------------------


def _manifest(path: Path) -> dict[str, Any]:
    return dict(json.loads((path / "manifest.json").read_text()))


def _edit(path: Path, change: Any) -> None:
    manifest = _manifest(path)
    change(manifest)
    (path / "manifest.json").write_text(json.dumps(manifest, indent=1))


EDITS = {
    "step_count": lambda m: m.update(step_count=m["step_count"] + 5),
    "lr": lambda m: m["config"]["groups"][0].update(lr=10.0),
    "tensors' sha256": lambda m: m.update(sha256="0" * 64),
    "digest dropped": lambda m: m.pop("manifest_sha256"),
}


@pytest.mark.parametrize("edit", list(EDITS))
def test_an_edited_manifest_is_refused_for_the_older_whole_checkpoint(
        tmp_path: Path, edit: str) -> None:
    svc = _service(tmp_path)
    svc.create("s", CONFIG)
    svc.step("s", GRADS)
    older = tmp_path / svc.checkpoint("s").path
    svc.step("s", gradients(1, shapes={"w": (4,)}))
    newer = tmp_path / svc.checkpoint("s").path
    _edit(newer, EDITS[edit])
    restarted = _service(tmp_path)
    assert restarted.describe("s").step == 1  # the newest is refused: the older one loads
    assert restarted.describe("s").groups[0]["lr"] == 1e-3
    _edit(older, EDITS[edit])
    assert _service(tmp_path).list() == []  # no whole checkpoint left


def test_checkpoints_of_the_previous_version_still_load(tmp_path: Path) -> None:
    svc = _service(tmp_path)
    svc.create("s", CONFIG)
    svc.step("s", GRADS)
    path = tmp_path / svc.checkpoint("s").path
    fingerprint = svc.store.get("s").fingerprint()
    assert _manifest(path)["version"] == 2
    _edit(path, lambda m: (m.pop("manifest_sha256"), m.update(version=1)))
    restarted = _service(tmp_path)
    assert restarted.store.get("s").fingerprint() == fingerprint
    written = tmp_path / restarted.checkpoint("s").path  # the next one: the new version
    assert _manifest(written)["version"] == 2


# -- a real server process on a read-only data directory ----------------------------


# Root passes every permission check (CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH): as root,
# the server runs without those two capabilities (dropped from the bounding set before it
# is exec'd), so chmod binds it as it binds any other user.
PR_CAPBSET_DROP, CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH = 24, 1, 2
AS_UNPRIVILEGED = (
    "import ctypes, os, sys\n"
    "prctl = ctypes.CDLL(None, use_errno=True).prctl\n"
    f"for cap in ({CAP_DAC_OVERRIDE}, {CAP_DAC_READ_SEARCH}):\n"
    f"    if prctl({PR_CAPBSET_DROP}, cap, 0, 0, 0): raise OSError(ctypes.get_errno(), 'prctl')\n"
    "os.execv(sys.argv[1], sys.argv[1:])\n")


class Process:
    """``adamserve serve`` in a process that the data directory's permissions bind."""

    def __init__(self, base: Path) -> None:
        self.base = base
        self.data = base / "data"
        self.log = base / "server.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.http = self.grpc = ""

    def start(self) -> Process:
        ports = self.base / "ports.json"
        ports.unlink(missing_ok=True)
        cmd = [sys.executable, "-m", "adamserve.cli", "serve", "--grpc-port", "0",
               "--http-port", "0", "--flight-port", "0", "--data-dir", str(self.data),
               "--ports-file", str(ports)]
        if os.geteuid() == 0:
            cmd = [sys.executable, "-c", AS_UNPRIVILEGED, *cmd]
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + 60
        while not ports.exists():
            assert self.proc.poll() is None, self.log.read_text()[-3000:]
            assert time.monotonic() < deadline, self.log.read_text()[-3000:]
            time.sleep(0.02)
        p = json.loads(ports.read_text())
        self.http, self.grpc = f"http://127.0.0.1:{p['http']}", f"127.0.0.1:{p['grpc']}"
        return self

    def terminate(self) -> int:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(60)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(30)


@pytest.fixture
def process(tmp_path: Path) -> Iterator[Process]:
    proc = Process(tmp_path)
    yield proc
    proc.kill()
    for d in (proc.data / "sessions", *proc.data.glob("sessions/*")):
        if d.is_dir():
            d.chmod(0o755)  # so that pytest can remove it


@pytest.mark.slow
def test_a_read_only_data_directory_over_both_wires_then_sigterm(process: Process) -> None:
    server = process.start()
    base, sessions = process.base, process.data / "sessions"
    with httpx.Client(base_url=server.http, timeout=30) as c, \
            grpc.insecure_channel(server.grpc) as channel:
        stub = pb_grpc.OptimizerServiceStub(channel)

        def step(sid: str) -> int:
            r = c.post(f"/v2/sessions/{sid}/step", json=GRAD)
            assert r.status_code == 200, r.text
            return int(r.json()["step"])

        for sid in ("s1", "s2", "s3", "zz"):
            assert c.post("/v2/sessions", json={"session_id": sid, **SPEC}).status_code == 201
            step(sid)
        for sid in ("s1", "zz"):
            c.post(f"/v2/sessions/{sid}/checkpoint").raise_for_status()
        for sid in ("s1", "s2", "s3"):
            step(sid)
        c.post("/v2/sessions/s1/checkpoint").raise_for_status()

        sessions.chmod(0o555)
        (sessions / "s1").chmod(0o555)
        refused_503(c.delete("/v2/sessions/zz"), base, "data directory not writable: deleting "
                    "the checkpoints of session 'zz' (sessions/zz: Permission denied)")
        assert c.get("/v2/sessions/zz").status_code == 200  # still there, as on disk
        refused_503(c.post("/v2/sessions/s1/checkpoint"), base, "data directory not writable: "
                    "writing the checkpoint of session 's1' at step 2", "Permission denied")
        refused_503(c.post("/v2/sessions/s2/checkpoint"), base, "(sessions/s2: Permission "
                    "denied)")
        refused_503(c.post("/v2/sessions/s1/restore", json={"step": 1}), base,
                    "restoring session 's1' to its checkpoint of step 1", "Permission denied")
        refused_unavailable(lambda: stub.Checkpoint(pb.CheckpointRequest(session_id="s1")),
                            base, "Permission denied")
        refused_unavailable(lambda: stub.RestoreCheckpoint(
            pb.RestoreCheckpointRequest(session_id="s1", step=1)), base, "Permission denied")
        refused_unavailable(lambda: stub.DeleteSession(pb.DeleteSessionRequest(session_id="zz")),
                            base, "deleting the checkpoints of session 'zz'")
        # nothing changed: the session refused a delete is there, and steps
        assert c.get("/v2/sessions/s1").json()["step"] == 2
        assert stub.GetSession(pb.GetSessionRequest(session_id="zz")).session.step == 1
        assert step("zz") == 2
        assert list(stub.ListCheckpoints(
            pb.ListCheckpointsRequest(session_id="s1")).steps) == [1, 2]

        sessions.chmod(0o755)  # only s1's own directory stays read-only
        assert c.delete("/v2/sessions/zz").status_code == 204
        assert c.get("/v2/sessions/zz").status_code == 404 and not (sessions / "zz").exists()
        assert step("s1") == 3
    assert server.terminate() == 1  # a session could not be saved: supervisors see it
    log = process.log.read_text()
    assert "on-stop checkpoint of session s1 failed: data directory not writable" in log
    assert "stopped; checkpointed 2 sessions; could not save 1" in log
    assert re.search(r"could not save 1 \(their unsaved changes are lost\): s1$", log, re.M)

    (sessions / "s1").chmod(0o755)
    server = process.start()
    with httpx.Client(base_url=server.http, timeout=30) as c:
        steps = {s["session_id"]: s["step"] for s in c.get("/v2/sessions").json()["sessions"]}
        # s1 at its last checkpoint, the later ones saved on stop, the deleted one gone
        assert steps == {"s1": 2, "s2": 2, "s3": 2}
    assert server.terminate() == 0
    assert sorted(os.listdir(sessions)) == ["s1", "s2", "s3"]
