"""Durable checkpoints: safetensors for the flat buffers, a JSON manifest for the rest.

Layout under ``<data_dir>/sessions/<session id>/``::

    ckpt-000000001200-<ns>/tensors.safetensors   param, slot.<name> (flat, state dtype)
    ckpt-000000001200-<ns>/manifest.json         config, hyperparameters, step counts, digests
    LATEST                                       name of the newest complete checkpoint

A checkpoint is built in a ``.tmp-*`` directory; its files are fsynced, the
directory is renamed into place and the parent fsynced; only then is LATEST
replaced (temp file, fsync, rename, fsync). A crash at any point leaves either the
old or the new checkpoint readable; ``.tmp-*`` leftovers are swept at start.
Nothing is ever unpickled: safetensors and JSON only.

Integrity (manifest version 2): ``sha256`` is the tensors file's digest and
``manifest_sha256`` the digest of the manifest's canonical JSON (sorted keys, no spaces)
without that field, so it covers every value (step_count, lr, ...) and the tensors'
digest with them. Loading refuses a checkpoint whose digests do not match and falls
back to the newest whole one. Version-1 manifests (written before the manifest was
covered) still load, their tensors checked as before: refusing them would lose every
session of an upgraded server, and accepting them is no worse than it was. The digests
catch damage and stray edits, not forgery: whoever can write the data directory can
recompute them, or write a version-1 manifest.

Failing disks: every OSError of the files (permissions, a read-only, full or failing
disk) is raised as :class:`~adamserve.errors.Unavailable` (DATA_DIR_UNAVAILABLE),
naming what failed by its path relative to the data directory (never the absolute one,
as replies do). An operation that fails leaves the files as they were (what it had begun
is removed or put back), so its caller changes nothing in memory. A delete renames the
session's directory aside first (:meth:`CheckpointStore.set_aside`): once that
succeeded no restart brings the session back, whatever happens to the removal.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import os
import shutil
import stat
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from safetensors.numpy import load as st_load
from safetensors.numpy import save as st_save

from adamserve.engine import algorithms as alg
from adamserve.engine.backend import Backend
from adamserve.engine.optimizer import FlatOptimizer
from adamserve.engine.schedules import MAX_STEPS
from adamserve.errors import Unavailable, shown
from adamserve.sessions import meta
from adamserve.sessions.pushlog import PushLog
from adamserve.sessions.session import Session, SessionConfig, build_optimizer

log = logging.getLogger("adamserve.checkpoints")

FORMAT = "adamserve-checkpoint"
VERSION = 2  # 2: manifest_sha256 covers the manifest
READABLE = (1, 2)  # 1: the tensors' sha256 only (see the module docstring)


@dataclass(frozen=True)
class CheckpointInfo:
    session_id: str
    step: int
    path: str  # relative to the data directory
    bytes: int


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_file(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _remove(path: Path) -> None:
    """Remove a file or a directory tree; one that is gone already is fine."""
    try:
        if stat.S_ISDIR(path.lstat().st_mode):
            shutil.rmtree(path)
        else:
            path.unlink()
    except (FileNotFoundError, NotADirectoryError):  # gone, or its directory is
        pass


def _entries(path: Path, prefix: str) -> list[Path]:
    """``path``'s entries named ``prefix*`` (none if it does not exist). Unlike glob,
    a directory that cannot be read raises instead of looking empty."""
    try:
        with os.scandir(path) as it:
            return [path / e.name for e in it if e.name.startswith(prefix)]
    except FileNotFoundError:
        return []


def manifest_digest(manifest: dict[str, Any]) -> str:
    """The sha256 of ``manifest``'s canonical JSON, without ``manifest_sha256`` itself."""
    body = {k: v for k, v in manifest.items() if k != "manifest_sha256"}
    text = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(text.encode()).hexdigest()


def manifest_of(session: Session) -> dict[str, Any]:
    opt = session.opt
    cfg = session.config.to_json()
    cfg["groups"] = [alg.with_none(g) for g in opt.groups]  # None, not NaN, in the JSON
    cfg["schedule"] = opt.schedule.to_dict() if opt.schedule is not None else None
    return {
        "format": FORMAT,
        "version": VERSION,
        "session_id": session.id,
        "config": cfg,
        "step_count": opt.step_count,
        "seg_step": [int(x) for x in opt.seg_step],
        "mu_product": [float(x) for x in opt.mu_product],
        "pushes": session.pushes.to_json(),
        "created": time.time(),
    }


def tensors_of(opt: FlatOptimizer) -> dict[str, np.ndarray[Any, Any]]:
    out = {"param": np.ascontiguousarray(opt.backend.to_host(opt.param))}
    for name in opt.slots:  # as stored: narrow moments keep their codes and scales
        for part, arr in opt.slot_native(name).items():
            out[f"slot.{name}" + (f".{part}" if part else "")] = arr
    return out


class CheckpointStore:
    def __init__(self, data_dir: str | os.PathLike[str], keep: int = 3) -> None:
        self.data_dir = Path(data_dir)
        self.root = self.data_dir / "sessions"
        self.root.mkdir(parents=True, exist_ok=True)
        self.keep = max(1, keep)

    def session_dir(self, session_id: str) -> Path:
        return self.root / session_id

    # -- failures -------------------------------------------------------------------

    def relative(self, path: str | os.PathLike[str]) -> str:
        """``path`` as replies and messages name it: relative to the data directory."""
        try:
            return Path(path).relative_to(self.data_dir).as_posix()
        except ValueError:
            return Path(path).name

    def _unavailable(self, exc: OSError, doing: str, session_id: str, *,
                     writing: bool = True) -> Unavailable:
        """``exc`` as the client sees it: what failed, where (relative), and why."""
        where = f"{self.relative(exc.filename)}: " if exc.filename else ""
        code = errno.errorcode.get(exc.errno or 0, str(exc.errno))
        return Unavailable(
            f"data directory not {'writable' if writing else 'readable'}: {doing} "
            f"({where}{exc.strerror or code})", reason="DATA_DIR_UNAVAILABLE",
            metadata=meta(session_id, errno=code))

    @contextlib.contextmanager
    def _disk(self, doing: str, session_id: str, *, writing: bool = True) -> Iterator[None]:
        """OSErrors in the block, as :meth:`_unavailable`."""
        try:
            yield
        except OSError as exc:
            raise self._unavailable(exc, doing, session_id, writing=writing) from exc

    def _discard(self, path: Path) -> None:
        """Remove what a failed or finished operation leaves; a failure is only logged
        (``.tmp-*`` names are swept at start, other leftovers are harmless)."""
        try:
            _remove(path)
        except OSError as exc:
            log.warning("could not remove %s (%s); it stays on disk", self.relative(path),
                        exc.strerror)

    # -- writing --------------------------------------------------------------------

    def write(self, session: Session) -> CheckpointInfo:
        """Write a checkpoint of ``session`` (caller holds its lock); durable on return.
        Unavailable if the disk refuses, with nothing of this write left behind."""
        sdir = self.session_dir(session.id)
        step = session.opt.step_count
        # unique per write: a second checkpoint of the same step never replaces the first
        name = f"ckpt-{step:012d}-{time.time_ns():020d}"
        blob = st_save(tensors_of(session.opt))
        manifest = manifest_of(session)
        manifest["sha256"] = hashlib.sha256(blob).hexdigest()
        manifest["tensors_bytes"] = len(blob)
        # the digest of what a load will parse (JSON turns tuples into lists, keys into str)
        manifest["manifest_sha256"] = manifest_digest(json.loads(json.dumps(manifest)))
        final = sdir / name
        tmp = sdir / f".tmp-{name}-{os.getpid()}-{time.monotonic_ns()}"
        made_dir = False
        with self._disk(f"writing the checkpoint of session {session.id!r} at step {step}",
                        session.id):
            try:
                if not sdir.exists():
                    sdir.mkdir(parents=True)
                    made_dir = True
                    _fsync_dir(self.root)  # the new session directory must survive a crash
                tmp.mkdir()
                _write_file(tmp / "tensors.safetensors", blob)
                _write_file(tmp / "manifest.json", json.dumps(manifest, indent=1).encode())
                _fsync_dir(tmp)
                tmp.rename(final)
                _fsync_dir(sdir)
                self._point_latest(sdir, name)
            except OSError:
                for leftover in (tmp, final):
                    self._discard(leftover)
                if made_dir:
                    with contextlib.suppress(OSError):
                        sdir.rmdir()
                raise
        self._prune(sdir, keep_name=name)
        return CheckpointInfo(session.id, step, self.relative(final), len(blob))

    @staticmethod
    def _point_latest(sdir: Path, name: str) -> None:
        latest_tmp = sdir / f".tmp-LATEST-{time.monotonic_ns()}"
        try:
            _write_file(latest_tmp, name.encode())
            latest_tmp.rename(sdir / "LATEST")
        except OSError:
            with contextlib.suppress(OSError):
                latest_tmp.unlink(missing_ok=True)
            raise
        _fsync_dir(sdir)

    def _prune(self, sdir: Path, keep_name: str) -> None:
        """Past ``keep`` checkpoints, the oldest go. The new one is durable by now, so a
        disk that refuses is logged, not failed: the checkpoint stands, the old stay."""
        try:
            ckpts = sorted(p.name for p in _entries(sdir, "ckpt-") if p.is_dir())
        except OSError as exc:
            log.warning("could not list %s to prune it (%s)", self.relative(sdir), exc.strerror)
            return
        for old in ckpts[: max(0, len(ckpts) - self.keep)]:
            if old != keep_name:
                self._discard(sdir / old)

    # -- deleting -------------------------------------------------------------------

    def set_aside(self, session_id: str) -> Path | None:
        """The first half of a delete: rename the session's directory to a ``.tmp-*`` name
        (atomic; swept at start), so no restart restores it. Returns that name for
        :meth:`remove_aside` (None: it had none). Unavailable if the disk refuses: then
        nothing changed."""
        sdir = self.session_dir(session_id)
        aside = self.root / f".tmp-deleted-{session_id}-{time.monotonic_ns()}"
        with self._disk(f"deleting the checkpoints of session {session_id!r}", session_id):
            if not sdir.exists():
                return None
            sdir.rename(aside)
            try:
                _fsync_dir(self.root)
            except OSError:  # not known to be durable: undo, so the failure changes nothing
                with contextlib.suppress(OSError):
                    aside.rename(sdir)
                raise
        return aside

    def delete(self, session_id: str) -> None:
        """Remove the session's checkpoints at once: :meth:`set_aside`, then
        :meth:`remove_aside` (the service drops the session from memory between them)."""
        aside = self.set_aside(session_id)
        if aside is not None:
            self.remove_aside(aside)

    def remove_aside(self, aside: Path) -> None:
        """The second half of a delete (a failure is logged; the start sweeps it)."""
        self._discard(aside)

    def sweep(self) -> int:
        """Remove temporary leftovers of interrupted writes and deletes; returns how many.
        One the disk refuses stays (logged): no ``.tmp-*`` name is ever loaded."""
        n = 0
        dirs = [self.root] + [self.session_dir(sid) for sid in self.session_ids()]
        for d in dirs:
            try:
                leftovers = _entries(d, ".tmp-")
            except OSError as exc:
                log.warning("could not list %s to sweep it (%s)", self.relative(d), exc.strerror)
                continue
            for p in leftovers:
                self._discard(p)
                n += 1
        return n

    # -- reading --------------------------------------------------------------------

    def session_ids(self) -> list[str]:
        return sorted(p.name for p in self.root.iterdir()
                      if p.is_dir() and not p.name.startswith("."))

    def load(self, session_id: str, backend: Backend) -> Session | None:
        """The session from its newest complete checkpoint, or None if it has none
        (the start restores what it can: an unreadable directory is logged, not fatal)."""
        sdir = self.session_dir(session_id)
        try:
            candidates = sorted((p.name for p in _entries(sdir, "ckpt-") if p.is_dir()),
                                reverse=True)
        except OSError as exc:
            log.error("session %s: data directory not readable (%s: %s)", session_id,
                      self.relative(sdir), exc.strerror)
            return None
        try:
            name = (sdir / "LATEST").read_text().strip()
        except (OSError, UnicodeDecodeError):
            name = ""
        if name in candidates:  # normally the newest anyway
            candidates.remove(name)
            candidates.insert(0, name)
        for name in candidates:
            try:
                return self._load_dir(session_id, sdir / name, backend)
            except Exception as exc:  # any damage: fall back to an older checkpoint
                log.warning("checkpoint %s/%s unreadable (%s: %s); trying an older one",
                            session_id, name, type(exc).__name__, _reason(exc))
        return None

    def _dirs_by_step(self, session_id: str) -> dict[int, list[Path]]:
        """Complete checkpoint directories by step, newest write first."""
        out: dict[int, list[Path]] = {}
        sdir = self.session_dir(session_id)
        with self._disk(f"listing the checkpoints of session {session_id!r}", session_id,
                        writing=False):
            for p in sorted(_entries(sdir, "ckpt-"), reverse=True):
                parts = p.name.split("-")
                if len(parts) == 3 and parts[1].isdigit() and (p / "manifest.json").exists():
                    out.setdefault(int(parts[1]), []).append(p)
        return out

    def steps(self, session_id: str) -> list[int]:
        """Steps of the session's complete checkpoints, oldest first."""
        return sorted(self._dirs_by_step(session_id))

    def rewind(self, session_id: str, step: int, backend: Backend) -> Session:
        """The session from its checkpoint of ``step``, made the latest: checkpoints of
        later steps are removed (a timeline that was abandoned). Raises KeyError when no
        readable checkpoint of that step exists, Unavailable when the disk refuses to
        read it or to make it the latest (then nothing changed)."""
        by_step = self._dirs_by_step(session_id)
        unreadable: OSError | None = None
        for path in by_step.get(step, []):
            try:
                session = self._load_dir(session_id, path, backend)
            except Exception as exc:
                if isinstance(exc, OSError):
                    unreadable = exc
                log.warning("checkpoint %s unreadable (%s: %s)", self.relative(path),
                            type(exc).__name__, _reason(exc))
                continue
            later = [p for s in sorted(by_step) if s > step for p in by_step[s]]
            self._make_latest(session_id, step, path, later)
            return session
        if unreadable is not None:  # the disk's fault, not a damaged checkpoint's
            raise self._unavailable(
                unreadable, f"reading the checkpoint of session {session_id!r} at step {step}",
                session_id, writing=False) from unreadable
        raise KeyError(step)

    def _make_latest(self, session_id: str, step: int, path: Path, later: list[Path]) -> None:
        """Point LATEST at ``path`` and drop the ``later`` checkpoints, all or nothing:
        they are renamed aside first and put back if LATEST cannot be written."""
        sdir = path.parent
        aside: list[tuple[Path, Path]] = []
        with self._disk(f"restoring session {session_id!r} to its checkpoint of step {step}",
                        session_id):
            try:
                for p in later:
                    moved = sdir / f".tmp-abandoned-{p.name}-{time.monotonic_ns()}"
                    p.rename(moved)
                    aside.append((p, moved))
                self._point_latest(sdir, path.name)  # its fsync covers the renames
            except OSError:
                for p, moved in reversed(aside):
                    with contextlib.suppress(OSError):
                        moved.rename(p)
                raise
        for _, moved in aside:
            self._discard(moved)

    def _load_dir(self, session_id: str, path: Path, backend: Backend) -> Session:
        manifest = json.loads((path / "manifest.json").read_bytes())
        if not isinstance(manifest, dict):
            raise ValueError("manifest.json is not a JSON object")
        version = manifest.get("version")
        if manifest.get("format") != FORMAT or version not in READABLE:
            raise ValueError(f"not an adamserve checkpoint of version {READABLE}")
        if version >= 2 and manifest.get("manifest_sha256") != manifest_digest(manifest):
            raise ValueError("manifest.json does not match its manifest_sha256 (edited or "
                             "damaged)")
        blob = (path / "tensors.safetensors").read_bytes()
        if hashlib.sha256(blob).hexdigest() != manifest["sha256"]:
            raise ValueError("tensors.safetensors does not match the manifest's sha256")
        config = SessionConfig.from_json(manifest["config"])
        opt = build_optimizer(config, backend)
        tensors = st_load(blob)
        opt.param[...] = backend.to_device(tensors["param"])
        stored: dict[str, dict[str, np.ndarray[Any, Any]]] = {}
        for key, arr in tensors.items():
            if key.startswith("slot."):
                name, _, part = key[5:].partition(".")
                stored.setdefault(name, {})[part] = arr
        for name, parts in stored.items():
            opt.set_slot_native(name, parts)
        opt.step_count = _step(manifest["step_count"], "step_count")
        opt.seg_step[:] = np.array([_step(x, "seg_step") for x in manifest["seg_step"]],
                                   dtype=np.int64)
        opt.mu_product[:] = np.array(manifest["mu_product"], dtype=np.float64)
        session = Session(session_id, config, opt)
        session.pushes = PushLog.from_json(manifest.get("pushes", {}))
        session.checkpointed_step = opt.step_count
        return session


def _step(value: object, field: str) -> int:
    """A step count from a manifest, within what every wire carries (int64) and what
    the schedules are bounded to."""
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_STEPS:
        raise ValueError(f"manifest {field} {shown(value)}: expected an integer in "
                         f"[0, {MAX_STEPS}]")
    return value


def _reason(exc: Exception) -> str:
    """An exception for a log line; an OSError by its strerror (str() names the absolute
    path, which the log of a shared server should not need)."""
    if isinstance(exc, OSError):
        return exc.strerror or str(exc.errno)
    return str(exc)
