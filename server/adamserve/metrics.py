"""Prometheus metrics, shared by the service (steps) and the transports (bytes).

Without the ``*_created`` series prometheus_client adds to every counter and histogram
by default: a second series per label set (when that set first appeared), which doubles
what every scrape carries and which rate() and increase() do not need.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram, disable_created_metrics

# read when the metrics are exposed: this process's, every registry's
disable_created_metrics()  # type: ignore[no-untyped-call]

STEPS = Counter("adamserve_steps_total", "Optimizer steps applied (skipped ones included)")
SKIPPED_STEPS = Counter("adamserve_skipped_steps_total",
                        "Steps skipped because a gradient held NaN or Inf")
STEP_SECONDS = Histogram(
    "adamserve_step_seconds", "Time from the first gradient byte decoded to the step applied",
    buckets=(1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 1e-2, 2.5e-2, 5e-2, 0.1, 0.25, 0.5, 1, 2.5))
BYTES_IN = Counter("adamserve_bytes_in_total", "Tensor bytes received", ["transport"])
BYTES_OUT = Counter("adamserve_bytes_out_total", "Tensor bytes sent", ["transport"])
REQUESTS = Counter("adamserve_requests_total", "Requests by transport, method and outcome",
                   ["transport", "method", "code"])
SESSIONS = Gauge("adamserve_sessions", "Live sessions")
STATE_BYTES = Gauge("adamserve_state_bytes", "Bytes of optimizer state held by all sessions")
CHECKPOINT_FAILURES = Counter("adamserve_checkpoint_failures_total",
                              "Checkpoints that failed, of any trigger (logged once per "
                              "session until one succeeds)")
CHECKPOINT_FAILING_SESSIONS = Gauge("adamserve_checkpoint_failing_sessions",
                                    "Sessions whose last checkpoint failed (the data "
                                    "directory refused it)")
DUPLICATE_PUSHES = Counter("adamserve_duplicate_pushes_total",
                           "Pushes acknowledged without being applied: seen before")
CHECKPOINTS = Counter("adamserve_checkpoints_total", "Durable checkpoints written")
ROUNDS_FAILED = Counter("adamserve_rounds_failed_total",
                        "Synchronous rounds failed by the straggler timeout")
ROUNDS_SHORT = Counter("adamserve_rounds_short_total",
                       "Synchronous rounds applied without every worker (straggler timeout)")
STALE_PUSHES = Counter("adamserve_stale_pushes_total",
                       "Pushes refused for being computed from too old parameters")
