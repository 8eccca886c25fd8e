"""The start-up warm-up compiles what a first session needs: after :func:`warm`, a real
first create and step over gRPC and HTTP (FP32 and BF16 on the wire, tensors under and
over the parallel kernels' threshold) add no CPU kernel signature of their own.

Structural, not timed (the timing is bench/first_call.py's), and in a fresh process:
in this one, earlier tests have compiled whatever they ran. A change to the kernels'
argument types (a read-only buffer becoming writable, say) that the warm-up does not
follow fails here.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import numpy as np
import pytest

from adamserve import warmup
from adamserve.engine.kernels_cpu import CpuBackend


def _signatures() -> list[list[str]]:
    from adamserve.engine import kernels_cpu

    kernels = [k for k in vars(kernels_cpu).values() if hasattr(k, "signatures")]
    kernels += list(kernels_cpu._SERIAL.values())
    return sorted([k.py_func.__qualname__, str(sig)] for k in kernels for sig in k.signatures)


def _first_session() -> None:
    """Print the signatures the warm-up compiled, then those a first session added."""
    import adamserve_client as ac
    from adamserve.app import Server, Settings
    from adamserve.engine.kernels_cpu import SERIAL_BELOW

    server = Server(Settings(grpc_port=0, http_port=0, flight_port=0, data_dir=None,
                             warmup=False))
    server.start()
    try:
        assert warmup.warm(server.service.store.backend) is True
        warmed = _signatures()
        rng = np.random.default_rng(0)
        for url in (f"grpc://127.0.0.1:{server.grpc_port}",
                    f"http://127.0.0.1:{server.http_port}"):
            for wire in ("float32", "bfloat16"):
                params = [rng.standard_normal(n).astype(np.float32) for n in (8, SERIAL_BELOW)]
                opt = ac.AdamW(params, lr=1e-3, server=url, wire_dtype=wire)
                opt.step([np.ones_like(p) for p in params])
                opt.close(delete=True)
        print(json.dumps({"warmed": warmed, "added": [s for s in _signatures()
                                                      if s not in warmed]}))
    finally:
        server.stop()


def test_a_first_create_and_step_need_nothing_the_warm_up_did_not_compile() -> None:
    done = subprocess.run([sys.executable, "-m", "tests.test_cli_warmup"], capture_output=True,
                          text=True, timeout=300, cwd=Path(__file__).parents[1])
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["warmed"], "the warm-up ran no kernel"
    assert result["added"] == [], result["added"]


def test_warm_up_stops_when_asked() -> None:
    stop = threading.Event()
    stop.set()
    assert warmup.warm(CpuBackend(), stop) is False


if __name__ == "__main__":
    _first_session()


def test_the_fallback_cache_directory_must_be_this_users_own(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """numba loads what it finds in its cache: a fallback under the shared temporary
    directory that someone else could write to is not used."""
    blocked = tmp_path / "file"
    blocked.write_text("not a directory")
    monkeypatch.setenv("NUMBA_CACHE_DIR", str(blocked / "numba"))
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    planted = tmp_path / f"adamserve-{os.getuid()}"
    planted.mkdir(mode=0o777)
    planted.chmod(0o777)  # as another user would leave it for us
    monkeypatch.delitem(sys.modules, "adamserve.engine.kernels_cpu")  # as before numba loads
    choice = warmup.configure_cache()
    assert choice.path == blocked / "numba" and "no writable fallback" in choice.problem
    assert "not a private directory" in choice.problem
    planted.chmod(0o700)
    choice = warmup.configure_cache()
    assert choice.path == planted / "numba" and choice.source == "temporary directory"
