"""The load test's replay survives a server that drops a connection without answering (fast, no vLLM).

A keep-alive connection that the server closes just as the client reuses it reads as
`RemoteProtocolError` ("Server disconnected without sending a response"); CI saw it once in the
replay against vLLM alone.  `replay` retries on a new connection; an error that persists still raises.
"""

from __future__ import annotations

import json
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))

from load_trace import Outcome, replay  # noqa: E402


class _Flaky(BaseHTTPRequestHandler):
    drops = 0  # how many requests to drop (close without a response) before answering

    def do_POST(self):  # noqa: N802
        self.rfile.read(int(self.headers["Content-Length"]))
        cls = type(self)
        if cls.drops > 0:
            cls.drops -= 1
            self.close_connection = True
            self.connection.close()
            return
        body = json.dumps({"choices": [{"text": " a b", "logprobs": {
            "token_logprobs": [-0.5, -0.25], "tokens": [" a", " b"], "top_logprobs": [{" a": -0.5}, {" b": -0.25}]}}]})
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body.encode())

    def log_message(self, *args):
        pass


@pytest.fixture()
def flaky():
    srv = ThreadingHTTPServer(("127.0.0.1", 0), _Flaky)
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    yield srv
    srv.shutdown()


def test_replay_retries_a_dropped_connection(flaky):
    _Flaky.drops = 1
    out = Outcome("raw", "/v1/completions", {"model": "m", "prompt": "x", "max_tokens": 2})
    with httpx.Client(base_url=f"http://127.0.0.1:{flaky.server_address[1]}", timeout=10) as http:
        text, lps, toks, _ = replay(http, out)
    assert (text, lps, toks) == (" a b", [-0.5, -0.25], [" a", " b"])
    assert _Flaky.drops == 0


def test_replay_raises_when_the_server_keeps_dropping(flaky):
    _Flaky.drops = 10
    out = Outcome("raw", "/v1/completions", {"model": "m", "prompt": "x", "max_tokens": 2})
    with httpx.Client(base_url=f"http://127.0.0.1:{flaky.server_address[1]}", timeout=10) as http:
        with pytest.raises(httpx.RemoteProtocolError):
            replay(http, out)
    assert _Flaky.drops == 7
