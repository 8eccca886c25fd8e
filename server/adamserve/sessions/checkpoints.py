"""Durable checkpoints: safetensors for the flat buffers, a JSON manifest for the rest.

Layout under ``<data_dir>/sessions/<session id>/``::

    ckpt-000000001200/tensors.safetensors   param, slot.<name> (flat, state dtype)
    ckpt-000000001200/manifest.json         config, hyperparameters, step counts, sha256
    LATEST                                  name of the newest complete checkpoint

A checkpoint is built in a ``.tmp-*`` directory; its files are fsynced, the
directory is renamed into place and the parent fsynced; only then is LATEST
replaced (temp file, fsync, rename, fsync). A crash at any point leaves either the
old or the new checkpoint readable. Loading checks the tensors' sha256 against the
manifest and falls back to the newest complete checkpoint if LATEST's is damaged.
Nothing is ever unpickled: safetensors and JSON only.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from safetensors.numpy import load as st_load
from safetensors.numpy import save as st_save

from adamserve.engine.backend import Backend
from adamserve.engine.optimizer import FlatOptimizer
from adamserve.sessions.pushlog import PushLog
from adamserve.sessions.session import Session, SessionConfig, build_optimizer

log = logging.getLogger("adamserve.checkpoints")

FORMAT = "adamserve-checkpoint"
VERSION = 1


@dataclass(frozen=True)
class CheckpointInfo:
    session_id: str
    step: int
    path: str
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


def manifest_of(session: Session) -> dict[str, Any]:
    opt = session.opt
    cfg = session.config.to_json()
    cfg["groups"] = [dict(g) for g in opt.groups]
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
    for name, buf in opt.slots.items():
        out[f"slot.{name}"] = np.ascontiguousarray(opt.backend.to_host(buf))
    return out


class CheckpointStore:
    def __init__(self, data_dir: str | os.PathLike[str], keep: int = 3) -> None:
        self.root = Path(data_dir) / "sessions"
        self.root.mkdir(parents=True, exist_ok=True)
        self.keep = max(1, keep)

    def session_dir(self, session_id: str) -> Path:
        return self.root / session_id

    def write(self, session: Session) -> CheckpointInfo:
        """Write a checkpoint of ``session`` (caller holds its lock); durable on return."""
        sdir = self.session_dir(session.id)
        if not sdir.exists():
            sdir.mkdir(parents=True)
            _fsync_dir(self.root)  # the new session directory itself must survive a crash
        step = session.opt.step_count
        # unique per write: a second checkpoint of the same step never replaces the first
        name = f"ckpt-{step:012d}-{time.time_ns():020d}"
        blob = st_save(tensors_of(session.opt))
        manifest = manifest_of(session)
        manifest["sha256"] = hashlib.sha256(blob).hexdigest()
        manifest["tensors_bytes"] = len(blob)
        tmp = sdir / f".tmp-{name}-{os.getpid()}-{time.monotonic_ns()}"
        tmp.mkdir()
        _write_file(tmp / "tensors.safetensors", blob)
        _write_file(tmp / "manifest.json", json.dumps(manifest, indent=1).encode())
        _fsync_dir(tmp)
        final = sdir / name
        tmp.rename(final)
        _fsync_dir(sdir)
        latest_tmp = sdir / f".tmp-LATEST-{time.monotonic_ns()}"
        _write_file(latest_tmp, name.encode())
        latest_tmp.rename(sdir / "LATEST")
        _fsync_dir(sdir)
        self._prune(sdir, keep_name=name)
        return CheckpointInfo(session.id, step, str(final), len(blob))

    def _prune(self, sdir: Path, keep_name: str) -> None:
        ckpts = sorted(p.name for p in sdir.glob("ckpt-*") if p.is_dir())
        for old in ckpts[: max(0, len(ckpts) - self.keep)]:
            if old != keep_name:
                shutil.rmtree(sdir / old, ignore_errors=True)

    def delete(self, session_id: str) -> None:
        sdir = self.session_dir(session_id)
        if sdir.exists():
            trash = self.root / f".tmp-deleted-{session_id}-{time.monotonic_ns()}"
            sdir.rename(trash)
            _fsync_dir(self.root)
            shutil.rmtree(trash, ignore_errors=True)

    def sweep(self) -> int:
        """Remove temporary leftovers of interrupted writes; returns how many."""
        n = 0
        for p in list(self.root.glob(".tmp-*")) + list(self.root.glob("*/.tmp-*")):
            if p.is_dir():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)
            n += 1
        return n

    def session_ids(self) -> list[str]:
        return sorted(p.name for p in self.root.iterdir()
                      if p.is_dir() and not p.name.startswith("."))

    def load(self, session_id: str, backend: Backend) -> Session | None:
        """The session from its newest complete checkpoint, or None if it has none."""
        sdir = self.session_dir(session_id)
        candidates = sorted((p.name for p in sdir.glob("ckpt-*") if p.is_dir()), reverse=True)
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
                            session_id, name, type(exc).__name__, exc)
        return None

    def _dirs_by_step(self, session_id: str) -> dict[int, list[Path]]:
        """Complete checkpoint directories by step, newest write first."""
        out: dict[int, list[Path]] = {}
        sdir = self.session_dir(session_id)
        for p in sorted(sdir.glob("ckpt-*"), reverse=True):
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
        readable checkpoint of that step exists."""
        sdir = self.session_dir(session_id)
        by_step = self._dirs_by_step(session_id)
        for path in by_step.get(step, []):
            try:
                session = self._load_dir(session_id, path, backend)
            except Exception as exc:
                log.warning("checkpoint %s unreadable (%s: %s)", path, type(exc).__name__, exc)
                continue
            latest_tmp = sdir / f".tmp-LATEST-{time.monotonic_ns()}"
            _write_file(latest_tmp, path.name.encode())
            latest_tmp.rename(sdir / "LATEST")
            _fsync_dir(sdir)
            for later in sorted(s for s in by_step if s > step):
                for p in by_step[later]:
                    shutil.rmtree(p, ignore_errors=True)
            _fsync_dir(sdir)
            return session
        raise KeyError(step)

    def _load_dir(self, session_id: str, path: Path, backend: Backend) -> Session:
        manifest = json.loads((path / "manifest.json").read_bytes())
        if not isinstance(manifest, dict):
            raise ValueError("manifest.json is not a JSON object")
        if manifest.get("format") != FORMAT or manifest.get("version") != VERSION:
            raise ValueError(f"not a version-{VERSION} adamserve checkpoint")
        blob = (path / "tensors.safetensors").read_bytes()
        if hashlib.sha256(blob).hexdigest() != manifest["sha256"]:
            raise ValueError("tensors.safetensors does not match the manifest's sha256")
        config = SessionConfig.from_json(manifest["config"])
        opt = build_optimizer(config, backend)
        tensors = st_load(blob)
        opt.param[...] = backend.to_device(tensors["param"])
        for key, arr in tensors.items():
            if key.startswith("slot."):
                name = key[5:]
                if name not in opt.slots:
                    opt.slots[name] = backend.zeros(opt.layout.size, opt.dtype)
                opt.slots[name][...] = backend.to_device(arr)
        opt.step_count = int(manifest["step_count"])
        opt.seg_step[:] = np.array(manifest["seg_step"], dtype=np.int64)
        opt.mu_product[:] = np.array(manifest["mu_product"], dtype=np.float64)
        session = Session(session_id, config, opt)
        session.pushes = PushLog.from_json(manifest.get("pushes", {}))
        session.checkpointed_step = opt.step_count
        return session
