"""Tiny lmms-eval projects built at run time, and evaluations of them in subprocesses.

:class:`Project` writes, under a test's temporary directory, everything a real lmms-eval
0.7.3 run needs and nothing from the network:

* ``data/images`` (a ``datasets`` ``DatasetDict`` saved with ``save_to_disk``: an ``Image``
  column, a question and an answer, 5 documents) and ``data/videos`` (4 documents naming
  small files in ``videos/`` that stand for videos: the fake model reads their bytes);
* ``tasks/tiny/*.yaml`` and ``utils.py`` (``!function`` callables): ``tiny_img`` (images,
  greedy), ``tiny_mc`` (``multiple_choice``, loglikelihood), ``tiny_sample`` (``repeats: 3``,
  ``do_sample``), ``tiny_video`` (``doc_to_visual`` returns a file path) and ``tiny_chat``
  (``doc_to_messages``, for the chat-layout model);
* ``plugin/lmmsfakeplug``: a plugin package (``models`` with ``AVAILABLE_MODELS`` and a
  ``tasks`` package) registering ``fake_vlm`` (:class:`lmms_worker.FakeVLM`) through
  ``LMMS_EVAL_PLUGINS``.

:class:`Worker` runs tests/lmms_worker.py on a list of evaluations in one new process (start
independent ones together and collect them after: importing lmms-eval costs seconds per
process). :class:`Cli` runs ``lmms-cache eval`` the same way.
"""

from __future__ import annotations

import collections
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import zlib
from pathlib import Path
from typing import Any

TESTS = Path(__file__).resolve().parent
WORKER = TESTS / "lmms_worker.py"
TIMEOUT = 180
PLUGIN = "lmmsfakeplug"

SIMPLE_TASKS = ["tiny_img", "tiny_mc", "tiny_sample", "tiny_video"]
CHAT_TASKS = ["tiny_chat"]
IMAGE_TASKS = ["tiny_img", "tiny_mc", "tiny_sample", "tiny_chat"]  # the tasks on data/images
REPEATS = 3

# (base colour, the answer in the dataset): some right, some wrong, so metrics are not trivial.
IMAGE_DOCS = [((200, 30, 30), "red"), ((20, 180, 40), "green"), ((30, 40, 220), "green"),
              ((210, 60, 50), "blue"), ((40, 200, 90), "green")]  # fmt: skip
VIDEO_DOCS = [("blue", "blue"), ("red", "red"), ("green", "red"), ("red", "red")]

UTILS = """\
import ast
import os

VIDEO_DIR = {video_dir!r}


def doc_to_visual(doc):
    return [doc["image"].convert("RGB")]


def doc_to_text(doc, lmms_eval_specific_kwargs=None):
    return doc["question"]


def doc_to_messages(doc, lmms_eval_specific_kwargs=None):
    return [{{"role": "user", "content": [{{"type": "image", "url": doc["image"].convert("RGB")}},
                                         {{"type": "text", "text": doc["question"]}}]}}]


def video_to_visual(doc):
    return [os.path.join(VIDEO_DIR, doc["video"])]


def process_results(doc, results):
    pred = results[0].strip().split()[0].lower() if results and results[0].strip() else ""
    return {{"exact": float(pred == doc["answer"].lower())}}


def mc_process_results(doc, results):
    # lmms-eval 0.7.3 turns (logprob, is_greedy) into its str() (unwrap_generation_output),
    # and its own multiple_choice scoring then fails: read the pairs back.
    pairs = [ast.literal_eval(r) if isinstance(r, str) else r for r in results]
    losses = [loss for loss, _ in pairs]  # lmms-eval picks the lowest
    pred = min(range(len(losses)), key=losses.__getitem__)
    return {{"acc": float(["red", "green", "blue"][pred] == doc["answer"])}}
"""

_COMMON = """\
dataset_path: {data}
dataset_kwargs:
  load_from_disk: true
task: {task}
test_split: test
doc_to_text: !function utils.doc_to_text
doc_to_target: answer
metadata:
  version: 0.0
"""
_EXACT = """\
process_results: !function utils.process_results
metric_list:
  - metric: exact
    aggregation: mean
    higher_is_better: true
"""
GREEDY = {"max_new_tokens": 8, "temperature": 0, "do_sample": False, "until": ["\n\n"]}
SAMPLED = {"max_new_tokens": 8, "temperature": 0.7, "do_sample": True, "until": ["\n\n"]}
TASK_YAML = {
    "tiny_img": ("images", "output_type: generate_until\ndoc_to_visual: !function utils.doc_to_visual\n"
                 + "generation_kwargs: " + json.dumps(GREEDY) + "\n" + _EXACT),
    "tiny_sample": ("images", f"output_type: generate_until\nrepeats: {REPEATS}\n"
                    "doc_to_visual: !function utils.doc_to_visual\n"
                    + "generation_kwargs: " + json.dumps(SAMPLED) + "\n" + _EXACT),
    "tiny_video": ("videos", "output_type: generate_until\ndoc_to_visual: !function utils.video_to_visual\n"
                   + "generation_kwargs: " + json.dumps(GREEDY) + "\n" + _EXACT),
    "tiny_chat": ("images", "output_type: generate_until\ndoc_to_messages: !function utils.doc_to_messages\n"
                  "doc_to_visual: !function utils.doc_to_visual\n"
                  + "generation_kwargs: " + json.dumps(GREEDY) + "\n" + _EXACT),
    "tiny_mc": ("images", "output_type: multiple_choice\ndoc_to_visual: !function utils.doc_to_visual\n"
                'doc_to_choice: ["red", "green", "blue"]\n'
                "process_results: !function utils.mc_process_results\n"
                "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n"),
}  # fmt: skip
CHOICES = 3


def image(rgb: tuple[int, int, int]) -> Any:
    """A small image with some texture (a few levels around its base colour)."""
    from PIL import Image

    img = Image.new("RGB", (8, 8))
    img.putdata([tuple(min(255, c + (x * 3 + y * 5) % 17) for c in rgb) for y in range(8) for x in range(8)])
    return img


def video_bytes(color: str) -> bytes:
    return f"FAKEVIDEO:{color}:".encode() + bytes(range(256))


class Project:
    """Datasets, media, tasks and the plugin package of one test, under ``root``."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.tasks = root / "tasks"
        self.images = root / "data" / "images"
        self.videos = root / "data" / "videos"
        self.video_dir = root / "videos"
        self.plugin = root / "plugin"
        self.image_docs = list(IMAGE_DOCS)
        self._build()

    def _build(self) -> None:
        self.video_dir.mkdir(parents=True)
        for i, (color, _) in enumerate(VIDEO_DOCS):
            (self.video_dir / f"clip{i}.mp4").write_bytes(video_bytes(color))
        self._save_images()
        self._save_videos()
        tiny = self.tasks / "tiny"
        tiny.mkdir(parents=True)
        (tiny / "utils.py").write_text(UTILS.format(video_dir=str(self.video_dir)))
        for task, (data, body) in TASK_YAML.items():
            path = self.images if data == "images" else self.videos
            (tiny / f"{task}.yaml").write_text(_COMMON.format(data=path, task=task) + body)
        pkg = self.plugin / PLUGIN
        (pkg / "models").mkdir(parents=True)
        (pkg / "tasks").mkdir()
        (pkg / "__init__.py").write_text("")
        (pkg / "tasks" / "__init__.py").write_text("")
        (pkg / "models" / "__init__.py").write_text('AVAILABLE_MODELS = {"fake_vlm": "FakeVLM"}\n')
        (pkg / "models" / "fake_vlm.py").write_text("from lmms_worker import FakeVLM  # noqa: F401\n")

    def _save_images(self) -> None:
        import datasets

        features = datasets.Features({"image": datasets.Image(), "question": datasets.Value("string"),
                                      "answer": datasets.Value("string")})  # fmt: skip
        rows = {"image": [image(rgb) for rgb, _ in self.image_docs],
                "question": [f"What colour is picture {i}?" for i in range(len(self.image_docs))],
                "answer": [a for _, a in self.image_docs]}  # fmt: skip
        self._save(self.images, datasets.Dataset.from_dict(rows, features=features))

    def _save_videos(self) -> None:
        import datasets

        rows = {"video": [f"clip{i}.mp4" for i in range(len(VIDEO_DOCS))],
                "question": [f"What colour is clip {i}?" for i in range(len(VIDEO_DOCS))],
                "answer": [a for _, a in VIDEO_DOCS]}  # fmt: skip
        self._save(self.videos, datasets.Dataset.from_dict(rows))

    @staticmethod
    def _save(path: Path, ds: Any) -> None:
        import datasets

        datasets.DatasetDict({"test": ds}).save_to_disk(str(path))

    def set_image(self, doc_id: int, rgb: tuple[int, int, int]) -> None:
        """Replace one document's image (same questions, same ids) and re-save the dataset."""
        self.image_docs[doc_id] = (rgb, self.image_docs[doc_id][1])
        self._save_images()

    def set_video(self, doc_id: int, color: str) -> None:
        (self.video_dir / f"clip{doc_id}.mp4").write_bytes(video_bytes(color))

    def env(self, **extra: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if k not in ("LMMS_CACHE_MODE", "LMMS_EVAL_PLUGINS")}
        path = [str(TESTS), str(self.plugin), env.get("PYTHONPATH", "")]
        env.update(PYTHONPATH=os.pathsep.join(p for p in path if p), HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1",
                   TRANSFORMERS_OFFLINE="1", HF_HOME=str(self.root / "hf-home"), TOKENIZERS_PARALLELISM="false",
                   LMMS_CACHE_DIR=str(self.root / "default-cache"))  # fmt: skip
        env.update(extra)
        return env


def run_spec(name: str, model: str = "simple", tasks: list[str] | None = None, cache: Path | None = None,
             batch_size: int | None = None, block_at: int | None = None) -> dict[str, Any]:  # fmt: skip
    """One evaluation of a worker: ``cache=None`` runs the model unwrapped."""
    return {"name": name, "model": model, "tasks": tasks or (SIMPLE_TASKS if model == "simple" else CHAT_TASKS),
            "cache": None if cache is None else str(cache), "batch_size": batch_size, "block_at": block_at}  # fmt: skip


class Worker:
    """tests/lmms_worker.py running some evaluations in one new process."""

    def __init__(self, project: Project, name: str, runs: list[dict[str, Any]]) -> None:
        self.project = project
        self.name = name
        base = project.root / "workers"
        base.mkdir(exist_ok=True)
        self.report = base / f"{name}.json"
        self.log = base / f"{name}.calls.jsonl"
        self.signal = base / f"{name}.blocked"
        self.out = base / f"{name}.out"
        spec = {"include_path": str(project.tasks), "log": str(self.log), "report": str(self.report),
                "runs": [{**r, "signal": str(self.signal)} for r in runs]}  # fmt: skip
        spec_path = base / f"{name}.spec.json"
        spec_path.write_text(json.dumps(spec))
        with open(self.out, "w") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-X", "faulthandler", str(WORKER), str(spec_path)], stdin=subprocess.PIPE,
                stdout=out, stderr=subprocess.STDOUT, env=project.env(PYTHONHASHSEED=str(zlib.crc32(name.encode()) % 4096)),
                cwd=project.root,
            )  # fmt: skip

    def output(self) -> str:
        return self.out.read_text()

    def result(self) -> dict[str, dict[str, Any]]:
        """Each evaluation's report by name (fails with the worker's output if it failed)."""
        try:
            self.proc.wait(timeout=TIMEOUT)
        finally:
            self.close()
        assert self.proc.returncode == 0, (
            f"worker {self.name} exited {self.proc.returncode}:\n{self.output()[-6000:]}"
        )
        return {r["name"]: r for r in json.loads(self.report.read_text())}

    def wait_blocked(self) -> None:
        """Until the model signals (through a file) that it is blocked in its batch."""
        deadline = time.monotonic() + TIMEOUT
        while not self.signal.exists():
            assert self.proc.poll() is None, f"worker {self.name} exited early:\n{self.output()[-6000:]}"
            assert time.monotonic() < deadline, f"worker {self.name} never blocked"
            time.sleep(0.05)

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=TIMEOUT)
        assert self.proc.returncode == -signal.SIGKILL
        self.close()

    def calls_logged(self) -> list[dict[str, Any]]:
        """The model calls the log file recorded (those of a killed worker too)."""
        if not self.log.exists():
            return []
        return [json.loads(line) for line in self.log.read_text().splitlines()]

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        if self.proc.stdin and not self.proc.stdin.closed:
            self.proc.stdin.close()


class Cli:
    """``lmms-cache eval ... -- <lmms-eval arguments>`` run as users run it, through the plugin's
    ``fake_vlm``; the model appends a line to ``marker`` (a model argument: runs meant to share
    cache entries share it) when constructed, and logs its calls to ``log``."""

    def __init__(self, project: Project, name: str, *options: str, cache: Path, marker: Path,
                 tasks: list[str], write_results: bool = False) -> None:  # fmt: skip
        base = project.root / "cli"
        base.mkdir(exist_ok=True)
        self.name = name
        self.marker = marker
        self.log = base / f"{name}.calls.jsonl"
        self.stdout_path, self.stderr_path = base / f"{name}.out", base / f"{name}.err"
        self.output = base / f"{name}.results"  # lmms-eval's --output_path, with write_results
        exe = shutil.which("lmms-cache")
        argv = [
            *([exe] if exe else [sys.executable, "-m", "lmms_cache"]), "eval", "--cache-dir", str(cache), *options,
            "--", "--model", "fake_vlm", "--model_args", f"pretrained=fake/vlm-1b,marker={self.marker}",
            "--tasks", ",".join(tasks), "--include_path", str(project.tasks),
            *(["--output_path", str(self.output)] if write_results else []),
        ]  # fmt: skip
        env = project.env(LMMS_EVAL_PLUGINS=PLUGIN, LMMS_FAKE_LOG=str(self.log))
        with open(self.stdout_path, "w") as out, open(self.stderr_path, "w") as err:
            self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=err, env=env,
                                         cwd=project.root)  # fmt: skip

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def wait(self) -> Cli:
        try:
            self.proc.wait(timeout=TIMEOUT)
        finally:
            self.close()
        self.returncode = self.proc.returncode
        self.stdout = self.stdout_path.read_text()
        self.stderr = self.stderr_path.read_text()
        # How often the model had been constructed when this run ended (runs share markers).
        self.constructions = len(self.marker.read_text().splitlines()) if self.marker.exists() else 0
        return self

    @property
    def header(self) -> list[str]:
        """The line lmms-eval prints above its results table, naming the model and settings."""
        return [line for line in self.stdout.splitlines() if line.startswith("fake_vlm (")]

    @property
    def table(self) -> list[str]:
        """The results table lmms-eval prints (not the throughput table below it)."""
        lines = self.stdout.split("\nThroughput Summary\n")[0].splitlines()
        return [line for line in lines if line.startswith("|")]

    @property
    def throughput_table(self) -> list[str]:
        """The table lmms-eval prints under "Throughput Summary" (when the model logged any)."""
        _, found, after = self.stdout.partition("\nThroughput Summary\n")
        return [line for line in after.splitlines() if line.startswith("|")] if found else []

    def results_file(self) -> dict[str, Any]:
        """The results JSON lmms-eval wrote (a run with ``write_results``)."""
        (found,) = self.output.rglob("*_results.json")
        return dict(json.loads(found.read_text()))

    def requests(self) -> list[dict[str, Any]]:
        if not self.log.exists():
            return []
        return requests_of([json.loads(line) for line in self.log.read_text().splitlines()])


# -- reading reports -------------------------------------------------------------------------


def requests_of(calls: list[dict[str, Any]], task: str | None = None) -> list[dict[str, Any]]:
    """Every request the model received, in order (optionally of one task)."""
    return [
        dict(r, method=c["method"]) for c in calls for r in c["requests"] if task is None or r["task"] == task
    ]


def signature(request: dict[str, Any]) -> str:
    """What identifies a request (not the gen_kwargs a model may have changed meanwhile)."""
    return json.dumps([request[k] for k in ("method", "task", "split", "doc_id", "context")]
                      + [request.get("continuation"), request["media"]])  # fmt: skip


def multiset(requests: list[dict[str, Any]]) -> collections.Counter[str]:
    return collections.Counter(signature(r) for r in requests)


def docs_computed(calls: list[dict[str, Any]]) -> dict[str, list[int]]:
    """task -> sorted distinct doc ids the model computed."""
    out: dict[str, set[int]] = collections.defaultdict(set)
    for r in requests_of(calls):
        out[r["task"]].add(r["doc_id"])
    return {t: sorted(ids) for t, ids in out.items()}


# Fields of simple_evaluate's results that differ between any two runs (timing, dates).
VOLATILE = {"date", "start_time", "end_time", "total_evaluation_time_seconds", "time", "datetime_str"}
_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")  # "<function doc_to_text at 0x7f...>" in the task configs


def comparable(results: dict[str, Any]) -> dict[str, Any]:
    """simple_evaluate's results without timing / date fields and object addresses."""

    def strip(v: Any) -> Any:
        if isinstance(v, dict):
            return {k: strip(x) for k, x in v.items() if k not in VOLATILE}
        if isinstance(v, list):
            return [strip(x) for x in v]
        if isinstance(v, str):
            return _ADDRESS.sub("", v)
        return v

    return strip(results)  # type: ignore[no-any-return]
