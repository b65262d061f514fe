"""Models constructed on their first miss: a fully cached rerun never loads weights.

:func:`lazy_model` returns an instance of the model class whose ``__init__`` has not run
yet: only the harness base class's own initializer (rank 0 of 1, an empty ``task_dict``),
with rank and world size taken from the launcher's environment (``RANK``,
``WORLD_SIZE``) so the evaluator shards documents as it would. The real ``__init__``
runs the first time a request method is called (the proxy calls it only for misses) or
an attribute the placeholder does not have is read. Whatever the evaluator set on the
placeholder before then (``task_dict``) is kept.

lm-eval adds the model's details to its results (``get_model_info``: parameter count,
dtype, revision, commit; ``add_tokenizer_info``: the tokenizer's special tokens,
``eot_token_id``, ``max_length``). A model that was never built answers from what is known
without its weights: :func:`model_info_without_weights` and :func:`tokenizer_without_weights`.
"""

from __future__ import annotations

import importlib
import inspect
import json
import logging
import math
import os
import struct
import time
from typing import Any

__all__ = ["is_constructed", "lazy_model", "model_info_without_weights", "tokenizer_without_weights"]

log = logging.getLogger("lmms_cache")

_STATE = "_lmms_cache_lazy"
_METHODS = ("generate_until", "loglikelihood", "loglikelihood_rolling", "generate_until_multi_round")
# Attributes the evaluators probe with hasattr()/getattr(..., default) before or after the
# requests, and set or skip when absent (lmms-eval: ``if not hasattr(lm, "accelerator"):
# lm.accelerator = Accelerator()``; lm-eval: ``getattr(lm, "tokenizer", False)`` for its
# logs, ``hasattr(lm, "MULTIMODAL")``). Reading them must not construct the model, even
# where the class defines them as properties; every other missing attribute does.
# The request methods are probed too (a class without loglikelihood_rolling has none to give).
_PROBED = frozenset({"accelerator", "batch_sizes", "get_model_info", "MULTIMODAL", "tokenizer", *_METHODS})
# Attributes an unbuilt model answers from its checkpoint's files when it can (lm-eval's
# add_tokenizer_info reads them after a run): see tokenizer_without_weights. When it cannot,
# each behaves as before: the tokenizer is absent (or the class's own value: lm-eval's
# TemplateLM says None); the other two, like any attribute, construct the model (lm-eval
# reads them only when there is a tokenizer).
_ANSWERED = ("tokenizer", "eot_token_id", "max_length")
_classes: dict[type, type] = {}


class _State:
    def __init__(self, cls: type, kwargs: dict[str, Any]) -> None:
        self.cls = cls
        self.kwargs = kwargs
        self.constructed = False
        self.constructing = False
        self.answers: dict[str, Any] | None = None  # tokenizer_without_weights, once asked

    def answer(self, name: str) -> tuple[bool, Any]:
        """(True, the value) when the unbuilt model answers ``name`` without its weights."""
        if name not in _ANSWERED:
            return False, None
        if self.answers is None:
            self.answers = tokenizer_without_weights(self.cls, self.kwargs)
        return (name in self.answers), self.answers.get(name)


def lazy_model(cls: type, kwargs: dict[str, Any]) -> Any:
    """An instance of ``cls`` that runs ``cls(**kwargs)``'s initializer when first needed.

    Example:
        >>> class Heavy:
        ...     def __init__(self, size):
        ...         print("loading", size)
        ...         self.size = size
        ...     def generate_until(self, requests):
        ...         return ["x"] * len(requests)
        >>> m = lazy_model(Heavy, {"size": 7})
        >>> isinstance(m, Heavy), is_constructed(m)
        (True, False)
        >>> m.generate_until([1])
        loading 7
        ['x']
        >>> m.size
        7
    """
    lazy_cls = _lazy_class(cls)
    obj: Any = object.__new__(lazy_cls)
    obj.__dict__[_STATE] = _State(cls, dict(kwargs))
    root_init = _root_initializer(cls)
    if root_init is not None:
        root_init(obj)
    if "_rank" in obj.__dict__:
        obj.__dict__["_rank"] = int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", 0)))
    if "_world_size" in obj.__dict__:
        obj.__dict__["_world_size"] = int(os.environ.get("WORLD_SIZE", 1))
    return obj


def is_constructed(obj: Any) -> bool:
    """False while a :func:`lazy_model` has not run its initializer (True for any other object)."""
    state = getattr(obj, "__dict__", {}).get(_STATE)
    return state is None or bool(state.constructed)


def _construct(obj: Any, cause: str) -> None:
    state: _State = obj.__dict__[_STATE]
    if state.constructed or state.constructing:
        return
    state.constructing = True
    kept = {k: obj.__dict__[k] for k in ("task_dict",) if obj.__dict__.get(k)}
    log.info("lmms-cache: constructing %s now (%s)", state.cls.__qualname__, cause)
    started = time.perf_counter()
    try:
        state.cls.__init__(obj, **state.kwargs)  # type: ignore[misc]
    finally:
        state.constructing = False
    state.constructed = True
    state.answers = None  # the model's own from now on (and a tokenizer less in memory)
    for name, value in kept.items():
        current = obj.__dict__.get(name)
        if isinstance(current, dict) and isinstance(value, dict):
            obj.__dict__[name] = {**value, **current}
    log.info("lmms-cache: constructed %s in %.1fs", state.cls.__qualname__, time.perf_counter() - started)


def _root_initializer(cls: type) -> Any:
    """The initializer of the harness base class (the last class before ``object`` with one)."""
    for base in reversed(cls.__mro__[:-1]):
        if "__init__" in base.__dict__ and base is not cls:
            return base.__dict__["__init__"]
    return None


def _lazy_class(cls: type) -> type:
    found = _classes.get(cls)
    if found is not None:
        return found

    def __getattr__(self: Any, name: str) -> Any:  # only for attributes not found otherwise
        state = self.__dict__.get(_STATE)
        if state is None or state.constructed or state.constructing or name.startswith("__"):
            raise AttributeError(f"{cls.__name__!r} object has no attribute {name!r}")
        known, value = state.answer(name)
        if known:
            return value
        if name in _PROBED:
            raise AttributeError(f"{cls.__name__!r} object has no attribute {name!r}")
        _construct(self, f"the attribute {name!r} was read")
        return getattr(self, name)

    namespace: dict[str, Any] = {"__getattr__": __getattr__, "__qualname__": cls.__qualname__,
                                 "__module__": cls.__module__}  # fmt: skip
    for method in _METHODS:
        if callable(getattr(cls, method, None)):
            namespace[method] = _constructing(cls, method)
    for name in (_PROBED | set(_ANSWERED)) - set(_METHODS) - {"get_model_info"}:
        value = inspect.getattr_static(cls, name, None)
        if isinstance(value, property) or (name in _ANSWERED and hasattr(cls, name)
                                           and not hasattr(type(value), "__get__")):  # fmt: skip
            # (lm-eval's TemplateLM has a class attribute ``tokenizer = None``, which the
            # instance's own would hide only once built.)
            namespace[name] = _probed_property(cls, name)
    if callable(getattr(cls, "get_model_info", None)):
        # lm-eval adds the model's details to its results after the run: an unconstructed
        # model has none to add, and loading weights for them would waste the cached run.
        original_info = cls.get_model_info  # type: ignore[attr-defined]

        def get_model_info(self: Any) -> Any:
            if is_constructed(self):
                return original_info(self)
            return model_info_without_weights(self.__dict__[_STATE].kwargs)

        namespace["get_model_info"] = get_model_info
    found = type(cls.__name__, (cls,), namespace)
    _classes[cls] = found
    return found


def _probed_property(cls: type, name: str) -> property:
    """A class property (or plain class attribute) the evaluators probe. Until the model is
    constructed: its answer without weights if it has one, else a plain class attribute's
    value, else left to the class's ``__getattr__`` (which says it is absent, or builds).
    While the initializer runs and after, the class's own (HFLM's ``__init__`` reads
    ``max_length`` to pick a batch size), or the instance's value set over a class attribute."""
    original = inspect.getattr_static(cls, name)
    is_property = isinstance(original, property)

    def get(self: Any) -> Any:
        state = self.__dict__.get(_STATE)
        if state is not None and not state.constructed and not state.constructing:
            known, value = state.answer(name)
            if known:
                return value
            if is_property:
                raise AttributeError(f"{cls.__name__!r} is not constructed yet: no {name!r}")
            return original
        if is_property:
            return original.__get__(self, type(self))
        return self.__dict__.get(name, original)

    if is_property:
        return property(get, original.fset, original.fdel, original.__doc__)

    def set_(self: Any, value: Any) -> None:
        self.__dict__[name] = value

    def delete(self: Any) -> None:
        del self.__dict__[name]

    return property(get, set_, delete)


def _constructing(cls: type, method: str) -> Any:
    original = getattr(cls, method)

    def call(self: Any, *args: Any, **kwargs: Any) -> Any:
        _construct(self, f"{method} was called: a request missed the cache")
        return original(self, *args, **kwargs)

    call.__name__ = call.__qualname__ = method
    return call


# -- what a model that was never built can tell about itself ---------------------------------

# safetensors dtype names -> torch's (what ``str(model.dtype)`` says)
_SAFETENSORS_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16",
                       "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2"}  # fmt: skip


def model_info_without_weights(kwargs: dict[str, Any]) -> dict[str, Any]:
    """lm-eval's ``HFLM.get_model_info()`` for a model given by these arguments, from its
    checkpoint's files alone (never loading a tensor), so that a fully cached rerun's results
    carry the same fields as the run that built the model.

    * ``model_num_parameters``: the elements of every tensor in the checkpoint's safetensors
      files (their headers only); -1 without safetensors files, as HFLM says when it cannot tell;
    * ``model_dtype``: ``torch.<dtype>`` from the ``dtype`` argument, else (``auto``) the
      config's ``torch_dtype`` / ``dtype``, else the first floating-point tensor's; ``""``
      when unknown;
    * ``model_revision``: the ``revision`` argument (HFLM's default ``main``);
    * ``model_sha``: the commit of that revision in the local Hugging Face cache, for a hub
      name; ``""`` for a local directory, as HFLM reports it (and ``peft_sha`` /
      ``delta_sha`` the same way).

    The checkpoint is ``pretrained`` when it names a local directory, else the Hub cache's
    snapshot of it. Without a string ``pretrained`` (not a Hugging Face model): ``{}``.
    """
    pretrained = kwargs.get("pretrained")
    if not isinstance(pretrained, str) or not pretrained:
        return {}
    revision = kwargs.get("revision", "main")
    revision = "main" if revision is None else str(revision)
    directory = pretrained if os.path.isdir(pretrained) else _hub_snapshot(pretrained, revision)
    tensors = _safetensors_tensors(directory) if directory else []
    info: dict[str, Any] = {
        "model_num_parameters": sum(math.prod(shape) for _, shape in tensors) if tensors else -1,
        "model_dtype": _dtype(kwargs.get("dtype", "auto"), directory, tensors),
        "model_revision": revision,
        "model_sha": "" if os.path.isdir(pretrained) else _hub_commit(pretrained, revision),
    }
    for name in ("peft", "delta"):
        if kwargs.get(name):
            source = str(kwargs[name])
            info[f"{name}_sha"] = "" if os.path.isdir(source) else _hub_commit(source, revision)
    return info


def tokenizer_without_weights(cls: type, kwargs: dict[str, Any]) -> dict[str, Any]:
    """``tokenizer``, ``eot_token_id`` and ``max_length`` of lm-eval's ``HFLM`` built with
    these arguments, without building it (the config and tokenizer files only, never a tensor),
    so that lm-eval's ``add_tokenizer_info`` writes the same fields on a fully cached rerun.

    * ``tokenizer``: what ``HFLM._create_tokenizer`` loads (the ``tokenizer`` argument, else
      ``pretrained``; with its ``revision``, ``trust_remote_code``, ``use_fast_tokenizer``,
      ``add_bos_token``, ``subfolder``, ``gguf_file``), its pad token set by lm-eval's own
      ``configure_pad_token`` as ``HFLM.__init__`` does;
    * ``eot_token_id``: the tokenizer's ``eos_token_id`` (``HFLM.eot_token_id``);
    * ``max_length``: the ``max_length`` argument, else lm-eval's own ``resolve_max_length``
      on the checkpoint's config and this tokenizer (``HFLM.max_length``).

    Only from local files (a directory or the Hugging Face cache: a cached run never waits on
    the network). ``{}`` (the fields stay out of the results) for any other class (one that is
    not ``HFLM`` or redefines how it makes its tokenizer or these properties), a ``pretrained``
    or ``tokenizer`` that is not a name, an lm-eval without those helpers, and any failure to
    load (logged at debug level: the evaluation never fails for these fields).
    """
    pretrained, tokenizer_name = kwargs.get("pretrained"), kwargs.get("tokenizer")
    if (not isinstance(pretrained, str) or not pretrained or not isinstance(tokenizer_name, (str, type(None)))
            or not _keeps_hflm_tokenizer(cls)):  # fmt: skip
        return {}
    try:
        transformers = importlib.import_module("transformers")
        lm_utils = importlib.import_module("lm_eval.models.utils")
        revision = str(kwargs.get("revision", "main"))  # HFLM's str(revision)
        trust = kwargs.get("trust_remote_code", False)
        subfolder, gguf_file = kwargs.get("subfolder", ""), kwargs.get("gguf_file")
        config = transformers.AutoConfig.from_pretrained(
            pretrained, revision=revision, trust_remote_code=trust, gguf_file=gguf_file, subfolder=subfolder,
            local_files_only=True)  # fmt: skip
        # HFLM._create_tokenizer's arguments
        options: dict[str, Any] = {"revision": revision, "trust_remote_code": trust, "local_files_only": True}
        if not tokenizer_name and gguf_file is not None:
            options["gguf_file"] = gguf_file
        else:
            options["use_fast"] = kwargs.get("use_fast_tokenizer", True)
        if kwargs.get("add_bos_token") is not None:
            options["add_bos_token"] = kwargs["add_bos_token"]
        if subfolder:
            options["subfolder"] = subfolder
        tokenizer = transformers.AutoTokenizer.from_pretrained(tokenizer_name or pretrained, **options)
        tokenizer = lm_utils.configure_pad_token(tokenizer, model_config=config)
        max_length = kwargs.get("max_length") or lm_utils.resolve_max_length(
            config, tokenizer, default=cls._DEFAULT_MAX_LENGTH)  # type: ignore[attr-defined]  # fmt: skip
        return {"tokenizer": tokenizer, "eot_token_id": tokenizer.eos_token_id, "max_length": max_length}
    except Exception as exc:  # what the files or transformers raise: the fields stay out
        log.debug("lmms-cache: no tokenizer details for %s without building it: %r", cls.__qualname__, exc)
        return {}


def _keeps_hflm_tokenizer(cls: type) -> bool:
    """``cls`` is lm-eval's ``HFLM`` or a subclass making its tokenizer, ``eot_token_id`` and
    ``max_length`` as ``HFLM`` does (what :func:`tokenizer_without_weights` reproduces)."""
    hflm = next((c for c in cls.__mro__ if c.__name__ == "HFLM" and c.__module__ == "lm_eval.models.huggingface"),
                None)  # fmt: skip
    if hflm is None:
        return False
    return all(getattr(cls, name, None) is hflm.__dict__.get(name)
               for name in ("_create_tokenizer", "eot_token_id", "max_length"))  # fmt: skip


def _dtype(requested: Any, directory: str | None, tensors: list[tuple[str, list[int]]]) -> str:
    if isinstance(requested, str) and requested not in ("", "auto"):
        return f"torch.{requested.removeprefix('torch.')}"
    if directory:
        try:
            with open(os.path.join(directory, "config.json"), encoding="utf-8") as f:
                config = json.load(f)
        except (OSError, ValueError):
            config = {}
        for key in ("torch_dtype", "dtype"):
            if isinstance(config.get(key), str) and config[key] not in ("", "auto"):
                return f"torch.{config[key].removeprefix('torch.')}"
    for dtype, _ in tensors:
        if dtype in _SAFETENSORS_DTYPES:
            return f"torch.{_SAFETENSORS_DTYPES[dtype]}"
    return ""


def _safetensors_tensors(directory: str) -> list[tuple[str, list[int]]]:
    """(dtype, shape) of every tensor in the checkpoint's safetensors files, from their
    headers (``model.safetensors``, or the shards ``model.safetensors.index.json`` names)."""
    try:
        with open(os.path.join(directory, "model.safetensors.index.json"), encoding="utf-8") as f:
            files = sorted(set(json.load(f)["weight_map"].values()))
    except (OSError, ValueError, KeyError, AttributeError, TypeError):
        files = ["model.safetensors"]
    found: list[tuple[str, list[int]]] = []
    for name in files:
        try:
            with open(os.path.join(directory, name), "rb") as f:
                (size,) = struct.unpack("<Q", f.read(8))
                if size > 100_000_000:  # not a safetensors header
                    return []
                header = json.loads(f.read(size))
        except (OSError, ValueError, struct.error):
            return []
        for key, tensor in header.items():
            if key != "__metadata__" and isinstance(tensor, dict):
                found.append((str(tensor.get("dtype")), [int(n) for n in tensor.get("shape", ())]))
    return found


def _hub_repo_folder(repo_id: str) -> str | None:
    try:
        from huggingface_hub import constants
    except ImportError:
        return None
    return os.path.join(constants.HF_HUB_CACHE, "models--" + repo_id.replace("/", "--"))


def _hub_commit(repo_id: str, revision: str) -> str:
    """The commit a revision of a Hub model resolves to in the local cache ('' if unknown)."""
    folder = _hub_repo_folder(repo_id)
    if folder is None:
        return ""
    if len(revision) == 40 and all(c in "0123456789abcdef" for c in revision):
        return revision if os.path.isdir(os.path.join(folder, "snapshots", revision)) else ""
    try:
        with open(os.path.join(folder, "refs", revision), encoding="utf-8") as f:
            return f.read().strip()
    except OSError:
        return ""


def _hub_snapshot(repo_id: str, revision: str) -> str | None:
    folder = _hub_repo_folder(repo_id)
    commit = _hub_commit(repo_id, revision)
    if folder is None or not commit:
        return None
    snapshot = os.path.join(folder, "snapshots", commit)
    return snapshot if os.path.isdir(snapshot) else None
