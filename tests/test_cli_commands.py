"""The management commands' rough edges (issue 12): pipes closed early, ``ls``'s limit,
export files, damaged files, consistent JSON and exit codes, help text, cache paths,
reading without a trace, imported hit counts, plurals and model labels.

Commands run in this process (``lmms_cache.cli.main``) except where a real pipe or a new
process is the point."""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sqlite3
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from cli_run import cli_json, run_cli
from fakes import FakeModel, gen_request, ll_request, task_dict
from lmms_cache import cached, cli, codec, manage
from lmms_cache.store import Entry, SQLiteStore, open_store

T0 = 1_700_000_000.0
NOW = T0 + 86400.0


@pytest.fixture(autouse=True)
def clock(monkeypatch: pytest.MonkeyPatch) -> float:
    monkeypatch.setattr(manage, "_clock", lambda: NOW)
    return NOW


def fill(path: Path, n: int, *, model: str = "m" * 32, task: str = "t", size: int = 20) -> list[bytes]:
    """``n`` entries written straight to the store (created and used at T0 + i)."""
    store = open_store(path)
    keys = [(i + 1).to_bytes(16, "big") for i in range(n)]
    store.remember_model(model, json.dumps({"class": "pkg.Model", "settings": {"pretrained": "org/m"}}))
    store.put_many([Entry(key=k, value=codec.encode(f"answer {i} " + "x" * size), model=model,
                          method="generate_until", task=task, split="test", doc_id=str(i),
                          created_at=T0 + i, used_at=T0 + i) for i, k in enumerate(keys)])  # fmt: skip
    store.close()
    return keys


def sidecars(directory: Path) -> set[str]:
    return {p.name for p in directory.iterdir() if p.name.endswith(("-wal", "-shm", "-journal"))}


@pytest.fixture(scope="module")
def proxied(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A cache the proxy wrote: generate_until x0-2 (GenerationResult) and loglikelihood x0."""
    path = tmp_path_factory.mktemp("proxied") / "cache"
    model = FakeModel(pretrained="a/one")
    model.task_dict = task_dict(3, "x")
    lm = cached(model, path)
    lm.generate_until([gen_request(i, task="x") for i in range(3)])
    lm.loglikelihood([ll_request(0, "yes", task="x")])
    lm.generate_until([gen_request(0, task="x")])  # one hit
    lm.cache_close()
    assert not sidecars(path)  # the proxy's last connection cleaned up
    return path


# -- item 2: a pipe closed early -----------------------------------------------------------


def _module(*args: Any) -> list[str]:
    return [sys.executable, "-m", "lmms_cache", *map(str, args)]


@pytest.mark.parametrize("command", [["ls", "--limit", "0", "--json"], ["stats"], ["ls"]])
def test_output_into_a_pipe_closed_before_it_is_written_ends_quietly(tmp_path, command):
    fill(tmp_path, 5)
    read, write = os.pipe()
    os.close(read)  # the reader is gone before anything is written
    try:
        done = subprocess.run(_module(command[0], tmp_path, *command[1:]), stdout=write, stderr=subprocess.PIPE,
                              text=True, timeout=120)  # fmt: skip
    finally:
        os.close(write)
    assert done.stderr == ""
    assert done.returncode == 141


def test_ls_json_into_head_c_100_ends_quietly(tmp_path):
    """``lmms-cache ls DIR --json | head -c 100``: far more than a pipe holds, read 100 bytes."""
    fill(tmp_path, 600, size=200)
    proc = subprocess.Popen(_module("ls", tmp_path, "--limit", "0", "--json"), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)  # fmt: skip
    assert proc.stdout is not None and proc.stderr is not None
    head = proc.stdout.read(100)
    proc.stdout.close()
    err = proc.stderr.read().decode()
    proc.wait(timeout=120)
    proc.stderr.close()
    assert head.startswith(b"{")
    assert "Traceback" not in err and "BrokenPipe" not in err and err == ""
    assert proc.returncode == 141


# -- item 3: ls says what it left out ------------------------------------------------------


def test_ls_says_how_many_rows_it_left_out(tmp_path):
    fill(tmp_path, 60)
    listed = cli_json("ls", tmp_path)
    assert len(listed["entries"]) == 50 and listed["more"] == 10
    text = run_cli("ls", tmp_path).stdout.splitlines()
    assert text[-1] == "... 10 more; --limit 0 shows all"
    assert len(text) == 2 + 50 + 1
    filtered = cli_json("ls", tmp_path, "--doc-id", "7", "--limit", "1")
    assert len(filtered["entries"]) == 1 and filtered["more"] == 0
    assert run_cli("ls", tmp_path, "--limit", "60").stdout.splitlines()[-1].startswith("0000")  # no "more" line


def test_ls_limit_0_lists_everything(tmp_path):
    fill(tmp_path, 60)
    listed = cli_json("ls", tmp_path, "--limit", "0")
    assert len(listed["entries"]) == 60 and listed["more"] == 0


@pytest.mark.parametrize("limit", ["-1", "-50", "many"])
def test_ls_negative_or_non_numeric_limit_is_a_usage_error(tmp_path, limit):
    fill(tmp_path, 3)
    done = run_cli("ls", tmp_path, "--limit", limit)
    assert done.returncode == 2
    assert "--limit" in done.stderr and done.stdout == ""


# -- item 4: export files, foreign files, damaged files ------------------------------------


def test_export_is_one_file_with_a_rollback_journal_and_importing_it_leaves_nothing_beside_it(proxied, tmp_path):
    out = tmp_path / "exports" / "all.lmc"
    out.parent.mkdir()
    assert cli_json("export", proxied, out)["exported"] == 4
    assert sidecars(out.parent) == set()
    with sqlite3.connect(out) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "delete"
    assert sidecars(out.parent) == set()
    assert cli_json("import", tmp_path / "target", out)["added"] == 4
    assert sidecars(out.parent) == set()
    assert sidecars(proxied) == set()  # the source was only read


def test_importing_an_old_wal_mode_export_leaves_nothing_beside_it(proxied, tmp_path):
    out = tmp_path / "exports" / "old.lmc"
    out.parent.mkdir()
    assert cli_json("export", proxied, out)["exported"] == 4
    with sqlite3.connect(out) as conn:
        conn.execute("PRAGMA journal_mode = WAL")
    assert sidecars(out.parent) == set()
    assert cli_json("import", tmp_path / "target", out)["added"] == 4
    assert sidecars(out.parent) == set()


def _foreign(path: Path) -> None:
    with sqlite3.connect(path) as conn:
        conn.execute("CREATE TABLE notes (x)")
    conn.close()


@pytest.mark.parametrize(
    ("make", "why"),
    [(lambda p: p.write_bytes(b""), "it is empty"),
     (lambda p: p.write_text("name,score\nx,1\n" * 20), "it is not an SQLite database"),
     (_foreign, "it is an SQLite database of another program")],
    ids=["empty", "text", "foreign-sqlite"],
)  # fmt: skip
def test_importing_something_that_is_not_an_export_says_so(tmp_path, make, why):
    source = tmp_path / "thing.lmc"
    make(source)
    target = tmp_path / "target"
    done = run_cli("import", target, source)
    assert done.returncode == 1
    assert done.stderr.strip() == f"lmms-cache: {source} is not an lmms-cache export ({why})"
    assert "no such table" not in done.stderr
    assert not target.exists()


def truncated(tmp_path: Path) -> Path:
    cache = tmp_path / "cache"
    fill(cache, 200, size=3000)
    store = open_store(cache)
    store.compact()
    store.close()
    db = cache / "cache.db"
    with open(db, "r+b") as f:
        f.truncate(db.stat().st_size // 2)
    return cache


def test_verify_of_a_truncated_database_reports_the_damaged_file(tmp_path):
    cache = truncated(tmp_path)
    done = run_cli("verify", cache)
    assert done.returncode == 1
    assert "malformed" in done.stderr and "verify --drop" in done.stderr
    assert sorted(p.name for p in cache.iterdir()) == ["cache.db"]  # nothing moved, nothing created


def test_verify_drop_of_a_truncated_database_reports_the_file_moved_aside_and_fails(tmp_path):
    cache = truncated(tmp_path)
    done = run_cli("verify", cache, "--drop")
    assert done.returncode == 1, done.stdout
    moved = [p for p in cache.iterdir() if p.name.startswith("cache.db.corrupt-")]
    assert len(moved) == 1
    said = done.stdout + done.stderr
    assert "checked 0 entries: 0 damaged" not in said
    assert "damaged" in said and str(moved[0]) in said
    again = run_cli("verify", cache, "--drop", "--json")
    assert again.returncode == 0 and json.loads(again.stdout)["checked"] == 0  # the new, empty cache


# -- item 6: consistent JSON, consistent exit codes ----------------------------------------


def zoned(text: str) -> datetime.datetime:
    when = datetime.datetime.fromisoformat(text)
    assert when.tzinfo is not None, text
    return when


def test_ls_show_and_explain_json_agree_on_keys_times_and_doc_ids(proxied):
    listed = cli_json("ls", proxied, "--limit", "0")["entries"]
    with manage.opened(proxied, readonly=True) as store:
        stored = {e.key.hex(): e for e in store.scan(values=False)}
    assert {r["key"] for r in listed} == set(stored)  # full keys
    for row in listed:
        e = stored[row["key"]]
        assert zoned(row["created_at"]).timestamp() == pytest.approx(e.created_at, abs=1)
        assert zoned(row["used_at"]).timestamp() == pytest.approx(e.used_at, abs=1)
        assert row["doc_id"] == e.doc_id and type(row["doc_id"]) is type(e.doc_id)
        shown = cli_json("show", proxied, row["key"])
        assert {k: shown[k] for k in row if k != "response"} == {k: v for k, v in row.items() if k != "response"}
    explained = cli_json("explain", proxied, "--task", "x", "--doc-id", "0")
    assert explained and all(len(r["key"]) == 32 for r in explained)
    assert all(zoned(r["created_at"]) and zoned(r["used_at"]) for r in explained)


def test_an_int_doc_id_from_the_store_stays_an_int(proxied, monkeypatch):
    """Schema v2 stores doc_id with its own type: the commands pass it through."""

    class IntDocIds(SQLiteStore):
        def scan(self, *args: Any, **kwargs: Any) -> Any:
            for e in super().scan(*args, **kwargs):
                yield e._replace(doc_id=int(e.doc_id) if e.doc_id is not None else None)

        def get(self, key: bytes) -> Any:
            e = super().get(key)
            return e._replace(doc_id=int(e.doc_id)) if e is not None and e.doc_id is not None else e

    import lmms_cache.store

    monkeypatch.setattr(lmms_cache.store, "SQLiteStore", IntDocIds)  # what open_store opens a directory with
    listed = cli_json("ls", proxied)["entries"]
    assert sorted(r["doc_id"] for r in listed) == [0, 0, 1, 2]
    assert cli_json("show", proxied, listed[0]["key"])["doc_id"] == listed[0]["doc_id"]
    assert "  0  " in run_cli("ls", proxied).stdout or " 0 " in run_cli("ls", proxied).stdout
    assert {r["doc_id"] for r in cli_json("explain", proxied, "--task", "x", "--doc-id", "0")} == {0}


def test_show_gives_the_response_and_the_description_as_json_values(proxied):
    listed = {(r["method"], r["doc_id"]): r["key"] for r in cli_json("ls", proxied)["entries"]}
    gen = cli_json("show", proxied, listed[("generate_until", 1)])
    assert gen["response"] == {"text": "answer to q1", "token_counts": None}
    assert gen["response_type"] == "GenerationResult"
    assert isinstance(gen["model_description"], dict) and gen["model_description"]["settings/pretrained"] == "a/one"
    assert isinstance(gen["components"], dict)
    ll = cli_json("show", proxied, listed[("loglikelihood", 0)])
    assert ll["response"] == [-2.0, True] and ll["response_type"] == "tuple"
    text = run_cli("show", proxied, listed[("loglikelihood", 0)]).stdout
    assert "(-2.0, True)" in text


@pytest.mark.parametrize(
    ("value", "expected"),
    [("a", "a"), (3, 3), (1.5, 1.5), (float("-inf"), "-inf"), (None, None), ((1.0, False), [1.0, False]),
     (["r1", "r2"], ["r1", "r2"]), ({"a": (1, 2)}, {"a": [1, 2]}), ({1: 2}, "{1: 2}"), (b"x", "b'x'")],
)  # fmt: skip
def test_jsonable(value, expected):
    assert manage.jsonable(value) == expected


@pytest.mark.parametrize(
    "command",
    [["prune", "--max-size", "12XB"], ["prune", "--older-than", "3 weeks"], ["rm", "--older-than", "3 weeks"],
     ["ls", "--older-than", "soon"], ["export", "OUT", "--older-than", "-3d"], ["rm"], ["clear"], ["prune"],
     ["ls", "--no-such-option"], ["frobnicate"]],
)  # fmt: skip
def test_usage_errors_exit_2_and_change_nothing(proxied, tmp_path, command):
    before = cli_json("stats", proxied)["entries"]
    out = tmp_path / "out.lmc"
    done = run_cli(command[0], *([] if command[0] == "frobnicate" else [proxied]),
                   *[out if a == "OUT" else a for a in command[1:]])  # fmt: skip
    assert done.returncode == 2, done.stderr
    assert done.stderr and done.stdout == ""
    assert cli_json("stats", proxied)["entries"] == before and not out.exists()


def test_failures_exit_1(proxied, tmp_path):
    assert run_cli("stats", tmp_path / "nowhere").returncode == 1
    assert run_cli("show", proxied, "f" * 32).returncode == 1
    assert run_cli("explain", proxied, "--task", "x", "--doc-id", "99").returncode == 1


# -- item 7: help, cache paths, reading without a trace, imported hits, plurals --------------


COMMANDS = ["lmms-cache", "eval", "stats", "ls", "show", "explain", "rm", "clear", "prune", "export", "import",
            "verify"]


def _parser(name: str) -> argparse.ArgumentParser:
    if name == "eval":
        return cli.build_eval_parser()
    parser = cli.build_parser()
    if name == "lmms-cache":
        return parser
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return commands.choices[name]  # type: ignore[no-any-return]


@pytest.mark.parametrize("name", COMMANDS)
def test_every_option_and_argument_has_help_and_no_rest_markup(name):
    parser = _parser(name)
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            assert all(a.help for a in action._choices_actions)
            continue
        assert action.help and action.help != argparse.SUPPRESS, (name, action.dest)
    text = parser.format_help()
    assert "``" not in text


@pytest.mark.parametrize("name", COMMANDS)
def test_help_of_every_command_runs_and_names_the_exit_codes(name):
    done = run_cli(*(["--help"] if name == "lmms-cache" else [name, "--help"]))
    assert done.returncode == 0, (name, done.stderr)
    assert "``" not in done.stdout
    assert "exit codes" in done.stdout, name


def test_the_database_file_itself_names_the_cache(proxied):
    by_dir = cli_json("stats", proxied)
    by_file = cli_json("stats", proxied / "cache.db")
    assert by_file["entries"] == by_dir["entries"] == 4
    assert len(cli_json("ls", proxied / "cache.db")["entries"]) == 4


def test_reading_commands_leave_no_wal_or_shm_files(proxied, tmp_path):
    assert sidecars(proxied) == set()
    key = cli_json("ls", proxied)["entries"][0]["key"]
    for command in (["stats"], ["ls"], ["show", key], ["explain", "--task", "x", "--doc-id", "0"], ["verify"],
                    ["export", tmp_path / "x.lmc"]):  # fmt: skip
        done = run_cli(command[0], proxied, *command[1:])
        assert done.returncode == 0, (command, done.stderr)
        assert sidecars(proxied) == set(), command


def test_reading_a_cache_another_process_has_open_keeps_its_files(proxied, tmp_path):
    """The clean-up never removes the -wal/-shm files of a database someone else has open."""
    cache = tmp_path / "open"
    fill(cache, 3)
    writer = open_store(cache)
    writer.stats()  # connected
    assert sidecars(cache) == {"cache.db-wal", "cache.db-shm"}
    assert cli_json("stats", cache)["entries"] == 3
    assert sidecars(cache) == {"cache.db-wal", "cache.db-shm"}
    writer.put_many([Entry(key=b"\xff" * 16, value=codec.encode("late"), model="m" * 32, method="generate_until")])
    assert cli_json("stats", cache)["entries"] == 4
    writer.close()


def test_an_imported_entry_starts_without_hits(proxied, tmp_path):
    out = tmp_path / "all.lmc"
    assert cli_json("export", proxied, out)["exported"] == 4
    assert sum(r["hits"] for r in cli_json("ls", out)["entries"]) == 1  # the export keeps them
    target = tmp_path / "target"
    assert cli_json("import", target, out)["added"] == 4
    imported = cli_json("ls", target)["entries"]
    assert [r["hits"] for r in imported] == [0, 0, 0, 0]
    assert {zoned(r["used_at"]).timestamp() for r in imported} == {NOW}
    assert cli_json("stats", target)["hits"] == 0


def test_counts_are_said_with_the_right_plural(tmp_path):
    fill(tmp_path / "c", 2)
    out1, out2 = tmp_path / "one.lmc", tmp_path / "two.lmc"
    assert run_cli("export", tmp_path / "c", out1, "--doc-id", "0").stdout.strip() == f"exported 1 entry to {out1}"
    assert run_cli("export", tmp_path / "c", out2).stdout.strip() == f"exported 2 entries to {out2}"
    assert run_cli("import", tmp_path / "d", out1).stdout.startswith("added 1 entry;")
    assert run_cli("verify", tmp_path / "d").stdout.strip() == "checked 1 entry: 0 damaged"
    assert run_cli("rm", tmp_path / "c", "--doc-id", "1").stdout.strip() == "removed 1 entry"
    assert run_cli("clear", tmp_path / "d", "--yes").stdout.strip() == "removed 1 entry"
    assert run_cli("clear", tmp_path / "d", "--yes").stdout.strip() == "removed 0 entries"


# -- item 11: labels people can tell apart -------------------------------------------------


def test_models_with_the_same_label_are_told_apart_by_digest(tmp_path):
    for temperature in (0.0, 0.7):
        model = FakeModel(pretrained="a/one", temperature=temperature)
        model.task_dict = task_dict(1)
        lm = cached(model, tmp_path)
        lm.generate_until([gen_request(0)])
        lm.cache_close()
    other = FakeModel(pretrained="b/two")
    other.task_dict = task_dict(1)
    lm = cached(other, tmp_path)
    lm.generate_until([gen_request(0)])
    lm.cache_close()
    stats = cli_json("stats", tmp_path)
    labels = {r["model"]: r["model_label"] for r in stats["by_model"]}
    assert len(set(labels.values())) == 3
    assert sorted(labels.values())[2] == "FakeModel(b/two)"
    for digest, name in labels.items():
        if "a/one" in name:
            assert name == f"FakeModel(a/one)#{digest[:8]}"
    listed = {r["model_label"] for r in cli_json("ls", tmp_path)["entries"]}
    assert listed == set(labels.values())
    text = run_cli("stats", tmp_path).stdout
    assert all(name in text for name in labels.values())


def test_a_description_with_its_own_label_is_named_by_it(tmp_path):
    store = open_store(tmp_path)
    store.remember_model("d" * 32, json.dumps({"label": "Qwen2.5-VL-7B (bf16)", "class": "x.Y"}))
    store.remember_model("e" * 32, json.dumps({"label": "", "class": "x.Y", "settings": {"pretrained": "o/m"}}))
    store.put_many([Entry(key=bytes([i]) * 16, value=codec.encode("v"), model=m, method="generate_until")
                    for i, m in ((1, "d" * 32), (2, "e" * 32))])  # fmt: skip
    store.close()
    assert {r["model_label"] for r in cli_json("stats", tmp_path)["by_model"]} == {"Qwen2.5-VL-7B (bf16)", "Y(o/m)"}


def test_stats_counts_entries_of_an_older_key_schema_and_prune_old_schema_drops_them(tmp_path):
    import sqlite3

    from fakes import FakeModel, gen_request, task_dict
    from lmms_cache import cached

    model = FakeModel()
    model.task_dict = task_dict(3)
    lm = cached(model, tmp_path)
    lm.generate_until([gen_request(i) for i in range(3)])
    lm.cache_close()
    with sqlite3.connect(tmp_path / "cache.db") as conn:  # one entry from the previous version
        conn.execute("UPDATE entries SET key_schema = 'lmms-cache/key/1' WHERE doc_id = 0")
    stats = cli_json("stats", tmp_path)
    assert stats["entries"] == 3 and stats["old_schema_entries"] == 1
    assert "prune --old-schema" in run_cli("stats", tmp_path).stdout
    assert cli_json("prune", tmp_path, "--old-schema")["removed"] == 1
    assert cli_json("stats", tmp_path)["old_schema_entries"] == 0
    again = FakeModel()
    again.task_dict = task_dict(3)
    rerun = cached(again, tmp_path)
    rerun.generate_until([gen_request(i) for i in range(1, 3)])
    assert rerun.cache_stats.hits == 2


def test_copy_between_two_directories_makes_imports_and_refuses_unsafe_values(tmp_path):
    from lmms_cache import trust

    lm = cached(FakeModel(), tmp_path / "a")
    lm.task_dict = task_dict(3)
    lm.generate_until([gen_request(0), gen_request(1)])
    lm.cache_close()
    store = open_store(tmp_path / "a")
    store.put_many([Entry(key=b"u" * 16, value=codec.encode(argparse.Namespace(x=1)), model="m",
                          method="generate_until", origin=trust.local_origin())])  # a class outside the safe set
    store.close()
    out = cli_json("copy", tmp_path / "a", tmp_path / "b")
    assert (out["added"], out["refused"], out["conflicts"]) == (2, 1, 0)
    copied = open_store(tmp_path / "b", readonly=True)
    # a copy's origin is never the source's claim, even one of this user's own
    assert {e.origin for e in copied.scan()} == {trust.imported_origin(trust.local_origin())}
    assert set(copied.models()) == {e.model for e in copied.scan()}
    copied.close()
    assert cli_json("copy", tmp_path / "a", tmp_path / "b", "--trust")["added"] == 1  # vouched for: now the user's
    assert cli_json("copy", tmp_path / "a", tmp_path / "b", "--task", "t")["conflicts"] == 2
