"""The README and docs/http-api.md say what a real server does.

The README's curl walkthrough runs as written (its port swapped for a server's on port
0) and prints each reply on its own line; each example runs against a server it is
given (``--server``, ``$ADAMSERVE_URL``) and its ``--help`` says when it starts one of
its own (tests/client/test_examples.py runs them on their own servers); the tables of
docs/http-api.md match the proto, the HTTP schemas, the server's routes and the groups
a session reports.
"""

from __future__ import annotations

import json
import os
import re
import runpy
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import safetensors.numpy

from adamserve.transports.http import schemas
from adamserve_proto.algorithms import ALGORITHMS
from adamserve_proto.v2 import optimizer_pb2 as pb
from tests.e2e.conftest import ServerProcess

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
HTTP_API = ROOT / "docs" / "http-api.md"
EXAMPLES = sorted(p for p in (ROOT / "examples").glob("*.py") if not p.name.startswith("_"))


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    proc = ServerProcess(tmp_path_factory.mktemp("readme") / "data").start()
    yield proc
    proc.kill()


def _sessions(server: ServerProcess) -> list[str]:
    with server.client() as c:
        return [s["session_id"] for s in c.get("/v2/sessions").json()["sessions"]]


# -- the README's curl walkthrough ------------------------------------------------------


def _curl_block() -> str:
    blocks: list[str] = [b for b in re.findall(r"```sh\n(.*?)```", README.read_text(), re.S)
                         if "curl" in b and "/v2/sessions" in b]
    assert len(blocks) == 1, "expected one curl walkthrough in README.md"
    return blocks[0]


def test_curl_walkthrough_prints_each_reply_on_its_own_line(server: ServerProcess,
                                                            tmp_path: Path) -> None:
    if shutil.which("curl") is None:
        pytest.skip("curl is not installed")
    block = _curl_block()
    assert block.startswith("URL=http://127.0.0.1:8000\n"), "the walkthrough uses scripts/serve's port"
    script = block.replace("http://127.0.0.1:8000", server.http_url, 1)
    out = subprocess.run(["bash", "-euo", "pipefail", "-c", script], cwd=tmp_path,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr
    assert out.stdout.endswith("\n"), "the last reply ends its line"
    lines = out.stdout.splitlines()
    assert len(lines) == 6, out.stdout  # created, three steps, the state, the delete

    created = json.loads(lines[0])
    assert created["session_id"] == "demo" and created["step"] == 0, lines[0]
    assert created["algorithm"] == "ALGORITHM_ADAMW"
    steps = [json.loads(line) for line in lines[1:4]]
    assert [s["step"] for s in steps] == [1, 2, 3], lines[1:4]

    # what it printed is AdamW's: torch.optim.AdamW on the same numbers
    torch = pytest.importorskip("torch")
    w = torch.tensor([[1.0, 2.0], [3.0, 4.0]], requires_grad=True)
    opt = torch.optim.AdamW([w], lr=0.01, weight_decay=0.01)
    for s in steps:
        w.grad = torch.tensor([[0.1, -0.2], [0.3, -0.4]])
        opt.step()
        [param] = s["params"]
        assert (param["name"], param["shape"], param["datatype"]) == ("w", [2, 2], "FP32")
        np.testing.assert_allclose(param["data"], w.detach().numpy().ravel(), rtol=1e-6)

    state = re.fullmatch(r"state: (\d+) bytes", lines[4])
    assert state is not None, lines[4]
    blob = (tmp_path / "demo-state.safetensors").read_bytes()
    assert len(blob) == int(state.group(1))
    # torch's state_dict, as torch's AdamW holds it after the same three steps
    saved = safetensors.numpy.load(blob)
    ours = opt.state_dict()["state"][0]
    for slot in ("exp_avg", "exp_avg_sq"):
        np.testing.assert_allclose(saved[f"state.0.{slot}"], ours[slot].numpy(), rtol=1e-6)
    header = json.loads(blob[8:8 + int.from_bytes(blob[:8], "little")])["__metadata__"]
    assert header["adamserve"] == "state_dict/1"
    assert json.loads(header["json"])["scalars"]["0"]["step"] == float(ours["step"])

    assert lines[5] == "delete: 204"
    assert "demo" not in _sessions(server)


# -- the examples -------------------------------------------------------------------------


def _start_example(name: str, *args: str, env: dict[str, str] | None = None
                   ) -> subprocess.Popen[str]:
    clean = {k: v for k, v in os.environ.items() if k != "ADAMSERVE_URL"}
    return subprocess.Popen([sys.executable, str(ROOT / "examples" / name), *args],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**clean, **(env or {})})


def test_examples_use_the_server_they_are_given(server: ServerProcess) -> None:
    """train_digits.py with --server (HTTP), resume_after_restart.py with $ADAMSERVE_URL
    (gRPC), at once (each spends most of its time importing torch)."""
    pytest.importorskip("sklearn", reason="the examples need scikit-learn")
    before = _sessions(server)
    grpc_url = "grpc://" + server.grpc_target
    digits = _start_example("train_digits.py", "--steps", "6", "--check", "1e-5",
                            "--server", server.http_url)
    resume = _start_example("resume_after_restart.py", "--steps", "6", "--check", "1e-6",
                            env={"ADAMSERVE_URL": grpc_url})
    out_digits, _ = digits.communicate(timeout=180)
    out_resume, _ = resume.communicate(timeout=180)
    assert digits.returncode == 0, out_digits
    assert f"adamserve at {server.http_url} (given)" in out_digits, out_digits
    assert "largest relative difference" in out_digits
    assert resume.returncode == 0, out_resume
    assert f"given server at {grpc_url}: steps 1-3" in out_resume, out_resume
    assert f"the same server (not started here, so not restarted) at {grpc_url}: steps 4-6" \
        in out_resume, out_resume
    # train_digits' anonymous session went with its optimizer; resume deletes its two
    assert _sessions(server) == before


@pytest.mark.parametrize("example", EXAMPLES, ids=lambda p: p.name)
def test_example_help_says_when_it_starts_a_server(
        example: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """``python examples/X.py --help``, in this process: the same main(argv), without
    importing torch once more."""
    pytest.importorskip("sklearn", reason="the examples need scikit-learn")
    monkeypatch.syspath_prepend(str(example.parent))  # its `from _server import ...`
    main = runpy.run_path(str(example), run_name="example")["main"]
    with pytest.raises(SystemExit) as done:
        main(["--help"])
    assert done.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "--server URL" in text and "$ADAMSERVE_URL" in text, text
    assert "starts its own server" in text, text
    assert "--steps" in text, text


# -- docs/http-api.md -----------------------------------------------------------------


def _section(title: str) -> str:
    text = HTTP_API.read_text()
    start = text.index(f"\n## {title}\n")
    end = text.find("\n## ", start + 1)
    return text[start:end if end >= 0 else None]


def _rows(section: str) -> list[list[str]]:
    """The cells of each table row of ``section`` (header and rule left out)."""
    rows = []
    for line in section.splitlines():
        if line.startswith("| ") and not line.startswith("|---"):
            rows.append([c.strip() for c in line.strip().strip("|").split("|")])
    return rows[1:] if rows else rows


def _ticked(cell: str) -> list[str]:
    return re.findall(r"`([^`]*)`", cell)


def test_every_rpc_has_its_route_in_the_docs(server: ServerProcess) -> None:
    rows = {_ticked(r[0])[0]: r[1] for r in _rows(_section("Routes"))}
    rpcs = {m.name for m in pb.DESCRIPTOR.services_by_name["OptimizerService"].methods}
    assert set(rows) == rpcs
    with server.client() as c:
        paths = c.get("/openapi.json").json()["paths"]
    for rpc, cell in rows.items():
        for route in _ticked(cell):
            method, path = route.split(" ", 1)
            path = path.split("?")[0].replace("{id}", "{session_id}")
            assert method.lower() in paths.get(path, {}), f"{rpc}: no route {route}"


def test_the_field_table_is_the_protos_and_the_schemas() -> None:
    rows = _rows(_section("Fields that differ"))
    assert rows
    for message, model, path, grpc_only, http_only in rows:
        proto = {f.name for f in getattr(pb, _ticked(message)[0]).DESCRIPTOR.fields}
        fields = set(getattr(schemas, _ticked(model)[0]).model_fields)
        where = f"{message} / {model}"
        assert set(_ticked(path)) | set(_ticked(grpc_only)) == proto - fields, where
        assert not set(_ticked(path)) & set(_ticked(grpc_only)), where
        assert set(_ticked(http_only)) == fields - proto, where


def _pairs(cell: str) -> dict[str, str]:
    return dict(item.split("=", 1) for item in _ticked(cell))


def test_the_algorithm_table_is_what_sessions_report(server: ServerProcess) -> None:
    rows = {_ticked(r[0])[0]: r[1:] for r in _rows(_section(
        "Hyperparameters: torch.optim's arguments and the wire's keys"))
        if r[0].startswith("`ALGORITHM_")}
    # torch's rows (optax's, SEMANTICS_OPTAX, are docs/optax.md's)
    assert set(rows) == {f"ALGORITHM_{name.upper()}" for name in ALGORITHMS if "." not in name}
    with server.client() as c:
        for algorithm, (values, flags, names, state) in rows.items():
            sid = "doc-" + algorithm.lower().replace("_", "-")
            r = c.post("/v2/sessions", json={"session_id": sid, "algorithm": algorithm,
                                             "tensors": [{"name": "w", "shape": [2, 2]}]})
            assert r.status_code == 201, r.text
            c.delete(f"/v2/sessions/{sid}")
            group: dict[str, Any] = r.json()["groups"][0]
            documented = {**_pairs(values), **_pairs(state)}
            got_values = {k: v for k, v in group["values"].items()}
            got_flags = {k: "true" if v else "false" for k, v in group["flags"].items()}
            assert {k: float(v) for k, v in documented.items() if k in got_values} == \
                got_values, algorithm
            assert {k: v for k, v in documented.items() if k not in got_values} | \
                _pairs(flags) == got_flags, algorithm
            assert _pairs(names) == {**group["names"], **dict.fromkeys(group["unset"], "None")}, \
                algorithm


def test_the_schedule_table_has_every_kind_and_field() -> None:
    documented = {(_ticked(r[0])[0], _ticked(r[1])[0]) for r in _rows(_section("Schedules"))}
    fields = {(kind.name, f.name) for kind in pb.Schedule.DESCRIPTOR.fields
              for f in kind.message_type.fields}
    assert documented == fields
