"""adamserve.malloc: after keep_large_blocks, a model-sized buffer comes from the heap
(no mmapped block), so the next step reuses its pages; measured in a fresh process,
because the setting is process-wide."""

from __future__ import annotations

import subprocess
import sys

PROBE = """
import ctypes
from adamserve import malloc

class Info(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks",
        "uordblks", "fordblks", "keepcost")]

libc = ctypes.CDLL(None)
libc.mallinfo2.restype = Info

def mapped_blocks(size):
    # how many mmapped blocks one allocation of ``size`` bytes adds
    before = libc.mallinfo2().hblks
    block = bytearray(size)
    n = libc.mallinfo2().hblks - before
    del block
    return n

before = mapped_blocks(64 << 20)
ok = malloc.keep_large_blocks()
print(before, ok, mapped_blocks(64 << 20))
"""


def test_large_blocks_stay_in_the_heap() -> None:
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True,
                         check=True).stdout.split()
    assert out == ["1", "True", "0"], out
