"""Models constructed on their first miss: a fully cached rerun never loads weights.

:func:`lazy_model` returns an instance of the model class whose ``__init__`` has not run
yet: only the harness base class's own initializer (rank 0 of 1, an empty ``task_dict``),
with rank and world size taken from the launcher's environment (``RANK``,
``WORLD_SIZE``) so the evaluator shards documents as it would. The real ``__init__``
runs the first time a request method is called (the proxy calls it only for misses) or
an attribute the placeholder does not have is read. Whatever the evaluator set on the
placeholder before then (``task_dict``) is kept.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any

__all__ = ["is_constructed", "lazy_model"]

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
_classes: dict[type, type] = {}


class _State:
    def __init__(self, cls: type, kwargs: dict[str, Any]) -> None:
        self.cls = cls
        self.kwargs = kwargs
        self.constructed = False
        self.constructing = False


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
        if (state is None or state.constructed or state.constructing or name.startswith("__")
                or name in _PROBED):  # fmt: skip
            raise AttributeError(f"{cls.__name__!r} object has no attribute {name!r}")
        _construct(self, f"the attribute {name!r} was read")
        return getattr(self, name)

    namespace: dict[str, Any] = {"__getattr__": __getattr__, "__qualname__": cls.__qualname__,
                                 "__module__": cls.__module__}  # fmt: skip
    for method in _METHODS:
        if callable(getattr(cls, method, None)):
            namespace[method] = _constructing(cls, method)
    for name in _PROBED - set(_METHODS) - {"get_model_info"}:
        if isinstance(getattr(cls, name, None), property):
            namespace[name] = _probed_property(cls, name)
    if callable(getattr(cls, "get_model_info", None)):
        # lm-eval adds the model's details to its results after the run: an unconstructed
        # model has none to add, and loading weights for them would waste the cached run.
        original_info = cls.get_model_info  # type: ignore[attr-defined]

        def get_model_info(self: Any) -> Any:
            return original_info(self) if is_constructed(self) else {}

        namespace["get_model_info"] = get_model_info
    found = type(cls.__name__, (cls,), namespace)
    _classes[cls] = found
    return found


def _probed_property(cls: type, name: str) -> property:
    """A class property the evaluators probe: absent until the model is constructed."""
    original: property = getattr(cls, name)

    def get(self: Any) -> Any:
        if not is_constructed(self):
            raise AttributeError(f"{cls.__name__!r} is not constructed yet: no {name!r}")
        return original.__get__(self, type(self))

    return property(get, original.fset, original.fdel, original.__doc__)


def _constructing(cls: type, method: str) -> Any:
    original = getattr(cls, method)

    def call(self: Any, *args: Any, **kwargs: Any) -> Any:
        _construct(self, f"{method} was called: a request missed the cache")
        return original(self, *args, **kwargs)

    call.__name__ = call.__qualname__ = method
    return call
