"""Tests of retina_scale.serving.client against a local HTTP server that answers as TF Serving's REST API does."""

import base64
import http.server
import json
import socket
import sys
import threading
import time

import pytest

from retina_scale.serving.client import ServingClient, ServingError


class FakeServing:
    """TF Serving's REST predict API on 127.0.0.1: ``mode`` picks the answer.

    ``ok``: 200 with one prediction per instance, derived from the photo's bytes (grade = first byte % 5; a photo
    starting with b"X" is answered as the model answers an unusable one); ``bad``: 400 with an error JSON;
    ``unavailable``: 503; ``slow``: answers after 2 s.
    """

    def __init__(self, mode="ok", port=0):
        self.mode = mode
        self.requests = []
        owner = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                body = self.rfile.read(int(self.headers["Content-Length"]))
                owner.requests.append((self.path, json.loads(body)))
                if callable(owner.mode):  # a test's own answer: mode(handler, request)
                    return owner.mode(self, json.loads(body))
                if owner.mode == "slow":
                    time.sleep(2)
                if owner.mode == "bad":
                    return self._send(400, {"error": "Expected tensor of dtype string for input images"})
                if owner.mode == "unavailable":
                    return self._send(503, {"error": "Servable not found for request: Latest(retina)"})
                predictions = []
                for instance in json.loads(body)["instances"]:
                    data = base64.b64decode(instance["b64"])
                    if data.startswith(b"X"):
                        predictions.append({"grade": -1, "grade_continuous": float("nan"), "referable": False,
                                            "valid": False, "error": "not an image (unknown file signature)"})
                    else:
                        g = data[0] % 5
                        predictions.append({"grade": g, "grade_continuous": g + 0.25, "referable": g >= 2,
                                            "valid": True, "error": ""})
                self._send(200, {"predictions": predictions})

            def _send(self, status, obj):
                text = json.dumps(obj).encode()  # NaN written as NaN, as TF Serving does
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(text)))
                self.end_headers()
                self.wfile.write(text)

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def serving():
    servers = []

    def start(mode="ok", port=0):
        s = FakeServing(mode, port)
        servers.append(s)
        return s

    yield start
    for s in servers:
        s.close()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_predict_sends_paths_and_bytes_as_b64_and_returns_one_row_each(serving, tmp_path):
    server = serving("ok")
    (tmp_path / "a.jpg").write_bytes(b"\x03photo-a")
    client = ServingClient(f"http://127.0.0.1:{server.port}", "retina", version=7, timeout=5)
    rows = client.predict([tmp_path / "a.jpg", b"\x02photo-b", b"Xjunk", str(tmp_path / "a.jpg")])
    path, body = server.requests[0]
    assert path == "/v1/models/retina/versions/7:predict"
    assert body["signature_name"] == "predict_images"
    assert [base64.b64decode(i["b64"]) for i in body["instances"]] == [b"\x03photo-a", b"\x02photo-b", b"Xjunk",
                                                                       b"\x03photo-a"]
    assert [r["grade"] for r in rows] == [3, 2, -1, 3]
    assert [r["referable"] for r in rows] == [True, True, False, True]
    assert rows[1]["grade_continuous"] == 2.25 and rows[2]["grade_continuous"] != rows[2]["grade_continuous"]
    assert rows[2]["valid"] is False and "not an image" in rows[2]["error"]
    assert ServingClient("http://h:1", "m").predict_url == "http://h:1/v1/models/m:predict"


def test_http_400_is_a_clear_error_and_not_retried(serving):
    server = serving("bad")
    client = ServingClient(f"http://127.0.0.1:{server.port}", "retina", retries=3, sleep=lambda s: None)
    with pytest.raises(ServingError, match="HTTP 400 .*Expected tensor of dtype string") as info:
        client.predict([b"\x01"])
    assert info.value.status == 400 and len(server.requests) == 1


def test_http_503_is_retried_a_bounded_number_of_times(serving):
    server = serving("unavailable")
    waits = []
    client = ServingClient(f"http://127.0.0.1:{server.port}", "retina", retries=2, backoff=0.1, sleep=waits.append)
    with pytest.raises(ServingError, match="HTTP 503 .*Servable not found.*gave up after 3 attempts") as info:
        client.predict([b"\x01"])
    assert info.value.status == 503 and len(server.requests) == 3 and waits == [0.1, 0.2]


def test_connection_refused_then_success(serving):
    port = _free_port()
    started = []

    def sleep(seconds):  # the server comes up while the client waits to retry
        if not started:
            started.append(serving("ok", port))

    client = ServingClient(f"http://127.0.0.1:{port}", "retina", retries=2, sleep=sleep)
    rows = client.predict([b"\x04x"])
    assert rows[0]["grade"] == 4 and len(started) == 1 and len(started[0].requests) == 1


def test_connection_refused_everywhere_gives_up(tmp_path):
    port = _free_port()
    client = ServingClient(f"http://127.0.0.1:{port}", "retina", retries=1, sleep=lambda s: None)
    with pytest.raises(ServingError, match="cannot reach TF Serving.*gave up after 2 attempts") as info:
        client.predict([b"\x01"])
    assert info.value.status is None


def test_timeout_is_honoured(serving):
    server = serving("slow")
    client = ServingClient(f"http://127.0.0.1:{server.port}", "retina", timeout=0.3, retries=0)
    start = time.monotonic()
    with pytest.raises(ServingError, match="cannot reach TF Serving|timed out"):
        client.predict([b"\x01"])
    assert time.monotonic() - start < 1.5


def test_bad_arguments_and_missing_grpc_dependency(monkeypatch):
    with pytest.raises(ValueError, match="url must start with http"):
        ServingClient("127.0.0.1:8501")
    with pytest.raises(ValueError, match="retries must be an integer >= 0"):
        ServingClient(retries=-1)
    with pytest.raises(ValueError, match="images is empty"):
        ServingClient().predict([])
    with pytest.raises(TypeError, match="file paths or bytes"):
        ServingClient().predict([3])
    monkeypatch.setitem(sys.modules, "tensorflow_serving", None)
    monkeypatch.setitem(sys.modules, "tensorflow_serving.apis", None)
    with pytest.raises(ImportError, match=r"pip install 'retina_scale\[serving\]'"):
        ServingClient().predict_grpc([b"\x01"])


# ------------------------------------------------------------------ hostile answers (issue 16, defect 11)
def _answer(body: bytes, content_type="application/json", status=200, length=None):
    """A mode for FakeServing: answers every request with ``body`` as it is."""

    def answer(handler, request):
        handler.send_response(status)
        handler.send_header("Content-Type", content_type)
        handler.send_header("Content-Length", str(len(body) if length is None else length))
        handler.end_headers()
        handler.wfile.write(body)

    return answer


GOOD_ROW = {"grade": 1, "grade_continuous": 1.2, "referable": False, "valid": True, "error": ""}


@pytest.mark.parametrize("body, message", [
    (b"{\"predictions\": [", "answered HTTP 200 with something that is not JSON"),
    (b"<html><body>502 Bad Gateway</body></html>", "answered HTTP 200 with something that is not JSON: b'<html>"),
    (b"\xff\xfe\x00garbage", "answered HTTP 200 with something that is not JSON"),
    (b"[1, 2]", "answered HTTP 200 with [1, 2], not a JSON object with 'predictions'"),
    (b"\"predictions\"", "answered HTTP 200 with 'predictions', not a JSON object"),
    (b"{\"outputs\": {}}", "no 'predictions' list of 1"),
    (b"{\"predictions\": [[1, 2, 3]]}", "row 0 is [1, 2, 3], not an object of outputs"),
    (b"{\"predictions\": [{}]}", "row 0 has no grade, grade_continuous, referable, valid, error"),
    (json.dumps({"predictions": [{**GOOD_ROW, "grade": "2"}]}).encode(), "row 0 has grade '2'; expected an integer"),
    (json.dumps({"predictions": [{**GOOD_ROW, "grade": 7}]}).encode(), "row 0 has grade 7; expected an integer in -1..4"),
    (json.dumps({"predictions": [{**GOOD_ROW, "grade": True}]}).encode(), "row 0 has grade True; expected an integer"),
    (json.dumps({"predictions": [{**GOOD_ROW, "grade_continuous": None}]}).encode(),
     "row 0 has grade_continuous None; expected a number"),
    (json.dumps({"predictions": [{**GOOD_ROW, "referable": "yes"}]}).encode(), "row 0 has referable 'yes'"),
    (json.dumps({"predictions": [{**GOOD_ROW, "error": ["x"]}]}).encode(), "row 0 has error ['x']; expected a string"),
    (b"[" * 100_000 + b"]" * 100_000, "answered HTTP 200 with something that is not JSON"),
], ids=["truncated", "html", "binary", "list", "string", "no-predictions", "row-list", "empty-row", "grade-str",
        "grade-7", "grade-bool", "score-null", "referable-str", "error-list", "deep"])
def test_an_answer_that_is_not_tf_servings_is_a_serving_error(serving, body, message):
    server = serving(_answer(body))
    client = ServingClient(f"http://127.0.0.1:{server.port}", "retina", timeout=10, retries=2, sleep=lambda s: None)
    with pytest.raises(ServingError) as info:
        client.predict([b"\x01photo"])
    assert message in str(info.value) and len(str(info.value)) < 700 and "\n" not in str(info.value)
    assert len(server.requests) == 1  # a malformed answer is not retried


def test_the_operating_points_outputs_are_kept_when_the_export_answers_them(serving):
    rows = [{**GOOD_ROW, "refer_high_sensitivity": True, "refer_high_specificity": False}, GOOD_ROW]
    server = serving(_answer(json.dumps({"predictions": rows}).encode()))
    client = ServingClient(f"http://127.0.0.1:{server.port}", "retina", timeout=10)
    got = client.predict([b"\x01a", b"\x01b"])
    assert got[0]["refer_high_sensitivity"] is True and got[0]["refer_high_specificity"] is False
    assert "refer_high_sensitivity" not in got[1]  # an export without operating points: not invented
    bad = serving(_answer(json.dumps({"predictions": [{**GOOD_ROW, "refer_high_sensitivity": "yes"}]}).encode()))
    with pytest.raises(ServingError, match="row 0 has refer_high_sensitivity 'yes'; expected true or false"):
        ServingClient(f"http://127.0.0.1:{bad.port}", "retina", timeout=10).predict([b"\x01a"])


def test_an_answer_over_the_size_cap_is_refused_unread(serving):
    big = json.dumps({"predictions": [GOOD_ROW], "padding": "x" * 5000}).encode()
    server = serving(_answer(big))
    client = ServingClient(f"http://127.0.0.1:{server.port}", "retina", max_response_bytes=4096)
    with pytest.raises(ServingError, match=f"answer from .* is {len(big)} bytes; the client reads at most 4096"):
        client.predict([b"\x01"])
    # A server that does not say how long its answer is (no Content-Length) is cut at the cap too.
    def no_length(handler, request):
        handler.send_response(200)
        handler.send_header("Content-Type", "application/json")
        handler.send_header("Connection", "close")
        handler.end_headers()
        handler.wfile.write(big)

    server = serving(no_length)
    with pytest.raises(ServingError, match="is over 4096 bytes; the client reads at most 4096"):
        ServingClient(f"http://127.0.0.1:{server.port}", "retina", max_response_bytes=4096).predict([b"\x01"])
    assert ServingClient(f"http://127.0.0.1:{server.port}", "retina").predict([b"\x01"])[0]["grade"] == 1


def test_a_server_that_drips_its_answer_is_cut_off_at_the_calls_deadline(serving):
    answer = json.dumps({"predictions": [GOOD_ROW]}).encode()

    def drip(handler, request):  # a complete, valid answer, one byte every 0.1 s (about 10 s in all)
        handler.send_response(200)
        handler.send_header("Content-Type", "application/json")
        handler.send_header("Content-Length", str(len(answer)))
        handler.end_headers()
        try:
            for i in range(len(answer)):
                handler.wfile.write(answer[i:i + 1])
                handler.wfile.flush()
                time.sleep(0.1)
        except OSError:  # the client hung up
            pass

    server = serving(drip)
    client = ServingClient(f"http://127.0.0.1:{server.port}", "retina", timeout=1, retries=3, sleep=lambda s: None)
    with pytest.raises(ServingError, match=r"did not answer within the call's deadline of 1 s \(timed out\)"):
        client.predict([b"\x01"])  # each byte comes well within 1 s: a per-read timeout never fires
    assert len(server.requests) == 1  # a call past its deadline is not retried


def test_retries_stop_at_the_calls_deadline(serving):
    server = serving("unavailable")
    waits = []
    client = ServingClient(f"http://127.0.0.1:{server.port}", "retina", timeout=1, retries=5, backoff=0.4,
                           sleep=waits.append)
    with pytest.raises(ServingError, match=r"HTTP 503 .*gave up after 3 attempts: the call's 1 s deadline"):
        client.predict([b"\x01"])
    assert waits == [0.4, 0.8]  # the next wait (1.6 s) would pass the deadline: no waiting for nothing


def test_bad_client_settings_are_refused():
    with pytest.raises(ValueError, match="timeout must be a positive number of seconds"):
        ServingClient(timeout=float("inf"))
    with pytest.raises(ValueError, match="max_response_bytes must be a positive integer"):
        ServingClient(max_response_bytes=0)
