"""lmms-eval's own ``openai`` model (simple and chat layouts) behind ``cached(...)``, talking
to a local OpenAI-compatible server (tests/openai_server.py): every paid request is paid
once, across processes; failed requests are never cached and are retried on the next run;
the API key reaches neither the cache nor a log.

The module-scoped ``runs`` fixture plays three runs on one cache directory, both layouts each:

1. in this process, with the server failing three documents (HTTP 500, a completion without
   choices, a null message);
2. in a new process (this file run as a script), the server now healthy;
3. in this process again, with new model objects and new proxies.

Run as a script, this file is that second run's worker:
``python tests/test_api_models.py --base-url URL --cache DIR --out REPORT.json``.
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import os
import sqlite3
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from openai_server import OpenAIServer

pytestmark = pytest.mark.e2e

API_KEY = "sk-lmmscache-TEST-7d1e0c55a9b34f2e"
TASK, SPLIT, N_DOCS = "api_demo", "test", 8
LAYOUTS = ("simple", "chat")
MAX_RETRIES = 2  # lmms-eval's own attempts per request; the server tells the client not to retry
FAILING = {2: "500", 5: "malformed", 6: "empty"}  # doc_id -> how the server fails it in run 1
MARKED = {2, 5}  # failures lmms-eval reports as "[LMMS_EVAL_REQUEST_FAILED ..." (after its retries)


# -- what an evaluation would build ---------------------------------------------------------


def question(layout: str, doc_id: int) -> str:
    return f"({layout}) What colour is picture {doc_id}?"


def build_docs() -> list[dict[str, Any]]:
    from PIL import Image

    return [{"image": Image.new("RGB", (12, 12), (i * 30 % 256, 60, 90)), "id": i} for i in range(N_DOCS)]


def doc_to_visual(doc: dict[str, Any]) -> list[Any]:
    return [doc["image"]]


def make_doc_to_messages(layout: str):
    def doc_to_messages(doc: dict[str, Any]) -> list[dict[str, Any]]:
        return [{"role": "user", "content": [{"type": "image", "url": doc["image"]},
                                             {"type": "text", "text": question(layout, doc["id"])}]}]  # fmt: skip

    return doc_to_messages


def build_model(layout: str, base_url: str, model_version: str = "fake-gpt-1", api_key: str = API_KEY,
                **settings: Any) -> Any:  # fmt: skip
    """lmms-eval's ``openai`` model as ``--model openai`` builds it: the chat class unless
    the simple layout is forced; few, immediate retries so failures are quick."""
    from lmms_eval.models import get_model

    cls = get_model("openai", force_simple=layout == "simple")
    options = {"max_retries": MAX_RETRIES, "retry_backoff_s": 0.0, "num_concurrent": 4, "timeout": 10,
               "httpx_trust_env": False, **settings}  # fmt: skip
    model = cls(model_version=model_version, base_url=base_url, api_key=api_key, **options)
    model.task_dict = {TASK: {SPLIT: build_docs()}}  # what simple_evaluate does
    return model


def build_requests(layout: str, doc_ids: range | list[int] = range(N_DOCS)) -> list[Any]:
    """``generate_until`` Instances as lmms-eval's tasks build them for each layout."""
    from lmms_eval.api.instance import Instance

    requests = []
    for i in doc_ids:
        gen_kwargs = {"max_new_tokens": 32, "temperature": 0, "until": ["\n\n"]}
        if layout == "simple":
            args = (question(layout, i), gen_kwargs, doc_to_visual, i, TASK, SPLIT)
        else:
            args = (question(layout, i), make_doc_to_messages(layout), gen_kwargs, i, TASK, SPLIT)
        requests.append(Instance(request_type="generate_until", arguments=args, idx=0,
                                 metadata={"task": TASK, "doc_id": i, "repeats": 1, "split": SPLIT}))  # fmt: skip
    return requests


def run_once(layout: str, base_url: str, cache_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """One evaluation's worth of requests through a new model and a new proxy."""
    from lmms_cache import cached, is_cached

    model = build_model(layout, base_url)
    lm = cached(model, cache_dir)
    assert is_cached(lm) and type(lm).__name__ == type(model).__name__ == "OpenAICompatible"
    assert lm.is_simple is (layout == "simple")
    results = lm.generate_until(build_requests(layout))
    lm.cache_close()
    return {
        "texts": [r.text for r in results],
        "tokens": [None if r.token_counts is None else [r.token_counts.input_tokens, r.token_counts.output_tokens]
                   for r in results],
        "stats": lm.cache_stats.as_dict(),
        "identity": lm.cache_identity.json(),
    }  # fmt: skip


# -- the three runs ---------------------------------------------------------------------------


def _by_layout(server: OpenAIServer) -> dict[str, list[str]]:
    """The texts of the completion requests the server received, per layout."""
    texts = [r.text for r in server.requests if r.path.endswith("/chat/completions")]
    return {layout: [t for t in texts if t.startswith(f"({layout})")] for layout in LAYOUTS}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    import lmms_eval.models  # noqa: F401  (its import resets loguru's sinks: import it first)
    from loguru import logger as loguru_logger

    root = tmp_path_factory.mktemp("api")
    cache_dir = root / "cache"
    log_text = io.StringIO()  # everything lmms-cache and lmms-eval log in this process
    handler = logging.StreamHandler(log_text)
    ours = logging.getLogger("lmms_cache")
    level = ours.level
    ours.addHandler(handler)
    ours.setLevel(logging.DEBUG)
    sink = loguru_logger.add(log_text, level="DEBUG")
    fail = {f"picture {doc}?": mode for doc, mode in FAILING.items()}  # in both layouts
    try:
        with OpenAIServer(delay=0.02, fail=fail) as server:
            first = {layout: run_once(layout, server.base_url, cache_dir) for layout in LAYOUTS}
            sent_first = _by_layout(server)
            records_first = server.requests

            server.fail.clear()
            server.reset()
            report = root / "second.json"
            env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
            env.pop("OPENAI_API_KEY", None)
            proc = subprocess.run(
                [sys.executable, __file__, "--base-url", server.base_url, "--cache", str(cache_dir),
                 "--out", str(report)],
                capture_output=True, text=True, timeout=120, env=env,
            )  # fmt: skip
            assert proc.returncode == 0, proc.stderr[-4000:]
            second = json.loads(report.read_text())
            sent_second = _by_layout(server)

            server.reset()
            third = {layout: run_once(layout, server.base_url, cache_dir) for layout in LAYOUTS}
            sent_third = _by_layout(server)
            base_url = server.base_url
    finally:
        loguru_logger.remove(sink)
        ours.removeHandler(handler)
        ours.setLevel(level)
    return {
        "cache_dir": cache_dir, "base_url": base_url, "first": first, "second": second, "third": third,
        "sent": {"first": sent_first, "second": sent_second, "third": sent_third},
        "records_first": records_first,
        "logs": log_text.getvalue() + proc.stdout + proc.stderr,
    }  # fmt: skip


@pytest.mark.parametrize("layout", LAYOUTS)
def test_first_run_pays_each_request_once_and_keeps_failures_out(runs, layout):
    sent = runs["sent"]["first"][layout]
    first = runs["first"][layout]
    for i in range(N_DOCS):
        expected = MAX_RETRIES if i in MARKED else 1  # lmms-eval retries its failures itself
        assert sent.count(question(layout, i)) == expected, (i, sent)
    assert len(sent) == N_DOCS + len(MARKED) * (MAX_RETRIES - 1)
    texts = first["texts"]
    for i in MARKED:
        assert texts[i].startswith(f"[LMMS_EVAL_REQUEST_FAILED after {MAX_RETRIES} retries]")
    assert not texts[6]  # a null message: "" (simple) or None (chat), never an answer
    good = [i for i in range(N_DOCS) if i not in FAILING]
    for i in good:
        assert texts[i].startswith("fake-gpt-1 answers") and f"picture {i}?" in texts[i]
    stats = first["stats"]
    assert (stats["misses"], stats["failures"], stats["written"], stats["hits"]) == (N_DOCS, 3, len(good), 0)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_a_new_process_resends_only_the_failed_requests(runs, layout):
    sent = runs["sent"]["second"][layout]
    assert sorted(sent) == sorted(question(layout, i) for i in FAILING)  # each once, nothing else
    second = runs["second"][layout]
    assert all(t.startswith("fake-gpt-1 answers") for t in second["texts"]), second["texts"]
    # the answers paid for in the first run come back unchanged
    for i in range(N_DOCS):
        if i not in FAILING:
            assert second["texts"][i] == runs["first"][layout]["texts"][i]
    stats = second["stats"]
    assert (stats["hits"], stats["misses"], stats["failures"], stats["written"]) == (N_DOCS - 3, 3, 0, 3)
    assert second["identity"] == runs["first"][layout]["identity"]


@pytest.mark.parametrize("layout", LAYOUTS)
def test_a_third_run_sends_nothing_and_returns_what_was_paid_for(runs, layout):
    assert runs["sent"]["third"][layout] == []
    third = runs["third"][layout]
    assert third["texts"] == runs["second"][layout]["texts"]
    assert (third["stats"]["hits"], third["stats"]["misses"], third["stats"]["model_calls"]) == (N_DOCS, 0, 0)
    # token counts the API reported are kept with each answer (a cost report still adds up)
    assert third["tokens"] == runs["second"][layout]["tokens"]
    paid = {
        r.text: [r.prompt_tokens, r.completion_tokens] for r in runs["records_first"] if r.outcome == "ok"
    }
    for i in range(N_DOCS):
        if i not in FAILING:
            assert third["tokens"][i] == paid[question(layout, i)]
            assert paid[question(layout, i)][0] > 0


def test_the_api_key_is_used_but_never_stored_nor_logged(runs):
    from lmms_cache import codec

    # the key did reach the API: the test would prove nothing otherwise
    assert {r.authorization for r in runs["records_first"]} == {f"Bearer {API_KEY}"}
    secret = API_KEY.encode()
    files = [p for p in Path(runs["cache_dir"]).rglob("*") if p.is_file()]
    assert any(p.name == "cache.db" for p in files)
    for path in files:  # cache.db and any -wal / -shm beside it
        assert secret not in path.read_bytes(), path
        assert b"7d1e0c55a9b34f2e" not in path.read_bytes(), path
    conn = sqlite3.connect(runs["cache_dir"] / "cache.db")
    try:
        models = conn.execute("SELECT digest, description FROM models").fetchall()
        rows = conn.execute("SELECT * FROM entries").fetchall()
        columns = [c[0] for c in conn.execute("SELECT * FROM entries LIMIT 0").description]
    finally:
        conn.close()
    assert len(models) == 2  # one per layout: the classes differ
    for _, description in models:
        assert API_KEY not in description and "fake-gpt-1" in description
        assert json.loads(description)["client/client"] == runs["base_url"]
    assert len(rows) == 2 * N_DOCS
    value_at = columns.index("value")
    for row in rows:  # every column, values decoded (they are compressed on disk)
        assert API_KEY not in repr(codec.decode(row[value_at]))
        assert all(API_KEY not in str(v) for j, v in enumerate(row) if j != value_at)
    logs = runs["logs"]
    assert "lmms-cache" in logs and "fake-gpt-1" in logs  # the logs were captured
    assert API_KEY not in logs


# -- identity: what lmms-cache takes from the openai model --------------------------------


@pytest.mark.parametrize("layout", LAYOUTS)
def test_derived_identity_is_model_version_and_endpoint_never_the_key(layout):
    from lmms_cache.identity import identify

    url = "http://127.0.0.1:9/v1"  # nothing is sent: constructing the model makes no request

    def ident(**kw: Any) -> Any:
        kw.setdefault("model_version", "gpt-4o")
        return identify(build_model(layout, kw.pop("base_url", url), **kw))

    base = ident()
    assert base.description["settings/model_version"] == "gpt-4o"
    assert base.description["client/client"] == url
    assert base.label == "OpenAICompatible(gpt-4o)"
    assert API_KEY not in base.json()
    # what changes the answers changes the identity
    assert ident(model_version="gpt-4o-mini").digest != base.digest
    assert ident(base_url="http://127.0.0.1:10/v1").digest != base.digest
    # what does not, does not: another key, retries, backoff, concurrency, timeout, batch size
    same = ident(api_key="sk-rotated-key", max_retries=9, retry_backoff_s=4.0, num_concurrent=1,
                 timeout=300, batch_size=8)  # fmt: skip
    assert same.digest == base.digest
    # model= is lmms-eval's alias of model_version; a trailing slash is the same endpoint
    assert ident(model_version=None, model="gpt-4o", base_url=url + "/").digest == base.digest
    # credentials written into the URL never reach the identity
    creds = ident(base_url="http://user:hunter2@127.0.0.1:9/v1?api_key=sk-in-url")
    assert "hunter2" not in creds.json() and "sk-in-url" not in creds.json()
    assert creds.digest == base.digest


def test_two_model_versions_never_share_entries_and_a_new_key_keeps_them(tmp_path):
    from lmms_cache import cached

    with OpenAIServer() as server:
        answers = {}
        for version, key in (("fake-gpt-a", API_KEY), ("fake-gpt-b", API_KEY), ("fake-gpt-a", "sk-rotated")):
            server.reset()
            lm = cached(build_model("simple", server.base_url, model_version=version, api_key=key), tmp_path)
            texts = [r.text for r in lm.generate_until(build_requests("simple", [0, 1, 2]))]
            lm.cache_close()
            answers[(version, key)] = (texts, server.count(), {r.authorization for r in server.requests})
    assert answers[("fake-gpt-a", API_KEY)][1] == 3
    texts_b, sent_b, _ = answers[("fake-gpt-b", API_KEY)]
    assert sent_b == 3 and all(t.startswith("fake-gpt-b answers") for t in texts_b)
    texts_again, sent_again, auth = answers[("fake-gpt-a", "sk-rotated")]
    assert sent_again == 0 and auth == set()
    assert texts_again == answers[("fake-gpt-a", API_KEY)][0]


# -- the second run's worker ------------------------------------------------------------------


def _worker(argv: list[str]) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--base-url", required=True)
    parser.add_argument("--cache", required=True)
    parser.add_argument("--out", required=True)
    options = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr)
    report = {layout: run_once(layout, options.base_url, options.cache) for layout in LAYOUTS}
    Path(options.out).write_text(json.dumps(report))


if __name__ == "__main__":
    _worker(sys.argv[1:])
