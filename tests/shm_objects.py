"""Shared-memory objects under /dev/shm for tests: made as the client makes them (pages
allocated), unlinked after the test."""

from __future__ import annotations

import mmap
import os
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import pytest

from adamserve.service.shared_memory import SHM_DIR


@dataclass
class Obj:
    """A shared-memory object a test created, and its mapping."""

    key: str
    map: mmap.mmap

    @property
    def path(self) -> str:
        return f"{SHM_DIR}/{self.key}"

    def put(self, offset: int, data: bytes) -> None:
        self.map[offset:offset + len(data)] = data

    def get(self, offset: int, size: int) -> bytes:
        return self.map[offset:offset + size]


@pytest.fixture
def shm() -> Iterator[Callable[[int], Obj]]:
    """Makes objects under /dev/shm; unlinks them after the test."""
    made: list[str] = []

    def make(size: int) -> Obj:
        key = f"adamserve-test-{uuid.uuid4().hex}"
        fd = os.open(f"{SHM_DIR}/{key}", os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        made.append(key)
        os.posix_fallocate(fd, 0, size)  # pages allocated, as the client makes them
        mapped = mmap.mmap(fd, size)
        os.close(fd)
        return Obj(key, mapped)

    yield make
    for key in made:
        if os.path.lexists(f"{SHM_DIR}/{key}"):
            os.unlink(f"{SHM_DIR}/{key}")
