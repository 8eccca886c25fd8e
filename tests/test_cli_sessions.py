"""``adamserve sessions list|describe|delete|checkpoint|export|import`` against a real
``adamserve serve`` process (127.0.0.1, port 0, a key, a data directory): tables,
export and import round trips byte for byte, progress, audit lines, and every error as
one line with a non-zero status. The commands run in-process (``cli.main``), one in a
process of its own to show that it imports none of the server's modules.
"""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import pytest

from adamserve import cli, operator_cli
from adamserve.app import Server, Settings
from adamserve.transports.state_codec import decode_state

TOKEN = "cli-sessions-test-key"
BIG = 300_000  # elements: a state of a few MB, exported in several chunks


@dataclass
class Running:
    url: str
    log: Path

    def client(self) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=60,
                            headers={"Authorization": f"Bearer {TOKEN}"})


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Running]:
    tmp = tmp_path_factory.mktemp("cli-sessions")
    ports, log = tmp / "ports.json", tmp / "server.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith("ADAMSERVE_")}
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "adamserve.cli", "serve", "--grpc-port", "0", "--http-port",
             "0", "--flight-port", "0", "--data-dir", str(tmp / "data"), "--ports-file",
             str(ports), "--no-warmup"],
            stdout=out, stderr=subprocess.STDOUT,
            env={**env, "PYTHONUNBUFFERED": "1", "ADAMSERVE_TOKEN": TOKEN})
    deadline = time.monotonic() + 60
    while not ports.exists():
        assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
        time.sleep(0.02)
    running = Running(f"http://127.0.0.1:{json.loads(ports.read_text())['http']}", log)
    with running.client() as c:
        for sid, n in (("big", BIG), ("small", 12), ("target", BIG)):
            r = c.post("/v2/sessions", json={
                "session_id": sid, "algorithm": "ALGORITHM_ADAMW",
                "groups": [{"values": {"lr": 0.01}}],
                "tensors": [{"name": "w", "shape": [n]}, {"name": "b", "shape": [3]}]})
            assert r.status_code == 201, r.text
        # a step, so that the state has moments to export
        g = np.linspace(-1, 1, BIG, dtype=np.float32)
        r = c.post("/v2/sessions/big/step", json={"gradients": [
            {"name": "w", "shape": [BIG], "datatype": "FP32", "data": g.tolist()},
            {"name": "b", "shape": [3], "datatype": "FP32", "data": [1.0, 2.0, 3.0]}]})
        assert r.status_code == 200, r.text
    yield running
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(60) == 0


@pytest.fixture
def run(server: Running, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> Iterator[object]:
    monkeypatch.setenv("ADAMSERVE_TOKEN", TOKEN)
    monkeypatch.delenv("ADAMSERVE_SERVER", raising=False)

    def call(*argv: str, server_url: str | None = None) -> tuple[int, str, str]:
        capsys.readouterr()
        code = cli.main(["sessions", *argv, "--server", server_url or server.url])
        out, err = capsys.readouterr()
        return code, out, err

    yield call


def test_list_is_a_table(run) -> None:  # type: ignore[no-untyped-def]
    code, out, err = run("list")
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0].split() == list(operator_cli.HEADERS)
    rows = {line.split()[0]: line.split() for line in lines[1:]}
    assert {"big", "small", "target"} <= rows.keys()
    assert rows["big"][1:5] == ["adamw", "float32", "1", "2"]
    code, out, _ = run("list", "--json")
    listed = {s["session_id"]: s for s in json.loads(out)}
    assert code == 0 and {"big", "small"} <= listed.keys()
    assert " ".join(rows["big"][5:7]) == operator_cli.human_bytes(listed["big"]["state_bytes"])
    # columns line up: every row as wide as the header's columns say
    starts = [lines[0].index(h) for h in ("ALGORITHM", "DTYPE")]
    for line in lines[1:]:
        assert line[starts[0]:].startswith("adamw") and line[starts[1]:].startswith("float32")


def test_describe(run) -> None:  # type: ignore[no-untyped-def]
    code, out, err = run("describe", "big")
    assert code == 0, err
    assert "algorithm:         adamw" in out and "step:              1" in out
    assert "lr=0.01" in out and "weight_decay=0.01" in out
    assert [line.split() for line in out.splitlines() if line.startswith(("w ", "b "))] == [
        ["w", str(BIG), "0"], ["b", "3", "0"]]


def test_export_then_import_round_trips(run, server: Running, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    blob = tmp_path / "big.safetensors"
    code, _, err = run("export", "big", str(blob))
    assert code == 0, err
    with server.client() as c:
        _same_state(blob.read_bytes(), c.get("/v2/sessions/big/state").content)
    assert err.startswith("exported session big to ") and " MiB in " in err, err
    assert not list(tmp_path.glob("*.part"))
    code, _, err = run("import", "target", str(blob))
    assert code == 0, err
    assert f"imported {blob} into session target (step 1)" in err, err
    with server.client() as c:
        assert c.get("/v2/sessions/target").json()["step"] == 1
        _same_state(c.get("/v2/sessions/target/state").content, blob.read_bytes())
    assert "action=ImportState session=target outcome=ok" in server.log.read_text()


def _same_state(a: bytes, b: bytes) -> None:
    """The same state_dict (not the same bytes: safetensors orders its metadata as it
    likes)."""
    x, y = decode_state(a), decode_state(b)
    assert x["param_groups"] == y["param_groups"] and x["state"].keys() == y["state"].keys()
    for i, slots in x["state"].items():
        assert slots.keys() == y["state"][i].keys()
        for slot, value in slots.items():
            np.testing.assert_array_equal(value, y["state"][i][slot])


def test_checkpoint(run) -> None:  # type: ignore[no-untyped-def]
    code, out, err = run("checkpoint", "small")
    assert code == 0, err
    assert out.startswith("checkpointed session small at step 0: sessions/small/"), out
    code, out, _ = run("describe", "small")
    assert "checkpointed step: 0" in out


def test_delete_asks_then_deletes(run, server: Running, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setattr(sys, "stdin", io.StringIO(""))  # not a terminal: nobody to ask
    code, _, err = run("delete", "small")
    assert code == 1 and "pass --yes" in err
    code, out, err = run("delete", "small", "--yes")
    assert code == 0 and out.strip() == "deleted session small", err
    code, _, err = run("describe", "small")
    assert code == 1
    assert err.strip() == ("adamserve sessions describe: 404 SESSION_NOT_FOUND: session "
                           "'small' does not exist")
    assert "action=DeleteSession session=small outcome=ok" in server.log.read_text()


def test_errors_are_one_line(run, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setenv("ADAMSERVE_TOKEN", "wrong")
    code, _, err = run("list")
    assert code == 1 and err.count("\n") == 1
    assert "401 UNAUTHENTICATED" in err and "ADAMSERVE_TOKEN" in err
    monkeypatch.setenv("ADAMSERVE_TOKEN", TOKEN)
    with socket_closed() as url:
        code, _, err = run("list", server_url=url)
    assert code == 1 and err.count("\n") == 1 and "cannot reach" in err, err
    code, _, err = run("export", "nope", str(tmp_path / "x"))
    assert code == 1 and "404 SESSION_NOT_FOUND" in err and not list(tmp_path.iterdir())
    code, _, err = run("import", "target", str(tmp_path / "missing"))
    assert code == 1 and "No such file or directory" in err and err.count("\n") == 1
    garbage = tmp_path / "garbage"
    garbage.write_bytes(b"not a state blob")
    code, _, err = run("import", "target", str(garbage))
    assert code == 1 and "400 INVALID_ARGUMENT" in err and err.count("\n") == 1, err
    code, _, err = run("list", server_url="ftp://host")
    assert code == 1 and "expected http://HOST:PORT" in err


class socket_closed:
    """The URL of a port nothing listens on."""

    def __enter__(self) -> str:
        import socket

        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        self.port = s.getsockname()[1]
        s.close()
        return f"http://127.0.0.1:{self.port}"

    def __exit__(self, *exc: object) -> None:
        pass


def test_progress_on_a_terminal() -> None:
    stream = io.StringIO()
    progress = operator_cli.Progress("export big", 3 << 20, stream=stream, tty=True)
    progress.advance(1 << 20)
    progress.done("exported session big to f")
    text = stream.getvalue()
    assert text.startswith("\rexport big [##########") and "1.0 MiB / 3.0 MiB  33%" in text
    assert text.endswith("exported session big to f: 1.0 MiB in 0.0 s\n")


def test_the_default_server_is_serves_default() -> None:
    defaults = Settings.model_fields
    serves = f"http://{defaults['host'].default}:{defaults['http_port'].default}"
    assert serves == operator_cli.DEFAULT_SERVER


def test_a_real_process_imports_none_of_the_server(server: Running) -> None:
    code = ("import sys; from adamserve import cli; rc = cli.main(sys.argv[1:]); "
            "heavy = sorted(m for m in ('numba', 'adamserve.app', 'fastapi', 'grpc') "
            "if m in sys.modules); print('imported:', heavy); sys.exit(rc)")
    env = {**os.environ, "ADAMSERVE_TOKEN": TOKEN}
    done = subprocess.run([sys.executable, "-c", code, "sessions", "list", "--server",
                           server.url], capture_output=True, text=True, env=env, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[-1] == "imported: []"
    assert "SESSION" in done.stdout


def test_https_with_a_ca_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                              capsys: pytest.CaptureFixture[str]) -> None:
    import trustme

    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1")
    crt, key, ca_file = tmp_path / "server.pem", tmp_path / "server.key", tmp_path / "ca.pem"
    crt.write_bytes(b"".join(blob.bytes() for blob in cert.cert_chain_pems))
    cert.private_key_pem.write_to_path(str(key))
    ca.cert_pem.write_to_path(str(ca_file))
    server = Server(Settings(grpc_port=0, http_port=0, flight_port=0, data_dir=None,
                             tls_cert=crt, tls_key=key, warmup=False))
    server.start()
    monkeypatch.delenv("ADAMSERVE_TOKEN", raising=False)
    try:
        url = f"https://127.0.0.1:{server.http_port}"
        assert cli.main(["sessions", "list", "--server", url, "--ca-file", str(ca_file)]) == 0
        assert capsys.readouterr().err.strip() == "no sessions"
        assert cli.main(["sessions", "list", "--server", url]) == 1  # the system's CAs
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "CERTIFICATE_VERIFY_FAILED" in err, err
    finally:
        server.stop()
