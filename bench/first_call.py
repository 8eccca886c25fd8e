"""The first call after a start: how long a new server takes to answer its first create
and step, on a first run (an empty kernel cache) and after a restart (the cache kept).

Each case is its own ``adamserve serve`` process (CPU backend, no data directory, free
ports) with ``--cache-dir`` a directory of this run's (``NUMBA_CACHE_DIR`` removed from
its environment, so that the flag decides). As soon as the server has written its ports
file, the Python client creates an AdamW session (gRPC; one tensor over the parallel
kernels' threshold and one under it, FP32 initial values) and steps it once; the create
and the step are timed from the client. The server's "kernels ready in" line gives the
background warm-up's length. Cases:

* first run: a new cache directory, warm-up on;
* restart: the same cache directory, warm-up on (the issue's target: create <= 1 s);
* restart, create after the warm-up line: a client that comes a second later;
* restart, --no-warmup: what the warm-up saves once the cache is there;
* first run, --no-warmup: a new cache directory, every kernel compiled by a request;
* first run, create after the warm-up line: the same, a client that comes later.

    python bench/first_call.py [--rows 512] [--cols 512] [--wire grpc|http]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

import adamserve_client as ac

START_TIMEOUT = 120.0
READY = re.compile(r"kernels ready in ([0-9.]+) s")


@dataclass
class Result:
    case: str
    startup: float  # spawn -> ports file written
    create: float
    step: float
    warmup: float | None  # the server's own "kernels ready in" figure


def run_case(case: str, cache: Path, work: Path, shapes: dict[str, tuple[int, ...]],
             wire: str, warmup: bool, after_warmup: bool = False) -> Result:
    ports = work / f"ports-{len(list(work.iterdir()))}.json"
    log = ports.with_suffix(".log")
    env = {k: v for k, v in os.environ.items() if k != "NUMBA_CACHE_DIR"}
    env["PYTHONUNBUFFERED"] = "1"
    cmd = [sys.executable, "-m", "adamserve.cli", "serve", "--grpc-port", "0", "--http-port",
           "0", "--flight-port", "0", "--data-dir", "none", "--ports-file", str(ports),
           "--cache-dir", str(cache), *([] if warmup else ["--no-warmup"])]
    began = time.perf_counter()
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
    try:
        while not ports.exists():
            if proc.poll() is not None or time.perf_counter() - began > START_TIMEOUT:
                raise RuntimeError(f"server did not start:\n{log.read_text()[-3000:]}")
            time.sleep(0.005)
        startup = time.perf_counter() - began
        warm = _ready(log) if after_warmup else None  # else read once the step is done
        bound = json.loads(ports.read_text())
        url = (f"grpc://127.0.0.1:{bound['grpc']}" if wire == "grpc"
               else f"http://127.0.0.1:{bound['http']}")
        rng = np.random.default_rng(0)
        params = [rng.standard_normal(s).astype(np.float32) for s in shapes.values()]
        grads = [rng.standard_normal(s).astype(np.float32) for s in shapes.values()]
        t = time.perf_counter()
        opt = ac.AdamW(params, lr=1e-3, server=url)  # creates the session
        create = time.perf_counter() - t
        t = time.perf_counter()
        opt.step(grads)
        step = time.perf_counter() - t
        del opt
        if warmup and warm is None:
            warm = _ready(log)
        return Result(case, startup, create, step, warm)
    finally:
        proc.terminate()
        proc.wait(60)


def _ready(log: Path) -> float:
    """The server's warm-up time, once its "kernels ready" line is in ``log``."""
    deadline = time.perf_counter() + START_TIMEOUT
    while time.perf_counter() < deadline:
        found = READY.search(log.read_text())
        if found:
            return float(found.group(1))
        time.sleep(0.02)
    raise RuntimeError(f"no 'kernels ready' line:\n{log.read_text()[-3000:]}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=512)
    ap.add_argument("--cols", type=int, default=512)
    ap.add_argument("--wire", choices=("grpc", "http"), default="grpc")
    args = ap.parse_args()
    shapes = {"w": (args.rows, args.cols), "b": (args.cols,)}
    with tempfile.TemporaryDirectory(prefix="adamserve-first-call-") as tmp:
        root = Path(tmp)
        work = root / "work"
        work.mkdir()
        cache, cold = root / "cache", root / "cache-2"
        results = [
            run_case("first run (empty cache)", cache, work, shapes, args.wire, True),
            run_case("restart (cache kept)", cache, work, shapes, args.wire, True),
            run_case("restart, create after the warm-up line", cache, work, shapes, args.wire,
                     True, after_warmup=True),
            run_case("restart, --no-warmup", cache, work, shapes, args.wire, False),
            run_case("first run, --no-warmup", cold, work, shapes, args.wire, False),
            run_case("first run, create after the warm-up line", root / "cache-3", work,
                     shapes, args.wire, True, after_warmup=True),
        ]
    n = sum(int(np.prod(s)) for s in shapes.values())
    print(f"# first call: AdamW, {n} fp32 params ({', '.join(f'{k} {s}' for k, s in shapes.items())}), "
          f"{args.wire}, {os.cpu_count()} cpus, {platform.machine()}, "
          f"Python {platform.python_version()}; create sent as soon as the ports file appears")
    print()
    print("| case | start-up s | first create s | first step s | warm-up s (server's line) |")
    print("|---|---|---|---|---|")
    for r in results:
        warm = f"{r.warmup:.1f}" if r.warmup is not None else "-"
        print(f"| {r.case} | {r.startup:.2f} | {r.create:.3f} | {r.step:.3f} | {warm} |")
    restart = results[1]
    print()
    print(f"restart: first create {restart.create:.3f} s (target <= 1 s: "
          f"{'met' if restart.create <= 1.0 else 'NOT met'}); first run / restart create "
          f"ratio {results[0].create / restart.create:.1f}; restart create+step, --no-warmup / "
          f"after the warm-up line: {_sum(results[3]) / _sum(results[2]):.0f}x")


def _sum(r: Result) -> float:
    return r.create + r.step


if __name__ == "__main__":
    main()
