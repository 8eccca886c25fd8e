"""Tensors in and out of a session: chunks checked against its layout and decoded
into a flat buffer, parameters encoded back, a commit's sums of squares checked."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

from adamserve.engine.dtypes import WIRE_DTYPES, decode_into, encode_buffer
from adamserve.engine.optimizer import FlatOptimizer, Layout, listed
from adamserve.errors import InvalidArgument, shown
from adamserve.service.types import TensorChunk


def sums(what: str, values: Sequence[float], n: int,
         finite: bool = False) -> npt.NDArray[np.float64]:
    """A commit's per-tensor sums of squares: ``n`` numbers >= 0. NaN and Inf (a
    non-finite gradient somewhere) are kept unless ``finite``: LAMB's norms come from a
    step that passed the non-finite check."""
    out = np.asarray(values, dtype=np.float64)
    if out.shape != (n,):
        raise InvalidArgument(f"{what}: expected {n} numbers, one per tensor of the session, "
                              f"got {len(values)}")
    if (out < 0).any():
        raise InvalidArgument(f"{what}: sums of squares cannot be negative")
    if finite and not np.isfinite(out).all():
        raise InvalidArgument(f"{what}: expected finite sums of squares")
    return out


def check_datatype(datatype: str | None, what: str) -> None:
    if datatype is not None and datatype not in WIRE_DTYPES:
        raise InvalidArgument(f"{what} {shown(datatype)}: expected one of "
                              f"{', '.join(WIRE_DTYPES)}")


class Assembler:
    """Decodes chunks of named tensors into a flat host buffer, checking each one."""

    def __init__(self, layout: Layout, out: npt.NDArray[Any],
                 scope: str = "in this session") -> None:
        self.layout = layout
        self.scope = scope
        self.out = out
        self.received = np.zeros(len(self.layout), dtype=np.int64)
        self.seen = np.zeros(len(self.layout), dtype=bool)  # a chunk came (maybe empty)
        self.sumsq = np.zeros(len(self.layout), dtype=np.float64)
        self.bytes = 0

    def add(self, chunk: TensorChunk) -> tuple[int, int, int]:
        """Check and decode one chunk; returns (tensor index, first, last+1 flat element)."""
        try:
            i = self.layout.index(chunk.name)
        except KeyError:
            names = [t.name for t in self.layout.tensors]
            raise InvalidArgument(
                f"tensor {shown(chunk.name)} is not {self.scope}; expected one of "
                f"{listed(names)}") from None
        t = self.layout.tensors[i]
        if chunk.datatype not in WIRE_DTYPES:
            raise InvalidArgument(
                f"tensor {shown(chunk.name)}: unknown datatype {shown(chunk.datatype)}; expected "
                f"one of {', '.join(WIRE_DTYPES)}")
        if tuple(chunk.shape) != t.shape:
            raise InvalidArgument(
                f"tensor {shown(chunk.name)}: expected shape {list(t.shape)}, got "
                f"{shown(list(chunk.shape))}")
        itemsize = WIRE_DTYPES[chunk.datatype].itemsize
        nbytes = len(chunk.data)
        if nbytes % itemsize:
            raise InvalidArgument(
                f"tensor {shown(chunk.name)}: {nbytes} bytes is not a whole number of "
                f"{chunk.datatype} elements ({itemsize} bytes each)")
        count = nbytes // itemsize
        done = int(self.received[i])
        if chunk.offset != done:
            raise InvalidArgument(
                f"tensor {shown(chunk.name)}: chunk starts at element {chunk.offset}, expected "
                f"{done} (chunks of a tensor arrive in order, each exactly once)")
        if done + count > t.numel:
            raise InvalidArgument(
                f"tensor {shown(chunk.name)}: {done + count} elements sent, expected {t.numel} "
                f"(shape {list(t.shape)})")
        lo = int(self.layout.offsets[i]) + done
        self.sumsq[i] += decode_into(self.out[lo:lo + count], chunk.data, chunk.datatype)
        self.received[i] = done + count
        self.seen[i] = True
        self.bytes += nbytes
        return i, lo, lo + count

    def finish(self, require_all: bool) -> npt.NDArray[np.bool_]:
        """Which tensors were sent; each must be complete (and all of them if required)."""
        numel = np.diff(self.layout.offsets)
        sent = self.received > 0
        if not self.seen.any():
            raise InvalidArgument("the request carries no gradient tensors")
        incomplete = sent & (self.received != numel)
        missing = ~sent & (numel > 0) if require_all else np.zeros_like(sent)
        for i in np.flatnonzero(incomplete):
            t = self.layout.tensors[int(i)]
            raise InvalidArgument(
                f"tensor {shown(t.name)}: received {int(self.received[i])} of {t.numel} elements")
        if missing.any():
            names = [self.layout.tensors[int(i)].name for i in np.flatnonzero(missing)]
            raise InvalidArgument(f"missing tensors: {listed(names)}")
        return np.asarray(sent | (numel == 0), dtype=np.bool_)


def initial_values(layout: Layout, chunks: Iterable[TensorChunk], dtype: np.dtype[Any],
                   scope: str = "in this session") -> npt.NDArray[Any]:
    """A new tensor's values as sent (a create's, or add_tensors'); zeros where none were."""
    host = np.zeros(layout.size, dtype=dtype)
    asm = Assembler(layout, host, scope=scope)
    for chunk in chunks:
        asm.add(chunk)
    if asm.bytes:
        asm.finish(require_all=False)
    return host


def encode_params(opt: FlatOptimizer, names: Sequence[str] | None,
                  datatype: str) -> list[TensorChunk]:
    """The parameters of the tensors ``names`` (None or empty: all), as ``datatype``."""
    layout = opt.layout
    if names:
        idx = []
        for n in names:
            try:
                idx.append(layout.index(n))
            except KeyError:
                raise InvalidArgument(f"tensor {shown(n)} is not in this session") from None
    else:
        idx = list(range(len(layout)))
    host = opt.backend.to_host(opt.param)
    out = []
    for i in idx:
        t = layout.tensors[i]
        # a buffer of its own: the values of now, however the session changes later
        out.append(TensorChunk(t.name, t.shape, datatype,
                               encode_buffer(host[layout.span(i)], datatype)))
    return out
