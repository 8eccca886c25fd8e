"""The HTTP transport: the server's ``/v1`` REST API over one httpx connection pool.

Tensors travel in the binary layout (the Triton / Open Inference Protocol
binary-data extension): a JSON header whose length is in ``Adamserve-Header-Length``,
then the raw tensor bytes back to back; steps and pulls ask for binary output the
same way. Requests that could not connect (or got 503) are retried a bounded
number of times; error bodies ``{"error", "code"}`` become their
:mod:`adamserve_client.errors` exception with the server's message.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping, Sequence
from typing import Any
from urllib.parse import quote

import httpx
import numpy as np

from adamserve_client import errors
from adamserve_client.tensors import DATATYPES, encode
from adamserve_client.transports import _codec
from adamserve_client.transports.base import (
    CheckpointInfo,
    HyperValue,
    Sender,
    SessionInfo,
    SessionSpec,
    StateDict,
    StepResult,
    TensorSpec,
    Transport,
    WireTensor,
)

__all__ = ["HttpTransport"]

HEADER_LENGTH = "Adamserve-Header-Length"
OCTET_STREAM = "application/octet-stream"
# Statuses when the error body carries no code.
_STATUS_CODES = {400: "invalid_argument", 401: "unauthenticated", 403: "permission_denied",
                 404: "not_found", 409: "failed_precondition", 413: "resource_exhausted",
                 429: "resource_exhausted", 503: "unavailable", 504: "deadline_exceeded"}


class _Busy(Exception):
    """A 503 answer: retried like a refused connection."""

    def __init__(self, response: httpx.Response) -> None:
        self.response = response


def _retryable(exc: BaseException) -> bool:
    # Only failures where the request surely did not reach the application.
    return isinstance(exc, httpx.ConnectError | httpx.ConnectTimeout | _Busy)


def _tensor_entry(t: WireTensor) -> dict[str, Any]:
    return {"name": t.name, "shape": list(t.shape), "datatype": t.datatype,
            "parameters": {"binary_data_size": memoryview(t.data).nbytes}}


def _binary_body(body: Mapping[str, Any], tensors: Sequence[WireTensor]
                 ) -> tuple[bytes, dict[str, str]]:
    header = json.dumps(body, separators=(",", ":")).encode()
    content = b"".join([header, *(memoryview(t.data).cast("B") for t in tensors)])
    return content, {"content-type": OCTET_STREAM, HEADER_LENGTH: str(len(header))}


def _tensors_out(response: httpx.Response) -> tuple[dict[str, Any], list[WireTensor]]:
    """The JSON part and the tensors of a step or pull response (binary or JSON)."""
    content = response.content
    n = response.headers.get(HEADER_LENGTH)
    view = memoryview(content)
    if n is None:
        body = json.loads(content)
        params = [WireTensor(p["name"], tuple(p["shape"]), p["datatype"],
                             encode(_numbers(p), p["datatype"])) for p in body.get("params", [])]
        return body, params
    pos = int(n)
    body = json.loads(bytes(view[:pos]))
    params = []
    for p in body.get("params", []):
        size = int(p["parameters"]["binary_data_size"])
        if pos + size > len(view):
            raise errors.ServerError("binary response: tensor data past the end of the body")
        params.append(WireTensor(p["name"], tuple(int(d) for d in p["shape"]), p["datatype"],
                                 view[pos:pos + size]))
        pos += size
    return body, params


def _numbers(p: Mapping[str, Any]) -> np.ndarray[Any, Any]:
    return np.asarray(p.get("data") or [], dtype=np.float64)


def _step_result(body: Mapping[str, Any], params: Sequence[WireTensor] = ()) -> StepResult:
    grad_norm = body.get("grad_norm")
    return StepResult(step=int(body["step"]), skipped=bool(body["skipped"]),
                      grad_norm=None if grad_norm is None else float(grad_norm),
                      nonfinite=tuple(body.get("nonfinite", ())), params=tuple(params),
                      duplicate=bool(body.get("duplicate", False)),
                      staleness=int(body.get("staleness", 0)),
                      pending=bool(body.get("pending", False)),
                      contributors=int(body.get("contributors", 0)),
                      missing=tuple(body.get("missing_workers", ())),
                      grad_sumsq=tuple(float(x) for x in body.get("grad_sumsq", ())),
                      param_sumsq=tuple(float(x) for x in body.get("param_sumsq", ())),
                      update_sumsq=tuple(float(x) for x in body.get("update_sumsq", ())),
                      round=int(body.get("round", 0)))


def _sender_fields(sender: Sender | None, base_step: int | None) -> dict[str, Any]:
    out: dict[str, Any] = {} if sender is None else {"worker_id": sender.worker,
                                                     "sequence": sender.sequence}
    if base_step is not None:
        out["base_step"] = base_step
    return out


class HttpTransport(Transport):
    """A transport to ``http://host:port`` (or ``https://``).

    ``token``: sent as ``Authorization: Bearer <token>``. ``timeout``: seconds
    allowed for each request (None: none, but connecting gives up after 10 s).
    ``retries``: requests made in all while the server cannot be reached.
    """

    def __init__(self, url: str, token: str | None = None, timeout: float | None = None, *,
                 retries: int = 3, backoff: float = 0.05) -> None:
        address = _codec.parse_url(url)
        if address.scheme not in ("http", "https"):
            raise ValueError(f"HttpTransport needs an http:// or https:// URL, got {url!r}")
        self.url = url
        self.timeout = timeout
        self.retries = retries
        self.backoff = backoff
        headers = {"authorization": f"Bearer {token}"} if token else {}
        self._client = httpx.Client(
            base_url=url.rstrip("/"), headers=headers,
            timeout=httpx.Timeout(timeout, connect=timeout if timeout is not None else 10.0))

    # -- plumbing --------------------------------------------------------------

    def _request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        def run() -> httpx.Response:
            r = self._client.request(method, path, **kwargs)
            if r.status_code == 503:
                raise _Busy(r)
            return r

        try:
            r = _codec.with_retries(run, _retryable, attempts=self.retries,
                                    backoff=self.backoff)
        except _Busy as busy:
            r = busy.response
        except httpx.TimeoutException as exc:
            raise errors.DeadlineExceeded(
                f"{self.url}: no answer within the timeout of {self.timeout} s ({exc})",
                url=self.url) from None
        except httpx.TransportError as exc:
            raise errors.Unavailable(
                f"cannot reach the adamserve server at {self.url} ({self.retries} attempts): "
                f"{exc or type(exc).__name__}", url=self.url) from None
        if r.status_code >= 400:
            raise self._error(r)
        return r

    def _error(self, r: httpx.Response) -> errors.AdamserveError:
        code = _STATUS_CODES.get(r.status_code, "internal")
        message = r.text or r.reason_phrase
        try:
            body = r.json()
            if isinstance(body, dict):
                code = str(body.get("code") or code)
                message = str(body.get("error") or body.get("detail") or message)
        except ValueError:
            pass
        if code == "unavailable":
            message = f"adamserve server at {self.url} is unavailable: {message}"
        return errors.error_for(code, message, self.url)

    @staticmethod
    def _path(session_id: str, *rest: str) -> str:
        return "/".join(("/v1/sessions", quote(session_id, safe=""), *rest))

    def _info(self, method: str, path: str, **kwargs: Any) -> SessionInfo:
        return _codec.session_info_from_json(self._request(method, path, **kwargs).json())

    # -- sessions ---------------------------------------------------------------

    def create_session(self, spec: SessionSpec,
                       initial: Sequence[WireTensor] = ()) -> SessionInfo:
        body: dict[str, Any] = {
            "session_id": spec.session_id, "algorithm": spec.algorithm,
            "tensors": [_codec.tensor_spec_to_json(t) for t in spec.tensors],
            "groups": [_codec.group_to_json(g) for g in spec.groups] or [{}],
            "dtype": spec.dtype,
            "schedule": dict(spec.schedule) if spec.schedule is not None else None,
            "max_grad_norm": spec.max_grad_norm, "clip_per_tensor": spec.clip_per_tensor,
            "skip_nonfinite": spec.skip_nonfinite,
            "workers": dataclasses.asdict(spec.workers), "labels": dict(spec.labels),
            "initial": [_tensor_entry(t) for t in initial],
        }
        content, headers = _binary_body(body, initial)
        return self._info("POST", "/v1/sessions", content=content, headers=headers)

    def add_tensors(self, session_id: str, tensors: Sequence[TensorSpec],
                    group: Mapping[str, HyperValue] | None = None,
                    initial: Sequence[WireTensor] = ()) -> SessionInfo:
        content, headers = _binary_body({
            "tensors": [_codec.tensor_spec_to_json(t) for t in tensors],
            "group": _codec.group_to_json(group) if group is not None else None,
            "initial": [_tensor_entry(t) for t in initial]}, initial)
        return self._info("POST", self._path(session_id, "tensors"), content=content,
                          headers=headers)

    def set_parameters(self, session_id: str, values: Sequence[WireTensor]) -> SessionInfo:
        content, headers = _binary_body({"values": [_tensor_entry(t) for t in values]}, values)
        return self._info("PUT", self._path(session_id, "params"), content=content,
                          headers=headers)

    def describe(self, session_id: str) -> SessionInfo:
        return self._info("GET", self._path(session_id))

    def list_sessions(self) -> list[SessionInfo]:
        body = self._request("GET", "/v1/sessions").json()
        return [_codec.session_info_from_json(s) for s in body["sessions"]]

    def delete_session(self, session_id: str) -> None:
        self._request("DELETE", self._path(session_id))

    # -- steps ------------------------------------------------------------------

    def step(self, session_id: str, gradients: Sequence[WireTensor], *,
             return_datatype: str = "FP32", require_all: bool = False,
             sender: Sender | None = None, base_step: int | None = None) -> StepResult:
        content, headers = _binary_body({
            "gradients": [_tensor_entry(t) for t in gradients],
            "return_datatype": return_datatype, "binary_output": True,
            "require_all": require_all, **_sender_fields(sender, base_step)}, gradients)
        r = self._request("POST", self._path(session_id, "step"), content=content,
                          headers=headers)
        body, params = _tensors_out(r)
        return _step_result(body, params)

    def push(self, session_id: str, gradients: Sequence[WireTensor], *,
             require_all: bool = False, sender: Sender | None = None,
             base_step: int | None = None) -> StepResult:
        content, headers = _binary_body({
            "gradients": [_tensor_entry(t) for t in gradients], "require_all": require_all,
            **_sender_fields(sender, base_step)}, gradients)
        r = self._request("POST", self._path(session_id, "push"), content=content,
                          headers=headers)
        return _step_result(r.json())

    def pull(self, session_id: str, names: Sequence[str] | None = None,
             datatype: str = "FP32", *, min_step: int = 0,
             wait: float | None = None) -> list[WireTensor]:
        if datatype not in DATATYPES:
            raise ValueError(f"datatype {datatype!r}: expected one of {', '.join(DATATYPES)}")
        r = self._request("POST", self._path(session_id, "pull"), json={
            "names": list(names) if names else None, "datatype": datatype,
            "binary_output": True, "min_step": min_step, "timeout": wait})
        return _tensors_out(r)[1]

    # -- hyperparameters, schedule, state ----------------------------------------

    def set_hyperparameters(self, session_id: str, group: int,
                            changes: Mapping[str, HyperValue]) -> SessionInfo:
        return self._info("PATCH", self._path(session_id, "hyperparameters"),
                          json={"group": group, "values": _codec.group_to_json(changes)})

    def set_schedule(self, session_id: str, schedule: Mapping[str, Any] | None) -> SessionInfo:
        return self._info("PUT", self._path(session_id, "schedule"), json={
            "schedule": dict(schedule) if schedule is not None else None})

    def export_state(self, session_id: str) -> StateDict:
        r = self._request("GET", self._path(session_id, "state"))
        return _codec.decode_state(bytearray(r.content))

    def import_state(self, session_id: str, state: Mapping[str, Any]) -> SessionInfo:
        return self._info("PUT", self._path(session_id, "state"),
                          content=_codec.encode_state(state),
                          headers={"content-type": OCTET_STREAM})

    def checkpoint(self, session_id: str) -> CheckpointInfo:
        d = self._request("POST", self._path(session_id, "checkpoint")).json()
        return CheckpointInfo(str(d["session_id"]), int(d["step"]), str(d["path"]),
                              int(d["bytes"]))

    def commit(self, session_id: str, step: int, tensor_sumsq: Sequence[float],
               total_sumsq: float, *, param_sumsq: Sequence[float] = (),
               update_sumsq: Sequence[float] = (), round_id: int = 0,
               return_datatype: str | None = "FP32") -> StepResult:
        # JSON has no NaN: a non-finite sum (a NaN gradient somewhere) goes as the
        # literal NaN / Infinity, which the server's parser accepts
        content = json.dumps({
            "step": step, "tensor_sumsq": [float(x) for x in tensor_sumsq],
            "total_sumsq": float(total_sumsq), "param_sumsq": [float(x) for x in param_sumsq],
            "update_sumsq": [float(x) for x in update_sumsq], "round": round_id,
            "return_datatype": return_datatype, "binary_output": True})
        r = self._request("POST", self._path(session_id, "commit"), content=content,
                          headers={"content-type": "application/json"})
        body, params = _tensors_out(r)
        return _step_result(body, params)

    def set_workers(self, session_id: str, count: int) -> SessionInfo:
        return self._info("PUT", self._path(session_id, "workers"), json={"count": count})

    def list_checkpoints(self, session_id: str) -> list[int]:
        body = self._request("GET", self._path(session_id, "checkpoints")).json()
        return [int(s) for s in body["steps"]]

    def restore_checkpoint(self, session_id: str, step: int) -> SessionInfo:
        return self._info("POST", self._path(session_id, "restore"), json={"step": step})

    def close(self) -> None:
        self._client.close()

    def __repr__(self) -> str:
        return f"HttpTransport({self.url!r})"

