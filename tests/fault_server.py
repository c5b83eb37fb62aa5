"""A teacher that misbehaves on request: chat completions on loopback, for the fault, resume and cluster tests."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections import defaultdict
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

SECRET = "sk-test-5ecret-do-not-leak"


class FaultServer:
    """Chat completions on loopback; the passage text picks the behaviour. Counts requests per passage and keeps
    server-side timestamps. With `api_key`, a request without that key gets 401, as a real endpoint answers. A
    `paced` server holds each request until `allow()` lets it through: a test then catches a run halfway however
    fast or slow the machine is."""

    def __init__(self, latency_s: float = 0.0, api_key: str = "", paced: bool = False):
        self.latency_s = latency_s
        self.api_key = api_key
        self.paced = paced
        self.waiting = 0  # requests a paced server holds
        self.allowed = 0  # of those, how many may go on (never more than are waiting: nothing is let through ahead)
        self.requests: dict[str, list[float]] = defaultdict(list)
        self.keys: set[str] = set()
        self.lock = threading.Lock()
        self.pace = threading.Condition(self.lock)
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def count(self, passage: str) -> int:
        with self.lock:
            return len(self.requests[passage])

    def times(self) -> list[float]:
        with self.lock:
            return sorted(t for ts in self.requests.values() for t in ts)

    def allow(self, answers: int) -> None:
        """Let up to `answers` of the requests a paced server holds now go on."""
        with self.pace:
            self.allowed = min(self.allowed + answers, self.waiting)
            self.pace.notify_all()

    def unpace(self) -> None:
        """Hold no request from now on."""
        with self.pace:
            self.paced = False
            self.pace.notify_all()

    def stop(self) -> None:
        self.unpace()
        self.httpd.shutdown()

    def _wait_for_pace(self) -> None:
        with self.pace:
            if not self.paced:
                return
            self.waiting += 1
            self.pace.wait_for(lambda: self.allowed > 0 or not self.paced)
            self.waiting -= 1
            self.allowed = max(0, self.allowed - 1)

    def _handler(self):
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                passage = body["messages"][-1]["content"].split("Passage: ", 1)[1]
                with server.lock:
                    server.requests[passage].append(time.monotonic())
                    nth = len(server.requests[passage])
                    server.keys.add(self.headers.get("Authorization", ""))
                server._wait_for_pace()
                time.sleep(server.latency_s)
                status, content, finish, headers = server.behave(passage, nth)
                if server.api_key and self.headers.get("Authorization") != f"Bearer {server.api_key}":
                    status, content, headers = 401, "Incorrect API key provided", {}
                if status == -1:  # the connection drops without an answer
                    self.close_connection = True
                    self.connection.shutdown(socket.SHUT_RDWR)
                    return
                if status == -2:  # a proxy's login page, with status 200
                    page = b"<html><body><h1>Proxy login required</h1></body></html>"
                    self.send_response(200)
                    self.send_header("Content-Type", "text/html")
                    self.send_header("Content-Length", str(len(page)))
                    self.end_headers()
                    self.wfile.write(page)
                    return
                if status == 0:
                    time.sleep(6)  # past the client's timeout
                    status, content, finish = 200, '[("late", "answer")]', "stop"
                if status != 200:
                    self._send(status, {"error": {"message": content, "type": "fault", "code": status}}, headers)
                    return
                message = {"role": "assistant", "content": content, "refusal": None}
                self._send(
                    200,
                    {
                        "id": "x",
                        "object": "chat.completion",
                        "created": 0,
                        "model": body["model"],
                        "choices": [{"index": 0, "message": message, "finish_reason": finish}],
                        "usage": {"prompt_tokens": 40 + len(passage) // 4, "completion_tokens": 12, "total_tokens": 52},
                    },
                    {},
                )

            def _send(self, status, payload, headers):
                data = json.dumps(payload).encode()
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    for name, value in headers.items():
                        self.send_header(name, value)
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):
                    pass

        return Handler

    def behave(self, passage: str, nth: int) -> tuple[int, str, str, dict]:
        """(HTTP status, or 0 for "too slow", -1 for a dropped connection, -2 for an HTML page; content, finish_reason,
        headers) for the nth request of a passage."""
        name = passage.split()[0]
        if passage.startswith("RATELIMITED") and nth == 1:
            return 429, "slow down", "", {"Retry-After": "1"}
        if passage.startswith("FLAKY") and nth == 1:
            return 500, "internal error", "", {}
        if passage.startswith("DROPPED") and nth == 1:
            return -1, "", "", {}
        if passage.startswith("SLOW") and nth == 1:
            return 0, "", "", {}
        if passage.startswith("PROXY"):
            return -2, "", "", {}
        if passage.startswith("BROKEN"):
            return 503, "unavailable", "", {}
        if passage.startswith("LEAKY"):
            return 400, f"bad request from key {SECRET}", "", {}
        if passage.startswith("UNAUTHORIZED"):
            return 401, "invalid api key", "", {}
        if passage.startswith("REFUSE"):
            return 200, "I'm sorry, but I can't help with that.", "stop", {}
        if passage.startswith("GARBLED"):
            return 200, "Entities: the passage talks about things.", "stop", {}
        if passage.startswith("CUTOFF"):
            return 200, f'[("{name}", "signal"), ("Paris", "ci', "length", {}
        return 200, f'Here you go:\n```\n[("{name}", "word"), ("Zanzibar", "island"), ("it", "none")]\n```', "stop", {}
