"""``adamserve serve`` as an operator meets it: --help, --version, bad values, busy ports
and unusable data directories (one line each, no traceback), the start-up line, the log
formats (plain and JSON, uvicorn's lines under adamserve's names, the access log), the
kernel cache directory and the warm-up's line, and /metrics without ``*_created``.

The server is a real ``python -m adamserve.cli serve`` process on 127.0.0.1 (port 0),
one for the module; the argument checks that never start a server run in-process.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from adamserve import __version__, cli, warmup
from adamserve.app import Settings

TOKEN = "cli-serve-test-key"


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("ADAMSERVE_") and k != "NUMBA_CACHE_DIR"}
    return {**env, "PYTHONUNBUFFERED": "1", **extra}


def _serve(*args: str, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "adamserve.cli", "serve", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=env or _env())


@dataclass
class Running:
    proc: subprocess.Popen[bytes]
    log: Path
    http: str
    grpc_port: int
    data_dir: Path
    cache: Path

    def lines(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.log.read_text().splitlines() if line]

    def wait_for(self, pattern: str, timeout: float = 120.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in self.lines():
                if re.search(pattern, line["message"]):
                    return line
            assert self.proc.poll() is None, self.log.read_text()[-3000:]
            time.sleep(0.05)
        raise AssertionError(f"no log line matching {pattern!r}:\n{self.log.read_text()}")


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory,
           pytestconfig: pytest.Config) -> Iterator[Running]:
    """JSON logs, the access log, a key, and a kernel cache kept between test runs (a
    first run compiles the kernels in the background, later ones load them)."""
    tmp = tmp_path_factory.mktemp("cli-serve")
    kept = getattr(pytestconfig, "cache", None)  # None under -p no:cacheprovider
    cache = Path(kept.mkdir("adamserve-kernels")) if kept is not None else tmp
    ports, log, data = tmp / "ports.json", tmp / "server.log", tmp / "data"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "adamserve.cli", "serve", "--grpc-port", "0", "--http-port",
             "0", "--flight-port", "0", "--data-dir", str(data), "--ports-file", str(ports),
             "--log-format", "json", "--access-log", "--cache-dir", str(cache)],
            stdout=out, stderr=subprocess.STDOUT, env=_env(ADAMSERVE_TOKEN=TOKEN))
    deadline = time.monotonic() + 60
    while not ports.exists():
        assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
        time.sleep(0.02)
    bound = json.loads(ports.read_text())
    yield Running(proc, log, f"http://127.0.0.1:{bound['http']}", bound["grpc"], data, cache)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(60) == 0


# -- arguments, in-process (no server starts) ----------------------------------------------


@pytest.fixture
def quiet_cache(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    # main() sets NUMBA_CACHE_DIR for `serve`: keep this process's as it was
    monkeypatch.setenv("NUMBA_CACHE_DIR", str(tmp_path / "numba"))
    for key in [k for k in os.environ if k.startswith("ADAMSERVE_")]:
        monkeypatch.delenv(key)


def test_help_shows_every_flags_default_and_choices(
        quiet_cache: None, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        cli.main(["serve", "--help"])
    assert exit_.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    for name, field in Settings.model_fields.items():
        flag = ("--no-" if field.annotation is bool and field.default else "--") + name.replace(
            "_", "-")
        assert flag in text, flag
        if name not in cli.ENVIRONMENT_ONLY:
            assert f"env ADAMSERVE_{name.upper()}" in text, name
    subcommands = next(a for a in cli._parser()._actions
                       if isinstance(a, argparse._SubParsersAction))
    for action in subcommands.choices["serve"]._actions:
        if action.dest not in ("help", *cli.ENVIRONMENT_ONLY):
            assert "default " in (action.help or ""), action.option_strings
    assert "--device {auto,cpu,cuda}" in text and "default cpu" in text
    assert "--log-format {plain,json}" in text and "--log-level {DEBUG,INFO,WARNING,ERROR}" in text
    assert "default 50051" in text and "default 8000" in text


def test_version(quiet_cache: None, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        cli.main(["--version"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out.strip() == f"adamserve {__version__}"


def _one_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert "Traceback" not in err
    return lines[0]


def test_a_bad_flag_value_is_one_line(quiet_cache: None,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        cli.main(["serve", "--device", "gpu"])
    assert exit_.value.code == 2
    line = _one_line(capsys.readouterr().err)
    assert "--device" in line and "'gpu'" in line and "auto" in line and "cuda" in line


def test_a_bad_environment_value_is_one_line(
        quiet_cache: None, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("ADAMSERVE_DEVICE", "gpu")
    assert cli.main(["serve"]) == 2
    line = _one_line(capsys.readouterr().err)
    assert line.startswith("adamserve serve: --device (ADAMSERVE_DEVICE):"), line
    assert "'gpu'" in line and "'cuda'" in line


def test_log_level_takes_any_case(quiet_cache: None) -> None:
    assert cli.load_settings(["serve", "--log-level", "debug"]).log_level == "DEBUG"


def test_busy_port_and_unusable_data_dir_end_with_one_line(tmp_path: Path) -> None:
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    port = busy.getsockname()[1]
    not_a_dir = tmp_path / "a-file"
    not_a_dir.write_text("")
    common = ("--grpc-port", "0", "--flight-port", "0", "--no-warmup")
    # both at once: each is a process start (the imports take about a second)
    on_busy = _serve(*common, "--http-port", str(port), "--data-dir", "none")
    on_file = _serve(*common, "--http-port", "0", "--data-dir", str(not_a_dir))
    try:
        out_busy, _ = on_busy.communicate(timeout=60)
        out_file, _ = on_file.communicate(timeout=60)
    finally:
        busy.close()
    assert on_busy.returncode == 1 and on_file.returncode == 1
    for out in (out_busy, out_file):
        assert "Traceback" not in out, out
    last = out_busy.strip().splitlines()[-1]
    assert last == (f"adamserve serve: HTTP: cannot listen on 127.0.0.1:{port} "
                    "(Address already in use)"), out_busy
    last = out_file.strip().splitlines()[-1]
    assert last.startswith(f"adamserve serve: data directory {not_a_dir}: Not a directory"), (
        out_file)


# -- the cache directory's choice ----------------------------------------------------------


def test_cache_directory_choice(tmp_path: Path) -> None:
    flag = tmp_path / "flag"
    choose = warmup.choose_cache_dir
    assert choose(flag, {"NUMBA_CACHE_DIR": "/cache/numba", "XDG_CACHE_HOME": "/x"}) == (
        warmup.CacheDir(Path("/cache/numba"), "NUMBA_CACHE_DIR"))  # the images' wins
    assert choose(flag, {"XDG_CACHE_HOME": "/x", "HOME": "/h"}).path == flag / "numba"
    assert choose(None, {"XDG_CACHE_HOME": "/x", "HOME": "/h"}).path == Path(
        "/x/adamserve/numba")
    # a relative XDG_CACHE_HOME is to be ignored (the XDG spec)
    assert choose(None, {"XDG_CACHE_HOME": "rel", "HOME": "/h"}).path == Path(
        "/h/.cache/adamserve/numba")


def test_an_unwritable_cache_directory_falls_back(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NUMBA_CACHE_DIR", raising=False)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # where the fallback goes
    blocked = tmp_path / "a-file"
    blocked.write_text("")  # a directory under a file cannot be made, not even by root
    choice = warmup.configure_cache(blocked)
    assert choice.path == tmp_path / f"adamserve-{os.getuid()}" / "numba"
    assert choice.source == "temporary directory" and "a-file" in choice.problem
    assert choice.path.is_dir() and os.access(choice.path, os.W_OK)
    # this process imported the kernels long ago: numba keeps its directory, and so does
    # the environment
    assert not choice.applied and "NUMBA_CACHE_DIR" not in os.environ


# -- a running server ----------------------------------------------------------------------


def test_start_up_line_says_where(server: Running) -> None:
    line = server.wait_for(r"^adamserve .* listening on")
    msg = line["message"]
    assert f"gRPC grpc://127.0.0.1:{server.grpc_port}" in msg, msg
    assert f"HTTP {server.http}" in msg and "Flight off" in msg and "backend cpu" in msg, msg
    assert f"data directory {server.data_dir.resolve()}" in msg, msg


def test_logs_are_json_and_uvicorns_lines_are_adamserves(server: Running) -> None:
    httpx.get(server.http + "/healthz").raise_for_status()
    server.wait_for(r"GET /healthz")
    lines = server.lines()
    assert all({"time", "level", "logger", "message"} <= line.keys() for line in lines)
    assert not [line for line in lines if line["logger"].startswith("uvicorn")]
    # uvicorn's routine lines ("Started server process", ...) are debug lines now
    assert not [line for line in lines if line["logger"] == "adamserve.http"
                and line["level"] == "INFO"]
    access = [line for line in lines if line["logger"] == "adamserve.http.access"]
    assert {"method": "GET", "path": "/healthz", "status": 200}.items() <= access[-1].items()


def test_kernels_are_cached_in_the_cache_dir_and_warmed_at_start(server: Running) -> None:
    line = server.wait_for(r"kernels ready in [0-9.]+ s")
    assert str(server.cache / "numba") in line["message"]
    indexes = {p.name.split("-")[0] for p in (server.cache / "numba").rglob("*.nbi")}
    # what a first create and step run: FP32 decoding, AdamW, BF16 both ways; serial and
    # parallel
    for kernel in ("kernels_cpu._copy_sumsq", "kernels_cpu._copy_sumsq_serial",
                   "kernels_cpu.adam", "kernels_cpu.adam_serial",
                   "kernels_cpu._bf16_widen_sumsq", "kernels_cpu._bf16_bits"):
        assert kernel in indexes, (kernel, sorted(indexes))


def test_metrics_have_no_created_series(server: Running) -> None:
    auth = {"Authorization": f"Bearer {TOKEN}"}
    r = httpx.get(server.http + "/metrics", headers=auth)
    r.raise_for_status()
    assert "adamserve_requests_total" in r.text
    assert "_created" not in r.text, [x for x in r.text.splitlines() if "_created" in x][:5]


def test_documentation_routes_have_their_own_method_label(server: Running) -> None:
    auth = {"Authorization": f"Bearer {TOKEN}"}
    for path in ("/openapi.json", "/docs"):
        httpx.get(server.http + path).raise_for_status()
    text = httpx.get(server.http + "/metrics", headers=auth).text
    http = [x for x in text.splitlines() if x.startswith("adamserve_requests_total{")
            and 'transport="http"' in x and 'code="200"' in x]
    assert not [x for x in http if 'method="unmatched"' in x], http
