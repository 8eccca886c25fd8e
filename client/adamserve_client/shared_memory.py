"""Same-host shared memory for an optimizer's steps (docs/shared-memory.md).

:class:`SharedRegion` is a POSIX shared-memory object this process creates under
``/dev/shm`` (a random name), maps, and unlinks on :meth:`~SharedRegion.close`, when
it is garbage-collected, and at interpreter exit. It is made with ``os.open`` and
:mod:`mmap`, not ``multiprocessing.shared_memory``, whose resource tracker would
also unlink objects it did not create.

:class:`StepRegion` lays one out for a session: the gradients of every tensor, then
its parameters, each packed in the session's tensor order as the wire datatype. It
registers the region with the server (every shard's, for a sharded session); a
step then writes the gradients into it, names the two places in its header, and
reads the parameters from it: no tensor bytes cross the socket.

:func:`wanted` reads the ``shared_memory`` switch (default ``$ADAMSERVE_SHARED_MEMORY``).
Whether a server can use the region is known only by asking it: one that refuses
(started without ``--allow-shared-memory``, on another host, as another user) is
answered by :func:`refusal`'s reason, and the optimizer goes on over the wire.
"""

from __future__ import annotations

import contextlib
import math
import mmap
import os
import secrets
import weakref
from collections.abc import Sequence

from adamserve_client import errors, tensors
from adamserve_client.transports.base import RegionRef, Transport, WireTensor

__all__ = ["ENV", "SHM_DIR", "SharedRegion", "StepRegion", "refusal", "wanted"]

SHM_DIR = "/dev/shm"
ENV = "ADAMSERVE_SHARED_MEMORY"
_ON = frozenset({"1", "true", "yes", "on"})


def wanted(shared_memory: bool | None) -> bool:
    """The optimizer's ``shared_memory`` argument; None: ``$ADAMSERVE_SHARED_MEMORY``."""
    if shared_memory is not None:
        return bool(shared_memory)
    return os.environ.get(ENV, "").strip().lower() in _ON


def _release(path: str, mapped: mmap.mmap) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
    with contextlib.suppress(BufferError):  # a view still alive: unmapped when it dies
        mapped.close()


class SharedRegion:
    """``byte_size`` bytes of a new shared-memory object, mapped read-write; only this
    user may open it."""

    def __init__(self, byte_size: int) -> None:
        self.key = f"adamserve_{os.getpid()}_{secrets.token_hex(12)}"
        self.byte_size = byte_size
        path = os.path.join(SHM_DIR, self.key)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                     0o600)
        try:
            # pages allocated now: ENOSPC here (and the wire instead), not SIGBUS later
            os.posix_fallocate(fd, 0, byte_size)
            self.map = mmap.mmap(fd, byte_size)
        except BaseException:
            os.unlink(path)
            raise
        finally:
            os.close(fd)
        self._finalizer = weakref.finalize(self, _release, path, self.map)

    def view(self, offset: int, size: int) -> memoryview:
        return memoryview(self.map)[offset:offset + size]

    @property
    def closed(self) -> bool:
        return not self._finalizer.alive

    def close(self) -> None:
        """Unlink the object and unmap it (the server's mapping of it goes too, at its
        next sweep)."""
        self._finalizer()


def refusal(exc: errors.AdamserveError, url: str) -> str:
    """Why a server refused a region, for the warning that steps go over the wire."""
    if exc.reason == "SHARED_MEMORY_DISABLED":
        return f"the server at {url} does not allow it (start it with --allow-shared-memory)"
    if exc.reason == "SHARED_MEMORY_NOT_FOUND":
        return (f"the server at {url} cannot open this host's shared memory (it runs on "
                "another host, or in a container with its own /dev/shm)")
    return f"the server at {url} refused it ({exc.reason}: {exc})"


class StepRegion:
    """One session's steps through one region: every tensor's gradient, then every
    tensor's parameters, packed in session order as ``datatype``. ``tensors``: the
    session's (name, shape) pairs, in order. Registered with ``transport`` here
    (errors.AdamserveError when the server refuses; the region is closed then)."""

    def __init__(self, transport: Transport, tensors_: Sequence[tuple[str, tuple[int, ...]]],
                 datatype: str) -> None:
        size = tensors.itemsize(datatype)
        self.datatype = datatype
        self.slots: dict[str, tuple[int, int]] = {}  # name -> (byte offset, bytes)
        self.shapes: dict[str, tuple[int, ...]] = {}
        at = 0
        for name, shape in tensors_:
            n = math.prod(shape) * size
            self.slots[name] = (at, n)
            self.shapes[name] = tuple(shape)
            at += n
        self.nbytes = at  # of each half
        self.region = SharedRegion(max(1, 2 * at))
        self.gradients = RegionRef(self.region.key, 0, at)
        self.params = RegionRef(self.region.key, at, at)
        try:
            self.register(transport)
        except BaseException:
            self.region.close()
            raise

    def register(self, transport: Transport) -> None:
        """Register the region (again, after a server dropped it or restarted)."""
        transport.register_shared_memory(self.region.key, self.region.key,
                                         self.region.byte_size)

    def covers(self, wire: Sequence[WireTensor]) -> bool:
        """Whether ``wire`` is one gradient for every tensor (the region holds all)."""
        return len(wire) == len(self.slots) and all(t.name in self.slots for t in wire)

    def write_gradients(self, wire: Sequence[WireTensor]) -> None:
        for t in wire:
            if t.datatype != self.datatype:
                raise ValueError(f"gradient {t.name!r} is {t.datatype}; the region holds "
                                 f"{self.datatype}")
            offset, n = self.slots[t.name]
            src = memoryview(t.data).cast("B")
            if src.nbytes != n:
                raise ValueError(f"gradient {t.name!r}: {src.nbytes} bytes, its slot holds {n}")
            self.region.map[offset:offset + n] = src

    def parameters(self) -> tuple[WireTensor, ...]:
        """Every tensor's parameters as the server wrote them (views of the region,
        valid until the next step)."""
        base = self.params.offset
        return tuple(WireTensor(name, self.shapes[name], self.datatype,
                                self.region.view(base + offset, n))
                     for name, (offset, n) in self.slots.items())

    def close(self, transport: Transport | None) -> None:
        """Unregister (when ``transport`` is given and reachable) and unlink."""
        if transport is not None and not self.region.closed:
            with contextlib.suppress(errors.AdamserveError):
                transport.unregister_shared_memory(self.region.key)
        self.region.close()
