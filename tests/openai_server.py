"""A small OpenAI-compatible HTTP server for tests (standard library only, loopback only).

    with OpenAIServer(delay=0.05) as server:
        model = OpenAICompatible(base_url=server.base_url, api_key="sk-test", ...)
        server.fail["picture 2"] = "500"      # requests whose text contains this fail
        ...
        server.count()                        # HTTP requests received so far

It answers ``POST /v1/chat/completions`` (all lmms-eval's ``openai`` model calls) and
``GET /v1/models``. An answer is a pure function of the model name, the text and the image
bytes of the request, and carries ``usage`` token counts (words of text + 85 per image in,
words of the answer out). Every request is recorded (:class:`Record`), including the
``Authorization`` header, so that tests can check what the client sent.

Failures, chosen by a substring of the request's text (``server.fail[substring] = mode``):

* ``"500"``: HTTP 500 with an OpenAI-style error body;
* ``"malformed"``: HTTP 200 whose completion has no choices (the client parses it, the
  model's ``response.choices[0]`` raises);
* ``"bad-json"``: HTTP 200 whose body is not JSON;
* ``"empty"``: HTTP 200 whose message content is ``null``.

Failed answers carry ``x-should-retry: false`` so that the OpenAI client does not retry on
its own (``retry_failures=True`` lets it): each of the model's own attempts is then exactly
one HTTP request.

Run it by hand with ``python tests/openai_server.py [--delay S]``: it prints its base URL.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

__all__ = ["FAILURE_MODES", "OpenAIServer", "Record"]

FAILURE_MODES = ("500", "malformed", "bad-json", "empty")
IMAGE_TOKENS = 85  # what one low-detail image costs with OpenAI


@dataclass
class Record:
    """One HTTP request the server received."""

    method: str
    path: str
    model: str | None = None
    text: str = ""  # the text parts of all messages, joined by newlines
    images: list[str] = field(default_factory=list)  # sha256 of each decoded image_url payload
    authorization: str | None = None
    body: dict[str, Any] = field(default_factory=dict)
    outcome: str = "ok"  # "ok" or the failure mode
    prompt_tokens: int = 0
    completion_tokens: int = 0


class OpenAIServer:
    """An OpenAI-compatible server on ``127.0.0.1`` and a free port, in a daemon thread.

    Args:
        delay: seconds to wait before each answer (the API's latency).
        fail: ``{substring of the text: mode}``; change it at any time.
        answer: ``Record -> str`` replacing the default answer text.
        retry_failures: let the OpenAI client retry failed answers by itself.
    """

    def __init__(self, delay: float = 0.0, fail: dict[str, str] | None = None,
                 answer: Callable[[Record], str] | None = None, retry_failures: bool = False) -> None:  # fmt: skip
        self.delay = delay
        self.fail: dict[str, str] = dict(fail or {})
        self.answer = answer or default_answer
        self.retry_failures = retry_failures
        self._records: list[Record] = []
        self._lock = threading.Lock()
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # -- lifecycle ----------------------------------------------------------------------------

    def start(self) -> OpenAIServer:
        server = self

        class Handler(_Handler):
            owner = server

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="openai-test-server",
                                        kwargs={"poll_interval": 0.05}, daemon=True)  # fmt: skip
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            assert self._thread is not None
            self._thread.join(timeout=10)
            self._httpd = self._thread = None

    def __enter__(self) -> OpenAIServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def port(self) -> int:
        assert self._httpd is not None, "the server is not running"
        return int(self._httpd.server_address[1])

    @property
    def base_url(self) -> str:
        """What to pass as ``base_url`` to an OpenAI client."""
        return f"http://127.0.0.1:{self.port}/v1"

    # -- what was asked -------------------------------------------------------------------------

    @property
    def requests(self) -> list[Record]:
        """A copy of the records so far, in arrival order."""
        with self._lock:
            return list(self._records)

    def count(self, contains: str | None = None, outcome: str | None = None) -> int:
        """Completion requests received, optionally only those whose text contains
        ``contains`` and whose outcome is ``outcome``."""
        return sum(1 for r in self.requests if r.path.endswith("/chat/completions")
                   and (contains is None or contains in r.text)
                   and (outcome is None or r.outcome == outcome))  # fmt: skip

    def reset(self) -> None:
        """Forget the records (the failure rules stay)."""
        with self._lock:
            self._records.clear()

    def _record(self, record: Record) -> None:
        with self._lock:
            self._records.append(record)

    def _failure_for(self, text: str) -> str | None:
        for needle, mode in list(self.fail.items()):
            if needle in text:
                if mode not in FAILURE_MODES:
                    raise ValueError(f"unknown failure mode {mode!r}; use one of {FAILURE_MODES}")
                return mode
        return None


def default_answer(record: Record) -> str:
    """Deterministic: the same model, text and images always get the same answer."""
    seen = hashlib.sha256("".join(record.images).encode()).hexdigest()[:8] if record.images else "none"
    question = " ".join(record.text.split())[-60:]
    return f"{record.model} answers {question!r} having seen {len(record.images)} image(s) {seen}"


def _words(text: str) -> int:
    return len(text.split())


class _Handler(BaseHTTPRequestHandler):
    owner: OpenAIServer
    protocol_version = "HTTP/1.1"  # keep-alive, as the OpenAI client expects

    def log_message(self, format: str, *args: Any) -> None:  # quiet
        pass

    def do_GET(self) -> None:
        record = Record(method="GET", path=self.path, authorization=self.headers.get("Authorization"))
        self.owner._record(record)
        if self.path.rstrip("/").endswith("/models"):
            self._json(
                200, {"object": "list", "data": [{"id": "fake-gpt", "object": "model", "owned_by": "tests"}]}
            )
        else:
            self._json(404, {"error": {"message": f"no route {self.path}", "type": "not_found"}})

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length)
        record = Record(method="POST", path=self.path, authorization=self.headers.get("Authorization"))
        if not self.path.rstrip("/").endswith("/chat/completions"):
            self.owner._record(record)
            self._json(404, {"error": {"message": f"no route {self.path}", "type": "not_found"}})
            return
        try:
            body = json.loads(raw)
        except ValueError:
            self.owner._record(record)
            self._json(400, {"error": {"message": "the body is not JSON", "type": "invalid_request_error"}})
            return
        record.body = body
        record.model = body.get("model")
        texts, images = [], []
        for message in body.get("messages", []):
            content = message.get("content")
            parts = [{"type": "text", "text": content}] if isinstance(content, str) else content or []
            for part in parts:
                if part.get("type") == "text":
                    texts.append(part.get("text", ""))
                elif part.get("type") == "image_url":
                    url = part.get("image_url", {}).get("url", "")
                    data = url.split(",", 1)[1] if url.startswith("data:") else url
                    try:
                        payload = base64.b64decode(data)
                    except ValueError:
                        payload = data.encode()
                    images.append(hashlib.sha256(payload).hexdigest())
        record.text = "\n".join(texts)
        record.images = images
        mode = self.owner._failure_for(record.text)
        record.outcome = mode or "ok"
        if self.owner.delay:
            time.sleep(self.owner.delay)
        if mode is None:
            content: str | None = self.owner.answer(record)
        else:
            content = None
        record.prompt_tokens = _words(record.text) + IMAGE_TOKENS * len(images)
        record.completion_tokens = _words(content or "")
        self.owner._record(record)
        retry = {"x-should-retry": "true" if self.owner.retry_failures else "false"}
        if mode == "500":
            self._json(500, {"error": {"message": "the test server failed this request on purpose",
                                       "type": "server_error"}}, retry)  # fmt: skip
            return
        if mode == "bad-json":
            self._send(200, b"{this is not json", "application/json", retry)
            return
        completion = {
            "id": f"chatcmpl-{len(self.owner.requests)}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": record.model,
            "choices": [] if mode == "malformed" else [
                {"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": content}}
            ],
            "usage": {"prompt_tokens": record.prompt_tokens, "completion_tokens": record.completion_tokens,
                      "total_tokens": record.prompt_tokens + record.completion_tokens},
        }  # fmt: skip
        self._json(200, completion, retry if mode else None)

    def _json(self, status: int, obj: Any, headers: dict[str, str] | None = None) -> None:
        self._send(status, json.dumps(obj).encode(), "application/json", headers)

    def _send(
        self, status: int, data: bytes, content_type: str, headers: dict[str, str] | None = None
    ) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(data)


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--delay", type=float, default=0.0, help="seconds before each answer")
    options = parser.parse_args()
    with OpenAIServer(delay=options.delay) as running:
        print(running.base_url, flush=True)
        with contextlib.suppress(KeyboardInterrupt):
            threading.Event().wait()
