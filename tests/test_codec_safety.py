"""Untrusted values load only from the allow-list: malicious payloads in valid envelopes are
refused by decode and flagged by scan / is_safe without running; allowed values round-trip."""

from __future__ import annotations

import collections
import copyreg
import datetime
import math
import pickle
import pickletools
import re
import struct
import subprocess
import sys
from pathlib import Path
from typing import Any

import dill
import pytest
import xxhash
from hypothesis import given, settings
from hypothesis import strategies as st
from lmms_eval.api.instance import GenerationResult, TokenCounts

from lmms_cache import codec
from lmms_cache.codec import CodecError, UntrustedValueError, decode, encode, is_safe, scan


def envelope(payload: bytes, kind: int = codec._PICKLE, compress: bool = False) -> bytes:
    """A valid envelope around any payload: what a crafted export file can hold."""
    size = len(payload)
    if compress:
        payload = codec._compressor().compress(payload)
        kind |= codec._ZSTD
    return struct.pack(">3sBBQI", b"LMC", codec.FORMAT_VERSION, kind, xxhash.xxh3_64_intdigest(payload), size) + payload


def touch_code(marker: Path) -> str:
    return f"open({str(marker)!r}, 'w').close()"


# -- payloads that run code when loaded: each creates ``marker`` -----------------------------------


class _Reduce:
    def __init__(self, fn: Any, *args: Any) -> None:
        self.fn, self.args = fn, args

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        return self.fn, self.args


def os_system(marker: Path) -> bytes:
    # Spelled os.system by hand (pickle itself would name posix.system).
    cmd = f"{sys.executable} -c \"{touch_code(marker)}\"".encode()
    return (b"\x80\x04\x8c\x02os\x94\x8c\x06system\x94\x93\x94X" + struct.pack("<I", len(cmd)) + cmd
            + b"\x94\x85\x94R\x94.")  # fmt: skip


def subprocess_popen(marker: Path) -> bytes:
    return pickle.dumps(_Reduce(subprocess.Popen, [sys.executable, "-c", touch_code(marker)]), protocol=5)


def builtins_eval(marker: Path) -> bytes:
    return pickle.dumps(_Reduce(eval, touch_code(marker)), protocol=5)


def getattr_gadget(marker: Path) -> bytes:
    # getattr(__import__("os"), "system")(cmd), the classic protocol 0 gadget.
    cmd = f"{sys.executable} -c \"{touch_code(marker)}\""
    return (f"cbuiltins\ngetattr\n(cbuiltins\n__import__\n(Vos\ntRVsystem\ntR(V{cmd}\ntR.").encode()


def reconstructor_of_foreign_class(marker: Path) -> bytes:
    # copyreg._reconstructor(Popen, Popen, args) runs Popen.__init__(obj, args).
    args = f"(lV{sys.executable}\naV-c\naV{touch_code(marker)}\na".encode()
    return b"ccopy_reg\n_reconstructor\n(csubprocess\nPopen\ncsubprocess\nPopen\n" + args + b"tR."


def reduce_eval(marker: Path) -> bytes:
    return pickle.dumps(_Reduce(eval, touch_code(marker)), protocol=2)


MALICIOUS = {
    "os.system": (os_system, "os.system"),
    "subprocess.Popen": (subprocess_popen, "subprocess.Popen"),
    "builtins.eval": (builtins_eval, "builtins.eval"),
    "getattr gadget": (getattr_gadget, "builtins.getattr"),
    "copyreg._reconstructor of Popen": (reconstructor_of_foreign_class, "subprocess.Popen"),
    "__reduce__ -> eval (protocol 2)": (reduce_eval, "builtins.eval"),
}


def run_trusted_and_wait(blob: bytes) -> None:
    value = decode(blob, trusted=True)
    if isinstance(value, subprocess.Popen):
        value.wait()  # (os.system and eval have finished when they return)


@pytest.mark.parametrize("name", MALICIOUS)
def test_malicious_payload_is_live_when_trusted(name: str, tmp_path: Path) -> None:
    """The payloads below really run code: the refusals are not vacuous."""
    build, _ = MALICIOUS[name]
    marker = tmp_path / "ran"
    run_trusted_and_wait(envelope(build(marker)))
    assert marker.exists()


@pytest.mark.parametrize("name", MALICIOUS)
def test_malicious_payload_is_refused_without_running(name: str, tmp_path: Path) -> None:
    build, needed = MALICIOUS[name]
    marker = tmp_path / "ran"
    blob = envelope(build(marker))
    assert codec.verify(blob)  # a valid envelope: only its contents are wrong
    with pytest.raises(UntrustedValueError, match=f"refused to load {re.escape(needed)}") as info:
        decode(blob)
    assert info.value.needed == needed
    assert not marker.exists()


@pytest.mark.parametrize("name", MALICIOUS)
def test_malicious_payload_is_flagged_by_scan_without_running(name: str, tmp_path: Path) -> None:
    build, needed = MALICIOUS[name]
    marker = tmp_path / "ran"
    blob = envelope(build(marker))
    names = {f"{codec._ALIASES.get(m, m)}.{n}" for m, n in scan(blob)}
    assert needed in names
    assert not is_safe(blob)
    assert not marker.exists()


def test_os_system_refusal_says_why(tmp_path: Path) -> None:
    with pytest.raises(CodecError, match=r"refused to load os\.system: the value was not written by you "
                                         r"on this machine and is not signed"):  # fmt: skip
        decode(envelope(os_system(tmp_path / "ran")))


def test_dill_payload_is_refused_without_running(tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    blob = envelope(builtins_eval(marker), kind=codec._DILL)  # dill.loads would run it
    with pytest.raises(UntrustedValueError, match="dill") as info:
        decode(blob)
    assert info.value.needed == "dill"
    assert not marker.exists()
    assert not is_safe(blob)
    decode(blob, trusted=True)
    assert marker.exists()


def test_dill_lambda_is_refused_untrusted_and_loads_trusted() -> None:
    blob = encode(lambda x: x + 1)
    assert blob[4] & 0x0F == codec._DILL
    with pytest.raises(UntrustedValueError):
        decode(blob)
    assert not is_safe(blob)
    assert decode(blob, trusted=True)(1) == 2


def test_dill_of_plain_value_is_still_not_safe() -> None:
    blob = envelope(dill.dumps("plain", protocol=5), kind=codec._DILL)
    assert scan(blob) == []
    assert not is_safe(blob)


def test_a_module_class_is_refused_untrusted() -> None:
    blob = encode(collections.Counter(a=1))  # plain pickle, but not on the allow-list
    with pytest.raises(UntrustedValueError, match=r"collections\.Counter"):
        decode(blob)
    assert decode(blob, trusted=True) == collections.Counter(a=1)


def test_build_cannot_set_attributes_on_an_allowed_class() -> None:
    # BUILD with a slot state on the class object itself: setattr(GenerationResult, ...).
    payload = (b"\x80\x04\x8c\x16lmms_eval.api.instance\x8c\x10GenerationResult\x93"
               b"N}\x8c\x08injected\x8c\x08builtins\x8c\x03set\x93s\x86b.")  # fmt: skip
    pickle.loads(payload)  # the real unpickler changes the class for the whole process...
    try:
        assert GenerationResult.injected is set  # type: ignore[attr-defined]
    finally:
        del GenerationResult.injected  # type: ignore[attr-defined]
    with pytest.raises(UntrustedValueError, match="setting 'injected'"):
        decode(envelope(payload))  # ...the restricted one refuses
    assert not hasattr(GenerationResult, "injected")


def test_build_cannot_set_attributes_on_a_helper() -> None:
    payload = b"\x80\x04\x8c\x07_codecs\x8c\x06encode\x93N}\x8c\x01x\x88s\x86b."
    with pytest.raises(CodecError, match="does not decode"):
        decode(envelope(payload))


def test_reconstructor_of_an_allowed_class_with_another_base_is_refused() -> None:
    payload = (b"ccopy_reg\n_reconstructor\n(clmms_eval.api.instance\nGenerationResult\n"
               b"ccollections\nOrderedDict\nNtR.")  # fmt: skip
    with pytest.raises(UntrustedValueError, match=r"copyreg._reconstructor of GenerationResult"):
        decode(envelope(payload))


def test_codecs_encode_with_another_codec_is_refused() -> None:
    payload = b"c_codecs\nencode\n(Vx\nVzlib\ntR."
    with pytest.raises(UntrustedValueError, match=r"_codecs\.encode with encoding 'zlib'"):
        decode(envelope(payload))


def test_bytes_of_a_count_is_refused() -> None:
    payload = b"\x80\x02c__builtin__\nbytes\nJ\x00\x00\x00@\x85R."  # bytes(2**30): a GB from 30 bytes
    with pytest.raises(UntrustedValueError, match=r"builtins\.bytes"):
        decode(envelope(payload))


def test_a_registered_extension_goes_through_the_allow_list() -> None:
    copyreg.add_extension("posix", "getcwd", 0x7FFFFF01)
    try:
        blob = envelope(b"\x80\x02\x84\x01\xff\xff\x7f.")  # EXT4: posix.getcwd by number
        with pytest.raises(UntrustedValueError, match=r"posix\.getcwd"):
            decode(blob)
        assert scan(blob) == [("<extension>", str(0x7FFFFF01))]
        assert not is_safe(blob)
    finally:
        copyreg.remove_extension("posix", "getcwd", 0x7FFFFF01)


def test_a_persistent_id_is_not_safe_and_does_not_decode() -> None:
    blob = envelope(b"\x80\x02Vx\nQ.")
    assert scan(blob) == [("<persistent id>", "BINPERSID")]
    assert not is_safe(blob)
    with pytest.raises(CodecError):
        decode(blob)


def test_response_class_not_installed_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(codec, "_RESPONSE_CLASSES", codec._RESPONSE_CLASSES | {("no_such_harness", "Result")})
    blob = envelope(b"\x80\x04\x8c\x0fno_such_harness\x8c\x06Result\x93)\x81.")
    with pytest.raises(UntrustedValueError, match=r"no_such_harness\.Result \(not installed here\)"):
        decode(blob)


def test_allowed_response_classes_have_no_hooks_a_pickle_could_use() -> None:
    """The safety argument for GenerationResult and TokenCounts: plain classes. A newer
    lmms-eval that adds one of these hooks must be reviewed before staying on the list."""
    for cls in (GenerationResult, TokenCounts):
        assert cls.__mro__ == (cls, object) and type(cls) is type
        hooks = {"__new__", "__setstate__", "__reduce__", "__reduce_ex__", "__getattr__", "__getattribute__",
                 "__setattr__", "__delattr__", "__post_init__", "__init_subclass__", "__class_getitem__",
                 "__set_name__", "__del__", "__setitem__", "__set__"}  # fmt: skip
        assert not hooks & set(cls.__dict__), (cls, hooks & set(cls.__dict__))
    assert {("lmms_eval.api.instance", "GenerationResult"),
            ("lmms_eval.api.instance", "TokenCounts")} == set(codec._RESPONSE_CLASSES)  # fmt: skip


# -- what loads untrusted ---------------------------------------------------------------------------

ALLOWED_VALUES: dict[str, Any] = {
    "generation result with token counts": GenerationResult(
        text="a cat", token_counts=TokenCounts(input_tokens=12, output_tokens=3, reasoning_tokens=None)),
    "generation result, long text (compressed)": GenerationResult(text="The bus is red. " * 200),
    "generation result without counts": GenerationResult(text="b"),
    "loglikelihood tuple": (-3.25, True),
    "rolling loglikelihood": -1234.5,
    "multi-round list of str": ["round 1", "round 2", "round 3"],
    "str": "The answer is B.",
    "empty str": "",
    "dict": {"answer": "B", "scores": [0.1, 0.9], "nested": {"k": (1, None)}},
    "None": None,
    "big int": 10**40,
    "bytes": b"\x00\xff",
    "bytearray": bytearray(b"ab"),
    "set": {1, "a"},
    "frozenset": frozenset({2.5}),
    "complex": 1 + 2j,
    "OrderedDict": collections.OrderedDict([("b", 1), ("a", 2)]),
    "datetime with tz": datetime.datetime(2024, 5, 6, 7, 8, 9, 10, tzinfo=datetime.timezone(datetime.timedelta(hours=2), "X")),
    "date, time, timedelta": (datetime.date(2024, 1, 2), datetime.time(3, 4), datetime.timedelta(days=1, seconds=2)),
    "list of generation results": [GenerationResult(text="x"), GenerationResult(text="y", token_counts=TokenCounts(1))],
}


def same(a: Any, b: Any) -> bool:
    return type(a) is type(b) and a == b


@pytest.mark.parametrize("name", ALLOWED_VALUES)
def test_allowed_value_round_trips_untrusted(name: str) -> None:
    value = ALLOWED_VALUES[name]
    blob = encode(value)
    assert is_safe(blob)
    back = decode(blob)
    assert same(back, value)
    if isinstance(value, GenerationResult) and value.token_counts is not None:
        assert type(back.token_counts) is TokenCounts


@pytest.mark.parametrize("protocol", [0, 1, 2, 3, 4, 5])
@pytest.mark.parametrize("name", ALLOWED_VALUES)
def test_allowed_value_round_trips_untrusted_from_any_protocol(name: str, protocol: int) -> None:
    value = ALLOWED_VALUES[name]
    blob = envelope(pickle.dumps(value, protocol=protocol))
    assert is_safe(blob), scan(blob)
    assert same(decode(blob), value)


def test_nan_and_infinities_round_trip_untrusted() -> None:
    back = decode(encode((float("nan"), float("inf"), -float("inf"), -0.0)))
    assert math.isnan(back[0]) and back[1:3] == (float("inf"), -float("inf"))
    assert math.copysign(1, back[3]) == -1


def test_decoded_generation_result_is_the_real_class_not_the_stand_in() -> None:
    back = decode(encode(GenerationResult(text="a", token_counts=TokenCounts(1, 2, 3))))
    assert type(back) is GenerationResult and type(back.token_counts) is TokenCounts
    back.text = "changed"  # an ordinary, mutable instance
    assert back.token_counts.to_dict() == {"input_tokens": 1, "output_tokens": 2, "reasoning_tokens": 3}


def test_plain_values_skip_the_unpickler(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_unpickler(*args: object) -> None:
        raise AssertionError("the restricted Unpickler was built for a value that names nothing")

    monkeypatch.setattr(codec, "_Restricted", no_unpickler)
    # a str of any length (a generation), and tiny values: (float, bool), a float, None
    for value in ("short", "x" * 400, "y" * 5000, (-1.5, False), -2.5, 7, None, True, ("a", 1.0), ["a", "b"]):
        blob = encode(value)
        assert not blob[4] & codec._ZSTD or value == "y" * 5000
        assert same(decode(blob), value)


# -- scan ------------------------------------------------------------------------------------------


def test_scan_reads_a_zstd_compressed_payload() -> None:
    blob = encode(GenerationResult(text="long answer " * 300, token_counts=TokenCounts(1)))
    assert blob[4] & codec._ZSTD
    assert scan(blob) == [("lmms_eval.api.instance", "GenerationResult"), ("lmms_eval.api.instance", "TokenCounts")]


def test_scan_reads_a_compressed_malicious_payload(tmp_path: Path) -> None:
    blob = envelope(builtins_eval(tmp_path / "ran"), compress=True)
    assert ("builtins", "eval") in scan(blob)
    assert not is_safe(blob)


def test_scan_resolves_a_module_name_from_the_memo() -> None:
    # 'os' memoized under a decoy, popped, fetched back for the STACK_GLOBAL.
    payload = b"\x80\x04\x8c\x02os\x94\x8c\x08builtins\x940h\x00\x8c\x06system\x93)R."
    assert scan(envelope(payload)) == [("os", "system")]


def test_scan_follows_the_stack_not_the_last_two_strings() -> None:
    # 'os' 'system' 'builtins' 'set' POP POP STACK_GLOBAL names os.system.
    payload = b"\x80\x04\x8c\x02os\x8c\x06system\x8c\x08builtins\x8c\x03set00\x93."
    assert scan(envelope(payload)) == [("os", "system")]
    assert not is_safe(envelope(payload))


def test_scan_follows_marks() -> None:
    # 'os' MARK 'builtins' 'set' POP_MARK 'system' STACK_GLOBAL
    payload = b"\x80\x04\x8c\x02os(\x8c\x08builtins\x8c\x03set1\x8c\x06system\x93."
    assert scan(envelope(payload)) == [("os", "system")]


def test_scan_reports_a_global_of_computed_names_as_unresolved() -> None:
    # The module name is the result of a REDUCE (an allowed call): unknown until run.
    payload = (b"\x80\x04\x8c\x07_codecs\x8c\x06encode\x93\x8c\x02os\x8c\x06latin1\x86R"
               b"\x8c\x06system\x93.")  # fmt: skip
    names = scan(envelope(payload))
    assert names[0] == ("_codecs", "encode") and names[1][0] == "<unresolved>"
    assert not is_safe(envelope(payload))


@pytest.mark.parametrize("protocol", [2, 3, 4, 5])
def test_scan_finds_the_global_in_every_protocol(protocol: int, tmp_path: Path) -> None:
    blob = envelope(pickle.dumps(_Reduce(eval, touch_code(tmp_path / "ran")), protocol=protocol))
    assert [(codec._ALIASES.get(m, m), n) for m, n in scan(blob)] == [("builtins", "eval")]
    assert not is_safe(blob)


@pytest.mark.parametrize("protocol", [2, 3, 4, 5])
def test_scan_lists_a_memoized_class_once_per_use_of_its_name(protocol: int) -> None:
    value = [GenerationResult(text="a"), GenerationResult(text="b")]  # the class comes back by GET
    names = scan(envelope(pickle.dumps(value, protocol=protocol)))
    assert names == [("lmms_eval.api.instance", "GenerationResult")]


def test_scan_never_unpickles(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: object, **kwargs: object) -> object:
        raise AssertionError("scan unpickled the value")

    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(pickle, "Unpickler", refuse)
    assert scan(encode(GenerationResult(text="x"))) == [("lmms_eval.api.instance", "GenerationResult")]


def test_scan_of_a_damaged_or_malformed_value_is_codec_error_and_not_safe() -> None:
    damaged = bytearray(encode("answer"))
    damaged[-2] ^= 1
    truncated = envelope(b"\x80\x05\x8c\x10short")
    underflow = envelope(b"\x80\x04\x93.")
    for blob in (bytes(damaged), truncated, underflow):
        with pytest.raises(CodecError):
            scan(blob)
        assert not is_safe(blob)


def test_a_huge_memo_index_is_not_safe() -> None:
    blob = envelope(b"\x80\x02Nr\xff\xff\xff\x7f.")  # LONG_BINPUT 2**31-1: a 16 GB memo
    assert not is_safe(blob)
    assert not codec._plain(blob[codec._HEADER.size :])


# -- properties ------------------------------------------------------------------------------------

hashable = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8)
plain = st.recursive(
    hashable | st.binary(max_size=8) | st.complex_numbers(allow_nan=False),
    lambda inner: st.lists(inner, max_size=4) | st.tuples(inner, inner)
    | st.dictionaries(st.text(max_size=5), inner, max_size=4)
    | st.sets(hashable, max_size=4) | st.frozensets(hashable, max_size=3)
    | st.builds(bytearray, st.binary(max_size=4))
    | st.dictionaries(st.text(max_size=3), inner, max_size=3).map(collections.OrderedDict),
    max_leaves=12,
)


@settings(max_examples=150, deadline=None)
@given(plain)
def test_plain_values_round_trip_untrusted_and_are_safe(value: object) -> None:
    blob = encode(value)
    assert is_safe(blob)
    back = decode(blob)
    assert back == value
    assert type(back) is type(value)


responses = st.recursive(
    st.text(max_size=5) | st.floats(allow_nan=False) | st.booleans()
    | st.builds(GenerationResult, text=st.text(max_size=5),
                token_counts=st.none() | st.builds(TokenCounts, st.integers(0, 9))),
    lambda inner: st.lists(inner, max_size=3) | st.tuples(inner, inner),
    max_leaves=6,
)  # fmt: skip


@settings(max_examples=150, deadline=None)
@given(responses, st.integers(2, 5))
def test_the_fast_path_only_admits_pickles_that_name_nothing(value: object, protocol: int) -> None:
    payload = pickle.dumps(value, protocol=protocol)
    if codec._plain(payload):
        assert scan(envelope(payload)) == []
    assert decode(envelope(payload)) == value


_UNSAFE_OPS = {"GLOBAL", "STACK_GLOBAL", "INST", "OBJ", "REDUCE", "NEWOBJ", "NEWOBJ_EX", "BUILD",
               "EXT1", "EXT2", "EXT4", "PERSID", "BINPERSID", "LONG_BINPUT"}  # fmt: skip
_TOKENS = [b"N", b"\x88", b"\x89", b"G" + b"\x00" * 8, b"K\x07", b")", b"]", b"}", b"(", b"\x86", b"\x85",
           b"t", b"a", b"e", b"s", b"u", b"\x94", b"h\x00", b"0", b"1", b"2", b".",
           b"\x93", b"c", b"R", b"\x81", b"b", b"i", b"Q", b"\x82\x01", b"r\x00\x00\x00\x00",
           b"\x8c\x03\xe2\x80\x93", b"\x8c\x01.", b"X\x04\x00\x00\x00c\xe2\x80\x93", b"C\x01\x93",
           b"\x8c\x03os.", b"\x8c\x10"]  # a str holding STACK_GLOBAL's byte (an en dash), a bad length  # fmt: skip


@settings(max_examples=400, deadline=None)
@given(st.lists(st.sampled_from(_TOKENS), max_size=12), st.booleans())
def test_the_fast_path_never_admits_an_opcode_that_names_or_calls(tokens: list[bytes], framed: bool) -> None:
    body = b"".join(tokens) + b"."
    payload = b"\x80\x05" + (b"\x95" + struct.pack("<Q", len(body)) if framed else b"") + body
    if codec._plain(payload):
        ops = set()
        try:  # the unpickler runs every opcode before a malformed one
            for op, _, _ in pickletools.genops(payload):
                ops.add(op.name)
        except ValueError:
            pass
        assert not ops & _UNSAFE_OPS, ops


def test_untrusted_value_error_is_a_codec_error() -> None:
    assert issubclass(UntrustedValueError, CodecError)
    assert UntrustedValueError("os.system").needed == "os.system"


def test_every_allowed_global_resolves() -> None:
    unpickler = codec._Restricted(__import__("io").BytesIO(b""))
    for module, name in sorted(codec.ALLOWED_GLOBALS):
        assert unpickler.find_class(module, name) is not None
    assert unpickler.find_class("__builtin__", "set") is set
