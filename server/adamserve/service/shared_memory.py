"""Same-host shared memory: the POSIX shared-memory regions clients register, mapped
and guarded, so that a step's gradients and parameters need not cross a socket.

A client on the server's host creates an object under ``/dev/shm`` (``shm_open``),
registers it under a name (:meth:`SharedMemoryRegistry.register`), and its steps
name a place in it (:class:`RegionRef`: region, offset, byte size) for the
gradients and for the returned parameters. The guards, each a clear refusal and
never a crash:

* **names**: a region's name and its object's key match ``[A-Za-z0-9_.-]{1,128}``
  and do not start with '.': no paths, no ``..``. The object is opened relative to
  the ``/dev/shm`` directory with ``O_NOFOLLOW`` (a symbolic link is refused) and
  ``O_NONBLOCK`` (a FIFO cannot hang the server), and must be a regular file owned
  by the server's user, at least ``byte_size`` bytes long;
* **mapping**: ``os.open`` + :mod:`mmap`, never ``multiprocessing.shared_memory``,
  whose resource tracker unlinks objects this process did not create;
* **bounds**: at most ``max_regions`` regions and ``max_bytes`` mapped bytes
  (RESOURCE_EXHAUSTED, QUOTA_EXCEEDED);
* **places**: an offset and a byte size are non-negative and lie within the region
  (SHARED_MEMORY_OUT_OF_RANGE); the size is exactly what the session needs;
* **truncation**: touching a mapped page past the end of a truncated object raises
  SIGBUS, which kills the process. Every use checks the object's size with
  ``fstat`` first (SHARED_MEMORY_OUT_OF_RANGE when it shrank); the object belongs to
  the server's own user, so this guards against mistakes (a client that recreated
  its object smaller), which is all a check can do against a process that may
  already do anything to the server;
* **lifetime**: a step holds its regions (:meth:`SharedMemoryRegistry.use`): an
  unregister, or a sweep, during the step removes the name at once and unmaps when
  the last step using it is done (unregistering mid-step must not crash);
* **tenants**: each region keeps its owner; another tenant's region is answered as
  absent (SHARED_MEMORY_NOT_FOUND), and so is an object another tenant registered;
* **clients that went away**: :meth:`SharedMemoryRegistry.sweep` drops regions whose
  object was unlinked (the client closed it, or exited) and regions idle for
  ``idle_seconds`` (a client killed before it could unlink); a live client whose
  region was dropped registers it again.

The regions are the client's memory: the service reads a step's gradients there
(in place where the engine can step from them, else decoded into its own buffer) and
writes the parameters in once the step is done (:func:`write_values`).
"""

from __future__ import annotations

import builtins
import contextlib
import errno
import logging
import mmap
import os
import re
import stat
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from adamserve.engine.dtypes import encode_into
from adamserve.errors import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    shown,
)
from adamserve_proto import codec

__all__ = ["IDLE_SECONDS", "MAX_MAPPED_BYTES", "MAX_REGIONS", "SHM_DIR", "Held", "RegionInfo",
           "RegionRef", "SharedMemoryRegistry", "check_name", "write_values"]

log = logging.getLogger("adamserve.service.shared_memory")

SHM_DIR = "/dev/shm"
MAX_REGIONS = 256
MAX_MAPPED_BYTES = 1 << 40  # address space only: the pages are the objects' (tmpfs)
IDLE_SECONDS = 600.0  # a region no step used for this long is dropped by the sweep

_NAME = re.compile(r"[A-Za-z0-9_.-]{1,128}")


@dataclass(frozen=True)
class RegionRef:
    """A place in a registered region: ``byte_size`` bytes from ``offset``."""

    region: str
    offset: int
    byte_size: int


@dataclass(frozen=True)
class RegionInfo:
    """A registered region: its ``name``, the object's ``key`` under /dev/shm, and the
    bytes mapped from the object's start."""

    name: str
    key: str
    byte_size: int


# Every region's object is named so: the Python client's are adamserve_<pid>_<random>.
KEY_PREFIX = "adamserve"


def check_name(value: str, what: str) -> str:
    """A region name or object key: 1-128 of ``[A-Za-z0-9_.-]``, not starting with '.'."""
    if not isinstance(value, str) or not _NAME.fullmatch(value) or value.startswith("."):
        raise InvalidArgument(
            f"{what} {shown(value)}: expected 1-128 letters, digits, '_', '-' or '.', not starting "
            "with '.' (a name under /dev/shm, without '/')")
    return value


def _meta(name: str) -> dict[str, str]:
    return {"region": name}


def _not_found(name: str, why: str) -> NotFound:
    return NotFound(why, reason="SHARED_MEMORY_NOT_FOUND", metadata=_meta(name))


def _out_of_range(name: str, why: str) -> InvalidArgument:
    return InvalidArgument(why, reason="SHARED_MEMORY_OUT_OF_RANGE", metadata=_meta(name))


def backed_bytes(st: os.stat_result) -> int:
    """The bytes of an object that have pages (tmpfs allocates them on first write, or
    on posix_fallocate): a write to one without a page on a full /dev/shm is SIGBUS."""
    return min(st.st_size, st.st_blocks * 512)


class _Region:
    """One mapping: the object's descriptor (kept for the size checks) and its map."""

    def __init__(self, info: RegionInfo, tenant: str, fd: int, mapped: mmap.mmap,
                 inode: tuple[int, int]) -> None:
        self.info = info
        self.tenant = tenant
        self.fd = fd
        self.map: mmap.mmap | None = mapped
        self.inode = inode
        self.users = 0  # steps using it now
        self.dropped = False  # unregistered or swept: unmapped once users reach 0
        self.last_used = time.monotonic()

    def size_now(self) -> int:
        return backed_bytes(os.fstat(self.fd))

    def unmap(self) -> None:
        mapped, self.map = self.map, None
        if mapped is not None:
            try:
                mapped.close()
            except BufferError:  # a view still alive somewhere: unmapped when it dies
                log.warning("shared-memory region %r: a view outlived its step; the mapping "
                            "goes when it does", self.info.name)
        with contextlib.suppress(OSError):
            os.close(self.fd)


class Held:
    """A place in a region, held for one step: :attr:`view` is its bytes."""

    def __init__(self, region: _Region, ref: RegionRef, whole: memoryview) -> None:
        self._region = region
        self.ref = ref
        self._whole = whole
        self.view = whole[ref.offset:ref.offset + ref.byte_size]

    def check(self, what: str) -> None:
        """Refuse (SHARED_MEMORY_OUT_OF_RANGE) if the object shrank below this place:
        touching it would raise SIGBUS."""
        end = self.ref.offset + self.ref.byte_size
        size = self._region.size_now()
        if size < end:
            raise _out_of_range(
                self.ref.region,
                f"{what}: the shared-memory object {self._region.info.key!r} of region "
                f"{self.ref.region!r} was truncated to {size} bytes; this place ends at byte "
                f"{end} (recreate the object and register it again)")

    def release(self) -> None:
        for view in (self.view, self._whole):
            # an array over it that outlived the step: the mapping goes when it does
            with contextlib.suppress(BufferError):
                view.release()


class SharedMemoryRegistry:
    """The registered regions of every tenant, keyed by (tenant, name). Thread-safe."""

    def __init__(self, directory: str = SHM_DIR, *, max_regions: int = MAX_REGIONS,
                 max_bytes: int = MAX_MAPPED_BYTES, idle_seconds: float = IDLE_SECONDS) -> None:
        self.directory = directory
        self.max_regions = max_regions
        self.max_bytes = max_bytes
        self.idle_seconds = idle_seconds
        self._lock = threading.Lock()
        self._regions: dict[tuple[str, str], _Region] = {}
        self._mapped: list[_Region] = []  # every mapping, also dropped ones still in use

    # -- registering -----------------------------------------------------------------

    def register(self, name: str, key: str, byte_size: int, tenant: str = "") -> RegionInfo:
        """Map ``byte_size`` bytes of the object ``key`` under the name ``name``.

        Registering the same name, key and size again (a retry) returns the region as
        it is; another region under a name taken is SHARED_MEMORY_EXISTS.
        """
        check_name(name, "region name")
        check_name(key, "shared-memory key")
        if not key.startswith(KEY_PREFIX):
            # the server's user owns other objects too (torch's, an object store's): a
            # caller may name only those made to be regions
            raise InvalidArgument(
                f"shared-memory key {shown(key)}: a region's object is named {KEY_PREFIX}... (the "
                "server maps no other objects of its user)", metadata=_meta(name))
        if isinstance(byte_size, bool) or not isinstance(byte_size, int) or byte_size <= 0:
            raise InvalidArgument(f"region {name!r}: byte_size {shown(byte_size)}: expected a "
                                  "positive number of bytes")
        info = RegionInfo(name, key, byte_size)
        with self._lock:
            if any(r.info.key == key and r.tenant != tenant for r in self._regions.values()):
                raise self._no_object(name, key)  # another tenant's: as if absent
            fd, inode = self._open(name, key, byte_size)
            try:
                taken = self._regions.get((tenant, name))
                if taken is not None:
                    if taken.info == info and taken.inode == inode:
                        os.close(fd)  # mapped already, by the first registration
                        return info  # a retry of this registration
                    raise AlreadyExists(
                        f"a shared-memory region named {name!r} is registered already (object "
                        f"{taken.info.key!r}, {taken.info.byte_size} bytes): unregister it "
                        "first, or pick another name", reason="SHARED_MEMORY_EXISTS",
                        metadata=_meta(name))
                self._check_room(name, byte_size)
                try:
                    mapped = mmap.mmap(fd, byte_size, mmap.MAP_SHARED,
                                       mmap.PROT_READ | mmap.PROT_WRITE)
                except (OSError, ValueError) as exc:
                    raise ResourceExhausted(
                        f"region {name!r}: the server could not map {byte_size} bytes of "
                        f"shared-memory object {key!r}: {exc}", reason="QUOTA_EXCEEDED",
                        metadata=_meta(name)) from None
            except BaseException:
                os.close(fd)
                raise
            region = _Region(info, tenant, fd, mapped, inode)
            self._regions[(tenant, name)] = region
            self._mapped.append(region)
        log.info("shared-memory region %r registered: /dev/shm/%s, %d bytes", name, key,
                 byte_size)
        return info

    def _no_object(self, name: str, key: str) -> NotFound:
        return _not_found(name, f"region {name!r}: no shared-memory object {key!r} on the "
                                f"server's host ({self.directory}/{key}): is the client on "
                                "another host, or in a container with another /dev/shm?")

    def _open(self, name: str, key: str, byte_size: int) -> tuple[int, tuple[int, int]]:
        """The object's descriptor, checked: a regular file of the server's user, large
        enough. Opened relative to the directory, never through a symbolic link."""
        try:
            dir_fd = os.open(self.directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError as exc:
            raise FailedPrecondition(
                f"region {name!r}: the server cannot open {self.directory}: {exc.strerror}",
                reason="SHARED_MEMORY_FORBIDDEN", metadata=_meta(name)) from None
        try:
            fd = os.open(key, os.O_RDWR | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC,
                         dir_fd=dir_fd)
        except FileNotFoundError:
            raise self._no_object(name, key) from None
        except OSError as exc:
            why = ("it is a symbolic link" if exc.errno == errno.ELOOP
                   else exc.strerror or str(exc))
            raise self._forbidden(name, key, why) from None
        finally:
            os.close(dir_fd)
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise self._forbidden(name, key, "it is not a regular file")
            if st.st_uid != os.geteuid():
                raise self._forbidden(name, key, f"it belongs to user {st.st_uid}, the server "
                                                 f"runs as {os.geteuid()}")
            if st.st_size < byte_size:
                raise _out_of_range(name, f"region {name!r}: shared-memory object {key!r} "
                                          f"holds {st.st_size} bytes, fewer than the "
                                          f"{byte_size} to register")
            if backed_bytes(st) < byte_size:
                raise self._forbidden(name, key, (
                    f"only {backed_bytes(st)} of its {byte_size} bytes have pages (a sparse "
                    "object: on a full /dev/shm the server's first write to a missing page "
                    "would crash it); allocate them first (posix_fallocate)"))
        except BaseException:
            os.close(fd)
            raise
        return fd, (st.st_dev, st.st_ino)

    def _forbidden(self, name: str, key: str, why: str) -> FailedPrecondition:
        return FailedPrecondition(
            f"region {name!r}: the server will not map {self.directory}/{key}: {why} (a "
            "region is a regular file of the server's own user)",
            reason="SHARED_MEMORY_FORBIDDEN", metadata=_meta(name))

    def _check_room(self, name: str, byte_size: int) -> None:
        live = [r for r in self._mapped if r.map is not None]
        if len(self._regions) >= self.max_regions:
            raise ResourceExhausted(
                f"region {name!r}: the server holds {len(self._regions)} shared-memory "
                f"regions, its limit: unregister one first", reason="QUOTA_EXCEEDED",
                metadata=_meta(name))
        mapped = sum(r.info.byte_size for r in live)
        if mapped + byte_size > self.max_bytes:
            raise ResourceExhausted(
                f"region {name!r}: {byte_size} bytes more would map {mapped + byte_size} "
                f"bytes of shared memory, over the server's limit of {self.max_bytes}",
                reason="QUOTA_EXCEEDED", metadata=_meta(name))

    def unregister(self, name: str, tenant: str = "") -> None:
        """Drop the region ``name``: later steps naming it are refused at once; a step
        using it now finishes, and the mapping goes with the last of them."""
        check_name(name, "region name")
        with self._lock:
            region = self._regions.get((tenant, name))
            if region is None:
                raise _not_found(name, f"no shared-memory region named {name!r} is "
                                       "registered")
            self._drop(region)
        log.info("shared-memory region %r unregistered", name)

    def _drop(self, region: _Region) -> None:
        """Forget ``region`` (the lock held); unmap it now unless a step holds it."""
        self._regions.pop((region.tenant, region.info.name), None)
        region.dropped = True
        if region.users == 0:
            self._unmap(region)

    def _unmap(self, region: _Region) -> None:
        region.unmap()
        self._mapped.remove(region)

    def list(self, tenant: str = "") -> builtins.list[RegionInfo]:
        """The tenant's regions, ordered by name."""
        with self._lock:
            return sorted((r.info for r in self._regions.values() if r.tenant == tenant),
                          key=lambda i: i.name)

    def sweep(self, now: float | None = None) -> int:
        """Drop regions whose object is gone (unlinked: the client closed it or exited)
        or that no step used for ``idle_seconds``; returns how many."""
        now = time.monotonic() if now is None else now
        dropped = 0
        with self._lock:
            for region in builtins.list(self._regions.values()):
                if region.users:
                    continue
                try:
                    gone = os.fstat(region.fd).st_nlink == 0
                except OSError:
                    gone = True
                idle = now - region.last_used > self.idle_seconds
                if gone or idle:
                    log.info("shared-memory region %r dropped: %s", region.info.name,
                             "its object was unlinked" if gone else
                             f"unused for {self.idle_seconds:g} s")
                    self._drop(region)
                    dropped += 1
        return dropped

    def close(self) -> None:
        """Unmap every region (the server stops)."""
        with self._lock:
            for region in builtins.list(self._mapped):
                self._regions.pop((region.tenant, region.info.name), None)
                self._unmap(region)

    # -- steps -----------------------------------------------------------------------

    @contextlib.contextmanager
    def use(self, ref: RegionRef, byte_size: int, tenant: str, what: str,
            expected: str) -> Iterator[Held]:
        """Hold the place ``ref`` for one step: it must lie within its region and be
        ``byte_size`` bytes (``expected`` says why, for the message)."""
        name = ref.region
        with self._lock:
            region = self._regions.get((tenant, name))
            if region is None or region.map is None:
                raise _not_found(name, f"{what}: no shared-memory region named {name!r} is "
                                       "registered (register it first; a server drops regions "
                                       "unused for a while and forgets them on restart)")
            size = region.info.byte_size
            if ref.offset < 0 or ref.byte_size < 0 or ref.offset + ref.byte_size > size:
                raise _out_of_range(name, f"{what}: bytes [{ref.offset}, "
                                          f"{ref.offset + ref.byte_size}) do not lie within "
                                          f"region {name!r} of {size} bytes")
            if ref.byte_size != byte_size:
                raise InvalidArgument(f"{what}: byte_size {ref.byte_size}, expected "
                                      f"{byte_size} ({expected})", metadata=_meta(name))
            whole = memoryview(region.map)
            region.users += 1
        held = Held(region, ref, whole)
        try:
            held.check(what)
            yield held
        finally:
            held.release()
            del held
            with self._lock:
                region.users -= 1
                region.last_used = time.monotonic()
                if region.dropped and region.users == 0:
                    self._unmap(region)


def write_values(out: memoryview, values: npt.NDArray[Any], datatype: str) -> None:
    """Encode ``values`` (a flat array) as ``datatype`` into the bytes ``out``: what
    :func:`adamserve_proto.codec.encode` would return, written in place."""
    dst = np.frombuffer(out, dtype=codec.DATATYPES[datatype])
    try:
        if dst.size != values.size:
            raise ValueError(f"{values.size} values for {dst.size} {datatype} elements")
        encode_into(dst, values, datatype)
    finally:
        del dst  # no export of ``out`` outlives the call: the region can be unmapped
