"""Content fingerprints: equal content => equal digest, any visible change => a different one."""

from __future__ import annotations

import copy
import functools
import io
import math
import os
import shutil
import types
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from lmms_cache.fingerprint import Encoder, FileDigests, Unfingerprintable, digest

# -- plain values -------------------------------------------------------------------------


def test_text_and_numbers_hash_by_value():
    assert digest("hello") == digest("hel" + "lo")
    assert digest(12345678901234567890) == digest(int("12345678901234567890"))
    assert digest(0.1) == digest(1 / 10)
    assert digest("hello") != digest("hellO")
    assert digest(0.1) != digest(0.2)


def test_integer_valued_float_equals_the_int():
    assert digest(0) == digest(0.0)
    assert digest({"temperature": 0}) == digest({"temperature": 0.0})
    assert digest(-3) == digest(-3.0)
    assert digest(0.5) != digest(0)


@pytest.mark.parametrize(("a", "b"), [(True, 1), (1, "1"), (True, "1"), (False, 0), (None, 0), (None, "")])
def test_bool_int_str_none_are_distinct(a, b):
    assert digest(a) != digest(b)


def test_item_boundaries_are_unambiguous():
    assert digest(("ab",)) != digest(("a", "b"))
    assert digest(["a", ["b"]]) != digest([["a"], "b"])
    assert digest([[], []]) != digest([[[]]])
    assert digest({"a": "bc"}) != digest({"ab": "c"})
    assert digest(b"ab") != digest("ab")


def test_dict_order_is_irrelevant_and_nesting_counts():
    a = {"x": 1, "y": {"p": [1, 2], "q": None}}
    b = {"y": {"q": None, "p": [1, 2]}, "x": 1}
    assert digest(a) == digest(b)
    assert digest(a) != digest({"x": 1, "y": {"p": [2, 1], "q": None}})
    assert digest({1: "a", "1": "b"}) != digest({1: "b", "1": "a"})


def test_list_and_tuple_are_the_same_sequence():
    assert digest([1, "a"]) == digest((1, "a"))


def test_sets_ignore_order():
    assert digest({3, 1, 2}) == digest(frozenset([2, 3, 1]))
    assert digest({1, 2}) != digest({1, 3})


def test_nan_and_infinities():
    assert digest(float("nan")) == digest(math.nan)
    assert digest(float("nan")) != digest(float("inf"))
    assert digest(float("inf")) != digest(float("-inf"))
    assert digest(float("inf")) != digest("inf")


def test_bytes_by_content():
    assert digest(b"abc") == digest(bytearray(b"abc")) == digest(memoryview(b"abc"))
    assert digest(b"abc") != digest(b"abd")


def test_strided_and_empty_memoryviews():
    arr = np.arange(8, dtype=np.int32)
    assert digest(memoryview(arr)[::2]) == digest(arr[::2].tobytes())
    assert digest(memoryview(b"")) == digest(b"")


def test_numpy_scalars_and_enums():
    import enum

    class Color(enum.Enum):
        RED = 1

    assert digest(np.float64(0.5)) == digest(0.5)
    assert digest(np.int64(3)) == digest(3)
    assert digest(Color.RED) != digest(1)


def test_constants_that_code_uses():
    assert digest(...) != digest(None)
    assert digest(1j) != digest(2j)
    assert digest(slice(0, 2)) != digest(slice(0, 3))
    assert digest(range(3)) != digest([0, 1, 2])


def test_self_containing_value_is_unfingerprintable():
    loop: list = []
    loop.append(loop)
    with pytest.raises(Unfingerprintable):
        digest(loop)


def test_unsupported_object_is_unfingerprintable():
    class Opaque:
        pass

    with pytest.raises(Unfingerprintable, match="Opaque"):
        digest({"x": [Opaque()]})


# -- images -------------------------------------------------------------------------------


def _gradient(size=(8, 6), mode="RGB"):
    img = Image.new("RGB", size)
    img.putdata([(x * 30 % 256, y * 40 % 256, (x + y) % 256) for y in range(size[1]) for x in range(size[0])])
    return img.convert(mode)


def test_image_by_pixels_not_identity():
    assert digest(_gradient()) == digest(_gradient())


def test_one_pixel_changed_gives_another_digest():
    img = _gradient()
    other = img.copy()
    other.putpixel((3, 2), (1, 2, 3))
    assert digest(img) != digest(other)


@pytest.mark.parametrize("mode", ["1", "L", "P", "RGB", "RGBA", "I;16", "I", "F", "CMYK", "YCbCr", "LA"])
@pytest.mark.parametrize("size", [(1500, 700), (3, 1), (0, 5)])
def test_image_pixels_are_hashed_as_tobytes_gives_them(mode, size):
    """The pixels are streamed into the hash in chunks; the digest is that of tobytes()."""
    import random

    import xxhash

    from lmms_cache.fingerprint import _image_digest

    rng = random.Random(f"{mode}{size}")
    img = Image.frombytes("RGB", size, rng.randbytes(size[0] * size[1] * 3)).convert(mode)
    h = xxhash.xxh3_128(f"{img.mode}:{img.size[0]}x{img.size[1]}:".encode())
    if img.mode in ("P", "PA"):
        h.update(img.palette.mode.encode() + b":")
        h.update(bytes(img.getpalette(rawmode=img.palette.mode) or ()))
    h.update(img.tobytes())
    assert _image_digest(img) == h.digest()


def test_image_mode_and_size_count():
    assert digest(Image.new("L", (4, 4), 0)) != digest(Image.new("1", (4, 4), 0))
    assert digest(Image.new("L", (4, 4), 0)) != digest(Image.new("L", (2, 8), 0))
    assert digest(Image.new("RGB", (4, 4))) != digest(Image.new("RGBA", (4, 4)))


def test_palette_image_palette_counts():
    a = Image.new("P", (4, 4), 0)
    a.putpalette([255, 0, 0] + [0] * 765)
    b = Image.new("P", (4, 4), 0)
    b.putpalette([0, 0, 255] + [0] * 765)
    assert a.tobytes() == b.tobytes()
    assert digest(a) != digest(b)


def test_png_decoded_twice_is_equal():
    buf = io.BytesIO()
    _gradient().save(buf, format="PNG")
    first = Image.open(io.BytesIO(buf.getvalue()))
    second = Image.open(io.BytesIO(buf.getvalue()))
    assert digest(first) == digest(second) == digest(_gradient())


# -- numpy arrays -------------------------------------------------------------------------


def test_array_dtype_and_shape_count():
    a = np.arange(6, dtype=np.int32)
    assert digest(a) == digest(np.arange(6, dtype=np.int32))
    assert digest(a) != digest(a.astype(np.int64))
    assert digest(a) != digest(a.reshape(2, 3))
    assert digest(a.reshape(2, 3)) != digest(a.reshape(3, 2))
    changed = a.copy()
    changed[4] = 40
    assert digest(a) != digest(changed)


def test_array_memory_layout_does_not_count():
    c = np.arange(12, dtype=np.float32).reshape(3, 4)
    assert digest(np.asfortranarray(c)) == digest(c)
    wide = np.arange(24, dtype=np.float32).reshape(3, 8)
    strided = wide[:, ::2]
    assert not strided.flags.c_contiguous
    assert digest(strided) == digest(np.ascontiguousarray(strided))
    assert digest(c.T) == digest(np.ascontiguousarray(c.T))


def test_empty_and_zero_dim_arrays():
    assert digest(np.zeros((0, 3))) != digest(np.zeros((3, 0)))
    assert digest(np.array(3.0)) != digest(np.array(4.0))
    assert digest(np.array(3.0)) != digest(np.array([3.0]))


def test_datetime_and_structured_arrays():
    days = np.array(["2024-01-01", "2024-01-02"], dtype="datetime64[D]")
    assert digest(days) == digest(days.copy())
    assert digest(days) != digest(days + 1)
    ab = np.zeros(2, dtype=[("a", "<i4"), ("b", "<f4")])
    xy = np.zeros(2, dtype=[("x", "<f4"), ("y", "<i4")])
    assert digest(ab) != digest(xy)


def test_object_arrays_with_ragged_rows():
    def ragged(last):
        a = np.empty(2, dtype=object)
        a[0], a[1] = np.arange(3), np.array([1, last])
        return a

    assert digest(ragged(2)) == digest(ragged(2))
    assert digest(ragged(2)) != digest(ragged(5))


# -- torch tensors ------------------------------------------------------------------------


@pytest.fixture
def torch():
    return pytest.importorskip("torch")


def test_tensor_views_equal_the_plain_tensor(torch):
    gen = torch.Generator().manual_seed(0)
    plain = torch.rand(2, 3, 4, 5, generator=gen)
    assert digest(plain.to(memory_format=torch.channels_last)) == digest(plain)
    assert digest(plain.clone().requires_grad_(True)) == digest(plain)
    wide = torch.rand(4, 10, generator=gen)
    strided = wide[:, ::2]
    assert not strided.is_contiguous()
    assert digest(strided) == digest(strided.contiguous())
    assert digest(wide.t()) == digest(wide.t().contiguous())
    z = torch.complex(torch.tensor([1.0, 2.0]), torch.tensor([3.0, -4.0]))
    assert z.conj().is_conj()
    assert digest(z.conj()) == digest(z.conj().resolve_conj())


def test_tensor_dtype_shape_and_values_count(torch):
    t = torch.arange(6, dtype=torch.float32)
    assert digest(t) == digest(torch.arange(6, dtype=torch.float32))
    assert digest(t) != digest(t.to(torch.float64))
    assert digest(t) != digest(t.reshape(2, 3))
    changed = t.clone()
    changed[5] = -1
    assert digest(t) != digest(changed)


def test_bfloat16_tensor(torch):
    t = torch.tensor([1.5, 2.25], dtype=torch.bfloat16)
    assert digest(t) == digest(t.clone())
    assert digest(t) != digest(t.to(torch.float16))
    assert digest(t) != digest(torch.tensor([1.5, 2.5], dtype=torch.bfloat16))


# -- files in media positions -------------------------------------------------------------


def test_file_hashed_by_content_in_media(tmp_path):
    a, b = tmp_path / "a.png", tmp_path / "sub" / "b.png"
    b.parent.mkdir()
    a.write_bytes(b"same bytes")
    b.write_bytes(b"same bytes")
    enc = Encoder()
    assert enc.digest(str(a), media=True) == enc.digest(str(b), media=True)
    assert enc.digest(a, media=True) == enc.digest(str(a), media=True)  # a Path too
    # outside media a path is just text
    assert enc.digest(str(a)) != enc.digest(str(b))


def test_changed_file_at_same_path_gives_another_digest(tmp_path):
    p = tmp_path / "clip.mp4"
    p.write_bytes(b"first version")
    enc = Encoder()
    before = enc.digest(str(p), media=True)
    p.write_bytes(b"other version")
    assert enc.digest(str(p), media=True) != before


def test_file_moved_keeps_its_digest(tmp_path):
    p = tmp_path / "x.wav"
    p.write_bytes(b"audio")
    enc = Encoder()
    before = enc.digest([str(p)], media=True)
    moved = tmp_path / "y.wav"
    shutil.move(p, moved)
    assert enc.digest([str(moved)], media=True) == before


def test_a_missing_path_hashes_as_the_string(tmp_path):
    enc = Encoder()
    missing = str(tmp_path / "missing.jpg")
    assert enc.digest(missing, media=True) == enc.digest(missing)


def test_a_directory_of_frames_counts_by_its_contents_not_its_path(tmp_path):
    """llava_vid globs frame folders; mvbench's frame subsets return them."""
    def frames(root, pixels=b"frame-", extra=()):
        root.mkdir(parents=True)
        for i in range(3):
            (root / f"{i:05d}.jpg").write_bytes(pixels + bytes([i]))
        (root / "sub").mkdir()
        (root / "sub" / "audio.wav").write_bytes(b"wav")
        for name in extra:
            (root / name).write_bytes(b"x")
        return str(root)

    enc = Encoder()
    a = enc.digest(frames(tmp_path / "a"), media=True)
    assert a != enc.digest(str(tmp_path / "a"))  # not the path
    assert enc.digest(frames(tmp_path / "moved" / "b"), media=True) == a  # a moved folder still hits
    assert enc.digest(frames(tmp_path / "c", pixels=b"other-"), media=True) != a  # a rewritten frame misses
    assert enc.digest(frames(tmp_path / "d", extra=[".hidden"]), media=True) != a  # hidden files count
    nested = tmp_path / "e"
    frames(nested)
    (nested / "sub" / "audio.wav").write_bytes(b"WAV")
    assert enc.digest(str(nested), media=True) != a  # recursive


def test_a_symlink_in_a_directory_counts_by_its_target_text_never_followed(tmp_path):
    (tmp_path / "one").write_bytes(b"1")
    (tmp_path / "two").write_bytes(b"1")
    d = tmp_path / "d"
    d.mkdir()
    (d / "link").symlink_to(tmp_path / "one")
    enc = Encoder()
    first = enc.digest(str(d), media=True)
    (d / "link").unlink()
    (d / "link").symlink_to(tmp_path / "two")  # same bytes behind it, another target
    assert enc.digest(str(d), media=True) != first
    (d / "link").unlink()
    (d / "link").symlink_to(tmp_path / "missing")  # dangling: no error
    assert enc.digest(str(d), media=True) not in (first, None)


def test_a_rewritten_file_inside_a_directory_changes_its_digest_with_one_memo(tmp_path):
    d = tmp_path / "frames"
    d.mkdir()
    (d / "0.jpg").write_bytes(b"a")
    enc = Encoder()  # one FileDigests memo across both digests, as in a proxy
    first = enc.digest(str(d), media=True)
    (d / "0.jpg").write_bytes(b"bb")
    assert enc.digest(str(d), media=True) != first


def test_palette_images_differing_only_in_alpha_differ():
    def paletted(alpha: int) -> Image.Image:
        img = Image.new("P", (4, 4))
        img.putpalette(bytes([255, 0, 0, alpha]) * 256, rawmode="RGBA")
        return img

    assert paletted(255).getpalette() == paletted(0).getpalette()  # RGB alone hides it
    assert Encoder().digest(paletted(255)) != Encoder().digest(paletted(0))


def test_chat_text_part_is_not_hashed_by_file_content(tmp_path):
    a, b = tmp_path / "a.jpg", tmp_path / "b.jpg"
    a.write_bytes(b"pixels")
    b.write_bytes(b"pixels")
    enc = Encoder()

    def text_part(path):
        return [{"role": "user", "content": [{"type": "text", "text": str(path)}]}]

    def plain_content(path):
        return [{"role": "user", "content": str(path)}]

    def image_part(path):
        return [{"role": "user", "content": [{"type": "image", "url": str(path)}]}]

    # the model reads the file name as text: two names are two questions
    assert enc.digest(text_part(a), media=True) != enc.digest(text_part(b), media=True)
    assert enc.digest(plain_content(a), media=True) != enc.digest(plain_content(b), media=True)
    # an image part is media: the same pixels under two names are one input
    assert enc.digest(image_part(a), media=True) == enc.digest(image_part(b), media=True)


def test_file_digests_are_memoized_and_can_be_persisted(tmp_path):
    p = tmp_path / "v.mp4"
    p.write_bytes(b"video")
    remembered = {}
    files = FileDigests(lookup=lambda path, sig: remembered.get((path, sig)),
                        remember=lambda path, sig, d: remembered.__setitem__((path, sig), d))  # fmt: skip
    first = files.get(str(p))
    assert first is not None and list(remembered.values()) == [first]
    assert files.get(str(p)) == first
    # another process trusts the persisted digest for the same (path, size, mtime, ...)
    persisted = {k: b"\x01" * 16 for k in remembered}
    again = FileDigests(lookup=lambda path, sig: persisted.get((path, sig)))
    assert again.get(str(p)) == b"\x01" * 16
    # ...and not once the file changed
    p.write_bytes(b"video, edited")
    assert again.get(str(p)) not in (None, b"\x01" * 16, first)
    assert files.get(str(tmp_path)) is None


# -- callables ----------------------------------------------------------------------------


def _visual(doc):
    return [doc["image"]]


def _visual_other_code(doc):
    return [doc["image"], doc["image"]]


def _with_default(doc, k=1):
    return doc[k]


def _make_closure(value):
    def inner(doc):
        return doc[value]

    return inner


def _make_recursive(depth):
    def walk(x):
        return walk(x - 1) if x > depth else x

    return walk


def test_same_function_is_equal():
    assert digest(_visual) == digest(_visual)
    assert digest(_make_closure("a")) == digest(_make_closure("a"))
    assert digest(functools.partial(_with_default, k=2)) == digest(functools.partial(_with_default, k=2))


def test_function_code_defaults_closure_and_partial_count():
    assert digest(_visual) != digest(_visual_other_code)
    other_default = types.FunctionType(_with_default.__code__, _with_default.__globals__, "_with_default", (2,))
    other_default.__qualname__ = _with_default.__qualname__
    assert digest(other_default) != digest(_with_default)
    assert digest(_make_closure("a")) != digest(_make_closure("b"))
    assert digest(functools.partial(_with_default, k=2)) != digest(functools.partial(_with_default, k=3))
    assert digest(functools.partial(_with_default, 1)) != digest(functools.partial(_with_default, k=1))


def test_lambdas_with_other_code_differ():
    assert digest(lambda d: d["a"]) != digest(lambda d: d["b"])


def test_recursive_closure_is_fingerprinted():
    assert digest(_make_recursive(1)) == digest(_make_recursive(1))
    assert digest(_make_recursive(1)) != digest(_make_recursive(2))


def test_function_using_ellipsis_or_complex_constants():
    def crop(a):
        return a[..., :3] * 1j

    assert digest(crop) == digest(crop)


def test_classmethod_counts_its_class():
    class Base:
        scale = 1

        @classmethod
        def visual(cls, doc):
            return doc * cls.scale

    class Double(Base):
        scale = 2

    assert digest(Base.visual) == digest(Base.visual)
    assert digest(Base.visual) != digest(Double.visual)


def test_builtin_bound_to_an_object_counts_the_object():
    assert digest({"a": 1}.get) == digest({"a": 1}.get)
    assert digest({"a": 1}.get) != digest({"a": 2}.get)
    assert digest(len) == digest(len)


def test_callable_object_is_unfingerprintable():
    class Visual:
        def __call__(self, doc):
            return doc

    with pytest.raises(Unfingerprintable):
        digest(Visual())


# -- properties ---------------------------------------------------------------------------

_leaves = (
    st.none()
    | st.booleans()
    | st.integers(-(10**20), 10**20)
    | st.floats(allow_nan=False)
    | st.text(max_size=8)
)
_json = st.recursive(
    _leaves,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=5), children, max_size=4),
    max_leaves=20,
)
_settings = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _reordered(v):
    """A deep copy with every dict's insertion order reversed."""
    if isinstance(v, dict):
        return {k: _reordered(v[k]) for k in reversed(list(v))}
    if isinstance(v, list):
        return [_reordered(x) for x in v]
    return v


def _leaf_paths(v, path=()):
    if isinstance(v, (dict, list)) and not v:
        yield path  # an empty container is a leaf too
    elif isinstance(v, dict):
        for k, x in v.items():
            yield from _leaf_paths(x, (*path, k))
    elif isinstance(v, list):
        for i, x in enumerate(v):
            yield from _leaf_paths(x, (*path, i))
    else:
        yield path


def _replace(v, path, new):
    if not path:
        return new
    v = copy.copy(v)
    v[path[0]] = _replace(v[path[0]], path[1:], new)
    return v


def _get(v, path):
    for p in path:
        v = v[p]
    return v


def _other_leaf(old):
    """A leaf that differs from ``old`` as a value (and is not a bool/int alias of it)."""
    if isinstance(old, bool):
        return int(old)  # the bool <-> int swap: True becomes 1
    if isinstance(old, int):
        return old + 1
    if isinstance(old, float):
        return old + 1.0 if abs(old) < 1e15 else -old
    if isinstance(old, str):
        return old + "x"
    if isinstance(old, list):
        return [None]
    if isinstance(old, dict):
        return {"": None}
    return 0  # None


@_settings
@given(_json)
def test_property_dict_order_never_matters(value):
    assert digest(copy.deepcopy(_reordered(value))) == digest(value)


@_settings
@given(st.integers(-(2**53), 2**53))
def test_property_integer_valued_float_equals_int(n):
    assert digest(float(n)) == digest(n)
    assert digest([n, {"k": float(n)}]) == digest([float(n), {"k": n}])


@_settings
@given(_json, st.data())
def test_property_changing_any_leaf_changes_the_digest(value, data):
    paths = list(_leaf_paths(value))
    path = data.draw(st.sampled_from(paths))
    old = _get(value, path)
    new = _other_leaf(old)
    assert new != old or type(new) is not type(old)
    assert digest(_replace(value, path, new)) != digest(value)


@_settings
@given(_json)
def test_property_bool_int_swap_changes_the_digest(value):
    wrapped = {"v": value, "flag": True}
    assert digest(wrapped) != digest({"v": value, "flag": 1})


def test_paths_in_values_are_never_stat_ed_outside_media(tmp_path, monkeypatch):
    p = tmp_path / "a.jpg"
    p.write_bytes(b"x")
    called = []
    real_stat = os.stat
    monkeypatch.setattr(os, "stat", lambda *a, **k: called.append(a) or real_stat(*a, **k))
    Encoder().digest({"context": str(p), "paths": [str(p), Path(p)]})
    assert called == []


def test_palette_transparency_counts():
    """A "P" image whose transparent index differs converts to different RGBA pixels."""
    from PIL import Image

    a = Image.new("P", (4, 4), 1)
    a.putpalette([0, 0, 0, 255, 0, 0] * 128)
    b = a.copy()
    a.info["transparency"] = 0
    b.info["transparency"] = 1
    assert a.convert("RGBA").tobytes() != b.convert("RGBA").tobytes()
    assert digest(a) != digest(b)
