"""A small client for a TensorFlow Serving model exported by :mod:`retina_scale.serving.export`.

REST (``/v1/models/<name>[/versions/<v>]:predict``) needs only the standard library (``urllib``). gRPC needs the
optional ``tensorflow-serving-api`` package (``pip install 'retina_scale[serving]'``), imported only when
:meth:`ServingClient.predict_grpc` is called.

Photos go as encoded JPEG/PNG bytes to the ``predict_images`` signature (over REST as ``{"b64": ...}``); each
result is a dict ``{"grade", "grade_continuous", "referable", "valid", "error"}``, plus ``refer_high_sensitivity``
and ``refer_high_specificity`` when the export answers them (its operating points). A photo the model cannot use
comes back with ``valid`` false and the reason in ``error``; the rest of the batch is graded.

Errors (every failure of a call is a :class:`ServingError`):

- Connection refused / reset, and HTTP 502, 503 (a server still loading the model) and 504: retried
  ``retries`` times with exponential back-off, then :class:`ServingError`.
- HTTP 400 (a malformed request, a wrong signature, or a photo corrupt beyond the graph's header checks, which
  fails the decoder and so the whole request), 404 (no such model or version) and other 4xx/5xx: not retried,
  :class:`ServingError` with the status and TF Serving's own ``error`` message.
- An answer that is not what TF Serving sends (not JSON, HTML, a list, a row without an output or with an
  output of the wrong type, a grade outside -1..4): :class:`ServingError` naming what is wrong.
- ``timeout`` is one deadline for the whole call (connecting, sending, reading, retries and their waits): a
  server that drips its answer byte by byte is cut off when it passes. An answer over ``max_response_bytes``
  is refused without reading the rest.

Example (it needs a running server, so it is not run as a doctest)::

    client = ServingClient("http://127.0.0.1:8501", "retina", timeout=10, retries=3)
    client.predict(["photos/10_left.jpeg", open("11_right.png", "rb").read()])
    # [{'grade': 2, 'grade_continuous': 1.83, 'referable': True, 'valid': True, 'error': ''}, ...]
"""

from __future__ import annotations

import base64
import http.client
import json
import math
import os
import reprlib
import socket
import threading
import time
import urllib.error
import urllib.request
from typing import Callable, Iterable, Sequence

from retina_scale.utils.errors import UserError

__all__ = ["ServingClient", "ServingError", "read_images"]

OUTPUTS = ("grade", "grade_continuous", "referable", "valid", "error")
OPTIONAL_OUTPUTS = ("refer_high_sensitivity", "refer_high_specificity")
"""Outputs of ``predict_images`` that only exports with operating points have: kept when the answer holds them."""
RETRY_STATUSES = (502, 503, 504)


class ServingError(RuntimeError):
    """A request that failed: ``status`` is the HTTP status (None for a connection failure)."""

    def __init__(self, message: str, status: int | None = None):
        super().__init__(message)
        self.status = status


def read_images(images: Iterable) -> list[bytes]:
    """File paths (str or PathLike) or bytes -> a list of bytes."""
    out = []
    for item in images:
        if isinstance(item, (bytes, bytearray, memoryview)):
            out.append(bytes(item))
        elif isinstance(item, (str, os.PathLike)):
            with open(item, "rb") as handle:
                out.append(handle.read())
        else:
            raise TypeError(f"images must be file paths or bytes; got {type(item).__name__}")
    if not out:
        raise UserError("images is empty; give at least one photo")
    return out


_SHORT = reprlib.Repr()
_SHORT.maxlevel, _SHORT.maxlist, _SHORT.maxdict, _SHORT.maxstring, _SHORT.maxother = 2, 5, 5, 80, 80

# What each output of a row must be: (accepts the value, what the error says it should be).
_OUTPUT_TYPES = {
    "grade": (lambda v: isinstance(v, int) and not isinstance(v, bool) and -1 <= v <= 4, "an integer in -1..4"),
    "grade_continuous": (lambda v: isinstance(v, (int, float)) and not isinstance(v, bool), "a number"),
    "referable": (lambda v: isinstance(v, bool), "true or false"),
    "valid": (lambda v: isinstance(v, bool), "true or false"),
    "error": (lambda v: isinstance(v, str), "a string"),
    **dict.fromkeys(OPTIONAL_OUTPUTS, (lambda v: isinstance(v, bool), "true or false")),
}


def _row(values, index: int = 0, signature: str = "predict_images") -> dict:
    """One photo's outputs, checked: a dict holding every output of the signature, each of its type.

    Raises:
        ServingError: not a dict, an output missing, or an output of the wrong type or range.
    """
    if not isinstance(values, dict):
        raise ServingError(f"unexpected answer from TF Serving: row {index} is {_SHORT.repr(values)}, not an "
                           f"object of outputs {', '.join(OUTPUTS)}")
    required = OUTPUTS if signature == "predict_images" else OUTPUTS[:3]
    missing = [k for k in required if k not in values]
    if missing:
        raise ServingError(f"unexpected answer from TF Serving: row {index} has no {', '.join(missing)} "
                           f"({_SHORT.repr(values)})")
    row = {k: values[k] for k in (*OUTPUTS, *OPTIONAL_OUTPUTS) if k in values}
    if isinstance(row.get("error"), bytes):
        row["error"] = row["error"].decode("utf-8", "replace")
    for key, value in row.items():
        ok, expected = _OUTPUT_TYPES[key]
        if not ok(value):
            raise ServingError(f"unexpected answer from TF Serving: row {index} has {key} {_SHORT.repr(value)}; "
                               f"expected {expected}")
    row["grade_continuous"] = float(row["grade_continuous"])  # NaN arrives as NaN (TF Serving writes NaN)
    return row


class _Deadline:
    """One deadline for a whole call: when it passes, the sockets of the call are shut, so that a read
    blocked on a server that drips its answer returns at once, whatever phase the request is in."""

    def __init__(self, seconds: float):
        self.seconds = seconds
        self.end = time.monotonic() + seconds
        self.expired = False
        self._sockets = []
        self._lock = threading.Lock()
        self._timer = threading.Timer(seconds, self._expire)
        self._timer.daemon = True
        self._timer.start()

    def remaining(self) -> float:
        return self.end - time.monotonic()

    def track(self, sock) -> None:
        with self._lock:
            self._sockets.append(sock)
            if self.expired:
                _shut(sock)

    def _expire(self) -> None:
        with self._lock:
            self.expired = True
            for sock in self._sockets:
                _shut(sock)

    def cancel(self) -> None:
        self._timer.cancel()


def _shut(sock) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:  # already closed
        pass


def _opener(deadline: _Deadline):
    """urllib's opener (proxies from the environment as usual) whose connections register with ``deadline``."""

    def tracked(base):
        class Connection(base):
            def connect(self):
                super().connect()
                deadline.track(self.sock)

        return Connection

    class HTTP(urllib.request.HTTPHandler):
        def http_open(self, req):
            return self.do_open(tracked(http.client.HTTPConnection), req)

    class HTTPS(urllib.request.HTTPSHandler):
        def https_open(self, req):
            return self.do_open(tracked(http.client.HTTPSConnection), req, context=self._context)

    return urllib.request.build_opener(HTTP, HTTPS)


def _read_capped(response, limit: int, url: str) -> bytes:
    """The body of ``response``, refused (without reading it all) when it is longer than ``limit`` bytes."""
    length = response.headers.get("Content-Length")
    if length is not None and length.strip().isdigit() and int(length) > limit:
        raise ServingError(f"TF Serving's answer from {url} is {int(length)} bytes; the client reads at most "
                           f"{limit} (max_response_bytes)")
    data = response.read(limit + 1)
    if len(data) > limit:
        raise ServingError(f"TF Serving's answer from {url} is over {limit} bytes; the client reads at most "
                           f"{limit} (max_response_bytes)")
    return data


def _json_object(data: bytes, url: str) -> dict:
    """The JSON object of a 200 answer; anything else (not UTF-8, not JSON, HTML, a list) is a ServingError."""
    try:
        answer = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise ServingError(f"TF Serving at {url} answered HTTP 200 with something that is not JSON: "
                           f"{_SHORT.repr(data[:200])}") from None
    if not isinstance(answer, dict):
        raise ServingError(f"TF Serving at {url} answered HTTP 200 with {_SHORT.repr(answer)}, not a JSON object "
                           "with 'predictions'")
    return answer


class ServingClient:
    """TF Serving REST (and gRPC) client for one model.

    Args:
        url: the REST base URL, e.g. ``http://127.0.0.1:8501``.
        model_name: the model's name in ``models.config`` (``--model_name``).
        version: a version number, or None for the newest the server has loaded.
        timeout: seconds for a whole call: connecting, sending, reading the answer, retries and the waits
            between them (REST; over gRPC, per attempt).
        retries: extra attempts after a connection error or a 502/503/504 (bounded; 0 for none).
        backoff: seconds before the first retry, doubled each time.
        grpc_target: ``host:port`` of the gRPC endpoint (default: the URL's host, port 8500).
        sleep: the function used to wait between retries (tests pass their own).
        max_response_bytes: the longest answer read (REST; default 64 MiB, ~300 bytes a photo).
    """

    def __init__(self, url: str = "http://127.0.0.1:8501", model_name: str = "retina", version: int | None = None,
                 timeout: float = 30.0, retries: int = 3, backoff: float = 0.5, grpc_target: str | None = None,
                 sleep: Callable[[float], None] = time.sleep, max_response_bytes: int = 64 << 20):
        if not url.startswith(("http://", "https://")):
            raise UserError(f"url must start with http:// or https://; got {url!r}")
        if not isinstance(retries, int) or retries < 0:
            raise UserError(f"retries must be an integer >= 0; got {retries!r}")
        if not isinstance(timeout, (int, float)) or not 0 < timeout < math.inf:
            raise UserError(f"timeout must be a positive number of seconds; got {timeout!r}")
        if isinstance(max_response_bytes, bool) or not isinstance(max_response_bytes, int) or max_response_bytes < 1:
            raise UserError(f"max_response_bytes must be a positive integer; got {max_response_bytes!r}")
        self.max_response_bytes = max_response_bytes
        self.url = url.rstrip("/")
        self.model_name = model_name
        self.version = version
        self.timeout = float(timeout)
        self.retries = retries
        self.backoff = float(backoff)
        host = self.url.split("://", 1)[1].split("/", 1)[0].rsplit(":", 1)[0]
        self.grpc_target = grpc_target or f"{host}:8500"
        self._sleep = sleep

    # ------------------------------------------------------------------------------------------------- REST
    @property
    def predict_url(self) -> str:
        version = f"/versions/{int(self.version)}" if self.version is not None else ""
        return f"{self.url}/v1/models/{self.model_name}{version}:predict"

    def _post(self, url: str, body: bytes) -> dict:
        deadline = _Deadline(self.timeout)
        try:
            return self._attempts(url, body, deadline)
        finally:
            deadline.cancel()

    def _attempts(self, url: str, body: bytes, deadline: _Deadline) -> dict:
        last = None
        for attempt in range(self.retries + 1):  # bounded
            if attempt:
                wait = self.backoff * 2 ** (attempt - 1)
                if wait >= deadline.remaining():
                    raise ServingError(f"{last} (gave up after {attempt} attempts: the call's {self.timeout:g} s "
                                       "deadline)", last.status)
                self._sleep(wait)
            late = ServingError(f"TF Serving at {url} did not answer within the call's deadline of {self.timeout:g} s "
                                "(timed out)")
            try:
                data = self._attempt(url, body, deadline)
            except ServingError as err:
                if err.status not in RETRY_STATUSES:
                    raise
                last = err
                continue
            except (OSError, http.client.HTTPException) as err:  # URLError, ConnectionError, timeouts
                if deadline.expired or deadline.remaining() <= 0:
                    raise late from None
                last = ServingError(f"cannot reach TF Serving at {url}: {getattr(err, 'reason', err)}")
                continue
            if deadline.expired:  # the socket was shut mid-answer: what was read is cut short
                raise late
            return _json_object(data, url)
        raise ServingError(f"{last} (gave up after {self.retries + 1} attempts)", last.status)

    def _attempt(self, url: str, body: bytes, deadline: _Deadline) -> bytes:
        """One POST: the answer's body (HTTP 200), or a ServingError with the status and TF Serving's message."""
        request = urllib.request.Request(url, data=body, method="POST", headers={"Content-Type": "application/json"})
        try:
            with _opener(deadline).open(request, timeout=max(deadline.remaining(), 1e-3)) as response:
                return _read_capped(response, self.max_response_bytes, url)
        except urllib.error.HTTPError as err:
            text = err.read(64 << 10).decode("utf-8", "replace")
            try:
                message = json.loads(text).get("error", text)
            except (ValueError, AttributeError, RecursionError):
                message = text
            message = " ".join(str(message).split())[:500]
            raise ServingError(f"TF Serving answered HTTP {err.code} for {url}: {message}", err.code) from None

    def predict(self, images: Sequence, signature: str = "predict_images") -> list[dict]:
        """Grades photos (file paths or bytes) over REST; one result dict per photo, in order."""
        payload = {
            "signature_name": signature,
            "instances": [{"b64": base64.b64encode(b).decode("ascii")} for b in read_images(images)],
        }
        answer = self._post(self.predict_url, json.dumps(payload).encode("utf-8"))
        predictions = answer.get("predictions")
        if not isinstance(predictions, list) or len(predictions) != len(payload["instances"]):
            raise ServingError(f"unexpected answer from TF Serving (no 'predictions' list of "
                               f"{len(payload['instances'])}): {_SHORT.repr(answer)}")
        return [_row(p, i, signature) for i, p in enumerate(predictions)]

    # ------------------------------------------------------------------------------------------------- gRPC
    def predict_grpc(self, images: Sequence, signature: str = "predict_images") -> list[dict]:
        """Grades photos over gRPC (``PredictionService.Predict``); needs ``tensorflow-serving-api``."""
        try:
            import grpc
            from tensorflow_serving.apis import predict_pb2, prediction_service_pb2_grpc
        except ImportError as err:
            raise ImportError(
                f"gRPC needs the optional tensorflow-serving-api package ({err.name} is missing): "
                "pip install 'retina_scale[serving]' (or use predict(), the REST API)"
            ) from None
        import tensorflow as tf

        request = predict_pb2.PredictRequest()
        request.model_spec.name = self.model_name
        request.model_spec.signature_name = signature
        if self.version is not None:
            request.model_spec.version.value = int(self.version)
        request.inputs["images"].CopyFrom(tf.make_tensor_proto(read_images(images), dtype=tf.string))
        last = None
        for attempt in range(self.retries + 1):  # bounded
            if attempt:
                self._sleep(self.backoff * 2 ** (attempt - 1))
            try:
                with grpc.insecure_channel(self.grpc_target) as channel:
                    stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
                    response = stub.Predict(request, timeout=self.timeout)
                break
            except grpc.RpcError as err:
                code = err.code()
                last = ServingError(f"TF Serving gRPC {code.name} at {self.grpc_target}: {err.details()}")
                if code not in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                    raise last from None
        else:
            raise ServingError(f"{last} (gave up after {self.retries + 1} attempts)")
        columns = {k: tf.make_ndarray(response.outputs[k]).tolist() for k in (*OUTPUTS, *OPTIONAL_OUTPUTS)
                   if k in response.outputs}
        n = len(next(iter(columns.values()), []))
        return [_row({k: v[i] for k, v in columns.items()}, i, signature) for i in range(n)]
