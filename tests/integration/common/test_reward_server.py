"""The reward-server form (``reward.url``) against a real local HTTP server (stdlib http.server in a
thread): the protocol, timeouts and retries, and clear errors when the server is down or answers
nonsense."""

from __future__ import annotations

import json
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from common.config import RewardConfig
from common.data import wire_metadata
from common.errors import RewardError
from common.rewards import RewardItem, resolve_reward
from common.rewards.server import HttpReward


class Server:
    """A reward server whose next answers can be scripted: ``plan`` holds ("fail", code), ("sleep", s),
    ("raw", body) or ("ok", None) steps, used up one per request; then every request is scored."""

    def __init__(self) -> None:
        self.plan: list[tuple[str, object]] = []
        self.requests: list[dict] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # quiet
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                outer.requests.append(body)
                step, arg = outer.plan.pop(0) if outer.plan else ("ok", None)
                if step == "sleep":
                    time.sleep(float(arg))
                if step == "fail":
                    self.send_response(int(arg))
                    self.end_headers()
                    self.wfile.write(b"server trouble")
                    return
                if step == "raw":
                    data = bytes(arg)
                else:
                    rewards = [
                        1.0 if it["answer"] in it["response"] and it["prompt"].startswith("Q") else -1.0
                        for it in body["items"]
                    ]
                    data = json.dumps({"rewards": rewards}).encode()
                try:
                    self.send_response(200)
                    self.send_header("Content-Type", "application/json")
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):  # the client gave up (timeout test)
                    pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/score"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(10)


@pytest.fixture
def server():
    s = Server()
    yield s
    s.stop()


def items() -> list[RewardItem]:
    meta = wire_metadata({"data_source": "dapo", "extra_info": {"index": 7}})
    return [
        RewardItem("so \\boxed{5}", "5", {"answer": "5", **meta}, 10, "Q: 2+3?"),
        RewardItem("so \\boxed{6}", "5", {"answer": "5", **meta}, 12, "Q: 2+3?"),
    ]


def test_scores_through_the_server(server):
    fn = resolve_reward("auto", cfg=RewardConfig(url=server.url, timeout_s=5.0))
    assert isinstance(fn, HttpReward)
    got = fn.judge_many(items())
    assert [(s.reward, s.correct) for s in got] == [(1.0, True), (-1.0, False)]
    [req] = server.requests
    first = req["items"][0]
    assert first["prompt"] == "Q: 2+3?" and first["response"] == "so \\boxed{5}" and first["answer"] == "5"
    assert first["metadata"]["extra_info"] == {"index": 7}  # nested metadata arrives as objects
    assert fn.stats.calls == 2 and fn.stats.errors == 0


def test_retries_failures_and_timeouts(server):
    fn = HttpReward(server.url, retries=3, backoff_s=0.01, timeout_s=0.5)
    server.plan = [("fail", 503), ("sleep", 1.5), ("fail", 429)]  # a 5xx, a timed-out try, a 429
    assert fn.score_many(items()) == [1.0, -1.0]
    assert len(server.requests) == 4 and fn.stats.errors == 3
    assert "HTTP 429" in fn.stats.last_error


def test_clear_errors(server):
    fn = HttpReward(server.url, retries=1, backoff_s=0.01, timeout_s=2.0)
    server.plan = [("fail", 400)]  # a client error is not retried: the request itself is wrong
    with pytest.raises(RewardError, match=r"refused the request \(HTTP 400: server trouble\)"):
        fn.score_many(items())
    assert len(server.requests) == 1
    server.plan = [("raw", b'{"rewards": [1.0]}')]
    with pytest.raises(RewardError, match=r"must answer \{\"rewards\": \[\.\.\.\]\} with 2 values"):
        fn.score_many(items())
    server.plan = [("raw", b'{"rewards": ["yes", 1]}')]
    with pytest.raises(RewardError, match="must return a finite float"):
        fn.score_many(items())
    server.plan = [("raw", b"not json")]
    with pytest.raises(RewardError, match="invalid JSON"):
        fn.score_many(items())
    # the server goes down mid-run: retried, then an error naming the server and the fix
    server.stop()
    t0 = time.monotonic()
    with pytest.raises(
        RewardError, match=r"failed 2 times \(last: ConnectionRefusedError.*check that it is up"
    ):
        fn.score_many(items())
    assert time.monotonic() - t0 < 5.0


def test_down_at_start_up():
    with socket.socket() as s:  # a port with nothing listening
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(
        RewardError, match=rf"reward server http://127.0.0.1:{port}/score is not reachable.*start it"
    ):
        resolve_reward("auto", cfg=RewardConfig(url=f"http://127.0.0.1:{port}/score", timeout_s=1.0))
