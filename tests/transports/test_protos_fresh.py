"""The committed generated protobuf files are what scripts/gen-protos makes of
protos/adamserve_proto/v2/optimizer.proto, and no other version is left."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
GENERATED = ("optimizer_pb2.py", "optimizer_pb2_grpc.py", "optimizer_pb2.pyi",
             "optimizer_pb2_grpc.pyi")


def test_generated_files_match_the_proto(tmp_path: Path) -> None:
    if shutil.which("bash") is None:
        pytest.skip("bash is needed to run scripts/gen-protos")
    done = subprocess.run([str(ROOT / "scripts" / "gen-protos"), str(tmp_path)], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, f"scripts/gen-protos failed:\n{done.stdout}\n{done.stderr}"
    stale = []
    for name in GENERATED:
        fresh = tmp_path / "adamserve_proto" / "v2" / name
        committed = ROOT / "protos" / "adamserve_proto" / "v2" / name
        assert fresh.exists(), f"scripts/gen-protos did not write {name}"
        if not committed.exists() or committed.read_bytes() != fresh.read_bytes():
            stale.append(name)
    assert not stale, (f"generated files are stale: {', '.join(stale)}; run scripts/gen-protos "
                       "and commit the result")


def test_only_v2_is_generated_and_shipped() -> None:
    versions = sorted(p.name for p in (ROOT / "protos" / "adamserve_proto").iterdir()
                      if p.is_dir() and p.name.startswith("v"))
    assert versions == ["v2"], f"proto versions in protos/adamserve_proto: {versions}"
