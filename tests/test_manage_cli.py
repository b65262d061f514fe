"""The cache-management commands (``lmms-cache stats/ls/show/explain/rm/clear/prune/export/
import/verify``) over caches the proxy wrote, run in this process (``lmms_cache.cli.main``).

No test depends on the clock: entries get explicit creation and last-use times, and the
commands read the time from ``lmms_cache.manage._clock``, set by the ``clock`` fixture."""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import os
import random
import shutil
import sqlite3
import string
from pathlib import Path
from typing import Any

import pytest

from cli_run import cli_json, run_cli
from fakes import FakeModel, gen_request, ll_request, task_dict
from lmms_cache import cached, codec, manage
from lmms_cache.store import Entry, open_store

DAY = 86400.0
T0 = 1_700_000_000.0  # the entries' times: T0 + their row id, unless a test says otherwise
NOW = T0 + DAY  # what the commands take as the current time
TASKS = {**task_dict(3, "x"), **task_dict(3, "y"), **task_dict(2, "z")}


class RepeatModel(FakeModel):
    """Long, very compressible answers (plain strings)."""

    def generate_until(self, requests: list[Any]) -> list[Any]:
        self._record("generate_until", requests)
        return [f"repeat {r.args[0]}. " * 200 for r in requests]


class BigModel(FakeModel):
    """Long random (nearly incompressible) answers."""

    def generate_until(self, requests: list[Any]) -> list[Any]:
        self._record("generate_until", requests)
        alphabet = string.ascii_letters + string.digits
        return ["".join(random.Random(r.args[0]).choices(alphabet, k=4000)) for r in requests]


# -- helpers -------------------------------------------------------------------------------


@pytest.fixture(autouse=True)
def clock(monkeypatch: pytest.MonkeyPatch) -> float:
    """The time the commands see: NOW, whatever the wall clock says."""
    monkeypatch.setattr(manage, "_clock", lambda: NOW)
    return NOW


def ls_json(*args: Any) -> list[dict[str, Any]]:
    """The entries ``ls --json`` lists (it must list them all)."""
    listed = cli_json("ls", *args)
    assert listed["more"] == 0, listed
    return listed["entries"]  # type: ignore[no-any-return]


def make(pretrained: str, cls: type = FakeModel, tasks: dict[str, Any] = TASKS) -> FakeModel:
    model = cls(pretrained=pretrained)
    model.task_dict = tasks
    return model


def gens(task: str, docs: Any, **kwargs: Any) -> list[Any]:
    return [gen_request(i, context=f"{task} question {i}", task=task, **kwargs) for i in docs]


@contextlib.contextmanager
def db(cache: Path, filename: str = "cache.db") -> Any:
    conn = sqlite3.connect(cache / filename)
    try:
        yield conn
        conn.commit()
    finally:
        conn.close()


def rows(cache: Path, filename: str = "cache.db") -> dict[str, dict[str, Any]]:
    """Every entry's metadata by hex key, read straight from the file."""
    with db(cache, filename) as conn:
        conn.row_factory = sqlite3.Row
        found = conn.execute("SELECT key, model, method, task, doc_id, size, hits, used_at, created_at "
                             "FROM entries").fetchall()  # fmt: skip
    return {r["key"].hex(): {**dict(r), "key": r["key"].hex()} for r in found}


def digests(cache: Path) -> dict[str, str]:
    """pretrained name -> model identity digest."""
    with db(cache) as conn:
        models = conn.execute("SELECT digest, description FROM models").fetchall()
    return {json.loads(d)["settings/pretrained"]: digest for digest, d in models}


def keys_where(cache: Path, **match: Any) -> set[str]:
    return {k for k, r in rows(cache).items() if all(r[c] == v for c, v in match.items())}


def damage(cache: Path, key: str, filename: str = "cache.db") -> None:
    """Flip one byte inside a stored value (its last payload byte)."""
    with db(cache, filename) as conn:
        (blob,) = conn.execute("SELECT value FROM entries WHERE key = ?", (bytes.fromhex(key),)).fetchone()
        bad = bytearray(blob)
        bad[-1] ^= 0xFF
        conn.execute("UPDATE entries SET value = ? WHERE key = ?", (bytes(bad), bytes.fromhex(key)))


def age(cache: Path, days: float, **match: Any) -> set[str]:
    """Make the matching entries ``days`` older (creation and last use); returns their keys."""
    doomed = keys_where(cache, **match)
    with db(cache) as conn:
        conn.executemany("UPDATE entries SET created_at = created_at - ?, used_at = used_at - ? WHERE key = ?",
                         [(days * DAY, days * DAY, bytes.fromhex(k)) for k in doomed])  # fmt: skip
    return doomed


def set_times(cache: Path, hit_last: bool = True) -> None:
    """Every entry created and last used at T0 + its row id; entries with hits (when
    ``hit_last``) last used after all of them, at T0 + 1000."""
    with db(cache) as conn:
        conn.execute("UPDATE entries SET created_at = ? + id, used_at = ? + id", (T0, T0))
        if hit_last:
            conn.execute("UPDATE entries SET used_at = ? + 1000 WHERE hits > 0", (T0,))


def checkpointed_size(cache: Path) -> int:
    with db(cache) as conn:
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    return os.path.getsize(cache / "cache.db")


# -- the shared cache ------------------------------------------------------------------------
#
# a/one: generate_until x0-2, y0-2; loglikelihood x0        (7 entries, x0 hit twice later)
# b/two: generate_until x0-2; loglikelihood x0              (4 entries)
# c/three (RepeatModel): generate_until z0-1, compressible  (2 entries)


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("built") / "cache"
    a = cached(make("a/one"), path)
    a.generate_until(gens("x", range(3)) + gens("y", range(3)))
    a.loglikelihood([ll_request(0, "yes", task="x")])
    a.cache_close()
    b = cached(make("b/two"), path)
    b.generate_until(gens("x", range(3)))
    b.loglikelihood([ll_request(0, "yes", task="x")])
    b.cache_close()
    c = cached(make("c/three", RepeatModel), path)
    c.generate_until(gens("z", range(2)))
    c.cache_close()
    again = cached(make("a/one"), path)
    again.generate_until(gens("x", [0, 0]))
    assert again.cache_stats.hits == 2 and again.__wrapped__.calls == 0
    again.cache_close()
    set_times(path)
    return path


@pytest.fixture
def cache(built: Path, tmp_path: Path) -> Path:
    """A private copy of the shared cache, for tests that change it."""
    return Path(shutil.copytree(built, tmp_path / "cache"))


# -- stats -----------------------------------------------------------------------------------


def test_stats_json_counts_entries_sizes_hits_by_model_and_task(built):
    stats = cli_json("stats", built)
    every = rows(built)
    assert stats["entries"] == len(every) == 13
    assert stats["bytes"] == sum(r["size"] for r in every.values())
    assert stats["raw_bytes"] > stats["bytes"]  # the repeated answers were compressed
    assert stats["compression_ratio"] == round(stats["raw_bytes"] / stats["bytes"], 2) > 1
    assert stats["hits"] == 2
    assert stats["seconds_saved"] > 0
    by_model = {r["model_label"]: r for r in stats["by_model"]}
    assert set(by_model) == {"FakeModel(a/one)", "FakeModel(b/two)", "RepeatModel(c/three)"}
    assert [by_model[m]["entries"] for m in sorted(by_model)] == [7, 4, 2]
    assert [by_model[m]["hits"] for m in sorted(by_model)] == [2, 0, 0]
    assert by_model["FakeModel(a/one)"]["model"] == digests(built)["a/one"]
    by_task = {r["task"]: r for r in stats["by_task"]}
    assert {t: r["entries"] for t, r in by_task.items()} == {"x": 8, "y": 3, "z": 2}
    assert {t: r["hits"] for t, r in by_task.items()} == {"x": 2, "y": 0, "z": 0}


def test_stats_text_names_models_and_totals(built):
    done = run_cli("stats", built)
    assert done.returncode == 0, done.stderr
    out = done.stdout
    assert "entries           13" in out
    assert "hits served       2" in out
    for name in ("FakeModel(a/one)", "FakeModel(b/two)", "RepeatModel(c/three)"):
        assert name in out
    assert "ratio" in out


# -- ls --------------------------------------------------------------------------------------


def test_ls_filters_by_model_digest_prefix_or_checkpoint_name(built):
    a = keys_where(built, model=digests(built)["a/one"])
    by_name = ls_json(built, "--model", "one")
    by_digest = ls_json(built, "--model", digests(built)["a/one"][:8])
    for listed in (by_name, by_digest):
        assert {r["model_label"] for r in listed} == {"FakeModel(a/one)"}
        assert {r["model"] for r in listed} == {digests(built)["a/one"]}
        assert {r["key"] for r in listed} == a


def test_ls_filters_by_task_method_doc_id_and_limit(built):
    assert {(r["model_label"], r["doc_id"]) for r in ls_json(built, "--task", "y")} == {
        ("FakeModel(a/one)", d) for d in (0, 1, 2)}  # fmt: skip
    ll = ls_json(built, "--method", "loglikelihood")
    assert sorted(r["model_label"] for r in ll) == ["FakeModel(a/one)", "FakeModel(b/two)"]
    assert all(r["method"] == "loglikelihood" for r in ll)
    doc1 = ls_json(built, "--doc-id", "1")
    assert sorted((r["task"], r["model_label"]) for r in doc1) == [
        ("x", "FakeModel(a/one)"), ("x", "FakeModel(b/two)"), ("y", "FakeModel(a/one)"), ("z", "RepeatModel(c/three)")]  # fmt: skip
    combined = ls_json(built, "--model", "two", "--task", "x", "--method", "generate_until", "--doc-id", "2")
    assert len(combined) == 1 and combined[0]["response"] == "answer to x question 2"
    listed = cli_json("ls", built, "--limit", "2")
    assert listed["more"] == 11
    limited = listed["entries"]
    assert len(limited) == 2
    # most recently used first: the entry the second proxy hit
    assert limited[0]["hits"] == 2 and limited[0]["response"] == "answer to x question 0"


def test_ls_text_previews_the_responses(built):
    done = run_cli("ls", built, "--task", "z")
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    header = ["key", "model", "method", "task", "doc_id", "bytes", "hits", "created", "response"]
    assert lines[0].split() == header
    assert len(lines) == 4  # header, rule, two entries
    assert "repeat z question 0. repeat" in done.stdout and "repeat z question 1." in done.stdout
    assert "RepeatModel(c/three)" in done.stdout
    assert "answer to" in run_cli("ls", built, "--task", "x").stdout


# -- show ------------------------------------------------------------------------------------


def test_show_finds_an_entry_by_key_prefix(built):
    (key,) = keys_where(built, model=digests(built)["b/two"], task="x", doc_id=1, method="generate_until")
    entry = cli_json("show", built, key[:10])
    assert entry["key"] == key
    assert entry["model_label"] == "FakeModel(b/two)"
    assert entry["response"] == {"text": "answer to x question 1", "token_counts": None}
    assert entry["response_type"] == "GenerationResult"
    assert entry["components"]["v"]["gen_kwargs.max_new_tokens"] == "16"
    text = run_cli("show", built, key[:10])
    assert text.returncode == 0 and key in text.stdout and "answer to x question 1" in text.stdout


def test_show_refuses_an_ambiguous_or_unknown_prefix(built):
    keys = sorted(rows(built))
    shared = max((os.path.commonprefix([a, b]) for a, b in itertools.pairwise(keys)), key=len)  # noqa: RUF071
    ambiguous = run_cli("show", built, shared)
    assert ambiguous.returncode == 1
    assert "more than one entry" in ambiguous.stderr
    unused = next(p for p in (f"{i:02x}" for i in range(256)) if not any(k.startswith(p) for k in keys))
    unknown = run_cli("show", built, unused)
    assert unknown.returncode == 1
    assert f"no entry starts with '{unused}'" in unknown.stderr


# -- explain ---------------------------------------------------------------------------------


@pytest.fixture
def two_runs(tmp_path: Path) -> Path:
    """Task x, doc 1 stored twice: a first run with max_new_tokens 16, a later one with 32."""
    for tokens in (16, 32):
        lm = cached(make("a/one"), tmp_path)
        lm.generate_until(gens("x", [1], gen_kwargs={"max_new_tokens": tokens, "temperature": 0}))
        lm.cache_close()
    set_times(tmp_path)  # the second run's entry is the more recent, whatever the clock did
    return tmp_path


def test_explain_names_the_setting_changed_between_two_runs(two_runs):
    explained = cli_json("explain", two_runs, "--task", "x", "--doc-id", "1")
    assert len(explained) == 2
    newest, older = explained
    assert newest["differs"] == []
    assert len(older["differs"]) == 1
    assert "max_new_tokens" in older["differs"][0]
    assert "16" in older["differs"][0] and "32" in older["differs"][0]
    text = run_cli("explain", two_runs, "--task", "x", "--doc-id", "1")
    assert text.returncode == 0 and "gen_kwargs.max_new_tokens" in text.stdout


def test_explain_arrow_runs_from_the_older_run_to_the_newer(two_runs):
    """Like a miss explanation (stored → requested): the first run had 16, the second 32."""
    _newest, older = cli_json("explain", two_runs, "--task", "x", "--doc-id", "1")
    assert older["differs"] == ["gen_kwargs.max_new_tokens: 16 → 32"]


def test_explain_of_an_unknown_document_fails(two_runs):
    done = run_cli("explain", two_runs, "--task", "x", "--doc-id", "7")
    assert done.returncode == 1
    assert "nothing stored for task 'x', doc_id '7'" in done.stderr


# -- rm and clear ----------------------------------------------------------------------------


def test_rm_without_a_filter_refuses_and_deletes_nothing(cache):
    done = run_cli("rm", cache)
    assert done.returncode == 2
    assert "clear --yes" in done.stderr
    assert len(rows(cache)) == 13


@pytest.mark.parametrize(
    ("filters", "match"),
    [
        (["--model", "one"], {"model": "a/one"}),
        (["--task", "x"], {"task": "x"}),
        (["--model", "two", "--method", "loglikelihood"], {"model": "b/two", "method": "loglikelihood"}),
        (["--doc-id", "2", "--task", "y"], {"doc_id": 2, "task": "y"}),
    ],
)
def test_rm_deletes_exactly_the_filtered_entries(cache, filters, match):
    if "model" in match:
        match = {**match, "model": digests(cache)[match["model"]]}
    before = set(rows(cache))
    doomed = keys_where(cache, **match)
    assert doomed
    done = run_cli("rm", cache, *filters)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"removed {len(doomed)} {'entry' if len(doomed) == 1 else 'entries'}"
    assert set(rows(cache)) == before - doomed
    assert cli_json("stats", cache)["entries"] == len(before - doomed)


def test_rm_older_than_deletes_only_old_entries(cache):
    old = age(cache, 40, task="y")
    before = set(rows(cache))
    done = run_cli("rm", cache, "--older-than", "30d", "--json")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == {"removed": 3}
    assert set(rows(cache)) == before - old


def test_clear_needs_yes(cache):
    refused = run_cli("clear", cache)
    assert refused.returncode == 2
    assert "--yes" in refused.stderr
    assert len(rows(cache)) == 13
    done = run_cli("clear", cache, "--yes")
    assert done.returncode == 0, done.stderr
    assert "removed 13 entries" in done.stdout
    assert rows(cache) == {}
    assert cli_json("stats", cache)["entries"] == 0


# -- prune -----------------------------------------------------------------------------------


def test_prune_max_size_evicts_the_least_recently_used(tmp_path):
    tasks = task_dict(10, "x")
    for doc in range(10):  # one write each: doc 0 the oldest
        lm = cached(make("a/one", tasks=tasks), tmp_path)
        lm.generate_until(gens("x", [doc]))
        lm.cache_close()
    reader = cached(make("a/one", tasks=tasks), tmp_path)
    reader.generate_until(gens("x", [0, 3]))  # two of the oldest become the most recently used
    assert reader.cache_stats.hits == 2
    reader.cache_close()
    set_times(tmp_path)  # creation in doc order; the two hit last
    every = rows(tmp_path)
    kept = {k for k, r in every.items() if r["doc_id"] in (0, 3, 9)}
    limit = sum(every[k]["size"] for k in kept)
    done = run_cli("prune", tmp_path, "--max-size", limit, "--json")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == {"removed": 7, "bytes": sum(r["size"] for r in every.values()) - limit}
    assert set(rows(tmp_path)) == kept
    assert cli_json("stats", tmp_path)["bytes"] <= limit


def test_prune_gives_the_space_back_to_the_file_system(tmp_path):
    tasks = task_dict(300, "big")
    lm = cached(make("big/model", BigModel, tasks), tmp_path)
    lm.generate_until(gens("big", range(300)))
    lm.cache_close()
    assert len(ls_json(tmp_path, "--limit", "1000")) == 300  # listed across pages
    before = checkpointed_size(tmp_path)
    assert before > 300 * 2500
    done = run_cli("prune", tmp_path, "--max-size", "50KB")
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("removed ")
    stats = cli_json("stats", tmp_path)
    assert 0 < stats["entries"] < 300
    assert stats["bytes"] <= 50_000
    assert checkpointed_size(tmp_path) < before / 4


def test_prune_older_than(cache):
    old = age(cache, 10, model=digests(cache)["b/two"])
    before = set(rows(cache))
    done = run_cli("prune", cache, "--older-than", "7d")
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("removed 4 entries")
    assert set(rows(cache)) == before - old


def test_prune_without_a_limit_refuses(cache):
    done = run_cli("prune", cache)
    assert done.returncode == 2
    assert len(rows(cache)) == 13


# -- export and import -----------------------------------------------------------------------


def test_export_then_import_serves_exactly_the_exported_requests(built, tmp_path):
    exported = tmp_path / "a-x.lmc"
    done = run_cli("export", built, exported, "--model", "one", "--task", "x", "--json")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["exported"] == 4
    target = tmp_path / "new"
    imported = cli_json("import", target, exported)
    assert imported == {"added": 4, "conflicts": 0, "damaged": 0, "refused": 0}
    assert set(rows(target)) == keys_where(built, model=digests(built)["a/one"], task="x")

    model = make("a/one")
    lm = cached(model, target)
    lm.generate_until(gens("x", range(3)) + gens("y", range(3)))
    lm.loglikelihood([ll_request(0, "yes", task="x")])
    lm.cache_close()
    assert lm.cache_stats.hits == 4
    assert [args[0] for _, args in model.seen] == ["y question 0", "y question 1", "y question 2"]


def test_import_keeps_existing_values_and_counts_conflicts(built, tmp_path):
    exported = tmp_path / "y.lmc"
    assert run_cli("export", built, exported, "--task", "y").returncode == 0
    y_keys = sorted(keys_where(built, task="y"))
    target = tmp_path / "target"
    store = open_store(target)
    store.put_many([Entry(key=bytes.fromhex(y_keys[0]), value=codec.encode("kept"), model=digests(built)["a/one"],
                          method="generate_until", task="y")])  # fmt: skip
    store.close()
    done = run_cli("import", target, exported)
    assert done.returncode == 0, done.stderr
    assert "added 2 entries; 1 already there" in done.stdout
    assert set(rows(target)) == set(y_keys)
    assert cli_json("show", target, y_keys[0])["response"] == "kept"


def test_export_refuses_to_overwrite_a_file(built, tmp_path):
    existing = tmp_path / "there.lmc"
    existing.write_bytes(b"keep me")
    done = run_cli("export", built, existing)
    assert done.returncode == 1
    assert "exists" in done.stderr
    assert existing.read_bytes() == b"keep me"


def test_import_skips_and_counts_a_damaged_value(built, tmp_path):
    exported = tmp_path / "all.lmc"
    assert run_cli("export", built, exported).returncode == 0
    victim = sorted(rows(built))[5]
    damage(tmp_path, victim, filename="all.lmc")
    target = tmp_path / "target"
    assert cli_json("import", target, exported) == {"added": 12, "conflicts": 0, "damaged": 1, "refused": 0}
    assert set(rows(target)) == set(rows(built)) - {victim}


def test_import_of_a_missing_file_fails_without_creating_a_cache(tmp_path):
    target = tmp_path / "target"
    done = run_cli("import", target, tmp_path / "typo.lmc")
    assert done.returncode == 1
    assert "no such file" in done.stderr
    assert not target.exists()


def test_options_may_come_between_the_cache_and_the_other_argument(built, tmp_path):
    """``lmms-cache export CACHE --task x FILE``, ``lmms-cache show CACHE --json KEY``."""
    out = tmp_path / "x.lmc"
    done = run_cli("export", built, "--task", "x", out)
    assert done.returncode == 0, done.stderr
    assert set(rows(tmp_path, "x.lmc")) == keys_where(built, task="x")
    key = sorted(rows(built))[0]
    shown = run_cli("show", built, "--json", key[:12])
    assert shown.returncode == 0, shown.stderr
    assert json.loads(shown.stdout)["key"] == key


def test_import_of_a_file_owned_by_another_user_needs_trust(built, tmp_path):
    exported = tmp_path / "theirs.lmc"
    assert run_cli("export", built, exported).returncode == 0
    os.chown(exported, 12345, 12345)
    refused = run_cli("import", tmp_path / "target", exported)
    assert refused.returncode == 1
    assert "another user" in refused.stderr
    assert cli_json("import", tmp_path / "target", exported, "--trust")["added"] == 13


# -- verify ----------------------------------------------------------------------------------


def test_verify_finds_drops_and_then_passes(cache):
    clean = run_cli("verify", cache)
    assert clean.returncode == 0, clean.stderr
    assert "checked 13 entries: 0 damaged" in clean.stdout
    victim = sorted(keys_where(cache, task="z"))[0]  # a compressed value
    damage(cache, victim)
    found = run_cli("verify", cache)
    assert found.returncode == 1
    assert victim in found.stdout and "1 damaged" in found.stdout
    assert len(rows(cache)) == 13  # without --drop nothing is deleted
    dropped = run_cli("verify", cache, "--drop", "--json")
    assert dropped.returncode == 0, dropped.stderr
    assert json.loads(dropped.stdout) == {"checked": 13, "damaged": [victim], "dropped": 1, "unsigned_foreign": []}
    remaining = rows(cache)
    assert len(remaining) == 12 and victim not in remaining
    again = run_cli("verify", cache)
    assert again.returncode == 0 and "checked 12 entries: 0 damaged" in again.stdout


# -- ownership -------------------------------------------------------------------------------


def test_a_cache_of_another_user_needs_trust(cache, caplog):
    os.chown(cache / "cache.db", 12345, 12345)
    refused = run_cli("stats", cache)
    assert refused.returncode == 1
    assert "another user" in refused.stderr and "--trust" in refused.stderr
    trusted = run_cli("stats", cache, "--trust", "--json")
    assert trusted.returncode == 0, trusted.stderr
    assert json.loads(trusted.stdout)["entries"] == 13

    model = make("a/one")
    with caplog.at_level(logging.WARNING, logger="lmms_cache"):
        lm = cached(model, cache)
        out = lm.generate_until(gens("x", [0]))
    lm.cache_close()
    assert any("another user" in r.getMessage() for r in caplog.records)
    assert out[0].text == "answer to x question 0"
    assert lm.cache_stats.hits == 0 and model.calls == 1  # uncached: the stored answer is not used
    assert len(rows(cache)) == 13

    trusting = cached(make("a/one"), cache, trust=True)
    trusting.generate_until(gens("x", [0]))
    trusting.cache_close()
    assert trusting.cache_stats.hits == 1


# -- no cache --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "command",
    [
        ["stats"], ["ls"], ["show", "abcd"], ["explain", "--task", "x", "--doc-id", "0"], ["rm", "--task", "x"],
        ["clear", "--yes"], ["prune", "--max-size", "1KB"], ["export", "OUT", "--task", "x"], ["verify"],
    ],
)  # fmt: skip
def test_every_command_on_a_missing_cache_says_so(tmp_path, command):
    missing = tmp_path / "nowhere"
    out = tmp_path / "out.lmc"
    done = run_cli(command[0], missing, *[out if a == "OUT" else a for a in command[1:]])
    assert done.returncode == 1
    assert f"no cache at {missing / 'cache.db'}" in done.stderr
    assert not missing.exists() and not out.exists()
