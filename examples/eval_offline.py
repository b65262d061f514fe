"""``lmms-cache eval`` offline: lmms-eval's own command line, run twice; the second run is
all hits and never builds the model.

    python examples/eval_offline.py [WORKDIR]

Needs lmms-eval and ``datasets`` (the README's test set-up installs both), nothing from the
network. The script writes, under WORKDIR (default: a temporary directory, removed at the
end):

* ``data/``: a tiny image dataset (``datasets.save_to_disk``: six coloured squares, a
  question and an answer each);
* ``tasks/tiny_colors.yaml`` and ``tasks/utils.py``: an lmms-eval task over it, read with
  ``--include_path``;
* ``plugin/colorplug``: a model plugin (``LMMS_EVAL_PLUGINS=colorplug``) registering
  ``color_guesser``, a stand-in for a real model: it "loads its weights" for a second when
  built and "thinks" 0.2 s per request, then names the dominant colour of the image.

Then it runs, twice::

    python -m lmms_cache eval --cache-dir WORKDIR/cache -- --model color_guesser \\
        --model_args pretrained=demo/color-guesser --tasks tiny_colors --include_path WORKDIR/tasks

and prints what each run cost and the line lmms-cache ends each run with.
"""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

COLORS = {"red": (210, 40, 40), "green": (40, 180, 60), "blue": (40, 60, 220)}
DOCS = ["red", "green", "blue", "green", "red", "blue"]

TASK_YAML = """\
dataset_path: {data}
dataset_kwargs:
  load_from_disk: true
task: tiny_colors
test_split: test
output_type: generate_until
doc_to_visual: !function utils.doc_to_visual
doc_to_text: !function utils.doc_to_text
doc_to_target: answer
generation_kwargs:
  max_new_tokens: 8
  temperature: 0
  do_sample: false
process_results: !function utils.process_results
metric_list:
  - metric: exact
    aggregation: mean
    higher_is_better: true
metadata:
  version: 0.0
"""

UTILS = '''\
def doc_to_visual(doc):
    return [doc["image"].convert("RGB")]


def doc_to_text(doc, lmms_eval_specific_kwargs=None):
    return doc["question"]


def process_results(doc, results):
    answer = results[0].strip().lower() if results else ""
    return {"exact": float(answer == doc["answer"])}
'''

MODEL = '''\
"""A stand-in for a real model: slow to build, slow per request."""

import sys
import time

from lmms_eval.api.instance import GenerationResult, TokenCounts
from lmms_eval.api.model import lmms


class ColorGuesser(lmms):
    def __init__(self, pretrained="demo/color-guesser", **kwargs):
        super().__init__()
        print(f"color_guesser: loading the weights of {pretrained} ...", file=sys.stderr, flush=True)
        time.sleep(1.0)
        self.pretrained = pretrained

    def generate_until(self, requests):
        answers = []
        for request in requests:
            context, _gen_kwargs, doc_to_visual, doc_id, task, split = request.args
            image = doc_to_visual(self.task_dict[task][split][doc_id])[0]
            time.sleep(0.2)  # the GPU time a real model would spend
            r, g, b = image.convert("RGB").resize((1, 1)).getpixel((0, 0))
            color = ("red", "green", "blue")[max(range(3), key=(r, g, b).__getitem__)]
            answers.append(GenerationResult(text=color, token_counts=TokenCounts(
                input_tokens=len(context.split()), output_tokens=1)))
        return answers

    def loglikelihood(self, requests):
        raise NotImplementedError

    def generate_until_multi_round(self, requests):
        raise NotImplementedError
'''

SUMMARY = re.compile(r"^lmms-cache: \d+ hits?, .*$", re.M)


def build(root: Path) -> None:
    """The dataset, the task and the model plugin, under ``root``."""
    import datasets
    from PIL import Image

    features = datasets.Features({"image": datasets.Image(), "question": datasets.Value("string"),
                                  "answer": datasets.Value("string")})  # fmt: skip
    rows = {"image": [Image.new("RGB", (16, 16), COLORS[c]) for c in DOCS],
            "question": [f"What colour is picture {i}? Answer with one word." for i in range(len(DOCS))],
            "answer": DOCS}  # fmt: skip
    datasets.DatasetDict({"test": datasets.Dataset.from_dict(rows, features=features)}).save_to_disk(
        str(root / "data"))
    (root / "tasks").mkdir(parents=True, exist_ok=True)
    (root / "tasks" / "tiny_colors.yaml").write_text(TASK_YAML.format(data=root / "data"))
    (root / "tasks" / "utils.py").write_text(UTILS)
    package = root / "plugin" / "colorplug"
    (package / "models").mkdir(parents=True, exist_ok=True)
    (package / "tasks").mkdir(exist_ok=True)
    (package / "__init__.py").write_text("")
    (package / "tasks" / "__init__.py").write_text("")
    (package / "models" / "__init__.py").write_text('AVAILABLE_MODELS = {"color_guesser": "ColorGuesser"}\n')
    (package / "models" / "color_guesser.py").write_text(MODEL)


def evaluate(root: Path) -> tuple[float, str, str]:
    """One ``lmms-cache eval`` run: (seconds, its stdout, its summary line)."""
    env = {**os.environ, "LMMS_EVAL_PLUGINS": "colorplug", "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1",
           "TRANSFORMERS_OFFLINE": "1", "HF_HOME": str(root / "hf-home"), "TOKENIZERS_PARALLELISM": "false",
           "PYTHONPATH": os.pathsep.join(p for p in (str(root / "plugin"), os.environ.get("PYTHONPATH", "")) if p)}  # fmt: skip
    command = [sys.executable, "-m", "lmms_cache", "eval", "--cache-dir", str(root / "cache"), "--",
               "--model", "color_guesser", "--model_args", "pretrained=demo/color-guesser",
               "--tasks", "tiny_colors", "--include_path", str(root / "tasks"), "--batch_size", "1"]  # fmt: skip
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, env=env, cwd=root)
    elapsed = time.perf_counter() - started
    if done.returncode != 0:
        sys.exit(f"lmms-cache eval failed ({done.returncode}):\n{done.stderr[-4000:]}")
    found = SUMMARY.findall(done.stderr)
    return elapsed, done.stdout, found[-1] if found else "(no summary line)"


def main() -> None:
    with contextlib.ExitStack() as stack:
        if len(sys.argv) > 1:
            root = Path(sys.argv[1]).resolve()
            root.mkdir(parents=True, exist_ok=True)
        else:
            root = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="lmms-cache-eval-")))
        if not (root / "plugin").exists():
            build(root)
        for name in ("first", "second"):
            elapsed, out, summary = evaluate(root)
            print(f"{name} run: {elapsed:5.1f} s")
            print(f"  {summary}")
        print("the results table of the second run (the same as the first's):")
        print("\n".join(line for line in out.splitlines() if line.startswith("|")))
        print(f"work directory: {root}" if len(sys.argv) > 1 else "work directory: temporary, now removed")


if __name__ == "__main__":
    main()
