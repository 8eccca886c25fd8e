"""Refused requests are logged (logger ``adamserve.refused``) with their reason and
message, never their payload, on gRPC and HTTP."""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import pytest

from adamserve_client import errors
from adamserve_client.transports import SessionSpec, TensorSpec, WireTensor, connect


@pytest.mark.parametrize("wire", ["grpc", "http"])
def test_a_refusal_is_logged_with_its_reason_not_its_payload(
        live: Any, sid: str, wire: str, caplog: pytest.LogCaptureFixture) -> None:
    secret = np.full(4, 1234.5678, "<f4")
    with connect(live.urls[wire]) as t, caplog.at_level(logging.INFO, "adamserve.refused"):
        t.create_session(SessionSpec(sid, "adam", (TensorSpec("w", (4,)),)))
        with pytest.raises(errors.InvalidArgument):
            t.step(sid, [WireTensor("w", (5,), "FP32", np.ones(5, "<f4").tobytes())])
        with pytest.raises(errors.NotFound):
            t.step(sid + "-missing", [WireTensor("w", (4,), "FP32", secret.tobytes())])
    lines = [r.getMessage() for r in caplog.records if r.name == "adamserve.refused"]
    assert any(wire in line and "INVALID_ARGUMENT" in line and "expected shape [4]" in line
               for line in lines), lines
    assert any("SESSION_NOT_FOUND" in line and "does not exist" in line for line in lines), lines
    assert not any("1234.5" in line for line in lines)
