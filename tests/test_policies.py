"""Size limits, expiry, hit bookkeeping and key components, through the proxy."""

from __future__ import annotations

import json
from typing import Any

import pytest

from fakes import FakeModel, gen_request, task_dict
from lmms_cache import cached
from lmms_cache.engine import TOUCH_EVERY
from lmms_cache.proxy import CachedModel, Options, wrap
from lmms_cache.units import format_size, parse_duration, parse_size


def model() -> FakeModel:
    m = FakeModel()
    m.task_dict = task_dict(8)
    return m


class Clock:
    """The proxy's clocks, moved by hand: wall-clock (creation, last use, expiry) and
    monotonic (how often hits are recorded). Nothing here depends on the machine's time."""

    def __init__(self) -> None:
        self.now = 1_700_000_000.0
        self.mono = 1000.0

    def time(self) -> float:
        return self.now

    def monotonic(self) -> float:
        return self.mono

    def advance(self, seconds: float) -> None:
        self.now += seconds
        self.mono += seconds


def timed(m: Any, path: Any, clock: Clock, **options: Any) -> CachedModel:
    return wrap(m, Options.make(path=path, clock=clock, **options))


def test_max_size_keeps_the_cache_under_its_limit_evicting_the_least_recently_used(tmp_path):
    clock = Clock()
    first = timed(model(), tmp_path, clock)
    first.generate_until([gen_request(i) for i in range(4)])  # all four created (and last used) now
    first.cache_close()
    per_entry = first.cache_store.stats()["bytes"] // 4
    clock.advance(1)
    lm = timed(model(), tmp_path, clock, max_size=per_entry * 4 + per_entry // 2)
    lm.generate_until([gen_request(0)])  # doc 0 is now the most recently used
    lm.cache_close()  # its hit is recorded
    clock.advance(1)
    lm = timed(model(), tmp_path, clock, max_size=per_entry * 4 + per_entry // 2)
    lm.generate_until([gen_request(4), gen_request(5)])  # two new entries push two out
    stats = lm.cache_store.stats()
    assert stats["entries"] == 4 and stats["bytes"] <= per_entry * 4 + per_entry // 2
    kept = sorted(int(e.doc_id) for e in lm.cache_store.scan(values=False))
    assert kept == [0, 3, 4, 5]  # 1 and 2 were used least recently


def test_expired_entries_are_recomputed(tmp_path):
    clock = Clock()
    timed(model(), tmp_path, clock).generate_until([gen_request(0), gen_request(1)])
    clock.advance(2 * 86400 - 1)
    young = model()
    lm = timed(young, tmp_path, clock, expire_after="2d")
    lm.generate_until([gen_request(0), gen_request(1)])
    assert lm.cache_stats.hits == 2 and young.calls == 0  # a second short of two days: still fresh
    clock.advance(2)
    fresh = model()
    lm = timed(fresh, tmp_path, clock, expire_after="2d")
    lm.generate_until([gen_request(0), gen_request(1)])
    assert lm.cache_stats.hits == 0 and fresh.calls == 1
    again = model()
    lm = timed(again, tmp_path, clock, expire_after="2d")
    lm.generate_until([gen_request(0), gen_request(1)])  # recomputed entries are new again
    assert lm.cache_stats.hits == 2 and again.calls == 0


def test_hits_are_recorded_in_batches_and_flushed_on_close(tmp_path):
    clock = Clock()
    timed(model(), tmp_path, clock).generate_until([gen_request(0), gen_request(1)])
    lm = timed(model(), tmp_path, clock)
    for _ in range(3):
        lm.generate_until([gen_request(0)])
        clock.advance(TOUCH_EVERY / 4)  # (however slow the machine: the proxy's clock is this one)
    assert {e.doc_id: e.hits for e in lm.cache_store.scan(values=False)} == {0: 0, 1: 0}  # not yet
    lm.cache_close()
    assert {e.doc_id: e.hits for e in lm.cache_store.scan(values=False)} == {0: 3, 1: 0}


def test_hits_are_recorded_once_the_touch_interval_has_passed(tmp_path):
    clock = Clock()
    timed(model(), tmp_path, clock).generate_until([gen_request(0), gen_request(1)])
    lm = timed(model(), tmp_path, clock)
    lm.generate_until([gen_request(0)])
    clock.advance(TOUCH_EVERY - 1)
    lm.generate_until([gen_request(1)])
    assert {e.doc_id: e.hits for e in lm.cache_store.scan(values=False)} == {0: 0, 1: 0}  # not yet
    clock.advance(1)
    lm.generate_until([gen_request(1)])  # the interval has passed: this call's hits flush all
    entries = {e.doc_id: e for e in lm.cache_store.scan(values=False)}
    assert {d: e.hits for d, e in entries.items()} == {0: 1, 1: 2}
    assert entries[1].used_at == clock.now  # last use: the proxy's wall clock at the flush


def test_readonly_records_no_hits(tmp_path):
    cached(model(), tmp_path).generate_until([gen_request(0)])
    lm = cached(model(), tmp_path, mode="readonly")
    lm.generate_until([gen_request(0)])
    lm.cache_close()
    assert [e.hits for e in cached(model(), tmp_path).cache_store.scan(values=False)] == [0]


def test_each_entry_stores_the_digest_of_every_key_component(tmp_path):
    lm = cached(model(), tmp_path)
    lm.generate_until([gen_request(0, gen_kwargs={"max_new_tokens": 16, "temperature": 0})])
    lm.generate_until([gen_request(0, gen_kwargs={"max_new_tokens": 32, "temperature": 0})])
    a, b = (json.loads(e.components) for e in lm.cache_store.scan(values=False))
    assert set(a["d"]) >= {"model", "method", "context", "gen_kwargs", "gen_kwargs.max_new_tokens",
                           "gen_kwargs.temperature", "visual"}  # fmt: skip
    assert sorted(k for k in a["d"] if a["d"][k] != b["d"][k]) == ["gen_kwargs", "gen_kwargs.max_new_tokens"]
    # the readable values are the caller's, not what the model added in place afterwards
    assert a["v"] == {"gen_kwargs.max_new_tokens": "16", "gen_kwargs.temperature": "0"}


def explain(lm, requests):
    return lm.cache_explain("generate_until", requests)


def test_explain_names_the_setting_that_changed_with_its_values(tmp_path):
    cached(model(), tmp_path).generate_until([gen_request(0), gen_request(1)])
    lm = cached(model(), tmp_path)
    lines = explain(lm, [gen_request(0), gen_request(1, gen_kwargs={"max_new_tokens": 32, "temperature": 0}),
                         gen_request(2)])  # fmt: skip
    assert lines == ["hit", "miss: gen_kwargs.max_new_tokens: 16 → 32",
                     "miss: nothing stored for this document or prompt"]  # fmt: skip


def test_explain_names_an_added_setting_a_changed_image_and_a_changed_prompt(tmp_path):
    docs = task_dict(2)
    m = model()
    m.task_dict = docs
    cached(m, tmp_path).generate_until([gen_request(0), gen_request(1)])
    from fakes import image

    docs["t"]["test"][1]["image"] = image((1, 2, 3))
    m2 = model()
    m2.task_dict = docs
    lm = cached(m2, tmp_path)
    lines = explain(lm, [gen_request(0, gen_kwargs={"max_new_tokens": 16, "temperature": 0, "top_p": 0.9}),
                         gen_request(1), gen_request(0, context="another question")])  # fmt: skip
    assert lines == ["miss: gen_kwargs.top_p added: 0.9", "miss: doc: content changed; visual: content changed",
                     "miss: context: content changed"]  # fmt: skip


def test_explain_names_a_changed_model_and_does_not_use_up_samples(tmp_path):
    cached(model(), tmp_path).generate_until([gen_request(0)])
    other = FakeModel(pretrained="another/checkpoint")
    other.task_dict = task_dict(8)
    assert explain(cached(other, tmp_path), [gen_request(0)]) == [
        "miss: settings/pretrained: 'fake/tiny-vlm' → 'another/checkpoint'"]
    def sampled():  # a fresh request each time: the model adds defaults to gen_kwargs in place
        return gen_request(3, gen_kwargs={"do_sample": True, "temperature": 0.7}, repeats=2)

    lm = cached(model(), tmp_path)
    lm.generate_until([sampled()])
    assert explain(lm, [sampled()]) == ["miss: sample #2 is not stored yet"]
    assert explain(lm, [sampled()]) == ["miss: sample #2 is not stored yet"]  # nothing used up
    lm.generate_until([sampled()])
    twice = sampled()
    assert explain(cached(model(), tmp_path), [twice, twice]) == ["hit", "hit"]


def test_a_miss_is_explained_in_a_debug_log_line(tmp_path, caplog):
    import logging

    cached(model(), tmp_path).generate_until([gen_request(0)])
    caplog.set_level(logging.DEBUG, logger="lmms_cache")
    cached(model(), tmp_path).generate_until([gen_request(0, gen_kwargs={"max_new_tokens": 8, "temperature": 0})])
    assert any("gen_kwargs.max_new_tokens: 16 → 8" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize(("text", "value"), [("20GB", 20 * 10**9), ("512MiB", 512 * 2**20), ("100", 100),
                                              ("1.5k", 1500), (7, 7)])  # fmt: skip
def test_sizes_parse_as_people_write_them(text, value):
    assert parse_size(text) == value


@pytest.mark.parametrize(("text", "seconds"), [("30d", 30 * 86400), ("12h", 43200), ("90m", 5400),
                                                ("45", 45), ("2w", 14 * 86400)])  # fmt: skip
def test_durations_parse_as_people_write_them(text, seconds):
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("bad", ["lots", "-5GB", "GB", ""])
def test_a_bad_size_is_refused_at_once(tmp_path, bad):
    with pytest.raises(ValueError, match="size"):
        cached(model(), tmp_path, max_size=bad)


def test_a_bad_duration_is_refused_at_once(tmp_path):
    with pytest.raises(ValueError, match="duration"):
        cached(model(), tmp_path, expire_after="soon")


def test_format_size_is_readable():
    assert (format_size(512), format_size(1536), format_size(3 * 2**30)) == ("512 B", "1.5 KiB", "3.0 GiB")
