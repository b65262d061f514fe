"""Origins and signatures: which stored values may load with full pickle."""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from lmms_cache import trust
from lmms_cache.codec import encode
from lmms_cache.trust import (
    SECRET_ENV,
    imported_origin,
    is_local,
    local_origin,
    may_load_trusted,
    sign,
    signature_valid,
)

KEY = bytes(range(16))
OTHER_KEY = bytes(range(1, 17))


@pytest.fixture
def secret(monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setenv(SECRET_ENV, "correct horse battery staple")
    return "correct horse battery staple"


@pytest.fixture
def fresh_origin() -> Iterator[None]:
    local_origin.cache_clear()
    yield
    local_origin.cache_clear()


# -- signatures --------------------------------------------------------------------------------------


def test_signature_of_the_same_key_and_value_is_valid(secret: str) -> None:
    blob = encode("The answer is B.")
    signature = sign(KEY, blob)
    assert signature is not None and len(signature) == 32
    assert signature_valid(KEY, blob, signature)


def test_signature_is_bound_to_its_key(secret: str) -> None:
    blob = encode("The answer is B.")
    assert not signature_valid(OTHER_KEY, blob, sign(KEY, blob))


def test_signature_of_a_tampered_value_is_invalid(secret: str) -> None:
    blob = bytearray(encode("The answer is B."))
    signature = sign(KEY, bytes(blob))
    blob[-2] ^= 0x01
    assert not signature_valid(KEY, bytes(blob), signature)


def test_a_signature_does_not_move_between_key_and_value(secret: str) -> None:
    # (key, blob) pairs that concatenate to the same bytes sign differently.
    assert sign(b"ab", b"c") != sign(b"a", b"bc")


def test_signature_under_another_secret_is_invalid(monkeypatch: pytest.MonkeyPatch) -> None:
    blob = encode("x")
    monkeypatch.setenv(SECRET_ENV, "theirs")
    theirs = sign(KEY, blob)
    monkeypatch.setenv(SECRET_ENV, "ours")  # read at call time: no restart needed
    assert not signature_valid(KEY, blob, theirs)
    assert signature_valid(KEY, blob, sign(KEY, blob))


def test_no_secret_signs_nothing_and_accepts_nothing(secret: str, monkeypatch: pytest.MonkeyPatch) -> None:
    blob = encode("x")
    signature = sign(KEY, blob)
    monkeypatch.delenv(SECRET_ENV)
    assert sign(KEY, blob) is None
    assert not signature_valid(KEY, blob, signature)


def test_an_empty_secret_is_no_secret(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(SECRET_ENV, "")
    assert trust.secret() is None
    assert sign(KEY, b"x") is None


def test_a_missing_or_truncated_signature_is_invalid(secret: str) -> None:
    blob = encode("x")
    signature = sign(KEY, blob)
    assert signature is not None
    assert not signature_valid(KEY, blob, None)
    assert not signature_valid(KEY, blob, b"")
    assert not signature_valid(KEY, blob, signature[:-1])


def test_signatures_are_compared_in_constant_time(secret: str, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    real = trust.hmac.compare_digest

    def spy(a: bytes, b: bytes) -> bool:
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(trust.hmac, "compare_digest", spy)
    blob = encode("x")
    assert signature_valid(KEY, blob, sign(KEY, blob))
    assert len(calls) == 1


# -- origins ---------------------------------------------------------------------------------------


def test_local_origin_names_this_user_and_a_hashed_machine(fresh_origin: object) -> None:
    origin = local_origin()
    assert re.fullmatch(rf"uid:{os.getuid()}@[0-9a-f]{{16}}", origin)
    for path in trust._MACHINE_ID_FILES:
        if os.path.exists(path):
            raw = Path(path).read_text().strip()
            assert raw and raw not in origin  # machine-id(5): never exposed raw
    assert local_origin() is origin  # computed once per process


def test_local_origin_is_stable_without_a_machine_id(fresh_origin: object, monkeypatch: pytest.MonkeyPatch,
                                                     tmp_path: Path) -> None:  # fmt: skip
    monkeypatch.setattr(trust, "_MACHINE_ID_FILES", (str(tmp_path / "missing"), str(tmp_path / "also-missing")))
    first = local_origin()
    local_origin.cache_clear()
    assert local_origin() == first
    assert first.startswith(f"uid:{os.getuid()}@")


def test_local_origin_without_getuid(fresh_origin: object, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delattr(os, "getuid")  # as on Windows
    monkeypatch.setenv("USERNAME", "ada")
    monkeypatch.setenv("LOGNAME", "ada")
    monkeypatch.setenv("USER", "ada")
    assert local_origin().startswith("user:ada@")


def test_machine_ids_differ_in_the_origin(fresh_origin: object, monkeypatch: pytest.MonkeyPatch,
                                          tmp_path: Path) -> None:  # fmt: skip
    (tmp_path / "a").write_text("0123456789abcdef0123456789abcdef\n")
    (tmp_path / "b").write_text("fedcba9876543210fedcba9876543210\n")
    monkeypatch.setattr(trust, "_MACHINE_ID_FILES", (str(tmp_path / "a"),))
    a = local_origin()
    local_origin.cache_clear()
    monkeypatch.setattr(trust, "_MACHINE_ID_FILES", (str(tmp_path / "b"),))
    assert local_origin() != a


def test_an_imported_origin_is_never_local_whatever_the_file_claims() -> None:
    claimed = local_origin()
    rewritten = imported_origin(claimed)
    assert not is_local(rewritten)
    assert rewritten == f"import:{claimed}"
    assert not is_local(imported_origin(None))


def test_an_imported_origin_keeps_no_control_characters() -> None:
    assert imported_origin("uid:0@x\x1b[2J\n") == "import:uid:0@x?[2J?"
    assert len(imported_origin("y" * 10_000)) <= 210


def test_only_local_or_validly_signed_values_load_trusted(secret: str, monkeypatch: pytest.MonkeyPatch) -> None:
    blob = encode("x")
    signature = sign(KEY, blob)
    assert may_load_trusted(KEY, blob, origin=local_origin(), signature=None)
    assert may_load_trusted(KEY, blob, origin="import:someone", signature=signature)
    assert not may_load_trusted(KEY, blob, origin="import:someone", signature=None)
    assert not may_load_trusted(OTHER_KEY, blob, origin="uid:0@elsewhere", signature=signature)
    monkeypatch.delenv(SECRET_ENV)
    assert not may_load_trusted(KEY, blob, origin="import:someone", signature=signature)
