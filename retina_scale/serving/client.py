"""A small client for a TensorFlow Serving model exported by :mod:`retina_scale.serving.export`.

REST (``/v1/models/<name>[/versions/<v>]:predict``) needs only the standard library (``urllib``). gRPC needs the
optional ``tensorflow-serving-api`` package (``pip install 'retina_scale[serving]'``), imported only when
:meth:`ServingClient.predict_grpc` is called.

Photos go as encoded JPEG/PNG bytes to the ``predict_images`` signature (over REST as ``{"b64": ...}``); each
result is a dict ``{"grade", "grade_continuous", "referable", "valid", "error"}``. A photo the model cannot use
comes back with ``valid`` false and the reason in ``error``; the rest of the batch is graded.

Errors:

- Connection refused / reset / timed out, and HTTP 502, 503 (a server still loading the model) and 504: retried
  ``retries`` times with exponential back-off, then :class:`ServingError`.
- HTTP 400 (a malformed request, a wrong signature, or a photo corrupt beyond the graph's header checks, which
  fails the decoder and so the whole request), 404 (no such model or version) and other 4xx/5xx: not retried,
  :class:`ServingError` with the status and TF Serving's own ``error`` message.

Example (it needs a running server, so it is not run as a doctest)::

    client = ServingClient("http://127.0.0.1:8501", "retina", timeout=10, retries=3)
    client.predict(["photos/10_left.jpeg", open("11_right.png", "rb").read()])
    # [{'grade': 2, 'grade_continuous': 1.83, 'referable': True, 'valid': True, 'error': ''}, ...]
"""

from __future__ import annotations

import base64
import http.client
import json
import os
import socket
import time
import urllib.error
import urllib.request
from typing import Callable, Iterable, Sequence

from retina_scale.utils.errors import UserError

__all__ = ["ServingClient", "ServingError", "read_images"]

OUTPUTS = ("grade", "grade_continuous", "referable", "valid", "error")
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


def _row(values: dict) -> dict:
    row = {k: values.get(k) for k in OUTPUTS if k in values}
    if isinstance(row.get("error"), bytes):
        row["error"] = row["error"].decode("utf-8", "replace")
    if row.get("grade_continuous") is not None:
        row["grade_continuous"] = float(row["grade_continuous"])  # NaN arrives as NaN (TF Serving writes NaN)
    if row.get("grade") is not None:
        row["grade"] = int(row["grade"])
    return row


class ServingClient:
    """TF Serving REST (and gRPC) client for one model.

    Args:
        url: the REST base URL, e.g. ``http://127.0.0.1:8501``.
        model_name: the model's name in ``models.config`` (``--model_name``).
        version: a version number, or None for the newest the server has loaded.
        timeout: seconds per HTTP request (connect and read).
        retries: extra attempts after a connection error or a 502/503/504 (bounded; 0 for none).
        backoff: seconds before the first retry, doubled each time.
        grpc_target: ``host:port`` of the gRPC endpoint (default: the URL's host, port 8500).
        sleep: the function used to wait between retries (tests pass their own).
    """

    def __init__(self, url: str = "http://127.0.0.1:8501", model_name: str = "retina", version: int | None = None,
                 timeout: float = 30.0, retries: int = 3, backoff: float = 0.5, grpc_target: str | None = None,
                 sleep: Callable[[float], None] = time.sleep):
        if not url.startswith(("http://", "https://")):
            raise UserError(f"url must start with http:// or https://; got {url!r}")
        if not isinstance(retries, int) or retries < 0:
            raise UserError(f"retries must be an integer >= 0; got {retries!r}")
        if not timeout or timeout <= 0:
            raise UserError(f"timeout must be a positive number of seconds; got {timeout!r}")
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
        last = None
        for attempt in range(self.retries + 1):  # bounded
            if attempt:
                self._sleep(self.backoff * 2 ** (attempt - 1))
            request = urllib.request.Request(url, data=body, method="POST",
                                             headers={"Content-Type": "application/json"})
            try:
                with urllib.request.urlopen(request, timeout=self.timeout) as response:
                    return json.loads(response.read().decode("utf-8"))
            except urllib.error.HTTPError as err:
                text = err.read().decode("utf-8", "replace")
                try:
                    message = json.loads(text).get("error", text)
                except (json.JSONDecodeError, AttributeError):
                    message = text
                message = " ".join(str(message).split())[:500]
                last = ServingError(f"TF Serving answered HTTP {err.code} for {url}: {message}", err.code)
                if err.code not in RETRY_STATUSES:
                    raise last from None
            except (urllib.error.URLError, ConnectionError, socket.timeout, http.client.HTTPException) as err:
                reason = getattr(err, "reason", err)
                last = ServingError(f"cannot reach TF Serving at {url}: {reason}")
        raise ServingError(f"{last} (gave up after {self.retries + 1} attempts)", last.status)

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
                               f"{len(payload['instances'])}): {str(answer)[:300]}")
        return [_row(p) for p in predictions]

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
        columns = {k: tf.make_ndarray(response.outputs[k]).tolist() for k in OUTPUTS if k in response.outputs}
        n = len(next(iter(columns.values())))
        return [_row({k: v[i] for k, v in columns.items()}) for i in range(n)]
