"""The model identity: everything about the wrapped model that can change its answers.

An identity is a set of named *fields*, each with key material (canonical bytes, raw) and a
readable value for people (scrubbed of secrets). Its digest is the hash of the fields'
key material; its description, the readable values. The two are kept apart: a chat
template is keyed as it is and only shown scrubbed.

What counts (when no ``model_id`` is given):

* **the class and its code**: the source of every module in the class's MRO (a class
  defined in a script's ``__main__`` counts by its own source, so that editing the rest of
  the script does not throw the cache away);
* **its settings**: what the constructor accepted (the parameters of ``__init__`` across
  the MRO, matched to the attributes ``name`` or ``_name``), every attribute assigned
  through the proxy (``lm.system_prompt = p``), and the names passed as
  ``cached(..., settings=[...])`` (the escape hatch for a setting the model stores under
  another name). Other attributes are the model's state (counters, caches, lazily loaded
  pipelines) and do not count. A text setting naming a local file or directory also
  counts by that file's content;
* **its components**, found among its attributes: a Hugging Face model (class, code,
  ``name_or_path``, commit, dtype, train/eval mode, the whole config and generation
  config, and for a local checkpoint directory a signature of its files: weights by name,
  size and mtime, small files by content); a tokenizer (its serialized vocabulary, added
  tokens and normalizers as a digest; its chat template, special tokens, padding side and
  size); a processor (its image/video processor settings and its tokenizer); a config;
  an API client's base URL;
* the versions of torch and transformers when a component uses them.

Left out, by exact name: where and how it runs (rank, world size, device, device map,
batch sizes, parallel degrees, memory and offload, timeouts, retries, concurrency,
logging and output of logs, KV-cache use); and secrets (an exact list of names such as
``api_key``, ``hf_token``, ``password``, and values that look like credentials:
``sk-…``, ``hf_…``, ``Bearer …``), which reach neither the key, the store nor a log.
Rotating an API key keeps the cache.

``model_id`` names *which model*: it replaces the class, its code, its components and the
settings that name a checkpoint, tokenizer or endpoint. The other settings still count.

The cheap parts (settings, configs, tokenizer templates and sizes, dtype, train mode) are
re-read at every call by :class:`Tracker`: a change made between calls (a prompt sweep)
gives a new identity; a change the model makes to itself during its own call (llava_hf
sets a chat template on its first call, a counter moves) does not, so that a rerun that
never calls the model keys exactly like the first run did.
"""

from __future__ import annotations

import ast
import contextlib
import dataclasses
import enum
import functools
import inspect
import json
import logging
import os
import re
import stat
import sys
import textwrap
import types
import urllib.parse
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import PurePath
from typing import Any

import xxhash

from .fingerprint import Encoder, FileDigests, Unfingerprintable, source_digest

__all__ = ["ModelIdentity", "Tracker", "differences", "identify", "identify_arguments", "is_secret_name"]

log = logging.getLogger("lmms_cache")

# -- names -----------------------------------------------------------------------------------
# Exact names only (compared after lower-casing, stripping leading underscores and turning
# camelCase into snake_case). A name that is not listed counts: a needless miss costs one
# recomputation, a wrong hit a published number.

SECRET_NAMES = frozenset({
    "api_key", "apikey", "api_token", "api_secret", "secret", "secret_key", "client_secret",
    "private_key", "access_key", "access_key_id", "secret_access_key", "aws_access_key_id",
    "aws_secret_access_key", "aws_session_token", "session_token", "token", "hf_token",
    "huggingface_token", "hub_token", "auth_token", "access_token", "bearer_token",
    "refresh_token", "id_token", "use_auth_token", "password", "passwd", "passphrase",
    "authorization", "auth", "cookie", "cookies", "credential", "credentials",
    "openai_api_key", "anthropic_api_key", "azure_api_key", "azure_openai_api_key",
    "gemini_api_key", "google_api_key", "dashscope_api_key", "watsonx_credentials",
    "watsonx_apikey", "reka_api_key", "together_api_key", "groq_api_key", "xai_api_key",
})  # fmt: skip

# Where and how the model runs, never what it answers. Every name here was read in the
# constructors of lmms-eval 0.7.3's and lm-eval 0.4.13's models.
OPERATIONAL_NAMES = frozenset({
    # process placement
    "rank", "local_rank", "global_rank", "process_index", "world_size", "num_processes",
    "device", "devices", "device_map", "accelerator", "distributed_type", "num_gpus",
    "num_nodes", "num_cpus", "threads", "num_threads", "num_workers", "max_workers",
    "worker_count", "worker_gpus", "stage_0_devices", "infer_auto_device_map", "parallelize",
    "parallel", "data_parallel", "data_parallel_size", "dp_size", "tensor_parallel_size",
    "tensor_model_parallel_size", "tp", "tp_size", "tp_degree", "tp_plan",
    "pipeline_parallel_size", "pipeline_model_parallel_size", "expert_model_parallel_size",
    "sp_size",
    # batching
    "batch_size", "batch_size_per_gpu", "max_batch_size", "micro_batch_size", "batch_sizes",
    "batch_schedule",
    # memory, offload, engine warm-up
    "max_memory_per_gpu", "max_cpu_memory", "offload_folder", "gpu_memory_utilization",
    "mem_fraction_static", "low_cpu_mem_usage", "dit_cpu_offload", "vae_cpu_offload",
    "text_encoder_cpu_offload", "image_encoder_cpu_offload", "enforce_eager",
    "enable_torch_compile", "compile_prefilling", "skip_mm_profiling", "chunked_prefill_size",
    "use_cache",
    # time, retries, concurrency
    "timeout", "request_timeout", "stage_init_timeout", "max_retries", "max_retry",
    "retry_backoff_s", "num_concurrent", "adaptive_concurrency", "adaptive_min_concurrency",
    "adaptive_max_concurrency", "adaptive_target_latency_s", "adaptive_increase_step",
    "adaptive_decrease_factor", "adaptive_failure_threshold", "poll_interval", "max_polls",
    "adaptive_config", "prefix_aware_queue", "prefix_hash_chars", "httpx_trust_env", "verify_certificate",
    "ca_cert_path",
    # logging and caches of the harness itself
    "verbose", "verbosity", "log_interval", "disable_log_stats", "metrics_output_path",
    "continual_mode", "response_persistent_folder", "cache_dir", "codec_cache_dir",
    "tmp_folder", "cache_hook", "task_dict",
})  # fmt: skip

# Settings that name which model (checkpoint, tokenizer, endpoint): a model_id replaces them.
NAMING_NAMES = frozenset({
    "pretrained", "model", "model_name", "model_version", "model_path", "model_name_or_path",
    "model_id", "model_id_name", "checkpoint", "checkpoint_path", "ckpt", "ckpt_path",
    "name_or_path", "engine", "path", "revision", "tokenizer", "tokenizer_path",
    "tokenizer_name", "tokenizer_revision", "base_url", "api_base", "api_url", "endpoint",
    "server_url", "url", "host", "port", "deployment_id", "nim_model", "nim_base_url",
})  # fmt: skip

# A string that is itself a credential, whatever its name.
_CREDENTIAL = re.compile(
    r"^(sk-[A-Za-z0-9_\-]{16,}|sk_(live|test)_[A-Za-z0-9]{16,}|hf_[A-Za-z0-9]{20,}|"
    r"gh[pousr]_[A-Za-z0-9]{20,}|github_pat_[A-Za-z0-9_]{20,}|xox[abprs]-[A-Za-z0-9-]{10,}|"
    r"AKIA[0-9A-Z]{16}|AIza[0-9A-Za-z_\-]{30,}|Bearer\s+\S+)$"
)
# In text shown to people only (descriptions, logs): assignments of secrets and credentials.
_SECRET_ASSIGNMENT = re.compile(
    r"((?<![A-Za-z0-9])(api_?key|api_?token|secret(_?key)?|password|passwd|access_?token|"
    r"auth_?token|hf_?token|bearer)\s*[=:]\s*)[^,\s&'\"]+", re.I
)
_CREDENTIAL_IN_TEXT = re.compile(
    r"(sk-[A-Za-z0-9_\-]{16,}|hf_[A-Za-z0-9]{20,}|gh[pousr]_[A-Za-z0-9]{20,}|Bearer\s+[A-Za-z0-9._\-]+)"
)
_URL_IN_TEXT = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://[^\s'\"<>]+")
_CAMEL = re.compile(r"([a-z0-9])([A-Z])")
_PLAIN = (str, int, float, bool, type(None))
_SECRET_MARK = b"\0secret\0"

# Files of a local checkpoint directory keyed by name, size and mtime, never read: weights.
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf", ".h5", ".msgpack",
                    ".onnx", ".npz", ".pkl", ".tflite", ".ot")  # fmt: skip
_SMALL_FILE = 64 << 20  # larger files are keyed by stat signature too
_MAX_DIR_FILES = 10_000
_WALK_DEPTH = 2  # components are looked for in attributes, and in their attributes


@functools.lru_cache(maxsize=8192)
def normalize_name(name: str) -> str:
    """``_apiKey`` -> ``api_key``: the form the exact name lists are written in."""
    return _CAMEL.sub(r"\1_\2", name.lstrip("_")).lower()


@functools.lru_cache(maxsize=8192)
def is_secret_name(name: str) -> bool:
    """Whether an attribute or argument name holds a secret (exact list)."""
    return normalize_name(name) in SECRET_NAMES


@functools.lru_cache(maxsize=8192)
def is_operational_name(name: str) -> bool:
    """Whether a name is where or how the model runs (exact list)."""
    return normalize_name(name) in OPERATIONAL_NAMES


def looks_like_credential(value: Any) -> bool:
    return type(value) is str and _CREDENTIAL.match(value) is not None


# -- the identity ------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelIdentity:
    """What a model is, for the key: ``description`` (no secrets) and its ``digest``."""

    description: dict[str, Any]
    digest: str  # 32 hex characters

    @property
    def label(self) -> str:
        """A short human name: the model_id, else class and checkpoint."""
        return str(self.description.get("label") or self.description.get("model_id") or "?")

    def json(self) -> str:
        return json.dumps(self.description, sort_keys=True, default=str)


# A field: (key material, its value as plain data). Fields are named by paths ("settings/x").
# Values are scrubbed only when an identity is built (they may hold secrets until then).
Field = tuple[bytes, Any]


def _build(fields: Mapping[str, Field], label: str) -> ModelIdentity:
    h = xxhash.xxh3_128(b"lmms-cache/identity/2\0")
    for name in sorted(fields):
        material = fields[name][0]
        h.update(b"%d:%s%d:" % (len(name), name.encode(), len(material)))
        h.update(material)
    description: dict[str, Any] = {"label": scrub(label)}
    description.update((name, scrub(_plain(fields[name][1]))) for name in sorted(fields))
    return ModelIdentity(description, h.hexdigest())


def identify(model: Any, model_id: str | None = None, *, settings: Iterable[str] = (),
             files: FileDigests | None = None) -> ModelIdentity:  # fmt: skip
    """The identity of ``model`` as it is now; ``model_id`` replaces what names the model.

    Example:
        >>> class Model:
        ...     def __init__(self, pretrained, temperature=0.0, rank=0):
        ...         self.pretrained, self.temperature, self._rank = pretrained, temperature, rank
        >>> a, b = identify(Model("org/m")), identify(Model("org/m", rank=7))
        >>> a.digest == b.digest, a.label
        (True, 'Model(org/m)')
        >>> identify(Model("org/m", temperature=0.7)).digest == a.digest
        False
    """
    return Tracker(model, model_id=model_id, settings=settings, files=files).identity


def identify_arguments(cls: type, harness: str, name: str, arguments: Mapping[str, Any],
                       files: FileDigests | None = None) -> ModelIdentity:  # fmt: skip
    """The identity of a model a harness builds from its name and ``--model_args``, without
    building it: the class and its code, and every argument except the operational ones
    and secrets (a local checkpoint directory or file also by its signature).

    Example:
        >>> class OpenAI:
        ...     pass
        >>> identify_arguments(OpenAI, "lmms-eval", "openai", {"model_version": "gpt-4o",
        ...     "api_key": "sk-123", "num_concurrent": 8}).label
        'openai(gpt-4o)'
    """
    files = files if files is not None else FileDigests()
    fields: dict[str, Field] = {"harness": _plain_field(f"{harness}/{name}")}
    fields.update(_class_fields(cls))
    for key in sorted(arguments):
        field = _setting_field(key, arguments[key], files)
        if field is not None:
            fields[f"settings/{key}"] = field
    named = [arguments[k] for k in ("pretrained", "model", "model_version", "model_name", "model_path")
             if isinstance(arguments.get(k), str)]  # fmt: skip
    return _build(fields, f"{name}({named[0]})" if named else name)


# -- what changed --------------------------------------------------------------------------


def differences(old: Mapping[str, Any], new: Mapping[str, Any], limit: int = 6) -> list[str]:
    """What differs between two identity descriptions, for people:
    ``settings/system_prompt: 'a' → 'b'``, ``model code changed: lmms_eval/models/x.py``.

    Example:
        >>> differences({"settings/top_p": 0.9}, {"settings/top_p": 1.0})
        ['settings/top_p: 0.9 → 1.0']
    """
    out = []
    for name in sorted(set(old) | set(new)):
        a, b = old.get(name), new.get(name)
        if name == "label" or a == b:
            continue
        if name.startswith("code/") or "/code/" in name:
            shown = b if isinstance(b, dict) else a
            out.append(f"model code changed: {shown.get('file', name) if isinstance(shown, dict) else name}")
        elif name not in old:
            out.append(f"{name} added: {_show(b)}")
        elif name not in new:
            out.append(f"{name} removed (was {_show(a)})")
        elif isinstance(a, dict) and isinstance(b, dict):
            inner = [k for k in sorted(set(a) | set(b), key=str) if a.get(k) != b.get(k)]
            out += [f"{name}.{k}: {_show(a.get(k))} → {_show(b.get(k))}" for k in inner[:limit]]
        else:
            out.append(f"{name}: {_show(a)} → {_show(b)}")
    if len(out) > limit:
        out = [*out[:limit], f"and {len(out) - limit} more"]
    return out


def _show(v: Any) -> str:
    text = repr(v) if isinstance(v, str) else json.dumps(v, default=str, sort_keys=True)
    return text if len(text) <= 60 else text[:59] + "…"


# -- the tracker -----------------------------------------------------------------------------


class Tracker:
    """The identity of one wrapped model over its lifetime.

    Built at wrap time: the static parts (class, code, checkpoint files, tokenizer
    vocabularies, client URLs) once, and readers of the cheap parts. Then, once per call:

    * :meth:`refresh` (before keying) re-reads the cheap parts; what changed since the
      last look was changed by the user between calls, and is applied to the keyed
      identity (with one INFO line naming it);
    * :meth:`settle` (after the model computed) re-reads them again and takes what the
      model changed during its own call as the new baseline *without* changing the keyed
      identity, so that a rerun, which never calls the model, keys the same;
    * :attr:`weights_changed` tells whether a component's parameters were modified in
      place (an optimizer step) outside the model's calls since wrapping.

    Args:
        model: the model.
        model_id: replaces the class, code, components and naming settings.
        settings: more attribute names to count as settings.
        files: file digests (memoized, possibly persisted by the store).
        fixed: a ready identity that never changes (a model built on its first miss, whose
            attributes must not be read).
    """

    def __init__(self, model: Any, *, model_id: str | None = None, settings: Iterable[str] = (),
                 files: FileDigests | None = None, fixed: ModelIdentity | None = None) -> None:  # fmt: skip
        if model_id is not None and (not isinstance(model_id, str) or not model_id):
            raise ValueError(f"model_id must be a non-empty string, not {model_id!r}")
        self._model = model
        self._model_id = model_id
        self._files = files if files is not None else FileDigests()
        self._extra = {str(s) for s in settings}
        self._user_set: set[str] = set()
        self._fixed = fixed
        self._params: set[str] = set()
        self._assigned: frozenset[str] = frozenset()
        self._dynamic = False
        self._changed: frozenset[str] = frozenset()
        self._paths: dict[str, bytes | None] = {}  # path text -> content digest, at wrap
        self._weights: list[tuple[str, list[Any]]] = []
        self._version = 0
        self.weights_changed = False
        if fixed is not None:
            self._static: dict[str, Field] = {}
            self._readers: list[tuple[str, Callable[[], Field | None]]] = []
            self._label = fixed.label
            self.identity = fixed
            self._observed: dict[str, Field] = {}
            self._keyed: dict[str, Field] = {}
            return
        self._params = _constructor_parameters(type(model))
        self._assigned, self._dynamic, self._changed = _init_analysis(type(model))
        self._static, self._readers, self._label = self._discover()
        self._observed = self._read()
        self._keyed = dict(self._observed)
        self.identity = _build({**self._static, **self._keyed}, self._label)
        self._version = self._weight_version()
        if model_id is None and not self._names_model():
            log.warning(
                "lmms-cache: found no checkpoint or model name on %s; two instances of it with "
                "different weights would share cache entries. Pass cached(model, model_id=...) "
                "to name the model.", self._static["class"][1],
            )

    # -- per call -----------------------------------------------------------------------

    def note_set(self, name: str) -> None:
        """An attribute was assigned through the proxy: it is a setting from now on."""
        if not name.startswith("__") and not is_operational_name(name) and not is_secret_name(name):
            self._user_set.add(name)

    def refresh(self) -> list[str]:
        """Re-read the cheap parts before a call; returns what changed (for people)."""
        if self._fixed is not None:
            return []
        if self._weights and self._weight_version() != self._version:
            self.weights_changed = True
        current = self._read()
        if _same(current, self._observed):
            return []
        changed = sorted(n for n in set(current) | set(self._observed)
                         if current.get(n, (None,))[0] != self._observed.get(n, (None,))[0])  # fmt: skip
        for name in changed:
            if name in current:
                self._keyed[name] = current[name]
            else:
                self._keyed.pop(name, None)
        self._observed = current
        old = self.identity
        self.identity = _build({**self._static, **self._keyed}, self._label)
        if self.identity.digest == old.digest:
            return []
        return differences(old.description, self.identity.description)

    def settle(self) -> None:
        """After the model's own call: what it changed in itself is its baseline, not a
        change of identity."""
        if self._fixed is not None:
            return
        self._observed = self._read()
        if self._weights:
            self._version = self._weight_version()

    def state(self) -> tuple[dict[str, Field], ModelIdentity]:
        """What a copy of the proxy needs to key as this one does."""
        return dict(self._keyed), self.identity

    def adopt(self, keyed: dict[str, Field], identity: ModelIdentity) -> None:
        """Key as the tracker whose :meth:`state` this is (a pickled or copied proxy):
        the model's present state is the baseline."""
        if self._fixed is not None:
            return
        self._keyed = dict(keyed)
        self.identity = identity

    # -- reading ----------------------------------------------------------------------------

    def _read(self) -> dict[str, Field]:
        out: dict[str, Field] = {}
        attributes = _attributes(self._model)
        for name in self._setting_names(attributes):
            field = _setting_field(name, attributes[name], self._files, self._paths)
            if field is not None:
                out[f"settings/{name}"] = field
        for name, reader in self._readers:
            try:
                field = reader()
            except Exception:  # a property of a half-built component; it counts as absent
                field = None
            if field is not None:
                out[name] = field
        return out

    def _setting_names(self, attributes: Mapping[str, Any]) -> list[str]:
        """The attributes that are settings (see the module notes): constructor
        parameters (``name`` or ``_name``), what ``__init__`` assigns and no other method
        changes, what was assigned through the proxy, and the names given to ``cached``."""
        found = set()
        for param in self._params | self._user_set | self._extra:
            for name in (param, "_" + param.lstrip("_"), param.lstrip("_")):
                if name in attributes:
                    found.add(name)
                    break
        assigned = attributes.keys() if self._dynamic else self._assigned
        found.update(n for n in assigned if n in attributes and n not in self._changed)
        names = []
        for name in found:
            if self._model_id is not None and normalize_name(name) in NAMING_NAMES:
                continue
            if _component_kind(attributes[name]) is None:
                names.append(name)
        return sorted(names)

    def _names_model(self) -> bool:
        return bool(self._weights) or any(
            k.startswith(("checkpoint/", "client/", "tokenizer/")) for k in self._static
        ) or any(normalize_name(k.split("/", 1)[1]) in NAMING_NAMES for k in self._keyed if k.startswith("settings/"))

    def _weight_version(self) -> int:
        total = 0
        for _name, tensors in self._weights:
            for t in tensors:
                with contextlib.suppress(Exception):  # inference tensors have no version counter
                    total += t._version
        return total

    # -- discovery, at wrap ---------------------------------------------------------------

    def _discover(self) -> tuple[dict[str, Field], list[tuple[str, Callable[[], Field | None]]], str]:
        model = self._model
        static: dict[str, Field] = {}
        readers: list[tuple[str, Callable[[], Field | None]]] = []
        if self._model_id is not None:
            static["model_id"] = _plain_field(self._model_id)
            return static, readers, self._model_id
        cls = type(model)
        static.update(_class_fields(cls))
        names: list[str] = []
        seen: set[int] = set()
        runtimes: set[str] = set()
        for path, value in _walk_components(model):
            if id(value) in seen:
                continue
            seen.add(id(value))
            kind = _component_kind(value)
            if kind == "model":
                names += self._add_model(path, value, static, readers, seen, runtimes)
            elif kind == "tokenizer":
                names += _add_tokenizer(path, value, static, readers, runtimes)
            elif kind == "processor":
                names += self._add_processor(path, value, static, readers, seen, runtimes)
            elif kind == "config":
                readers.append((f"config/{path}", _state_reader(value)))
                runtimes.add("transformers")
            elif kind == "client":
                url = _client_url(value)
                if url is not None:
                    # Credentials are not part of which endpoint it is: scrubbed in the key too.
                    static[f"client/{path}"] = (scrub_url(url).encode(), scrub_url(url))
        for package in sorted(runtimes):
            version = _version_of(package)
            if version is not None:
                static[f"runtime/{package}"] = _plain_field(version)
        label_name = cls.__name__
        attributes = _attributes(model)
        hints = [str(attributes[n]) for n in ("pretrained", "model_version", "model_name", "model_path", "model")
                 if isinstance(attributes.get(n), str) and attributes[n]]  # fmt: skip
        shown = (hints + names)[:1]
        return static, readers, f"{label_name}({shown[0]})" if shown else label_name

    def _add_model(self, path: str, module: Any, static: dict[str, Field],
                   readers: list[tuple[str, Callable[[], Field | None]]], seen: set[int],
                   runtimes: set[str]) -> list[str]:  # fmt: skip
        base = f"checkpoint/{path}"
        runtimes.add("torch")
        static[f"{base}/class"] = _plain_field(_qualified(type(module)))
        static.update({f"{base}/{k}": v for k, v in _class_fields(type(module), "code").items()
                       if k.startswith("code/")})  # fmt: skip
        names = []
        config = getattr(module, "config", None)
        if _component_kind(config) == "config":
            runtimes.add("transformers")
            name = getattr(config, "_name_or_path", None)
            if isinstance(name, str) and name:
                names.append(name)
                static[f"{base}/name_or_path"] = _plain_field(name)
                if os.path.isdir(name):
                    static[f"{base}/files"] = _directory_field(name, self._files)
            commit = getattr(config, "_commit_hash", None)
            if isinstance(commit, str):
                static[f"{base}/commit"] = _plain_field(commit)
            if id(config) not in seen:
                seen.add(id(config))
                readers.append((f"{base}/config", _state_reader(config)))
        generation = getattr(module, "generation_config", None)
        if generation is not None and id(generation) not in seen and _has_state(generation):
            seen.add(id(generation))
            readers.append((f"{base}/generation_config", _state_reader(generation)))
        readers.append((f"{base}/dtype", lambda: _plain_field(str(getattr(module, "dtype", None)))))
        readers.append((f"{base}/training", lambda: _plain_field(bool(getattr(module, "training", False)))))
        try:
            tensors = list(module.parameters()) + list(module.buffers())
        except Exception:
            tensors = []
        if tensors:
            self._weights.append((path, tensors))
        return names

    def _add_processor(self, path: str, processor: Any, static: dict[str, Field],
                       readers: list[tuple[str, Callable[[], Field | None]]], seen: set[int],
                       runtimes: set[str]) -> list[str]:  # fmt: skip
        runtimes.add("transformers")
        base = f"processor/{path}"
        static[f"{base}/class"] = _plain_field(_qualified(type(processor)))
        static.update({f"{base}/{k}": v for k, v in _class_fields(type(processor), "code").items()
                       if k.startswith("code/")})  # fmt: skip
        names = []
        parts = {}
        for name, value in sorted(_attributes(processor).items()):
            kind = _component_kind(value)
            if kind == "tokenizer" and id(value) not in seen:
                seen.add(id(value))
                names += _add_tokenizer(f"{path}.{name}", value, static, readers, runtimes)
            elif kind is not None or (_has_state(value) and not _is_plain(value)):
                if id(value) not in seen:
                    seen.add(id(value))
                    static[f"{base}/{name}/class"] = _plain_field(_qualified(type(value)))
                    readers.append((f"{base}/{name}", _state_reader(value)))
            else:
                parts[name] = value
        readers.append((f"{base}/settings", _state_reader(processor, sorted(parts))))
        return names


# -- fields of each kind ---------------------------------------------------------------------


def _plain_field(value: Any) -> Field:
    return Encoder().encode(value), value


def _class_fields(cls: type, prefix: str = "") -> dict[str, Field]:
    out: dict[str, Field] = {} if prefix else {"class": _plain_field(_qualified(cls))}
    for module_name, (digest, shown) in _code_digests(cls).items():
        out[f"code/{module_name}"] = (digest, {"file": shown, "digest": digest.hex()[:16]})
    return out


def _setting_field(name: str, value: Any, files: FileDigests,
                   paths: dict[str, bytes | None] | None = None) -> Field | None:  # fmt: skip
    """A setting's key material and readable value, or None when it is not one."""
    if is_secret_name(name) or is_operational_name(name):
        return None
    t = type(value)
    if t is int or t is float or t is bool or value is None:  # most settings: no path, no secret
        return _SCALAR_BYTES.get((t, value)) or _scalar_field(t, value), value
    if looks_like_credential(value):
        return None
    try:
        plain = _plain(value)
        material = Encoder().encode(_without_secrets(plain))
    except (Unfingerprintable, RecursionError, ValueError, TypeError):
        material = _qualified(type(value)).encode()
        plain = f"<{_qualified(type(value))}>"
    if isinstance(value, str) and value and len(value) < 4096 and "\n" not in value:
        digest = _path_digest(value, files, paths)
        if digest is not None:
            material += b"@" + digest
    return material, plain


_SCALAR_BYTES: dict[tuple[type, Any], bytes] = {}


def _scalar_field(t: type, value: Any) -> bytes:
    material = Encoder().encode(value)
    if len(_SCALAR_BYTES) < 4096 and not (t is float and value != value):  # (nan is not a dict key)
        _SCALAR_BYTES[(t, value)] = material
    return material


def _path_digest(text: str, files: FileDigests, memo: dict[str, bytes | None] | None) -> bytes | None:
    """The content of a model input a text setting names (taken once per tracker: what the
    model loaded at construction): a checkpoint, tokenizer or adapter directory, or a file
    a model reads (weights, JSON/YAML configs, templates, prompt text). Other paths (a log,
    an output directory the model writes) count by their name only, or every run would
    miss."""
    if memo is not None and text in memo:
        return memo[text]
    found: bytes | None = None
    try:
        st = os.stat(text)
    except (OSError, ValueError):
        st = None
    if st is not None and stat.S_ISDIR(st.st_mode) and _is_checkpoint_directory(text):
        found = _directory_field(text, files)[0]
    elif st is not None and stat.S_ISREG(st.st_mode) and text.lower().endswith(_INPUT_SUFFIXES):
        found = _file_material(text, st, files)
    if memo is not None:
        memo[text] = found
    return found


# Files that make a directory a checkpoint (or a tokenizer, processor or adapter of one).
_CHECKPOINT_FILES = frozenset({
    "config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
    "tokenizer.model", "vocab.json", "vocab.txt", "merges.txt", "special_tokens_map.json",
    "adapter_config.json", "preprocessor_config.json", "processor_config.json",
    "chat_template.jinja", "chat_template.json", "params.json", "model_index.json",
})  # fmt: skip
_INPUT_SUFFIXES = (*_WEIGHT_SUFFIXES, ".json", ".yaml", ".yml", ".jinja", ".j2", ".txt", ".model",
                   ".tiktoken", ".vocab", ".toml")  # fmt: skip


def _is_checkpoint_directory(path: str) -> bool:
    try:
        with os.scandir(path) as entries:
            for count, entry in enumerate(entries):
                if entry.name in _CHECKPOINT_FILES or entry.name.endswith(_WEIGHT_SUFFIXES):
                    return True
                if count > _MAX_DIR_FILES:
                    return False
    except OSError:
        return False
    return False


def _file_material(path: str, st: os.stat_result, files: FileDigests) -> bytes:
    if st.st_size > _SMALL_FILE or path.endswith(_WEIGHT_SUFFIXES):
        return b"s%d:%d;" % (st.st_size, st.st_mtime_ns)
    return b"c" + (files.get(path) or b"")


def _directory_field(path: str, files: FileDigests) -> Field:
    """A local checkpoint directory: its top-level files, weights by name, size and mtime
    (never read), small files by content."""
    h = xxhash.xxh3_128(b"checkpoint-dir\0")
    count = 0
    try:
        entries = sorted(os.scandir(path), key=lambda e: e.name)
    except OSError:
        entries = []
    for entry in entries:
        try:
            st = entry.stat(follow_symlinks=True)
        except OSError:
            continue
        if not stat.S_ISREG(st.st_mode):
            continue
        count += 1
        if count > _MAX_DIR_FILES:
            break
        name = entry.name.encode("utf-8", "surrogateescape")
        h.update(b"%d:%s" % (len(name), name))
        h.update(_file_material(entry.path, st, files))
    digest = h.digest()
    return digest, {"path": path, "files": count, "digest": digest.hex()[:16]}  # a path: no secret


def _add_tokenizer(path: str, tokenizer: Any, static: dict[str, Field],
                   readers: list[tuple[str, Callable[[], Field | None]]], runtimes: set[str]) -> list[str]:  # fmt: skip
    base = f"tokenizer/{path}"
    static[f"{base}/class"] = _plain_field(_qualified(type(tokenizer)))
    static.update({f"{base}/{k}": v for k, v in _class_fields(type(tokenizer), "code").items()
                   if k.startswith("code/")})  # fmt: skip
    vocab = _vocabulary_digest(tokenizer)
    static[f"{base}/vocabulary"] = (vocab, vocab.hex()[:16])
    if type(tokenizer).__module__.startswith("transformers"):
        runtimes.add("transformers")
    readers.append((f"{base}/settings", _tokenizer_reader(tokenizer)))
    name = getattr(tokenizer, "name_or_path", None)
    return [name] if isinstance(name, str) and name else []


def _vocabulary_digest(tokenizer: Any) -> bytes:
    """Vocabulary, merges, added tokens, normalizer and pre/post-processing: the serialized
    fast tokenizer; else the vocabulary and added tokens."""
    backend = getattr(tokenizer, "backend_tokenizer", None) or getattr(tokenizer, "_tokenizer", None)
    to_str = getattr(backend, "to_str", None) or getattr(tokenizer, "to_str", None)
    if callable(to_str):
        try:
            return xxhash.xxh3_128_digest(to_str().encode("utf-8", "surrogatepass"))
        except Exception:
            pass
    h = xxhash.xxh3_128(b"vocab\0")
    try:
        vocab = tokenizer.get_vocab()
        h.update(Encoder().encode(sorted(vocab.items())))
    except Exception as exc:
        h.update(f"unreadable:{type(exc).__name__}".encode())
    return h.digest()


def _tokenizer_reader(tokenizer: Any) -> Callable[[], Field | None]:
    def read() -> Field:
        state = _state_of(tokenizer, None, _TOKENIZER_SKIP)
        state["chat_template"] = getattr(tokenizer, "chat_template", None)
        with contextlib.suppress(Exception):
            state["size"] = len(tokenizer)
        return _json_material(state), state

    return read


# The serialized backend holds these (vocabulary, added tokens, files), or they are the
# tokenizer's own bookkeeping (warnings given, a context manager's flag); the rest of a
# tokenizer's attributes count.
_TOKENIZER_SKIP = frozenset({"init_kwargs", "name_or_path", "_tokenizer", "_added_tokens_encoder",
                             "_added_tokens_decoder", "vocab_file", "merges_file", "tokenizer_file",
                             "files_loaded", "deprecation_warnings", "_in_target_context_manager",
                             "verbose"})  # fmt: skip


def _state_reader(obj: Any, names: list[str] | None = None,
                  skip: frozenset[str] = frozenset()) -> Callable[[], Field | None]:  # fmt: skip
    """A component's state (its attributes, or those ``names``) as canonical JSON: the
    C encoder keeps a config of a hundred fields at tens of microseconds per call, and
    tells ``true`` from ``1`` and ``1.0`` from ``1`` as the key must."""

    def read() -> Field:
        state = _state_of(obj, names, skip)
        return _json_material(state), state

    return read


def _state_of(obj: Any, names: list[str] | None, skip: frozenset[str]) -> dict[str, Any]:
    attributes = _attributes(obj)
    if names is not None:
        attributes = {n: attributes[n] for n in names if n in attributes}
    return {k: v for k, v in attributes.items()
            if k not in skip and k not in _PER_PROCESS and not k.startswith("__") and not is_secret_name(k)}  # fmt: skip


def _json_material(state: dict[str, Any]) -> bytes:
    try:
        text = json.dumps(state, sort_keys=True, default=_json_default, ensure_ascii=False)
    except (TypeError, ValueError, RecursionError):  # mixed key types, cycles: the slow path
        return b"E" + Encoder().encode(_without_secrets(_plain(state)))
    return b"J" + text.encode("utf-8", "surrogatepass")


def _json_default(value: Any) -> Any:
    """Objects inside a component's state, as JSON: configs by class and attributes."""
    if type(value).__name__ == "AddedToken":  # a Rust object: its properties
        return {k: getattr(value, k, None) for k in ("content", "lstrip", "rstrip", "single_word", "normalized", "special")}
    plain = _plain(value, 5)
    if isinstance(plain, (dict, list, str)) and plain is not value:
        return _without_secrets(plain) if isinstance(plain, dict) else plain
    try:
        return "d:" + Encoder().digest(value).hex()
    except (Unfingerprintable, RecursionError):
        return f"<{_qualified(type(value))}>"


# -- plain values ------------------------------------------------------------------------------


def _plain(value: Any, depth: int = 0) -> Any:
    """``value`` as data the Encoder keys: configs and other objects by their class and
    attributes (depth-limited, per-process values left out), dtypes and devices as text,
    what the Encoder knows (enums, dataclasses, arrays, images, functions) as it is,
    anything else by its class name."""
    t = type(value)
    if t in _PLAIN_TYPES:
        return value
    if t is list or t is tuple:
        return [_plain(v, depth + 1) for v in value]
    if t is dict or isinstance(value, Mapping):
        return {k if isinstance(k, str) else str(k): _plain(v, depth + 1) for k, v in value.items()}
    if t.__module__ == "torch" and t.__name__ in ("dtype", "device"):
        return str(value)
    if isinstance(value, (set, frozenset)):
        return sorted((_plain(v, depth + 1) for v in value), key=repr)
    # Hugging Face configs are dataclasses whose attribute reads are slow: by their __dict__.
    hugging_face = t.__module__.startswith("transformers")
    if not hugging_face and _encoder_knows(value):
        return value
    if depth <= 6 and (hasattr(value, "__dict__") or hasattr(t, "__slots__")):
        attributes = _attributes(value)
        if not hugging_face:
            # Another object (an engine, a client, a pool): its class and its plain scalar
            # attributes. Deeper state is not configuration and may differ per process.
            return {"__class__": _qualified(t),
                    **{k: v for k, v in sorted(attributes.items())
                       if type(v) in _PLAIN_TYPES and not k.startswith("__") and not is_secret_name(k)
                       and not is_operational_name(k)}}  # fmt: skip
        return {"__class__": _qualified(t),
                **{k: _plain(v, depth + 1) for k, v in sorted(attributes.items())
                   if not k.startswith("__") and k not in _PER_PROCESS}}  # fmt: skip
    return f"<{_qualified(t)}>"


# Attributes whose values differ between two processes holding the same object: a hash
# of a string (GenerationConfig keeps one, randomized per process by PYTHONHASHSEED).
_PER_PROCESS = frozenset({"_original_object_hash"})


def _encoder_knows(value: Any) -> bool:
    """Values the Encoder keys by content itself (see :mod:`lmms_cache.fingerprint`)."""
    if isinstance(value, (enum.Enum, int, float, str, bytes, bytearray, complex, range, slice, PurePath,
                          types.FunctionType, types.MethodType, types.BuiltinFunctionType, functools.partial)):  # fmt: skip
        return True
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return True
    module = type(value).__module__.split(".", 1)[0]
    return module in ("numpy", "PIL") or (module == "torch" and type(value).__name__ == "Tensor")


_PLAIN_TYPES = frozenset({str, int, float, bool, type(None), bytes})


def _without_secrets(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _SECRET_MARK if is_secret_name(k) else _without_secrets(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_without_secrets(v) for v in value]
    if looks_like_credential(value):
        return _SECRET_MARK
    return value


def _is_plain(v: Any, depth: int = 0) -> bool:
    if isinstance(v, _PLAIN):
        return True
    if depth > 3:
        return False
    if isinstance(v, (list, tuple)):
        return all(_is_plain(x, depth + 1) for x in v)
    if isinstance(v, Mapping):
        return all(isinstance(k, str) and _is_plain(x, depth + 1) for k, x in v.items())
    return False


def _has_state(v: Any) -> bool:
    return hasattr(v, "__dict__") and not isinstance(v, (type, types.ModuleType, types.FunctionType))


def _same(a: Mapping[str, Field], b: Mapping[str, Field]) -> bool:
    if a.keys() != b.keys():
        return False
    return all(a[k][0] == b[k][0] for k in a)


# -- scrubbing (descriptions and logs only) ----------------------------------------------------


def scrub(v: Any) -> Any:
    """``v`` for people: secrets removed from mappings, text and URLs."""
    if isinstance(v, str):
        if looks_like_credential(v):
            return "***"
        if "://" in v:
            v = _URL_IN_TEXT.sub(lambda m: scrub_url(m.group()), v)
        v = _SECRET_ASSIGNMENT.sub(r"\1***", v)
        return _CREDENTIAL_IN_TEXT.sub("***", v)
    if isinstance(v, (list, tuple)):
        return [scrub(x) for x in v]
    if isinstance(v, Mapping):
        return {k: scrub(x) for k, x in v.items() if not (isinstance(k, str) and is_secret_name(k))}
    if isinstance(v, bytes):
        return f"<{len(v)} bytes>"
    if isinstance(v, _PLAIN):
        return v
    return f"<{_qualified(type(v))}>" if not callable(v) else f"<{getattr(v, '__qualname__', type(v).__name__)}>"


def scrub_url(url: str) -> str:
    """``url`` without credentials: no ``user:password@``, no secret query parameters."""
    try:
        parts = urllib.parse.urlsplit(url)
    except ValueError:  # malformed: at least drop user:password@
        return re.sub(r"//[^/]*@", "//", url)
    netloc = parts.netloc.rpartition("@")[2]  # host[:port] without user:password@
    query = urllib.parse.urlencode(
        [(k, val) for k, val in urllib.parse.parse_qsl(parts.query)
         if not is_secret_name(k) and not looks_like_credential(val)]
    )
    return urllib.parse.urlunsplit((parts.scheme, netloc, parts.path.rstrip("/"), query, ""))


# -- components ----------------------------------------------------------------------------


def _component_kind(value: Any) -> str | None:
    """``model``, ``tokenizer``, ``processor``, ``config``, ``client`` or None."""
    if value is None or isinstance(value, (*_PLAIN, list, tuple, dict, type)):
        return None
    kind = _kinds.get(type(value), _UNKNOWN)
    if kind is _UNKNOWN:
        kind = _kinds[type(value)] = _kind_of_class(value)
    if kind is not None:
        return kind  # type: ignore[return-value]
    try:
        url = getattr(value, "base_url", None)  # an API client: per object
    except Exception:
        url = None
    return "client" if url is not None and not callable(url) else None


_UNKNOWN = object()
# What a class's instances are (a model, a tokenizer, ...): classes are few, reads per call many.
_kinds: dict[type, object] = {}


def _kind_of_class(value: Any) -> str | None:
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(value, torch.nn.Module):
        return "model"
    transformers = sys.modules.get("transformers")
    if transformers is not None:
        for kind, names in _HF_KINDS:
            for name in names:
                base = getattr(transformers, name, None) if _hf_loaded(transformers, name) else None
                if isinstance(base, type) and isinstance(value, base):
                    return kind
    cls = type(value)
    if callable(getattr(value, "get_vocab", None)) and hasattr(value, "encode") and hasattr(value, "decode"):
        return "tokenizer"
    if "tokenizers" in sys.modules and cls.__module__.startswith("tokenizers") and cls.__name__ == "Tokenizer":
        return "tokenizer"
    return None


_HF_KINDS = (
    ("tokenizer", ("PreTrainedTokenizerBase",)),
    ("processor", ("ProcessorMixin",)),
    ("config", ("PretrainedConfig", "GenerationConfig")),
    ("config", ("ImageProcessingMixin", "FeatureExtractionMixin")),
)


def _hf_loaded(transformers: Any, name: str) -> bool:
    """Whether ``transformers.<name>`` can be read without importing a submodule (the lazy
    module imports on attribute access; a model that uses the class has imported it)."""
    objects = getattr(transformers, "__dict__", {})
    if name in objects:
        return True
    for module in ("tokenization_utils_base", "processing_utils", "configuration_utils",
                   "generation.configuration_utils", "image_processing_base",
                   "feature_extraction_utils"):  # fmt: skip
        loaded = sys.modules.get(f"transformers.{module}")
        if loaded is not None and name in vars(loaded):
            return True
    return False


def _walk_components(model: Any) -> list[tuple[str, Any]]:
    """(attribute path, object) of the model's attributes and their attributes that are
    components, in a stable order; operational attributes are not entered."""
    out: list[tuple[str, Any]] = []
    frontier: list[tuple[str, Any, int]] = [("", model, 0)]
    visited = {id(model)}
    while frontier:
        prefix, obj, depth = frontier.pop(0)
        for name, value in sorted(_attributes(obj).items()):
            if name.startswith("__") or is_operational_name(name) or id(value) in visited:
                continue
            if isinstance(value, (*_PLAIN, types.ModuleType, type, types.FunctionType)):
                continue
            visited.add(id(value))
            path = f"{prefix}{name}"
            if _component_kind(value) is not None:
                out.append((path, value))
            elif depth + 1 < _WALK_DEPTH and hasattr(value, "__dict__") and not isinstance(value, (list, dict, tuple)):
                frontier.append((path + ".", value, depth + 1))
    return out


def _client_url(value: Any) -> str | None:
    try:
        url = getattr(value, "base_url", None)
    except Exception:
        return None
    return None if url is None or callable(url) else str(url)


def _attributes(obj: Any) -> dict[str, Any]:
    try:
        return dict(vars(obj))
    except TypeError:  # __slots__ classes
        names = [n for c in type(obj).__mro__ for n in getattr(c, "__slots__", ())]
        out = {}
        for n in names:
            with contextlib.suppress(AttributeError):
                out[n] = getattr(obj, n)
        return out


def _constructor_parameters(cls: type) -> set[str]:
    """Names the constructors across the MRO accept (``*args``/``**kwargs`` aside)."""
    names: set[str] = set()
    for klass in cls.__mro__:
        init = klass.__dict__.get("__init__")
        if init is None or klass is object:
            continue
        try:
            signature = inspect.signature(init)
        except (TypeError, ValueError):
            continue
        for p in list(signature.parameters.values())[1:]:
            if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
                names.add(p.name)
    return names


_analysed: dict[type, tuple[frozenset[str], bool, frozenset[str]]] = {}


def _init_analysis(cls: type) -> tuple[frozenset[str], bool, frozenset[str]]:
    """What the class's code says about its attributes, across the MRO:

    * the names ``__init__`` assigns (``self.x = ...``, ``setattr(self, "x", ...)``);
    * whether it also assigns names it computes (``setattr(self, k, v)`` in a loop,
      ``self.__dict__.update(...)``): then every attribute may be one of them;
    * the names other methods assign, delete or mutate in place (``self.n += 1``,
      ``self.pipe = load()``, ``self.history.append(x)``): the model's running state.
      Property setters and ``set_*`` methods are how users configure a model, not state.
    """
    if cls in _analysed:
        return _analysed[cls]
    assigned: set[str] = set()
    changed: set[str] = set()
    dynamic = False
    for klass in cls.__mro__:
        if klass is object or klass.__module__.startswith(("builtins", "lmms_cache")):
            continue
        try:
            tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
        except (OSError, TypeError, SyntaxError, IndentationError):
            continue
        body = tree.body[0].body if tree.body and isinstance(tree.body[0], ast.ClassDef) else []
        for node in body:
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) or not node.args.args:
                continue
            self_name = node.args.args[0].arg
            names, computed, mutated = _self_writes(node, self_name)
            if node.name == "__init__":
                assigned |= names | mutated
                dynamic = dynamic or computed
            elif not _is_setter(node):
                changed |= names | mutated
    found = _analysed[cls] = (frozenset(assigned), dynamic, frozenset(changed))
    return found


_MUTATORS = frozenset({"append", "extend", "insert", "pop", "remove", "clear", "update", "setdefault",
                       "add", "discard", "popitem", "sort", "reverse", "__setitem__", "__delitem__"})  # fmt: skip


def _self_writes(function: ast.AST, self_name: str) -> tuple[set[str], bool, set[str]]:
    """(names assigned, whether names are computed, names mutated in place) of ``self``."""
    assigned: set[str] = set()
    mutated: set[str] = set()
    computed = False

    def attribute_of_self(node: ast.AST) -> str | None:
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == self_name:
            return node.attr
        return None

    def root_of(node: ast.AST) -> str | None:
        """``X`` of ``self.X.a[0].b``: what a write inside that chain changes."""
        while isinstance(node, (ast.Attribute, ast.Subscript)):
            if (name := attribute_of_self(node)) is not None:
                return name
            node = node.value
        return None

    def target(node: ast.AST) -> None:
        if isinstance(node, (ast.Tuple, ast.List)):
            for element in node.elts:
                target(element)
        elif isinstance(node, ast.Starred):
            target(node.value)
        elif (name := attribute_of_self(node)) is not None:
            assigned.add(name)
        elif (name := root_of(node)) is not None:
            mutated.add(name)

    for node in ast.walk(function):
        if isinstance(node, ast.Assign):
            for t in node.targets:
                target(t)
        elif isinstance(node, (ast.AugAssign, ast.AnnAssign)) and node.target is not None:
            target(node.target)
            if isinstance(node, ast.AugAssign) and (name := attribute_of_self(node.target)) is not None:
                mutated.add(name)
        elif isinstance(node, ast.Delete):
            for t in node.targets:
                target(t)
        elif isinstance(node, ast.Call):
            func = node.func
            if isinstance(func, ast.Name) and func.id in ("setattr", "delattr") and node.args:
                if isinstance(node.args[0], ast.Name) and node.args[0].id == self_name:
                    if len(node.args) > 1 and isinstance(node.args[1], ast.Constant) and isinstance(node.args[1].value, str):
                        assigned.add(node.args[1].value)
                    else:
                        computed = True
            elif isinstance(func, ast.Attribute):
                if func.attr in _MUTATORS and (name := root_of(func.value)) is not None:
                    mutated.add(name)
                if (func.attr == "update" and isinstance(func.value, ast.Attribute) and func.value.attr == "__dict__"
                        and attribute_of_self(func.value) == "__dict__"):  # fmt: skip
                    computed = True
    return assigned, computed, mutated


def _is_setter(function: ast.FunctionDef | ast.AsyncFunctionDef) -> bool:
    if function.name.startswith("set_"):
        return True
    return any(isinstance(d, ast.Attribute) and d.attr == "setter" for d in function.decorator_list)


# -- code -----------------------------------------------------------------------------------

_SKIP_CODE = ("builtins", "abc", "typing", "collections", "wrapt", "torch.nn", "torch._C", "lmms_cache")


def _code_digests(cls: type) -> dict[str, tuple[bytes, str]]:
    """Module name -> (digest of its source, the file relative to its package) for the
    modules of ``cls``'s MRO."""
    out: dict[str, tuple[bytes, str]] = {}
    for klass in cls.__mro__:
        module_name = klass.__module__
        if klass is object or module_name.startswith(_SKIP_CODE) or module_name in out:
            continue
        module = sys.modules.get(module_name)
        if module_name == "__main__" or module is None:
            out[f"{module_name}.{klass.__qualname__}"] = (_class_source_digest(klass), f"{module_name}:{klass.__qualname__}")
            continue
        digest = source_digest(module_name)
        if digest is None:
            out[f"{module_name}.{klass.__qualname__}"] = (_class_source_digest(klass), f"{module_name}:{klass.__qualname__}")
        else:
            out[module_name] = (digest, module_name.replace(".", "/") + os.path.splitext(getattr(module, "__file__", "") or ".py")[1])
    return out


def _class_source_digest(cls: type) -> bytes:
    """A class without a module file: its own source, else its functions' code identity."""
    try:
        return xxhash.xxh3_128_digest(inspect.getsource(cls).encode())
    except (OSError, TypeError):
        pass
    functions = {name: value for name, value in sorted(vars(cls).items())
                 if isinstance(value, (types.FunctionType, staticmethod, classmethod, property))}  # fmt: skip
    h = xxhash.xxh3_128(cls.__qualname__.encode())
    for name, value in functions.items():
        fn = value.fget if isinstance(value, property) else getattr(value, "__func__", value)
        try:
            h.update(name.encode() + Encoder().encode(fn))
        except (Unfingerprintable, RecursionError):
            h.update(name.encode())
    return h.digest()


def _version_of(package: str) -> str | None:
    module = sys.modules.get(package)
    version = getattr(module, "__version__", None)
    return str(version) if version is not None else None


def _qualified(t: type) -> str:
    return f"{t.__module__}.{t.__qualname__}"
