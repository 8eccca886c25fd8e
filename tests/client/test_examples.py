"""The examples run, against a server they start themselves, and say what they claim."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def test_train_digits_matches_torch() -> None:
    pytest.importorskip("sklearn", reason="examples/train_digits.py needs scikit-learn")
    out = subprocess.run(
        [sys.executable, str(EXAMPLES / "train_digits.py"), "--steps", "40", "--check", "1e-5"],
        capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stdout + out.stderr
    worst = re.search(r"largest relative difference: (\S+)", out.stdout)
    assert worst is not None, out.stdout
    assert float(worst.group(1)) <= 1e-5
    curve = re.findall(r"^\s+\d+\s+(\S+)\s+(\S+)\s+\S+$", out.stdout, re.MULTILINE)
    assert len(curve) >= 20 and float(curve[-1][0]) < float(curve[0][0])  # it learned


def test_resume_after_restart_continues_identically() -> None:
    pytest.importorskip("sklearn", reason="examples/resume_after_restart.py needs scikit-learn")
    out = subprocess.run(
        [sys.executable, str(EXAMPLES / "resume_after_restart.py"), "--steps", "30",
         "--check", "1e-6"], capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "restarted server at grpc://" in out.stdout
