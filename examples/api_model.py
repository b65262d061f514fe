"""An API-priced model, cached: the second run sends nothing and costs nothing.

    python examples/api_model.py [--price-per-1k-tokens 0.005] [--latency 0.2] [--cache-dir DIR] [--port N]

lmms-eval's own ``openai`` model (what ``--model openai`` builds) answers questions about
images through an OpenAI-compatible API. To run offline, this script starts a tiny
stand-in for that API on 127.0.0.1, port 18765 unless ``--port`` says otherwise (it waits
``--latency`` seconds per request and reports token usage as OpenAI does); point
``base_url`` at a real endpoint and nothing else changes.

The evaluation runs twice, each time with a new model object and a new proxy, as after a
restart. The first run pays for every request; the second is answered from the cache on
disk, token counts included, so the script can tell what the second run saved. Run the
script again with the same ``--cache-dir`` (and port) and both runs are free: nothing is
sent to the API at all. Without ``--cache-dir`` the cache lives in a temporary directory,
removed at the end.

The cache tells models apart by their class, ``model_version`` and endpoint URL (never the
API key): two servers are two models, so the stand-in's port is fixed and a second run
finds the first one's answers. If the URL of the same model changes between runs (a local
server restarted on a new port), name the model yourself:
``cached(model, path, model_id="my-gpt-4o")``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")  # nothing here needs the Hub
os.environ.setdefault("HF_HUB_OFFLINE", "1")


# -- a stand-in for the API (skip this part when you have a real endpoint) -------------------


class FakeAPI(ThreadingHTTPServer):
    """``POST /v1/chat/completions`` on a loopback port; counts what it is sent."""

    daemon_threads = True

    def __init__(self, latency: float, port: int = 0) -> None:
        super().__init__(("127.0.0.1", port), _Handler)
        self.latency = latency
        self.requests = 0
        self.tokens = 0
        self.lock = threading.Lock()

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/v1"


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: FakeAPI

    def log_message(self, *args: object) -> None:
        pass

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        parts = [p for m in body["messages"] for p in m["content"]]
        text = " ".join(p["text"] for p in parts if p["type"] == "text")
        images = sum(p["type"] == "image_url" for p in parts)
        time.sleep(self.server.latency)  # the API thinking
        answer = f"A small square picture ({images} image) for the question: {text}"
        usage = {"prompt_tokens": len(text.split()) + 85 * images, "completion_tokens": len(answer.split())}
        usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
        with self.server.lock:
            self.server.requests += 1
            self.server.tokens += usage["total_tokens"]
        data = json.dumps({"id": "chatcmpl-demo", "object": "chat.completion", "created": int(time.time()),
                           "model": body["model"], "usage": usage, "choices": [
                               {"index": 0, "finish_reason": "stop",
                                "message": {"role": "assistant", "content": answer}}]}).encode()  # fmt: skip
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


DEFAULT_PORT = 18765

# -- the evaluation ---------------------------------------------------------------------------

TASK, SPLIT = "demo_vqa", "test"


def doc_to_messages(doc: dict) -> list[dict]:
    """What a chat-layout lmms-eval task gives the model for one document."""
    return [{"role": "user", "content": [{"type": "image", "url": doc["image"]},
                                         {"type": "text", "text": doc["question"]}]}]  # fmt: skip


def evaluate(base_url: str, cache_dir: str, docs: list[dict]) -> tuple[list, object, float]:
    from lmms_eval.api.instance import Instance
    from lmms_eval.models import get_model

    from lmms_cache import cached

    model_class = get_model("openai")  # the class `--model openai` uses (chat layout)
    model = model_class(model_version="gpt-4o-mini", base_url=base_url, api_key="sk-demo-not-a-real-key",
                        num_concurrent=8, max_retries=2, retry_backoff_s=0.5, httpx_trust_env=False)  # fmt: skip
    model.task_dict = {TASK: {SPLIT: docs}}  # simple_evaluate does this for each task
    lm = cached(model, cache_dir)  # the one line
    requests = [
        Instance("generate_until", (doc["question"], doc_to_messages, {"max_new_tokens": 64, "temperature": 0},
                                    i, TASK, SPLIT),
                 idx=0, metadata={"task": TASK, "doc_id": i, "repeats": 1, "split": SPLIT})
        for i, doc in enumerate(docs)
    ]  # fmt: skip
    started = time.perf_counter()
    results = lm.generate_until(requests)
    elapsed = time.perf_counter() - started
    stats = lm.cache_stats
    lm.cache_close()
    return results, stats, elapsed


def tokens(results: list) -> int:
    """Tokens the API billed for these answers (GenerationResult.token_counts)."""
    return sum((r.token_counts.input_tokens or 0) + (r.token_counts.output_tokens or 0)
               for r in results if r.token_counts is not None)  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--price-per-1k-tokens", type=float, default=None, metavar="USD",
                        help="what the API charges per 1,000 tokens, to print the money saved")  # fmt: skip
    parser.add_argument(
        "--latency", type=float, default=0.2, help="seconds the stand-in API takes per request"
    )
    parser.add_argument("--docs", type=int, default=24, help="questions to ask")
    parser.add_argument("--cache-dir", default=None,
                        help="the cache (default: a temporary directory, removed at the end)")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT,
                        help=f"the stand-in API's port on 127.0.0.1 (default {DEFAULT_PORT}); it is part of "
                             "the model's identity, like any endpoint URL")  # fmt: skip
    options = parser.parse_args()

    from PIL import Image

    docs = [{"image": Image.new("RGB", (32, 32), (i * 10 % 256, 120, 200)),
             "question": f"What is the red value of picture {i}?"} for i in range(options.docs)]  # fmt: skip
    with contextlib.ExitStack() as stack:
        cache_dir = options.cache_dir or stack.enter_context(tempfile.TemporaryDirectory(prefix="lmms-cache-api-"))
        run_twice(options, docs, cache_dir)
        if options.cache_dir is None:
            print("cache: a temporary directory, now removed (pass --cache-dir DIR to keep it: a next run is free)")
        else:
            print(f"cache: {cache_dir}")


def run_twice(options: argparse.Namespace, docs: list[dict], cache_dir: str) -> None:
    try:
        api = FakeAPI(options.latency, options.port)
    except OSError as exc:
        sys.exit(f"cannot start the stand-in API on 127.0.0.1:{options.port} ({exc.strerror}); pass --port N")
    threading.Thread(target=api.serve_forever, daemon=True).start()
    runs = {}
    try:
        for name in ("first", "second"):
            before_requests, before_tokens = api.requests, api.tokens
            results, stats, elapsed = evaluate(api.base_url, cache_dir, docs)
            sent, billed = api.requests - before_requests, api.tokens - before_tokens
            runs[name] = (results, elapsed, billed)
            print(f"{name} run: {sent:3d} requests sent to the API, {elapsed:6.2f} s, {billed:6,d} tokens billed, "
                  f"{stats.hits} answers from the cache")  # fmt: skip
    finally:
        api.shutdown()
        api.server_close()

    (first, first_s, _), (second, second_s, _) = runs["first"], runs["second"]
    assert [r.text for r in first] == [r.text for r in second]
    saved_tokens = tokens(second)  # what those answers cost when they were paid for
    print(f"saved by the second run: {first_s - second_s:.2f} s and {saved_tokens:,} tokens")
    if options.price_per_1k_tokens is not None:
        money = saved_tokens / 1000 * options.price_per_1k_tokens
        print(f"money saved: ${money:.4f} at ${options.price_per_1k_tokens:g} per 1k tokens")
    else:
        print("pass --price-per-1k-tokens USD to see the money saved")
    print(f"e.g. {second[3].text!r}")


if __name__ == "__main__":
    main()
