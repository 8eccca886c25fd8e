"""Synchronous workers and shards on loopback: steps/s and bytes/s, as ratios to one worker
on one server.

One run starts two real ``adamserve serve`` processes (CPU backend) and, for 1, 2 and 4
worker processes against 1 and 2 shards, times ``steps`` synchronous steps of one AdamW
session over gRPC and over Arrow Flight (after ``warmup`` untimed ones). Every worker is its own process with
its own transport; in each step every worker sends its whole gradient (FP32) and gets
the new parameters back (FP32), and the step is the mean of the K gradients.

* 1 shard: a plain gRPC transport to one server.
* 2 shards: :class:`~adamserve_client.transports.sharded.ShardedTransport` over both
  servers, with the session's defaults (``skip_nonfinite=True``): a two-phase step
  (push, then a commit carrying the whole-model sums of squares).
* 2 shards, one phase (unless ``--no-one-phase``): the same with ``skip_nonfinite=False``,
  where each shard applies its part as soon as its round is full.

steps/s counts session steps (all K workers together make one); "gradients/s ratio" is
K x steps/s relative to one worker on one server (gradients processed per second);
MB/s is gradient bytes in plus parameter bytes out, over all workers, per second.

On a machine with few cores the worker processes, the server processes and the
optimizer kernels share those cores, so the ratios show the cost of rounds and shards,
not how throughput scales across machines (see docs/scaling.md).

    python bench/workers.py [--params 4194304] [--tensors 4] [--steps 25] [--warmup 3]
                            [--rounds 2] [--workers 1 2 4] [--wires grpc flight]
                            [--no-one-phase]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing as mp
import os
import queue
import socket
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from adamserve_client.transports import SessionSpec, TensorSpec, Transport, WireTensor, connect
from adamserve_client.transports.base import Sender, Workers
from adamserve_client.transports.sharded import ShardedTransport

CALL_TIMEOUT = 300.0  # seconds one transport call may take before the run is called hung
SERVER_ENV = {"PYTHONUNBUFFERED": "1"}


@dataclass(frozen=True)
class Case:
    workers: int
    shards: int
    skip_nonfinite: bool = True
    wire: str = "grpc"  # or "flight"

    @property
    def kind(self) -> str:
        if self.shards == 1:
            return "one server"
        return "two-phase" if self.skip_nonfinite else "one phase"


@dataclass(frozen=True)
class Measured:
    case: Case
    seconds: float  # wall time of the timed steps, first worker's start to last one's end
    steps: int
    bytes_moved: int  # gradient bytes sent plus parameter bytes received, all workers
    server_cpu: float  # CPU seconds of the shard processes over the timed steps
    worker_cpu: float  # CPU seconds of the worker processes over the timed steps

    @property
    def steps_per_s(self) -> float:
        return self.steps / self.seconds

    @property
    def mb_per_s(self) -> float:
        return self.bytes_moved / self.seconds / 1e6


# -- servers ----------------------------------------------------------------------


class Server:
    """One ``adamserve serve`` process on 127.0.0.1 with ports chosen by the kernel."""

    def __init__(self, root: Path, name: str) -> None:
        self.data = root / name
        self.ports = root / f"{name}-ports.json"
        self.log = root / f"{name}.log"
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "adamserve.cli", "serve", "--grpc-port", "0",
                 "--http-port", "0", "--flight-port", str(_free_port()), "--data-dir",
                 str(self.data), "--ports-file", str(self.ports), "--log-level", "WARNING"],
                stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **SERVER_ENV})
        self.urls: dict[str, str] = {}

    def wait_ready(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while not self.ports.exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"server did not start (exit {self.proc.poll()}):\n"
                                   + self.tail())
            time.sleep(0.05)
        ports = json.loads(self.ports.read_text())
        self.urls = {w: f"{w}://127.0.0.1:{ports[w]}" for w in ("grpc", "flight")}

    def tail(self) -> str:
        with contextlib.suppress(OSError):
            return self.log.read_text()[-3000:]
        return ""

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(30)


def _free_port() -> int:
    """A port free now (Flight's port 0 turns it off, so the bench picks one)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def open_transport(urls: list[str]) -> Transport:
    if len(urls) == 1:
        return connect(urls[0], timeout=CALL_TIMEOUT)
    return ShardedTransport([connect(u, timeout=CALL_TIMEOUT) for u in urls])


def tensor_specs(params: int, count: int) -> tuple[TensorSpec, ...]:
    per = params // count
    return tuple(TensorSpec(f"w{j}", (per,)) for j in range(count))


# -- one worker process ---------------------------------------------------------------


def worker_main(urls: list[str], session_id: str, rank: int, world: int, params: int,
                count: int, warmup: int, steps: int, start: Any, out: Any) -> None:
    """Step the session ``warmup + steps`` times as worker ``rank`` of ``world``; put a
    dict on ``out``: the timed steps' start and end, bytes moved, CPU seconds of this
    process, or the error."""
    try:
        transport = open_transport(urls)
        rng = np.random.default_rng(rank)
        grads = [WireTensor(t.name, t.shape, "FP32",
                            (rng.standard_normal(t.shape, dtype=np.float32) * 1e-3)
                            .data.cast("B"))
                 for t in tensor_specs(params, count)]
        sent = sum(memoryview(g.data).nbytes for g in grads)
        base = 0

        def one() -> int:
            nonlocal base
            r = transport.step(session_id, grads, return_datatype="FP32",
                               sender=Sender(f"rank{rank}", base + 1), base_step=base)
            if r.step != base + 1 or r.skipped or (world > 1 and r.contributors != world):
                raise RuntimeError(f"rank {rank}: step {base} -> {r.step}, skipped={r.skipped}, "
                                   f"contributors={r.contributors} of {world}")
            base = r.step
            return sent + sum(memoryview(p.data).nbytes for p in r.params)

        for _ in range(warmup):
            one()
        start.wait(CALL_TIMEOUT)
        t0, c0 = time.monotonic(), time.process_time()  # CLOCK_MONOTONIC: one clock for all
        moved = sum(one() for _ in range(steps))
        t1, c1 = time.monotonic(), time.process_time()
        transport.close()
        out.put({"rank": rank, "t0": t0, "t1": t1, "moved": moved, "cpu": c1 - c0,
                 "error": None})
    except BaseException:
        start.abort()  # release the others (and the parent) from the barrier
        out.put({"rank": rank, "error": traceback.format_exc()})


def cpu_seconds(pid: int) -> float:
    """User plus system CPU seconds of process ``pid`` (all its threads) so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def run_case(ctx: Any, servers: list[Server], case: Case,
             args: argparse.Namespace) -> Measured:
    sid = (f"bench-{case.wire}-{case.workers}w-{case.shards}s-{int(case.skip_nonfinite)}-"
           f"{time.monotonic_ns()}")
    mine = servers[:case.shards]
    urls = [s.urls[case.wire] for s in mine]
    admin = open_transport(urls)
    admin.create_session(SessionSpec(sid, "adamw", tensor_specs(args.params, args.tensors),
                                     skip_nonfinite=case.skip_nonfinite,
                                     workers=Workers(count=case.workers)))
    start = ctx.Barrier(case.workers + 1)  # the workers, after their warm-up, and this
    out = ctx.Queue()
    procs = [ctx.Process(target=worker_main, args=(
        urls, sid, rank, case.workers, args.params, args.tensors, args.warmup,
        args.steps, start, out)) for rank in range(case.workers)]
    for p in procs:
        p.start()
    rows: list[dict[str, Any]] = []
    server_cpu = 0.0
    try:
        with contextlib.suppress(threading.BrokenBarrierError):  # a worker failed: below
            start.wait(CALL_TIMEOUT * 2)
            server_cpu = -sum(cpu_seconds(s.proc.pid) for s in mine)
        for _ in procs:
            try:
                rows.append(out.get(timeout=CALL_TIMEOUT * 2))
            except queue.Empty:
                raise RuntimeError(f"{case}: a worker gave no answer in "
                                   f"{CALL_TIMEOUT * 2:.0f} s (hung)") from None
            if rows[-1]["error"] is not None:
                raise RuntimeError(f"{case}: worker {rows[-1]['rank']} failed:\n"
                                   f"{rows[-1]['error']}")
        server_cpu += sum(cpu_seconds(s.proc.pid) for s in mine)
    finally:
        for p in procs:
            p.join(10)
            if p.is_alive():
                p.terminate()
                p.join(10)
        with contextlib.suppress(Exception):
            admin.delete_session(sid)
        admin.close()
    return Measured(case, max(r["t1"] for r in rows) - min(r["t0"] for r in rows), args.steps,
                    sum(r["moved"] for r in rows), server_cpu, sum(r["cpu"] for r in rows))


# -- main ---------------------------------------------------------------------------


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--params", type=int, default=1 << 22, help="model size (fp32 elements)")
    ap.add_argument("--tensors", type=int, default=4, help="tensors the model is split into")
    ap.add_argument("--steps", type=int, default=25, help="timed steps per case")
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps per case first")
    ap.add_argument("--rounds", type=int, default=2, help="times the sweep runs (best kept)")
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--wires", nargs="+", default=["grpc", "flight"],
                    choices=["grpc", "flight"])
    ap.add_argument("--no-one-phase", action="store_true",
                    help="skip the 2-shard cases with skip_nonfinite=False")
    args = ap.parse_args()
    args.params -= args.params % args.tensors

    cases = []
    for wire in args.wires:
        cases += [Case(k, m, wire=wire) for m in (1, 2) for k in args.workers]
        if not args.no_one_phase:
            cases += [Case(k, 2, skip_nonfinite=False, wire=wire) for k in args.workers]

    ctx = mp.get_context("spawn")
    began = time.monotonic()
    runs: dict[Case, list[Measured]] = {c: [] for c in cases}
    with tempfile.TemporaryDirectory(prefix="adamserve-bench-") as tmp:
        servers = [Server(Path(tmp), f"shard{i}") for i in range(2)]
        try:
            for s in servers:
                s.wait_ready()
            for rnd in range(args.rounds):
                for case in cases:
                    m = run_case(ctx, servers, case, args)
                    runs[case].append(m)
                    print(f"  round {rnd + 1}: {case.wire}, {case.workers} worker(s), "
                          f"{case.shards} "
                          f"shard(s), {case.kind}: {m.steps_per_s:.2f} steps/s",
                          file=sys.stderr, flush=True)
        except BaseException:
            for s in servers:
                print(f"--- {s.log.name} ---\n{s.tail()}", file=sys.stderr)
            raise
        finally:
            for s in servers:
                s.stop()

    model_mb = args.params * 4 / 1e6
    cpus = os.cpu_count()
    results = [max(ms, key=lambda m: m.steps_per_s) for ms in runs.values()]  # best round
    # the reference: the fewest workers on one server over the first wire (1 worker, gRPC,
    # with the defaults)
    base = min((r for r in results if r.case.shards == 1 and r.case.wire == args.wires[0]),
               key=lambda r: r.case.workers)
    print(f"# workers: {args.params} fp32 params in {args.tensors} tensors "
          f"({model_mb:.1f} MB each way per worker per step), AdamW, "
          f"{' and '.join(args.wires)}, loopback, "
          f"{cpus} cpus, servers on the CPU backend; each case: {args.warmup} warm-up steps "
          f"then {args.steps} timed steps, best of {args.rounds} rounds (the sweep run "
          f"{args.rounds} times)\n")
    print(f"Note: the worker processes, the server processes and their kernels share these "
          f"{cpus} cores, so the ratios show the overhead of rounds and shards on one "
          f"machine, not scaling across machines.\n")
    print("| wire | workers | shards | sharded step | s/step | steps/s | ratio | "
          "gradients/s ratio | MB/s | server CPU s/step | workers CPU s/step |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in results:
        k = r.case.workers
        print(f"| {r.case.wire} | {k} | {r.case.shards} | {r.case.kind} | "
              f"{1 / r.steps_per_s:.3f} | "
              f"{r.steps_per_s:.2f} | {r.steps_per_s / base.steps_per_s:.2f} | "
              f"{k * r.steps_per_s / (base.case.workers * base.steps_per_s):.2f} | "
              f"{r.mb_per_s:.0f} | "
              f"{r.server_cpu / r.steps:.3f} | {r.worker_cpu / r.steps:.3f} |")
    total = args.warmup + args.steps
    print(f"\nMB/s: gradient bytes in plus parameter bytes out, all workers "
          f"({2 * model_mb:.1f} MB per worker per step). CPU s/step: user + system CPU "
          f"seconds of the shard processes (all of them) and of the worker processes (all "
          f"of them) over the timed steps, per step. Total run {time.monotonic() - began:.0f} s ({total} steps a case).")


if __name__ == "__main__":
    main()
