"""A small OpenAI-compatible chat-completions server for tests (stdlib only, loopback only).

``FakeOpenAIServer`` serves ``POST /v1/chat/completions`` on 127.0.0.1 (OS-chosen port) from a
background thread. Its answer is a function of the conversation's user messages: the first keyword
of ``keywords`` found (latest user message first, case-insensitive) gives the label, so a test knows
the right answer. Faults are injected by ``script``, one behaviour consumed per request, then
``default`` for every later request:

- ``"ok"``: a normal answer (after ``latency`` seconds)
- ``"429"`` / ``"429:0.3"``: HTTP 429 with ``Retry-After`` (default ``retry_after``)
- ``"500"`` / ``"503"`` / ``"401"`` / ...: that status with an OpenAI-style error body
- ``"slow:2.0"``: sleep 2 s, then answer normally (meant to exceed the client's timeout)
- ``"garbage"``: HTTP 200 with a non-JSON body
- ``"drop"``: close the connection without answering
- ``"nolabel"``: a normal response whose answer is ``"I think maybe"`` (no label, no label logprobs)

With ``keep_alive`` the server speaks HTTP/1.1 and keeps each connection open for the next request,
as real servers (llama-server, vLLM) do; by default it answers in HTTP/1.0 and closes the connection
after every answer. ``connections`` counts the connections it accepted.

A token is ``chars_per_token`` characters; with ``honour_max_tokens`` an answer is cut after
``max_tokens`` tokens, as a real server cuts it.

It counts requests per behaviour, records every ``Authorization`` header, request body and the
maximum number of requests in flight at once.
"""

from __future__ import annotations

import json
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

NOLABEL_ANSWER = "I think maybe"
FILLER_TOKENS = ("I", "Hmm", "The", "This", "It", "A", "Maybe", "Well", "Yes", "No", "Label", "Answer")


def keyword_policy(keywords: dict[str, str]) -> Callable[[list[str]], str]:
    """Answer policy: label of the first keyword found in the user messages, latest first."""

    def policy(user_messages: list[str]) -> str:
        for text in reversed(user_messages):
            low = text.lower()
            for keyword, label in keywords.items():
                if keyword.lower() in low:
                    return label
        return NOLABEL_ANSWER

    return policy


class FakeOpenAIServer:
    def __init__(
        self,
        *,
        labels: Sequence[str] = (),
        keywords: dict[str, str] | None = None,
        policy: Callable[[list[str]], str] | None = None,
        script: Iterable[str] = (),
        default: str = "ok",
        logprobs: bool = True,
        latency: float = 0.0,
        retry_after: str = "0.05",
        error_message: str | None = None,
        chars_per_token: int = 4,
        honour_max_tokens: bool = False,
        keep_alive: bool = False,
    ) -> None:
        self.labels = list(labels)
        self.policy = policy or keyword_policy(keywords or {})
        self.script = list(script)
        self.default = default
        self.logprobs = logprobs
        self.latency = latency
        self.retry_after = retry_after
        self.error_message = error_message
        self.chars_per_token = chars_per_token
        self.honour_max_tokens = honour_max_tokens
        self.keep_alive = keep_alive
        self.connections = 0
        self.counts: Counter[str] = Counter()
        self.auth_headers: list[str | None] = []
        self.bodies: list[dict[str, Any]] = []
        self.request_times: list[float] = []
        self.in_flight = 0
        self.max_in_flight = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._url: str | None = None

    # lifecycle ---------------------------------------------------------------------------------

    @property
    def url(self) -> str:
        assert self._url is not None, "server not started"
        return self._url

    @property
    def requests(self) -> int:
        return sum(self.counts.values())

    def start(self) -> FakeOpenAIServer:
        server = self

        class Handler(_Handler):
            owner = server
            protocol_version = "HTTP/1.1" if server.keep_alive else "HTTP/1.0"

        httpd = _QuietServer(("127.0.0.1", 0), Handler)
        self._httpd = httpd
        host, port = httpd.server_address[:2]
        self._url = f"http://{host}:{port}/v1"
        self._thread = threading.Thread(
            target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, name="fake-openai", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()  # wakes handlers sleeping in "slow" behaviours
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
        if self._thread is not None:
            self._thread.join(timeout=10)
        self._httpd = None
        self._thread = None

    def __enter__(self) -> FakeOpenAIServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # request handling --------------------------------------------------------------------------

    def next_behaviour(self) -> str:
        with self._lock:
            behaviour = self.script.pop(0) if self.script else self.default
            self.counts[behaviour] += 1
            return behaviour

    def completion(self, body: dict[str, Any], answer: str) -> dict[str, Any]:
        if self.honour_max_tokens:  # the answer stops after max_tokens tokens, as a real server's
            answer = answer[: int(body.get("max_tokens") or 16) * self.chars_per_token]
        messages = body.get("messages") or []
        prompt_chars = sum(len(str(m.get("content") or "")) for m in messages)
        prompt_tokens = max(1, prompt_chars // 4)
        completion_tokens = max(1, len(answer) // 4)
        choice: dict[str, Any] = {
            "index": 0,
            "message": {"role": "assistant", "content": answer},
            "finish_reason": "stop",
            "logprobs": None,
        }
        if self.logprobs and body.get("logprobs"):
            choice["logprobs"] = {
                "content": [self._first_token_logprobs(answer, int(body.get("top_logprobs") or 0))]
            }
        return {
            "id": "chatcmpl-test",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": body.get("model", "test"),
            "choices": [choice],
            "usage": {
                "prompt_tokens": prompt_tokens,
                "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens,
            },
        }

    def _first_token_logprobs(self, answer: str, top_n: int) -> dict[str, Any]:
        """Crude tokenizer: a token is ``chars_per_token`` characters of a word."""
        n = self.chars_per_token
        words = answer.split()
        first = words[0][:n] if words else ""
        top = [(first, -0.05)]
        if answer in self.labels:
            # Other labels' first tokens as unlikely alternatives, as a real model would list them.
            top += [(" " + label[:n], -3.0 - i) for i, label in enumerate(self.labels) if label != answer]
        fillers = [
            t for t in FILLER_TOKENS if not any(lab.lower().startswith(t.lower()) for lab in self.labels)
        ]
        top += [(t, -8.0 - i) for i, t in enumerate(fillers) if t != first]
        top = top[: max(top_n, 1)]
        return {
            "token": first,
            "logprob": -0.05,
            "bytes": list(first.encode()),
            "top_logprobs": [{"token": t, "logprob": lp, "bytes": list(t.encode())} for t, lp in top],
        }


class _QuietServer(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # a client that hung up (timeout, "drop") is expected here


class _Handler(BaseHTTPRequestHandler):
    owner: FakeOpenAIServer
    timeout = 10  # socket timeout: no handler waits forever on a silent client
    server_version = "FakeOpenAI/1.0"
    _in_flight = False  # this handler's request counted in the owner's in_flight

    def log_message(self, format: str, *args: Any) -> None:  # quiet
        pass

    def setup(self) -> None:
        super().setup()
        with self.owner._lock:
            self.owner.connections += 1

    def _send_json(self, status: int, payload: Any, headers: dict[str, str] | None = None) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        self._answered()
        self.wfile.write(data)

    def _error(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        self._send_json(
            status, {"error": {"message": message, "type": "test_error", "code": status}}, headers
        )

    def do_POST(self) -> None:
        owner = self.owner
        with owner._lock:
            owner.in_flight += 1
            owner.max_in_flight = max(owner.max_in_flight, owner.in_flight)
            owner.request_times.append(time.monotonic())
            owner.auth_headers.append(self.headers.get("Authorization"))
        self._in_flight = True
        try:
            self._handle()
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client gave up (timeout): nothing to answer
        finally:
            self._answered()

    def _answered(self) -> None:
        """The request stops counting as in flight just before its answer's last bytes go out: once
        the client has them it may send its next request, which must not find this one counted."""
        if self._in_flight:
            self._in_flight = False
            with self.owner._lock:
                self.owner.in_flight -= 1

    def _handle(self) -> None:
        owner = self.owner
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        if self.path.rstrip("/") != "/v1/chat/completions":
            self._error(404, f"no route {self.path}")
            return
        try:
            body = json.loads(raw)
        except ValueError:
            self._error(400, "body is not JSON")
            return
        with owner._lock:
            owner.bodies.append(body)
        behaviour = owner.next_behaviour()
        name, _, arg = behaviour.partition(":")

        if name == "drop":
            self.close_connection = True
            self.connection.shutdown(2)  # socket.SHUT_RDWR
            return
        if name == "429":
            self._error(429, "Rate limit reached", {"Retry-After": arg or owner.retry_after})
            return
        if name.isdigit() and name != "200":
            status = int(name)
            message = owner.error_message or f"test error {status}"
            auth = self.headers.get("Authorization") or ""
            if status == 401:
                # Echo the key back, as some servers do, to check the client scrubs it.
                message = owner.error_message or f"Incorrect API key provided: {auth.removeprefix('Bearer ')}"
            self._error(status, message)
            return
        if name == "garbage":
            data = b"<html><body>502 Bad Gateway (not JSON)</body></html>"
            self.send_response(200)
            self.send_header("Content-Type", "text/html")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self._answered()
            self.wfile.write(data)
            return
        if name == "slow":
            owner._stop.wait(float(arg or 2.0))
        elif owner.latency:
            owner._stop.wait(owner.latency)

        user_messages = [
            str(m.get("content") or "") for m in body.get("messages", []) if m.get("role") == "user"
        ]
        answer = NOLABEL_ANSWER if name == "nolabel" else owner.policy(user_messages)
        self._send_json(200, owner.completion(body, answer))
