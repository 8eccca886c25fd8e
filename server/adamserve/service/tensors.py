"""Tensors in and out of a session: chunks checked against its layout and decoded
into a flat buffer, parameters encoded back, a commit's sums of squares checked."""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

from adamserve.engine.algorithms import Algorithm
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


ROW_INDEX = np.dtype("<i8")  # a row index on the wire


class Assembler:
    """Decodes chunks of named tensors into a flat host buffer, checking each one.

    ``rows`` (gradients only): row-sparse chunks are accepted; their rows' values land
    at their places in the flat buffer. With ``lazy`` (an algorithm that reads only the
    rows sent, SparseAdam) the other rows are left as they were; else they are zeroed
    once, at the tensor's first row-sparse chunk (a dense algorithm sees zeros there).
    """

    def __init__(self, layout: Layout, out: npt.NDArray[Any],
                 scope: str = "in this session", *, rows: bool = False,
                 lazy: bool = False) -> None:
        self.layout = layout
        self.scope = scope
        self.out = out
        self.received = np.zeros(len(self.layout), dtype=np.int64)
        self.seen = np.zeros(len(self.layout), dtype=bool)  # a chunk came (maybe empty)
        self.sumsq = np.zeros(len(self.layout), dtype=np.float64)
        self.bytes = 0
        self.accept_rows = rows
        self.lazy = lazy
        # per row-sparse tensor, the row indices of its chunks (sorted and checked for
        # repeats at the end: no buffer of the tensor's row count is kept)
        self._row_lists: dict[int, list[npt.NDArray[np.int64]]] = {}
        self._rows: dict[int, npt.NDArray[np.int64]] = {}

    def rows(self) -> list[npt.NDArray[np.int64] | None]:
        """Per tensor, the rows its row-sparse chunks carried, sorted (None: sent dense,
        or not sent); after :meth:`finish`."""
        out: list[npt.NDArray[np.int64] | None] = [None] * len(self.layout)
        for i, rows in self._rows.items():
            out[i] = rows
        return out

    @property
    def row_sparse(self) -> bool:
        return bool(self._row_lists)

    def _add_rows(self, i: int, chunk: TensorChunk, itemsize: int) -> tuple[int, int, int]:
        t = self.layout.tensors[i]
        what = f"tensor {shown(chunk.name)}"
        if not self.accept_rows:
            raise InvalidArgument(f"{what}: row-sparse chunks carry gradients (Step, Push) "
                                  "only; send the values dense")
        if not t.shape:
            raise InvalidArgument(f"{what}: a scalar has no rows; send it dense")
        if chunk.offset:
            raise InvalidArgument(f"{what}: a row-sparse chunk's offset must be 0, got "
                                  f"{chunk.offset}")
        if self.received[i] or (self.seen[i] and i not in self._row_lists):
            raise InvalidArgument(f"{what}: sent both dense and row-sparse; send it one way")
        assert chunk.rows is not None
        index_bytes = len(chunk.rows)
        if index_bytes % ROW_INDEX.itemsize:
            raise InvalidArgument(f"{what}: {index_bytes} bytes of row indices is not a "
                                  f"whole number of int64 indices (8 bytes each)")
        rows = np.frombuffer(chunk.rows, dtype=ROW_INDEX)
        n_rows = int(t.shape[0])
        width = int(t.numel) // n_rows if n_rows else 0
        count = len(rows) * width
        if len(chunk.data) != count * itemsize:
            raise InvalidArgument(
                f"{what}: {len(chunk.data)} bytes of values for {len(rows)} rows; expected "
                f"{count * itemsize} ({width} {chunk.datatype} elements per row, shape "
                f"{list(t.shape)})")
        if len(rows) and (int(rows.min()) < 0 or int(rows.max()) >= n_rows):
            bad = int(rows[(rows < 0) | (rows >= n_rows)][0])
            raise InvalidArgument(f"{what}: row {bad} is out of range; expected rows in "
                                  f"[0, {n_rows})")
        if i not in self._row_lists:
            self._row_lists[i] = []
            if not self.lazy:
                self.out[self.layout.span(i)] = 0
        if len(rows):
            values = np.empty(count, dtype=self.out.dtype)
            self.sumsq[i] += decode_into(values, chunk.data, chunk.datatype)
            lo = int(self.layout.offsets[i])
            block = self.out[lo:lo + t.numel].reshape(n_rows, width)
            block[rows] = values.reshape(len(rows), width)
            self._row_lists[i].append(rows.astype(np.int64))
        self.seen[i] = True
        self.bytes += len(chunk.data) + index_bytes
        lo = int(self.layout.offsets[i])
        return i, lo, lo + t.numel

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
        if chunk.rows is not None:
            return self._add_rows(i, chunk, itemsize)
        if i in self._row_lists:
            raise InvalidArgument(f"tensor {shown(chunk.name)}: sent both dense and "
                                  "row-sparse; send it one way")
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
        for k, parts in self._row_lists.items():
            sent[k] = True
            rows = np.sort(np.concatenate(parts)) if parts else np.zeros(0, np.int64)
            repeated = rows[1:][np.diff(rows) == 0]
            if len(repeated):
                raise InvalidArgument(
                    f"tensor {shown(self.layout.tensors[k].name)}: row {int(repeated[0])} is "
                    "sent twice; sum the values of a row into one (torch's coalesce())")
            self._rows[k] = rows
        if not self.seen.any():
            raise InvalidArgument("the request carries no gradient tensors")
        incomplete = sent & (self.received != numel)
        for k in self._row_lists:
            incomplete[k] = False
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


def lazy(opt: FlatOptimizer) -> bool:
    """Whether the session's algorithm reads only the rows a row-sparse gradient sent
    (SparseAdam): then the engine is given the rows, and the other rows keep their
    moments."""
    return opt.algorithm is Algorithm.SPARSE_ADAM


Rows = Sequence[npt.NDArray[np.int64] | None]


def _index(layout: Layout, name: str) -> int:
    try:
        return layout.index(name)
    except KeyError:
        raise InvalidArgument(f"tensor {shown(name)} is not in this session") from None


def _row_block(host: npt.NDArray[Any], layout: Layout, i: int) -> npt.NDArray[Any]:
    t = layout.tensors[i]
    return host[layout.span(i)].reshape(t.shape[0], math.prod(t.shape[1:]))


def _row_chunk(name: str, shape: tuple[int, ...], datatype: str, values: npt.NDArray[Any],
               rows: npt.NDArray[np.int64]) -> TensorChunk:
    return TensorChunk(name, shape, datatype, encode_buffer(values, datatype),
                       rows=rows.astype(ROW_INDEX).tobytes())


def encode_params(opt: FlatOptimizer, names: Sequence[str] | None, datatype: str,
                  rows: Rows | None = None) -> list[TensorChunk]:
    """The parameters of the tensors ``names`` (None or empty: all), as ``datatype``;
    ``rows`` (per tensor of the session, None: whole): the tensors that have rows
    there are sent as those rows only (row-sparse chunks)."""
    layout = opt.layout
    idx = [_index(layout, n) for n in names] if names else list(range(len(layout)))
    host = opt.backend.to_host(opt.param)
    out = []
    for i in idx:
        t = layout.tensors[i]
        picked = rows[i] if rows is not None else None
        if picked is not None:
            out.append(_row_chunk(t.name, t.shape, datatype,
                                  _row_block(host, layout, i)[picked], picked))
            continue
        # a buffer of its own: the values of now, however the session changes later
        out.append(TensorChunk(t.name, t.shape, datatype,
                               encode_buffer(host[layout.span(i)], datatype)))
    return out


def select_rows(params: Sequence[TensorChunk], layout: Layout,
                rows: Rows) -> list[TensorChunk]:
    """Whole-tensor parameter chunks (a round's answer) cut down to ``rows`` (per tensor
    of the session, None: whole)."""
    out = []
    for c in params:
        i = layout.index(c.name)
        picked = rows[i]
        if picked is None or c.rows is not None:
            out.append(c)
            continue
        values = np.frombuffer(c.data, dtype=WIRE_DTYPES[c.datatype]).reshape(
            c.shape[0], math.prod(c.shape[1:]))
        out.append(TensorChunk(c.name, c.shape, c.datatype, values[picked].tobytes(),
                               rows=picked.astype(ROW_INDEX).tobytes()))
    return out


def parse_rows(layout: Layout, selections: Sequence[tuple[str, bytes | memoryview]]
               ) -> list[tuple[int, npt.NDArray[np.int64]]]:
    """Pull's row selections, checked: (tensor index, rows) each. A tensor's rows are
    distinct and it is named once, so the answer is never larger than the session."""
    out = []
    named: set[int] = set()
    for name, raw in selections:
        i = _index(layout, name)
        t = layout.tensors[i]
        what = f"rows of tensor {shown(name)}"
        if i in named:
            raise InvalidArgument(f"{what}: the tensor is named twice; ask for its rows once")
        named.add(i)
        if not t.shape:
            raise InvalidArgument(f"{what}: a scalar has no rows; pull it whole")
        if len(raw) % ROW_INDEX.itemsize:
            raise InvalidArgument(f"{what}: {len(raw)} bytes is not a whole number of int64 "
                                  "indices (8 bytes each)")
        picked = np.frombuffer(raw, dtype=ROW_INDEX).astype(np.int64)
        bad = picked[(picked < 0) | (picked >= t.shape[0])]
        if len(bad):
            raise InvalidArgument(f"{what}: row {int(bad[0])} is out of range; expected rows "
                                  f"in [0, {t.shape[0]})")
        ordered = np.sort(picked)
        repeated = ordered[1:][np.diff(ordered) == 0]
        if len(repeated):
            raise InvalidArgument(f"{what}: row {int(repeated[0])} is asked for twice; ask "
                                  "for each row once")
        out.append((i, picked))
    return out


def encode_rows(opt: FlatOptimizer, picked: Sequence[tuple[int, npt.NDArray[np.int64]]],
                datatype: str) -> list[TensorChunk]:
    """The rows ``picked`` (from :func:`parse_rows`) of the session's parameters."""
    host = opt.backend.to_host(opt.param)
    layout = opt.layout
    return [_row_chunk(layout.tensors[i].name, layout.tensors[i].shape, datatype,
                       _row_block(host, layout, i)[rows], rows) for i, rows in picked]
