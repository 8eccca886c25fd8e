"""How a sharded session's tensors lie across its shards: the plan, and cutting whole
tensors into the shards' pieces and joining them back.

The model's tensors, in order, form one flat key space that is cut into N
contiguous ranges of about equal size. A tensor that crosses a cut stays whole on
one shard when it is small; one of ``split_elements`` or more is split (as ps-lite
and BytePS split large keys). A piece of a split tensor is a 1-D tensor named
``<name>#<start>:<end>:<shape>``, so the plan can be rebuilt from the shards'
sessions alone (:func:`plan_from_sessions`); :attr:`ShardPlan.digest` names the
whole layout, and every shard session carries it in its labels.

A tensor cut only between its rows (``plan_shards(rows=...)``: a lazy algorithm's,
SparseAdam's) keeps its row shape in each piece, ``(rows, *shape[1:])``: a
row-sparse gradient of it goes to each shard as the rows that shard holds, renumbered
from the piece's first row. Elsewhere a row-sparse gradient is sent dense to the
pieces whose cuts fall inside a row (the rows not sent are zero).
"""

from __future__ import annotations

import hashlib
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from adamserve_client import tensors
from adamserve_client.transports.base import SessionInfo, TensorSpec, WireTensor

__all__ = ["DEFAULT_SPLIT_ELEMENTS", "Piece", "ShardPlan", "by_rows", "dense_pieces", "join",
           "plan_from_sessions", "plan_shards", "split"]

DEFAULT_SPLIT_ELEMENTS = 1 << 20
_PIECE = re.compile(r"(?P<name>.+)#(?P<start>\d+):(?P<end>\d+):(?P<shape>[\d,]*)")


@dataclass(frozen=True)
class Piece:
    """Elements ``[start, end)`` of model tensor ``parent`` (an index), held by a shard."""

    parent: int
    start: int
    end: int
    spec: TensorSpec  # as the shard's session declares it


@dataclass(frozen=True)
class ShardPlan:
    """Which pieces of the model's tensors each shard holds, in flat order."""

    tensors: tuple[TensorSpec, ...]
    shards: tuple[tuple[Piece, ...], ...]

    @property
    def digest(self) -> str:
        h = hashlib.sha256()
        for shard in self.shards:
            h.update(b"|")
            for p in shard:
                h.update(f"{p.spec.name}:{list(p.spec.shape)}:{p.spec.group};".encode())
        return h.hexdigest()[:16]

    def numel(self, parent: int) -> int:
        return math.prod(self.tensors[parent].shape)


def _piece(parent: int, spec: TensorSpec, start: int, end: int, by_rows: bool = False) -> Piece:
    numel = math.prod(spec.shape)
    if start == 0 and end == numel:
        return Piece(parent, start, end, spec)
    shape = ",".join(str(d) for d in spec.shape)
    width = _width(spec.shape)
    held = ((end - start) // width, *spec.shape[1:]) if by_rows else (end - start,)
    return Piece(parent, start, end,
                 TensorSpec(f"{spec.name}#{start}:{end}:{shape}", held, spec.group))


def _width(shape: Sequence[int]) -> int:
    """Elements per row (a slice along the first dim); 1 for a scalar."""
    return math.prod(shape[1:]) if shape else 1


def plan_shards(specs: Sequence[TensorSpec], shards: int,
                split_elements: int = DEFAULT_SPLIT_ELEMENTS,
                whole: Callable[[TensorSpec], bool] | None = None,
                rows: Callable[[TensorSpec], bool] | None = None) -> ShardPlan:
    """Cut the flat key space of ``specs`` into ``shards`` ranges of about equal size;
    a tensor for which ``whole`` holds is never split (Adafactor's and Muon's, whose
    steps need the whole tensor), one for which ``rows`` holds only between rows
    (SparseAdam's: each shard steps whole rows)."""
    if shards < 1:
        raise ValueError(f"shards: expected at least 1, got {shards}")
    for t in specs:
        if _PIECE.fullmatch(t.name):
            raise ValueError(f"tensor {t.name!r}: names of the form <name>#<start>:<end>:"
                             "<shape> are reserved for the pieces of split tensors")
    total = sum(math.prod(t.shape) for t in specs)
    target = max(1, -(-total // shards))
    out: list[list[Piece]] = [[] for _ in range(shards)]
    s, fill = 0, 0
    for j, t in enumerate(specs):
        n = math.prod(t.shape)
        cut = split_elements if whole is None or not whole(t) else n + 1  # n < cut: whole
        by_rows = rows is not None and len(t.shape) >= 2 and rows(t)
        unit = _width(t.shape) if by_rows else 1  # cuts fall on multiples of it
        start = 0
        while True:
            room = target - fill
            rest = n - start
            if s < shards - 1 and (room <= 0 or (
                    n < cut and fill > 0 and rest - room > room)):
                s, fill = s + 1, 0  # full, or a whole tensor overflows more than it fits
                continue
            if s == shards - 1 or rest <= room or n < cut or (unit > 1 and room < unit):
                if unit > 1 and rest > room and s < shards - 1 and fill > 0:
                    s, fill = s + 1, 0  # not a whole row's room left here
                    continue
                out[s].append(_piece(j, t, start, n, by_rows))
                fill += rest
                break
            room -= room % unit
            out[s].append(_piece(j, t, start, start + room, by_rows))
            start += room
            s, fill = s + 1, 0
    empty = [i for i, shard in enumerate(out) if not shard]
    if empty:
        raise ValueError(
            f"the model's {len(specs)} tensors ({total} elements) leave shard(s) "
            f"{', '.join(map(str, empty))} of {shards} empty: use fewer shards or a smaller "
            "split_elements")
    return ShardPlan(tuple(specs), tuple(tuple(shard) for shard in out))


def plan_from_sessions(infos: Sequence[SessionInfo]) -> ShardPlan:
    """The plan of an existing sharded session, from its shards' descriptions."""
    parents: list[TensorSpec] = []
    index: dict[str, int] = {}
    covered: list[int] = []
    shards: list[tuple[Piece, ...]] = []
    for info in infos:
        pieces = []
        for t in info.tensors:
            m = _PIECE.fullmatch(t.name)
            if m is None:
                name, shape, start, end = t.name, t.shape, 0, math.prod(t.shape)
            else:
                name = m["name"]
                shape = tuple(int(d) for d in m["shape"].split(",") if d)
                start, end = int(m["start"]), int(m["end"])
            if name not in index:
                index[name] = len(parents)
                parents.append(TensorSpec(name, shape, t.group))
                covered.append(0)
            j = index[name]
            if start != covered[j]:
                raise ValueError(f"session {info.session_id!r}: tensor {name!r} is not split "
                                 "into consecutive pieces across the shards given (are the "
                                 "servers listed in their shard order?)")
            covered[j] = end
            pieces.append(Piece(j, start, end, t))
        shards.append(tuple(pieces))
    for j, t in enumerate(parents):
        if covered[j] != math.prod(t.shape):
            raise ValueError(f"tensor {t.name!r}: the shards hold elements [0, {covered[j]}) of "
                             f"{math.prod(t.shape)}; a shard is missing")
    return ShardPlan(tuple(parents), tuple(shards))


def by_rows(plan: ShardPlan, p: Piece) -> bool:
    """Whether piece ``p`` holds whole rows of its tensor, in their row shape."""
    parent = plan.tensors[p.parent].shape
    return bool(parent) and p.spec.shape[1:] == parent[1:] and (
        p.start % _width(parent) == 0)


def split(plan: ShardPlan, values: Sequence[WireTensor]) -> list[list[WireTensor]]:
    """Per shard, the pieces of ``values`` (whole model tensors, or row-sparse ones) it
    holds."""
    by_name = {w.name: w for w in values}
    unknown = sorted(set(by_name) - {t.name for t in plan.tensors})
    if unknown:
        raise ValueError(f"tensors not in the sharded session: {', '.join(unknown)}")
    out: list[list[WireTensor]] = []
    for shard in plan.shards:
        pieces = []
        for p in shard:
            w = by_name.get(plan.tensors[p.parent].name)
            if w is None:
                continue
            if w.rows is not None:
                pieces.append(_rows_piece(plan, p, w))
                continue
            size = tensors.itemsize(w.datatype)
            view = memoryview(w.data).cast("B")[p.start * size:p.end * size]
            pieces.append(WireTensor(p.spec.name, p.spec.shape, w.datatype, view))
        out.append(pieces)
    return out


def _rows_piece(plan: ShardPlan, p: Piece, w: WireTensor) -> WireTensor:
    """The part of row-sparse ``w`` piece ``p`` holds: its rows, renumbered from the
    piece's first (or, where the piece's cuts fall inside rows, its elements dense)."""
    width = _width(w.shape)
    size = tensors.itemsize(w.datatype)
    rows = np.frombuffer(w.rows, dtype="<i8") if w.rows is not None else np.zeros(0, "<i8")
    values = np.frombuffer(w.data, dtype=np.uint8).reshape(len(rows), width * size)
    if p.start == 0 and p.end == plan.numel(p.parent):
        return WireTensor(p.spec.name, p.spec.shape, w.datatype, w.data, w.rows)
    if by_rows(plan, p):
        lo, hi = p.start // width, p.end // width
        mine = (rows >= lo) & (rows < hi)
        return WireTensor(p.spec.name, p.spec.shape, w.datatype, values[mine].tobytes(),
                          (rows[mine] - lo).astype("<i8").tobytes())
    dense = np.zeros((plan.numel(p.parent) // width if width else 0, width * size), np.uint8)
    dense[rows] = values
    flat = dense.reshape(-1)[p.start * size:p.end * size]
    return WireTensor(p.spec.name, p.spec.shape, w.datatype, flat.tobytes())


def dense_pieces(plan: ShardPlan, values: Sequence[WireTensor]) -> bool:
    """Whether a row-sparse tensor of ``values`` goes dense to some piece (a cut inside
    its rows): the step then returns those pieces whole."""
    sparse = {w.name for w in values if w.rows is not None}
    return any(plan.tensors[p.parent].name in sparse and not by_rows(plan, p)
               and not (p.start == 0 and p.end == plan.numel(p.parent))
               for shard in plan.shards for p in shard)


def join(plan: ShardPlan, parts: Sequence[Sequence[WireTensor]]) -> list[WireTensor]:
    """Whole model tensors from the pieces the shards returned, in model order."""
    owner: dict[str, Piece] = {p.spec.name: p for shard in plan.shards for p in shard}
    pieces: dict[int, list[tuple[Piece, WireTensor]]] = {}
    for part in parts:
        for w in part:
            p = owner[w.name]
            pieces.setdefault(p.parent, []).append((p, w))
    out = []
    for j in sorted(pieces):
        spec = plan.tensors[j]
        got = pieces[j]
        if any(w.rows is not None for _, w in got):
            out.append(_join_rows(spec, got))
            continue
        if len(got) == 1 and got[0][0].start == 0 and got[0][0].end == plan.numel(j):
            w = got[0][1]
            out.append(WireTensor(spec.name, spec.shape, w.datatype, w.data))
            continue
        datatype = got[0][1].datatype
        size = tensors.itemsize(datatype)
        buf = bytearray(plan.numel(j) * size)
        for p, w in got:
            buf[p.start * size:p.end * size] = memoryview(w.data).cast("B")
        out.append(WireTensor(spec.name, spec.shape, datatype, buf))
    return out


def _join_rows(spec: TensorSpec, got: Sequence[tuple[Piece, WireTensor]]) -> WireTensor:
    """One row-sparse model tensor from its pieces' row-sparse answers."""
    if not all(w.rows is not None for _, w in got):
        raise ValueError(f"tensor {spec.name!r}: the shards answered some pieces whole and "
                         "some as rows")
    width = _width(spec.shape)
    rows = [np.frombuffer(w.rows, dtype="<i8") + p.start // width
            for p, w in got if w.rows is not None]
    return WireTensor(spec.name, spec.shape, got[0][1].datatype,
                      b"".join(bytes(w.data) for _, w in got),
                      np.concatenate(rows).astype("<i8").tobytes() if rows else b"")
