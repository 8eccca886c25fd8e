"""The first call: numba's kernel cache on disk, and the kernels compiled before a
request needs them.

numba compiles each kernel the first time it runs (seconds each; the parallel ones
longest) and, with ``cache=True``, keeps the machine code next to the module unless
``NUMBA_CACHE_DIR`` names a directory. A package directory may be read-only (an
image, a system install), so the server names one itself, before numba is imported
(numba reads the variable once, at import): ``NUMBA_CACHE_DIR`` when it is set (the
images set it), else ``--cache-dir``/``ADAMSERVE_CACHE_DIR`` + ``/numba``, else
``$XDG_CACHE_HOME/adamserve/numba``, else ``~/.cache/adamserve/numba``; one that
cannot be written is replaced by a directory under the system's temporary one.

At start-up a daemon thread then runs, on tiny arrays and through the engine's own
calls, the kernels a session's first create and step use (decoding FP32 and BF16
gradients, AdamW's step, BF16 parameters back; the serial kernels and the parallel
ones of larger tensors): loaded from the cache after a restart (under a second),
compiled on a first run. Other algorithms compile on their first step, and are
cached from then on.
"""

from __future__ import annotations

import logging
import os
import stat
import sys
import tempfile
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from adamserve.engine.backend import Backend

__all__ = ["CACHE_ENV", "CacheDir", "choose_cache_dir", "configure_cache", "start", "warm"]

log = logging.getLogger("adamserve.warmup")

CACHE_ENV = "NUMBA_CACHE_DIR"


@dataclass(frozen=True)
class CacheDir:
    path: Path
    source: str  # what chose it: NUMBA_CACHE_DIR, --cache-dir, XDG_CACHE_HOME, ...
    problem: str = ""  # why the chosen directory was not used (then path is the fallback)
    # False: the kernels were imported already (an embedding process), so numba keeps the
    # directory it had and nothing was set
    applied: bool = True


def choose_cache_dir(cache_dir: Path | None = None,
                     environ: Mapping[str, str] = os.environ) -> CacheDir:
    """The directory numba should keep compiled kernels in (not checked)."""
    if environ.get(CACHE_ENV):
        return CacheDir(Path(environ[CACHE_ENV]), CACHE_ENV)
    if cache_dir is not None and str(cache_dir):
        return CacheDir(Path(cache_dir) / "numba", "--cache-dir")
    xdg = environ.get("XDG_CACHE_HOME", "")
    if os.path.isabs(xdg):  # the XDG spec: a relative value is to be ignored
        return CacheDir(Path(xdg) / "adamserve" / "numba", "XDG_CACHE_HOME")
    return CacheDir(Path(environ.get("HOME") or Path.home()) / ".cache" / "adamserve" / "numba",
                    "~/.cache")


def _writable(path: Path, private: bool = False) -> str:
    """'' when ``path`` is (made) a directory this process can write in, else why not.
    ``private`` (a directory under the shared temporary directory): it must also be this
    user's own and writable by no one else, since numba loads what it finds there."""
    try:
        if private:
            path.parent.mkdir(mode=0o700, exist_ok=True)
            for d in (path.parent, path):
                d.mkdir(mode=0o700, exist_ok=True)
                st = d.lstat()
                if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid() or (
                        st.st_mode & 0o022):
                    return f"{d}: not a private directory of this user"
        path.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=path).close()  # numba's own test of a cache directory
    except OSError as exc:
        return f"{path}: {exc.strerror or exc}"
    return ""


def configure_cache(cache_dir: Path | None = None) -> CacheDir:
    """Choose the cache directory and set ``NUMBA_CACHE_DIR`` to it, for this process and
    the processes it starts. Call it before numba is imported: numba reads the variable
    then (after the kernels' import, nothing is changed: ``applied`` is False)."""
    choice = choose_cache_dir(cache_dir)
    problem = _writable(choice.path)
    if problem:
        fallback = Path(tempfile.gettempdir()) / f"adamserve-{os.getuid()}" / "numba"
        refused = _writable(fallback, private=True)
        if refused:
            return CacheDir(choice.path, choice.source, problem + "; no writable fallback "
                            f"either ({refused}): kernels compile at every start")
        choice = CacheDir(fallback, "temporary directory", problem)
    if "adamserve.engine.kernels_cpu" in sys.modules:
        return replace(choice, applied=False)
    os.environ[CACHE_ENV] = str(choice.path)
    return choice


def warm(backend: Backend, stop: threading.Event | None = None) -> bool:
    """Run the kernels of a first create and step once on ``backend``, in the order a
    first session needs them (a first request waits for the kernel compiling, not for
    all): FP32 decoding, AdamW's step, then BF16 both ways; each serial (small tensors)
    and parallel (large ones; AdamW's parallel one first: it runs over a session's whole
    buffer, which is large for any real model). False: ``stop`` was set before the end."""
    from adamserve.engine import dtypes
    from adamserve.engine.kernels_cpu import SERIAL_BELOW
    from adamserve.engine.optimizer import FlatOptimizer, Layout, TensorSpec

    small, large = 8, SERIAL_BELOW  # the serial kernels, the parallel ones
    sizes = (small, large)
    values = {n: np.linspace(-1.0, 1.0, n, dtype=np.float32) for n in sizes}
    host = {n: np.empty(n, dtype=np.float32) for n in sizes}
    sumsq: dict[int, float] = {}

    def fp32_in(n: int) -> None:  # create's initial values, a step's gradients
        sumsq[n] = dtypes.decode_into(host[n], values[n].tobytes(), "FP32")  # read-only bytes

    def adamw_step(n: int) -> None:
        opt = FlatOptimizer("adamw", Layout((TensorSpec("w", (n,)),)), [{"lr": 1e-3}],
                            backend=backend, params=host[n])
        opt.grad[...] = backend.to_device(host[n])
        opt.step(grad_sumsq=np.array([sumsq[n]]))

    def bf16_both_ways(n: int) -> None:  # parameters out, gradients in
        dtypes.decode_into(host[n], bytes(dtypes.encode_buffer(values[n], "BF16")), "BF16")

    for run, n in ((fp32_in, small), (fp32_in, large), (adamw_step, large),
                   (adamw_step, small), (bf16_both_ways, small), (bf16_both_ways, large)):
        if stop is not None and stop.is_set():
            return False
        run(n)
    return True


def start(backend: Backend, stop: threading.Event | None = None,
          cache: str | None = None) -> threading.Thread:
    """:func:`warm` in a daemon thread, with a log line when it is done."""

    def run() -> None:
        began = time.perf_counter()
        where = cache or os.environ.get(CACHE_ENV) or "numba's default"
        try:
            done = warm(backend, stop)
        except Exception:  # a kernel that fails here fails its first request too, clearly
            log.warning("compiling the kernels ahead of the first request failed; they "
                        "compile on first use", exc_info=True)
            return
        if done:
            log.info("kernels ready in %.1f s (compiled, or loaded from the cache %s)",
                     time.perf_counter() - began, where)

    thread = threading.Thread(target=run, name="warmup", daemon=True)
    thread.start()
    return thread
