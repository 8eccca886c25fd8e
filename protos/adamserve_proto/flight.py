"""Tensors as Arrow record batches: the layout both sides of the Flight data plane use.

A stream of tensors (a step's gradients, the parameters a step or a pull returns,
a create's initial values) is record batches of one schema::

    tensor: utf8                  the tensor's name
    shape:  list<int64>           its shape (as the session declares it)
    offset: int64                 the index of the row's first element in the
                                  flattened tensor
    data:   list<T>               the row's elements, T by the datatype:
                                  FP32 float32, FP64 float64, FP16 float16,
                                  BF16 uint16 (the bfloat16 bits)

and, in a stream that carries row-sparse tensors (a step's row-sparse gradients,
the rows a step or pull returns), a fifth column::

    rows:   list<int64>           null: the row is a chunk as above; else the
                                  tensor's rows (along its first dim) that
                                  ``data`` holds, row after row (offset 0)

with the schema metadata ``datatype`` naming the datatype (FP32, FP64, FP16,
BF16). Each row is one chunk of one tensor, as a v2 ``TensorChunk``: the rows of
a tensor come in order (offset 0, then where the previous row ended), each
element once. No column but ``rows`` holds nulls. Large tensors go one row per batch, the
row's values a view of the tensor's memory (no copy); small tensors share a
batch (copied together), so a model of many small tensors costs few messages.

Readers take each row's values as a view of the received Arrow buffer:
:func:`rows` yields them, checked against the schema, as memoryviews.

pyarrow is imported here: only Flight code imports this module.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa

from adamserve_proto import codec

__all__ = ["ARROW_TYPES", "BATCH_BYTES", "Row", "batches", "datatype_of", "rows", "schema"]

MiB = 1 << 20
# The most data bytes one record batch carries (one gRPC message each).
BATCH_BYTES = 4 * MiB
# Tensors smaller than this share a batch (their bytes copied together).
_PACK_BYTES = 256 << 10

# datatype -> the Arrow type of the data column's values
ARROW_TYPES: dict[str, pa.DataType] = {
    "FP32": pa.float32(),
    "FP64": pa.float64(),
    "FP16": pa.float16(),
    "BF16": pa.uint16(),
}
_COLUMNS = ("tensor", "shape", "offset", "data")
_ROWS = "rows"


def schema(datatype: str, rows: bool = False) -> pa.Schema:
    """The schema of a stream of tensors of ``datatype`` (``rows``: with row-sparse
    tensors among them)."""
    fields = [("tensor", pa.utf8()), ("shape", pa.list_(pa.int64())),
              ("offset", pa.int64()), ("data", pa.list_(ARROW_TYPES[datatype]))]
    if rows:
        fields.append((_ROWS, pa.list_(pa.int64())))
    return pa.schema(fields, metadata={"datatype": datatype})


def datatype_of(s: pa.Schema) -> str:
    """The datatype of a stream of tensors; ValueError naming what differs from the
    layout above."""
    meta = s.metadata or {}
    datatype: str = meta.get(b"datatype", b"").decode("utf-8", "replace")
    if datatype not in ARROW_TYPES:
        raise ValueError(f"record batch schema: metadata 'datatype' is {datatype!r}; expected "
                         f"one of {', '.join(ARROW_TYPES)}")
    want = schema(datatype, rows=len(s.names) == len(_COLUMNS) + 1)
    if tuple(s.names)[:4] != _COLUMNS or not s.equals(want, check_metadata=False):
        got = ", ".join(f"{f.name}: {f.type}" for f in s)
        raise ValueError(f"record batch schema ({got}) for {datatype}: expected tensor: string, "
                         f"shape: list<int64>, offset: int64, data: list<{ARROW_TYPES[datatype]}>"
                         " (and, with row-sparse tensors, rows: list<int64>)")
    return datatype


@dataclass(frozen=True)
class Row:
    """One chunk of one tensor, its values a view of the batch's buffer."""

    name: str
    shape: tuple[int, ...]
    offset: int
    data: memoryview
    rows: memoryview | None = None  # row-sparse: the rows' indices, int64 little-endian


def rows(batch: pa.RecordBatch, datatype: str) -> Iterator[Row]:
    """The chunks a batch (of :func:`schema` ``datatype``) carries; ValueError for nulls
    and for buffers and offsets that do not hold together (a batch from the wire is
    checked in full before any offset in it is read)."""
    try:
        batch.validate(full=True)
    except pa.ArrowInvalid as exc:
        raise ValueError(f"record batch: {str(exc).splitlines()[0]}") from None
    for name, col in zip(batch.schema.names, batch.columns, strict=True):
        if (col.null_count and name != _ROWS) or (
                isinstance(col, pa.ListArray) and col.values.null_count):
            raise ValueError("record batch: null values; no column but rows holds nulls")
    row_ids = _row_ids(batch.column(4)) if batch.num_columns > 4 else None
    names = batch.column(0).to_pylist()
    shapes = batch.column(1)
    offsets = batch.column(2).to_numpy()
    data = batch.column(3)
    itemsize = codec.itemsize(datatype)
    starts = data.offsets.to_numpy()
    values = data.values
    buf = values.buffers()[1]
    view = memoryview(buf).cast("B") if buf is not None else memoryview(b"")
    base = values.offset * itemsize
    for i, name in enumerate(names):
        lo, hi = base + int(starts[i]) * itemsize, base + int(starts[i + 1]) * itemsize
        shape = tuple(int(d) for d in shapes[i].values.to_numpy())
        yield Row(name, shape, int(offsets[i]), view[lo:hi],
                  None if row_ids is None else row_ids[i])


def _row_ids(col: pa.ListArray) -> list[memoryview | None]:
    """The rows column: per row, its row indices' bytes (None where null: dense)."""
    starts = col.offsets.to_numpy()
    buf = col.values.buffers()[1]
    view = memoryview(buf).cast("B") if buf is not None else memoryview(b"")
    base = col.values.offset * 8
    valid = col.is_valid().to_numpy(zero_copy_only=False)
    return [view[base + int(starts[i]) * 8:base + int(starts[i + 1]) * 8] if valid[i] else None
            for i in range(len(col))]


def _list(values: pa.Array, lengths: Iterable[int]) -> pa.ListArray:
    ends = np.cumsum([0, *lengths], dtype=np.int32)
    return pa.ListArray.from_arrays(pa.array(ends, pa.int32()), values)


def _values(datatype: str, data: Any, count: int) -> pa.Array:
    """A primitive array over ``data``'s bytes (a view, not a copy)."""
    return pa.Array.from_buffers(ARROW_TYPES[datatype], count, [None, pa.py_buffer(data)])


_Part = tuple[str, tuple[int, ...], int, Any, int, Any]  # ..., count, row ids or None


def _batch(datatype: str, parts: list[_Part], with_rows: bool) -> pa.RecordBatch:
    """One batch of rows (name, shape, offset, data, count, row ids); one part: no copy."""
    data = parts[0][3] if len(parts) == 1 else b"".join(bytes(p[3]) for p in parts)
    counts = [p[4] for p in parts]
    values = _values(datatype, data, sum(counts))
    shapes = pa.ListArray.from_arrays(
        pa.array(np.cumsum([0, *(len(p[1]) for p in parts)], dtype=np.int32), pa.int32()),
        pa.array([d for p in parts for d in p[1]], pa.int64()))
    columns = [pa.array([p[0] for p in parts], pa.utf8()), shapes,
               pa.array([p[2] for p in parts], pa.int64()), _list(values, counts)]
    if with_rows:
        ids = [np.frombuffer(p[5], dtype="<i8") if p[5] is not None else None for p in parts]
        columns.append(pa.array([None if r is None else r for r in ids],
                                pa.list_(pa.int64())))
    return pa.record_batch(columns, schema=schema(datatype, with_rows))


def batches(tensors: Iterable[tuple[str, tuple[int, ...], Any, int]
                              | tuple[str, tuple[int, ...], Any, int, Any]], datatype: str,
            max_bytes: int = BATCH_BYTES, rows: bool = False) -> Iterator[pa.RecordBatch]:
    """Record batches carrying ``tensors`` (name, shape, bytes of ``datatype``, offset of
    its first element, and, with ``rows``, the row ids of a row-sparse tensor or None):
    large tensors split into rows of at most ``max_bytes`` (a row-sparse one, of whole
    rows), one per batch and not copied; small ones packed together."""
    itemsize = codec.itemsize(datatype)
    pending: list[_Part] = []
    pending_bytes = 0
    for t in tensors:
        name, shape, data, offset = t[:4]
        ids = t[4] if len(t) > 4 else None
        if ids is not None and not rows:
            raise ValueError(f"tensor {name!r} is row-sparse: the stream needs rows=True")
        view = memoryview(data).cast("B")
        nbytes = view.nbytes
        if nbytes % itemsize:
            raise ValueError(f"tensor {name!r}: {nbytes} bytes is not a whole number of "
                             f"{datatype} elements")
        count = nbytes // itemsize
        if nbytes < _PACK_BYTES:
            if pending and pending_bytes + nbytes > max_bytes:
                yield _batch(datatype, pending, rows)
                pending, pending_bytes = [], 0
            pending.append((name, shape, offset, view, count, ids))
            pending_bytes += nbytes
            continue
        # a row-sparse tensor is cut between its rows (each part with its rows' ids)
        unit = 1 if ids is None else max(1, math.prod(shape[1:]))
        per = max(1, max_bytes // (itemsize * unit)) * unit
        for lo in range(0, count, per):
            hi = min(count, lo + per)
            part_ids = None if ids is None else memoryview(ids).cast("B")[
                lo // unit * 8:hi // unit * 8]
            yield _batch(datatype, [(name, shape, offset + lo,
                                     view[lo * itemsize:hi * itemsize], hi - lo, part_ids)],
                         rows)
    if pending:
        yield _batch(datatype, pending, rows)
