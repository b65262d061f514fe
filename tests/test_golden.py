"""Golden keys: the key format, pinned.

CHANGING ANY VALUE BELOW IS A KEY-FORMAT VERSION BUMP. Every cache written so far would
silently stop hitting (or, worse, a changed rule could make two different requests share
an entry). A change here must come with a new ``KEY_SCHEMA`` name in ``key.py`` and a
migration or an explicit note in the CHANGELOG; never just paste the new values.

The requests avoid callables' code identity on purpose (bytecode differs between Python
versions); callables here are resolved on their documents and keyed by what they return.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from lmms_eval.api.instance import Instance
from PIL import Image

from lmms_cache.fingerprint import Encoder, digest
from lmms_cache.identity import identify
from lmms_cache.key import KEY_SCHEMA, KeyBuilder

GOLDEN = {
    "schema": "lmms-cache/key/2",
    "identity": "629ee5216b7542f49700d29104b5c253",
    "value": "c6c88ba3f912a675d03e7d2ec4ad5226",
    "text": "f631796379c251be939153a98ef807a8",
    "gen_kwargs": "1a8247e301ae845b455146fe5fde958f",
    "image": "38003efccc0e21c5e4acd5de80753da7",
    "numpy": "dfedcb4d4393e2d832daf5ca4e9ace25",
    "loglikelihood": "18d639effc19682c013c0aef33213560",
    "sampled_2nd": "8a17b7e17be85773c9b9db92c1dbca6b",
    "lm_eval_tuple": "401ff552f550dc30e545a4123bd9258a",
    "lm_eval_instance": "faad6707d713dee9cb45652893948e06",
    "palette": "a3a3eb99a4d8a9adac096eacdf181da2",
    "directory": "3e7b782f07f9525894c16361fd4dd682",
}


class _GoldenModel:
    """The model the keys are built for; its identity is given by model_id."""

    def __init__(self) -> None:
        self.task_dict = {"golden": {"test": [_document()]}}


def _document() -> dict[str, Any]:
    img = Image.new("RGB", (8, 4))
    img.putdata([(x * 32, y * 64, (x * y * 8) % 256) for y in range(4) for x in range(8)])
    return {"image": img, "question": "What colour is the corner?"}


def _visual(doc: dict[str, Any]) -> list[Any]:
    return [doc["image"]]


def _instance(request_type: str, args: tuple[Any, ...], repeats: int = 1) -> Instance:
    return Instance(request_type=request_type, arguments=args, idx=0,
                    metadata={"task": "golden", "doc_id": 0, "repeats": repeats, "split": "test"})  # fmt: skip


def _frames() -> str:
    """A directory of frames with fixed names and bytes (its path never counts)."""
    import tempfile

    root = Path(tempfile.mkdtemp(prefix="golden-frames-"))
    for i in range(3):
        (root / f"{i:05d}.jpg").write_bytes(bytes([i]) * 64)
    (root / ".meta").write_text("fps=2")
    return str(root)


def _palette_image() -> Image.Image:
    """A palette image whose palette has alpha (RGBA)."""
    img = Image.new("P", (4, 2))
    palette = b"".join(bytes([(i * 7) % 256, (i * 13) % 256, (i * 29) % 256, 128]) for i in range(256))
    img.putpalette(palette, rawmode="RGBA")
    img.putdata([0, 1, 2, 3, 4, 5, 6, 7])
    return img


def compute() -> dict[str, str]:
    """The golden keys, hex, computed from scratch."""
    import shutil

    import numpy as np
    from lm_eval.api.instance import Instance as LmInstance

    model = _GoldenModel()
    identity = identify(model, model_id="golden-model")

    def keys(method: str, requests: list[Any]) -> list[str]:
        general = [rk.key.hex() for rk in KeyBuilder(identity, model, Encoder()).keys(method, requests)]
        # the proxy's way (common layouts keyed without their views) gives the very same keys
        lean = KeyBuilder(identity, model, Encoder()).keys(method, requests, views=False)
        assert [rk.key.hex() for rk in lean] == general
        return general

    greedy = {"max_new_tokens": 32, "temperature": 0}
    settings = {"max_new_tokens": 64, "temperature": 0.0, "top_p": 0.95, "until": ["\n\n"],
                "system_prompt": "Be brief.", "image_aspect_ratio": "pad", "do_sample": False}  # fmt: skip
    sampled = _instance("generate_until", ("Tell a story.", {"do_sample": True, "temperature": 0.8},
                                           None, 0, "golden", "test"))  # fmt: skip
    waveform = np.arange(16, dtype=np.float32).reshape(4, 4) / 7
    out = {
        "schema": KEY_SCHEMA.decode(),
        "identity": identity.digest,
        "value": digest({"b": [1, 2.5, True, None, "x", b"y"], "a": {"nested": (0.0, -7)}}).hex(),
        "text": keys("generate_until", [_instance("generate_until", ("Describe.", greedy, None, 0, "golden", "test"))])[0],
        "gen_kwargs": keys("generate_until", [_instance("generate_until", ("Describe.", settings, None, 0, "golden", "test"))])[0],
        "image": keys("generate_until", [_instance("generate_until", ("Describe the image.", greedy, _visual, 0, "golden", "test"))])[0],
        "numpy": keys("generate_until", [("Transcribe.", {"until": ["\n"]}, {"audio": [waveform]})])[0],
        "loglikelihood": keys("loglikelihood", [_instance("loglikelihood", ("Answer:", " B", _visual, 0, "golden", "test"))])[0],
        "sampled_2nd": keys("generate_until", [sampled, sampled])[1],
        "lm_eval_tuple": keys("loglikelihood", [("Question: 2+2?\nAnswer:", " 4")])[0],
        "lm_eval_instance": keys("generate_until", [LmInstance(
            request_type="generate_until", doc={"question": "2+2", "seed": 3}, idx=0, metadata=("arith", 7, 1),
            arguments=("Question: 2+2?\nAnswer:", {"until": "\n", "max_gen_toks": 8}))])[0],
        "palette": digest(_palette_image()).hex(),
    }  # fmt: skip
    frames = _frames()
    try:
        out["directory"] = digest(frames, media=True).hex()
    finally:
        shutil.rmtree(frames)
    return out


def test_golden_keys_in_this_process():
    assert compute() == GOLDEN


def test_golden_keys_in_another_process_with_another_hash_seed():
    here = Path(__file__).parent
    env = {**os.environ, "PYTHONHASHSEED": "4242", "PYTHONPATH": os.pathsep.join(
        [str(here), *filter(None, [os.environ.get("PYTHONPATH")])])}  # fmt: skip
    code = "import json, test_golden; print(json.dumps(test_golden.compute()))"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120, check=True)
    assert json.loads(out.stdout.strip().splitlines()[-1]) == GOLDEN


def test_pinned_sample_is_the_second_occurrence():
    first = compute_first_sample()
    assert first != GOLDEN["sampled_2nd"]
    assert len(set(GOLDEN.values())) == len(GOLDEN)


def compute_first_sample() -> str:
    model = _GoldenModel()
    kb = KeyBuilder(identify(model, model_id="golden-model"), model, Encoder())
    sampled = _instance("generate_until", ("Tell a story.", {"do_sample": True, "temperature": 0.8},
                                           None, 0, "golden", "test"))  # fmt: skip
    return kb.keys("generate_until", [sampled])[0].key.hex()
