"""The value envelope: round trips keep types, damage is detected, foreign bytes refused."""

from __future__ import annotations

import os
import pickle
import struct

import pytest
import xxhash
from hypothesis import given, settings
from hypothesis import strategies as st
from lmms_eval.api.instance import GenerationResult, TokenCounts

from lmms_cache import codec
from lmms_cache.codec import CodecError, decode, encode, verify

HEADER = struct.calcsize(">3sBBQI")
CHECKSUM_END = struct.calcsize(">3sBBQ")


def test_string_round_trip() -> None:
    assert decode(encode("The answer is B.")) == "The answer is B."


def test_loglikelihood_tuple_stays_a_tuple() -> None:
    value = decode(encode((-3.25, True)))
    assert value == (-3.25, True)
    assert type(value) is tuple
    assert type(value[0]) is float
    assert type(value[1]) is bool


def test_generation_result_with_token_counts_round_trip() -> None:
    result = GenerationResult(text="a cat", token_counts=TokenCounts(input_tokens=12, output_tokens=3, reasoning_tokens=1))
    back = decode(encode(result))
    assert type(back) is GenerationResult
    assert type(back.token_counts) is TokenCounts
    assert back == result


def test_multi_round_list_of_strings_round_trip() -> None:
    value = decode(encode(["round 1", "round 2"]))
    assert value == ["round 1", "round 2"]
    assert type(value) is list


def test_lambda_goes_through_dill() -> None:
    blob = encode(lambda x: x * 2)
    assert blob[4] == codec._DILL
    assert decode(blob, trusted=True)(21) == 42


def test_local_class_goes_through_dill() -> None:
    class Answer:
        def __init__(self, text: str) -> None:
            self.text = text

    blob = encode(Answer("yes"))
    assert blob[4] & 0x0F == codec._DILL
    back = decode(blob, trusted=True)
    assert back.text == "yes"
    assert type(back).__name__ == "Answer"


def test_plain_values_use_pickle() -> None:
    blob = encode("text")
    assert blob[:3] == b"LMC"
    assert blob[4] == codec._PICKLE
    assert pickle.loads(blob[HEADER:]) == "text"


json_like = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.tuples(inner, inner)
    | st.dictionaries(st.text(max_size=5), inner, max_size=4),
    max_leaves=12,
)


@settings(max_examples=50, deadline=None)
@given(json_like)
def test_round_trip_is_exact(value: object) -> None:
    blob = encode(value)
    assert verify(blob)
    back = decode(blob)
    assert back == value
    assert type(back) is type(value)


@pytest.mark.parametrize("offset", [0, 7, -1])
def test_one_flipped_payload_byte_is_detected(offset: int) -> None:
    blob = bytearray(encode(GenerationResult(text="a long enough answer " * 4)))
    position = HEADER + offset if offset >= 0 else len(blob) + offset
    blob[position] ^= 0x01
    assert not verify(bytes(blob))
    with pytest.raises(CodecError, match="checksum"):
        decode(bytes(blob))


def test_flipped_checksum_byte_is_detected() -> None:
    blob = bytearray(encode("answer"))
    blob[CHECKSUM_END - 1] ^= 0x80
    assert not verify(bytes(blob))
    with pytest.raises(CodecError, match="checksum"):
        decode(bytes(blob))


def test_wrong_magic_is_refused() -> None:
    blob = b"XYZ" + encode("answer")[3:]
    assert not verify(blob)
    with pytest.raises(CodecError, match="not an lmms-cache envelope"):
        decode(blob)


def test_raw_pickle_is_refused() -> None:
    with pytest.raises(CodecError):
        decode(pickle.dumps("answer" * 10))


def test_newer_format_version_is_refused() -> None:
    blob = bytearray(encode("answer"))
    blob[3] = codec.FORMAT_VERSION + 1
    assert not verify(bytes(blob))
    with pytest.raises(CodecError, match="format"):
        decode(bytes(blob))


@pytest.mark.parametrize("keep", [0, 3, HEADER - 1, HEADER, HEADER + 2])
def test_truncated_value_is_refused(keep: int) -> None:
    blob = encode("an answer that is longer than the header")[:keep]
    assert not verify(blob)
    with pytest.raises(CodecError):
        decode(blob)


def test_unknown_serializer_is_refused() -> None:
    blob = bytearray(encode("answer"))
    blob[4] = 9
    assert not verify(bytes(blob))
    with pytest.raises(CodecError, match="serializer"):
        decode(bytes(blob))


def test_payload_that_does_not_unpickle_is_codec_error() -> None:
    payload = b"\x80\x05cno_such_module_anywhere\nThing\n)R."  # a pickle of a missing class
    blob = struct.pack(">3sBBQI", b"LMC", codec.FORMAT_VERSION, codec._PICKLE,
                       xxhash.xxh3_64_intdigest(payload), len(payload))  # fmt: skip
    blob += payload
    assert verify(blob)  # well formed: only unpickling can tell
    with pytest.raises(CodecError, match="decode"):
        decode(blob, trusted=True)


def test_verify_does_not_unpickle(monkeypatch: pytest.MonkeyPatch) -> None:
    blob = encode(GenerationResult(text="x"))

    def refuse(*args: object, **kwargs: object) -> object:
        raise AssertionError("verify unpickled the value")

    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(pickle, "Unpickler", refuse)
    assert verify(blob)


def test_large_values_are_stored_compressed_and_come_back_exactly() -> None:
    text = "The image shows a red bus parked beside a tree. " * 200
    blob = encode(GenerationResult(text=text))
    assert blob[4] & codec._ZSTD
    assert len(blob) < len(text) // 5
    assert codec.raw_size(blob) > len(text)
    assert verify(blob)
    assert decode(blob) == GenerationResult(text=text)


def test_small_or_incompressible_values_are_stored_as_they_are() -> None:
    small = encode("yes")
    noise = encode(os.urandom(4096))
    assert not small[4] & codec._ZSTD and not noise[4] & codec._ZSTD
    assert codec.raw_size(small) == len(small) and codec.raw_size(noise) == len(noise)


def test_a_damaged_compressed_payload_is_caught_by_the_checksum() -> None:
    blob = bytearray(encode("word " * 1000))
    blob[HEADER + 3] ^= 0xFF
    assert not verify(bytes(blob))
    with pytest.raises(CodecError, match="checksum"):
        decode(bytes(blob))
