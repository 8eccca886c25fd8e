"""What finding locally changed parameters costs a step, measured in one run.

Before each step the client compares every parameter's version counter and storage
address with those it saw when it last wrote or sent the tensor, and sends only the
tensors that changed (SetParameters). This starts a real ``adamserve serve`` process
(CPU backend) and times, through the Python client (torch tensors, gRPC), one step
of a 16M-parameter fp32 Adam session in 8 tensors:

* nothing changed, with the check (the default) and with the check turned off,
  interleaved with the next case step by step (each first in turn) so that all see
  the same machine;
* one tensor (1/8 of the parameters) changed in place before each step;
* the check alone (``_changed()``), over many calls.

    python bench/param_changes.py [--params 16777216] [--tensors 8] [--repeat 15]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from e2e import start_server

import adamserve_client


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--params", type=int, default=1 << 24)
    ap.add_argument("--tensors", type=int, default=8)
    ap.add_argument("--repeat", type=int, default=15)
    args = ap.parse_args()
    per = args.params // args.tensors
    torch.manual_seed(0)
    params = [torch.zeros(per, requires_grad=True) for _ in range(args.tensors)]
    for p in params:
        p.grad = torch.randn(per) * 1e-3

    with tempfile.TemporaryDirectory() as tmp:
        proc, gport, _ = start_server(Path(tmp))
        try:
            opt = adamserve_client.Adam(params, lr=1e-3, server=f"grpc://127.0.0.1:{gport}",
                                        session="param-changes")
            check = opt._send_changed

            def timed(fn: Callable[[], object]) -> float:
                t0 = time.perf_counter()
                fn()
                return time.perf_counter() - t0

            def without_check() -> None:
                opt._send_changed = lambda: None  # type: ignore[method-assign]
                try:
                    opt.step()
                finally:
                    opt._send_changed = check  # type: ignore[method-assign]

            def one_changed() -> None:
                with torch.no_grad():
                    params[0].add_(1e-6)
                opt.step()

            for _ in range(3):
                opt.step()  # warm-up
            cases: list[tuple[Callable[[], object], list[float]]] = [
                (opt.step, []), (without_check, []), (one_changed, [])]
            for i in range(args.repeat):
                for k in range(3):  # each case first, second and third in turn
                    fn, times = cases[(i + k) % 3]
                    times.append(timed(fn))
            with_times, without_times, changed_times = (times for _, times in cases)
            calls = 10_000
            t0 = time.perf_counter()
            for _ in range(calls):
                opt._changed()
            check_alone = (time.perf_counter() - t0) / calls
            opt.close(delete=True)
        finally:
            proc.terminate()
            proc.wait(60)

    t_with = statistics.median(with_times)
    t_without = statistics.median(without_times)
    t_changed = statistics.median(changed_times)
    mb = args.params * 4 / 1e6
    print(f"# param changes: {args.params} fp32 params in {args.tensors} tensors "
          f"({mb:.0f} MB each way), Python client with torch, gRPC, loopback, "
          f"{os.cpu_count()} cpus, server on the CPU backend; medians of {args.repeat} "
          "interleaved steps\n")
    print("| step | seconds per step | ratio to no check | target |")
    print("|---|---|---|---|")
    print(f"| nothing changed, check off | {t_without:.3f} | 1.000 | |")
    print(f"| nothing changed, check on (default) | {t_with:.3f} | "
          f"{t_with / t_without:.3f} | <= 1.01 |")
    print(f"| one tensor ({100 / args.tensors:.1f}% of the parameters) changed | "
          f"{t_changed:.3f} | {t_changed / t_without:.3f} | |")
    print(f"\nthe check alone: {check_alone * 1e6:.1f} us per step "
          f"({check_alone / t_without * 100:.4f}% of a step)")


if __name__ == "__main__":
    main()
