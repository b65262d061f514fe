"""Values that load without running code, end to end: what the proxy, ``ls``, ``show``,
``import`` and ``verify`` do with a value someone else crafted (issue 11).

A value loads with full pickle only when this user wrote it on this machine, or when it
is signed with the team's ``$LMMS_CACHE_SECRET``; anything else loads restricted.
"""

from __future__ import annotations

import logging
import os
import sqlite3
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from cli_run import cli_json, run_cli
from fakes import FakeModel, gen_request, task_dict
from lmms_cache import cached, codec, trust
from lmms_cache.manage import export


@dataclass
class Answer:
    """A response class of the user's own: not on the restricted loader's allow-list."""

    text: str


class Own(FakeModel):
    def generate_until(self, requests: list[Any]) -> list[Any]:
        self._record("generate_until", requests)
        return [Answer(f"answer to {r.args[0]}") for r in requests]


class Evil:
    """Unpickling it runs a command (creates a marker file)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.system, (f"touch {self.marker}",))


def model(cls: type = FakeModel) -> Any:
    m = cls()
    m.task_dict = task_dict(2)
    return m


def plant(cache: Path, value: bytes, *, origin: str, signature: bytes | None = None) -> bytes:
    """Replace the value of the cache's only entry, as a crafted file would hold it."""
    with sqlite3.connect(cache / "cache.db") as conn:
        (key,) = conn.execute("SELECT key FROM entries").fetchone()
        conn.execute("UPDATE entries SET value = ?, size = ?, origin = ?, signature = ?",
                     (value, len(value), origin, signature))  # fmt: skip
    return bytes(key)


@pytest.fixture
def marker(tmp_path: Path) -> Path:
    path = tmp_path / "pwned"
    assert codec.decode(codec.encode(Evil(path)), trusted=True) == 0 and path.exists()  # it would run
    path.unlink()
    return path


def test_a_planted_malicious_value_never_runs_on_a_hit(tmp_path, marker, caplog):
    cache = tmp_path / "cache"
    cached(model(), cache).generate_until([gen_request(0)])
    plant(cache, codec.encode(Evil(marker)), origin="uid:0@another-machine")
    again = model()
    with caplog.at_level(logging.WARNING, logger="lmms_cache"):
        lm = cached(again, cache)
        assert [r.text for r in lm.generate_until([gen_request(0)])] == ["answer to q0"]
    assert not marker.exists()
    assert again.calls == 1 and lm.cache_stats.hits == 0  # recomputed...
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "system" in warnings[0] and "trust=True" in warnings[0]
    rerun = model()
    cached(rerun, cache).generate_until([gen_request(0)])
    assert rerun.calls == 0  # ...and overwritten with a value of ours


def test_an_invalid_signature_does_not_make_a_foreign_value_trusted(tmp_path, marker):
    cache = tmp_path / "cache"
    cached(model(), cache).generate_until([gen_request(0)])
    plant(cache, codec.encode(Evil(marker)), origin="uid:0@elsewhere", signature=b"\0" * 32)
    cached(model(), cache).generate_until([gen_request(0)])
    assert not marker.exists()


def test_your_own_values_of_your_own_classes_still_hit(tmp_path):
    cache = tmp_path / "cache"
    cached(model(Own), cache).generate_until([gen_request(0)])
    again = model(Own)
    lm = cached(again, cache)
    assert lm.generate_until([gen_request(0)]) == [Answer("answer to q0")]
    assert again.calls == 0 and lm.cache_stats.hits == 1


def test_a_value_signed_with_the_team_secret_loads_and_a_forged_one_does_not(tmp_path, monkeypatch):
    monkeypatch.setenv(trust.SECRET_ENV, "team-secret")
    cache = tmp_path / "cache"
    cached(model(Own), cache).generate_until([gen_request(0)])
    value = codec.encode(Answer("from a teammate"))
    with sqlite3.connect(cache / "cache.db") as conn:
        (key,) = conn.execute("SELECT key FROM entries").fetchone()
    plant(cache, value, origin="uid:1000@teammate", signature=trust.sign(bytes(key), value))
    lm = cached(model(Own), cache)
    assert lm.generate_until([gen_request(0)]) == [Answer("from a teammate")]

    plant(cache, value, origin="uid:1000@teammate", signature=b"\1" * 32)
    forged = model(Own)
    assert cached(forged, cache).generate_until([gen_request(0)]) == [Answer("answer to q0")]
    assert forged.calls == 1


def test_ls_and_show_never_run_a_planted_value(tmp_path, marker):
    cache = tmp_path / "cache"
    cached(model(), cache).generate_until([gen_request(0)])
    key = plant(cache, codec.encode(Evil(marker)), origin="uid:0@another-machine")
    listed = cli_json("ls", cache)["entries"]
    assert "not loaded: needs" in listed[0]["response"]
    shown = cli_json("show", cache, key.hex())
    assert "not loaded: needs" in shown["response"]
    assert not marker.exists()


def test_import_refuses_an_unsigned_value_that_would_run_code_and_verify_reports_it(tmp_path, marker):
    source = tmp_path / "source"
    cached(model(), source).generate_until([gen_request(0), gen_request(1)])
    plant_one = sqlite3.connect(source / "cache.db")
    with plant_one:
        row = plant_one.execute("SELECT key FROM entries ORDER BY id LIMIT 1").fetchone()
        evil = codec.encode(Evil(marker))
        plant_one.execute("UPDATE entries SET value = ?, size = ?, origin = 'uid:0@x' WHERE key = ?",
                          (evil, len(evil), row[0]))  # fmt: skip
    plant_one.close()
    from lmms_cache.store import open_store

    store = open_store(source)
    try:
        exported = tmp_path / "shared.lmmscache"
        export(store, str(exported))
    finally:
        store.close()

    counts = cli_json("import", tmp_path / "mine", exported)
    assert counts["added"] == 1 and counts["refused"] == 1
    assert not marker.exists()
    verified = cli_json("verify", source)
    assert verified["unsigned_foreign"] == [bytes(row[0]).hex()]
    assert "written elsewhere and unsigned" in run_cli("verify", source).stdout

    trusted = cli_json("import", tmp_path / "trusting", exported, "--trust")
    assert trusted["added"] == 2 and trusted["refused"] == 0
    assert not marker.exists()  # importing never loads a value


def test_imported_entries_are_never_yours_whatever_the_file_says(tmp_path):
    source = tmp_path / "source"
    cached(model(Own), source).generate_until([gen_request(0)])
    with sqlite3.connect(source / "cache.db") as conn:
        conn.execute("UPDATE entries SET origin = ?", (trust.local_origin(),))  # claims to be us
    from lmms_cache.store import open_store

    store = open_store(source)
    try:
        export(store, str(tmp_path / "x.lmmscache"))
    finally:
        store.close()
    # Answer is outside the allow-list: refused, though the file claims our origin
    assert cli_json("import", tmp_path / "mine", tmp_path / "x.lmmscache")["refused"] == 1
