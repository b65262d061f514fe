"""A drop-in replacement for the request-building cache of lmms-eval and lm-eval.

Both harnesses can cache the requests (``Instance`` lists) they build for a task
(``--cache_requests true``) through ``<harness>.caching.cache``: ``load_from_cache``,
``save_to_cache`` and ``delete_cache``, files named ``{name}{FILE_SUFFIX}`` under
``$LM_HARNESS_CACHE_PATH``.  Their implementations have faults this module fixes:

* writes are atomic (temporary file in the same directory, flush, fsync, ``os.replace``):
  a crash during a save leaves the previous file intact, never a half-written one;
* a corrupted, truncated or foreign file is a miss with one warning, not an exception;
* callables inside cached requests survive the round trip.  lmms-eval 0.7.3 replaces them
  by ``None`` on save and then crashes on its own cache hit.  Here every Python function
  (including those of a task's ``utils.py`` loaded by file path, as ``!function`` does) is
  stored as a reference: defining module and file, qualified name and a digest of its
  source.  It is resolved on load (by module name when importable, else by loading the
  file); if the source changed, the whole entry is a miss with a warning (stale code).
  ``functools.partial`` objects and bound methods are rebuilt around such references.
  A harness ``Task`` object (what ``self.doc_to_visual`` is bound to) is stored as a
  reference to the task by class and name, plus a digest of its configuration; on load it
  is resolved to the live task object that is building its requests;
* file names never contain path separators and stay below file-system limits;
* ``delete_cache(key)`` deletes our files whose name starts with ``key`` and nothing else;
* the directory and files are private to the user (0700 / 0600).

Functions take the arguments of both harnesses: lmms-eval calls ``load_from_cache(file_name)``,
lm-eval ``load_from_cache(file_name, cache=...)``.

``install()`` puts these functions in place of both harnesses' own: in their caching module
and in every already-imported module that did ``from <harness>.caching.cache import ...``
(lmms-eval's and lm-eval's ``api.task``, lm-eval's ``evaluator``, plugins).  Modules imported
later pick them up from the patched caching module.  It is idempotent, skips a harness that
is not installed, and ``uninstall()`` restores the originals:

>>> from lmms_cache import harness_cache
>>> harness_cache.install()    # doctest: +SKIP
['lmms_eval', 'lm_eval']
>>> harness_cache.uninstall()  # doctest: +SKIP
['lmms_eval', 'lm_eval']

Files start with a magic line and end with a SHA-256 of the pickle, so files written by the
harnesses' own code (whose callables are lost) are never mistaken for ours.  Loading a cache
file runs code (it is a pickle, as in the harnesses): only use a directory you trust.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import importlib
import importlib.util
import inspect
import io
import json
import linecache
import logging
import marshal
import os
import pickle
import re
import stat
import sys
import tempfile
import threading
import types
import weakref
from collections.abc import Iterator
from typing import Any

import dill

logger = logging.getLogger(__name__)

__all__ = [
    "ENV_VAR",
    "FILE_SUFFIX",
    "CacheEntryUnusable",
    "StaleCodeError",
    "UnresolvedReferenceError",
    "cache_dir",
    "cache_file_path",
    "delete_cache",
    "install",
    "installed",
    "load_from_cache",
    "save_to_cache",
    "uninstall",
]

#: The environment variable both harnesses read for their cache directory.
ENV_VAR = "LM_HARNESS_CACHE_PATH"
MODULE_DIR = os.path.dirname(os.path.realpath(__file__))
#: Used when ``$LM_HARNESS_CACHE_PATH`` is unset or empty, as in the harnesses.
DEFAULT_PATH = os.path.join(MODULE_DIR, ".cache")

# The harnesses' naming, kept so that their own delete_cache also finds our files.
HASH_INPUT = "EleutherAI-lm-evaluation-harness"
HASH_PREFIX = hashlib.sha256(HASH_INPUT.encode("utf-8")).hexdigest()
FILE_SUFFIX = f".{HASH_PREFIX}.pickle"
MAX_CACHE_FILENAME_BYTES = 240
CACHE_KEY_HASH_LEN = 16

MAGIC = b"lmms-cache harness-cache v1\n"
_DIGEST_LEN = hashlib.sha256().digest_size
_TMP_SUFFIX = ".tmp"


class CacheEntryUnusable(Exception):
    """A cache entry that was read intact but cannot be used: the whole entry is a miss."""


class StaleCodeError(CacheEntryUnusable):
    """A function (or task configuration) referenced by an entry changed since it was saved."""


class UnresolvedReferenceError(CacheEntryUnusable):
    """A function, class or task referenced by an entry cannot be found any more."""


# --------------------------------------------------------------------------- locations


def cache_dir() -> str:
    """The cache directory: ``$LM_HARNESS_CACHE_PATH`` read at call time, else ``DEFAULT_PATH``."""
    return os.environ.get(ENV_VAR) or DEFAULT_PATH


def _safe_name(name: str) -> str:
    """``name`` with path separators replaced, as a file name."""
    return re.sub(r"[/\\]+", "_", name)


def cache_file_path(file_name: str) -> str:
    """The path of the entry ``file_name``: ``<cache_dir>/<file_name><FILE_SUFFIX>``.

    Path separators become ``_``; a name too long for the file system keeps a readable prefix
    followed by a hash of the full name (lm-eval 0.4.13's scheme, so the names agree).
    """
    safe = _safe_name(file_name)
    basename = f"{safe}{FILE_SUFFIX}"
    if len(basename.encode("utf-8")) > MAX_CACHE_FILENAME_BYTES:
        digest = hashlib.sha256(file_name.encode("utf-8")).hexdigest()[:CACHE_KEY_HASH_LEN]
        hashed_suffix = f"-{digest}{FILE_SUFFIX}"
        room = MAX_CACHE_FILENAME_BYTES - len(hashed_suffix.encode("utf-8"))
        prefix = safe.encode("utf-8")[:room].decode("utf-8", errors="ignore").rstrip("-_.") or "cache"
        basename = f"{prefix}{hashed_suffix}"
    return os.path.join(cache_dir(), basename)


# --------------------------------------------------------------------------- references

# Functions that are pickling machinery, not user code: pickled by plain reference.
_INFRASTRUCTURE = ("dill", "pickle", "_pickle", "copyreg", "copy", "functools", "builtins", __name__)


def _is_infrastructure(module: str | None) -> bool:
    """Whether ``module`` is pickling machinery (or this module), whose functions pickle by name."""
    return module is not None and any(module == m or module.startswith(m + ".") for m in _INFRASTRUCTURE)


def _lookup(namespace: dict[str, Any], qualname: str) -> Any:
    """The object a module namespace holds under a dotted qualified name (KeyError/AttributeError if none)."""
    first, *rest = qualname.split(".")
    obj = namespace[first]
    for part in rest:
        obj = getattr(obj, part)
    return obj


def _sha(data: bytes) -> str:
    """Hex SHA-256 of ``data``."""
    return hashlib.sha256(data).hexdigest()


def _function_digest(fn: types.FunctionType) -> str:
    """A digest of a function's source text, or of its code object when it has no source."""
    filename = fn.__code__.co_filename
    linecache.checkcache(filename)  # a file edited since it was read must be read again
    try:
        return "src:" + _sha(inspect.getsource(fn).encode("utf-8"))
    except (OSError, TypeError):
        return "code:" + _sha(marshal.dumps(fn.__code__))


def _class_functions(cls: type) -> list[tuple[str, types.FunctionType]]:
    """The functions a class body defines (methods, static/class methods, property getters), by name."""
    found = []
    for name, value in sorted(vars(cls).items()):
        if isinstance(value, (staticmethod, classmethod)):
            value = value.__func__
        elif isinstance(value, property):
            value = value.fget
        if isinstance(value, types.FunctionType) and value.__qualname__.startswith(cls.__qualname__ + "."):
            found.append((name, value))
    return found


def _source_digest(obj: Any) -> str:
    """The digest of a function, or of a class as the digests of the functions it defines."""
    if isinstance(obj, types.FunctionType):
        return _function_digest(obj)
    if isinstance(obj, type):
        parts = [f"{name}={_function_digest(fn)}" for name, fn in _class_functions(obj)]
        return "cls:" + _sha("\n".join(parts).encode("utf-8"))
    raise TypeError(f"no source digest for {obj!r}")


def _namespace_ref(globals_: dict[str, Any], what: str) -> tuple[str, str | None, bool]:
    """(module name, defining file, importable by module name) for a module's globals."""
    modname = globals_.get("__name__")
    if not isinstance(modname, str):
        raise pickle.PicklingError(f"{what}: its module has no name")
    file = globals_.get("__file__")
    file = os.path.realpath(file) if isinstance(file, str) else None
    module = sys.modules.get(modname)
    by_name = module is not None and getattr(module, "__dict__", None) is globals_
    if not by_name and file is None:
        raise pickle.PicklingError(f"{what}: module {modname!r} is neither importable nor loaded from a file")
    return modname, file, by_name


def _function_ref(fn: types.FunctionType) -> tuple[str, str | None, str, str, bool]:
    """The reference (module, file, qualname, source digest, by name) of a module-level function."""
    qualname = fn.__qualname__
    what = f"function {fn.__module__}.{qualname}"
    if "<locals>" in qualname or "<lambda>" in qualname:
        raise pickle.PicklingError(f"{what} is not reachable by name: cannot be cached by reference")
    modname, file, by_name = _namespace_ref(fn.__globals__, what)
    try:
        found = _lookup(fn.__globals__, qualname)
    except (KeyError, AttributeError):
        found = None
    if found is not fn:
        raise pickle.PicklingError(f"{what} is not what its module holds under that name")
    return modname, file, qualname, _function_digest(fn), by_name


def _class_ref(cls: type) -> tuple[str, str | None, str, str, bool] | None:
    """A reference for a class from a module loaded by path; None when pickle's own works."""
    module = sys.modules.get(cls.__module__)
    try:
        if module is not None and _lookup(vars(module), cls.__qualname__) is cls:
            return None
    except (KeyError, AttributeError):
        pass
    functions = _class_functions(cls)
    if "<locals>" in cls.__qualname__ or not functions:
        return None  # leave it to dill (or its error)
    modname, file, by_name = _namespace_ref(functions[0][1].__globals__, f"class {cls.__qualname__}")
    try:
        found = _lookup(functions[0][1].__globals__, cls.__qualname__)
    except (KeyError, AttributeError):
        found = None
    if found is not cls:
        return None
    return modname, file, cls.__qualname__, _source_digest(cls), by_name


_path_modules: dict[tuple[str, int, int], types.ModuleType] = {}
_path_lock = threading.Lock()


def _module_from_file(modname: str, file: str) -> types.ModuleType:
    """Execute ``file`` as a module the way lmms-eval's ``!function`` does, once per file version."""
    try:
        st = os.stat(file)
    except OSError as e:
        raise UnresolvedReferenceError(f"{file} is gone ({e})") from None
    key = (file, st.st_mtime_ns, st.st_size)
    with _path_lock:
        module = _path_modules.get(key)
        if module is None:
            spec = importlib.util.spec_from_file_location(modname, file)
            if spec is None or spec.loader is None:
                raise UnresolvedReferenceError(f"cannot load {file} as a module")
            module = importlib.util.module_from_spec(spec)
            try:
                spec.loader.exec_module(module)
            except Exception as e:
                raise UnresolvedReferenceError(f"loading {file} failed: {e!r}") from e
            _path_modules[key] = module
    return module


def _namespace(modname: str, file: str | None, by_name: bool) -> dict[str, Any]:
    """The namespace of a referenced module: imported by name when it was importable, else loaded by path."""
    if by_name:
        try:
            return vars(importlib.import_module(modname))
        except Exception as e:
            if file is None or modname == "__main__" or not os.path.exists(file):
                raise UnresolvedReferenceError(f"cannot import {modname!r}: {e!r}") from e
    if file is None:
        raise UnresolvedReferenceError(f"module {modname!r} has no file to load")
    return vars(_module_from_file(modname, file))


def _resolve_function(modname: str, file: str | None, qualname: str, digest: str, by_name: bool) -> Any:
    """Unpickling hook: the function (or class) named by a reference, if its source is unchanged."""
    namespace = _namespace(modname, file, by_name)
    where = f"{modname}.{qualname}" + (f" ({file})" if file else "")
    try:
        obj = _lookup(namespace, qualname)
    except (KeyError, AttributeError):
        raise UnresolvedReferenceError(f"{where} no longer exists") from None
    try:
        current = _source_digest(obj)
    except TypeError:
        raise StaleCodeError(f"{where} is no longer a function") from None
    if current != digest:
        raise StaleCodeError(f"the source of {where} changed since the entry was saved")
    return obj


# --------------------------------------------------------------------------- tasks

_TASK_MODULES = ("lmms_eval.api.task", "lm_eval.api.task")
_live_tasks: weakref.WeakValueDictionary[tuple[str, str], Any] = weakref.WeakValueDictionary()


def _task_classes() -> tuple[type, ...]:
    """The harnesses' ``Task`` base classes among the loaded modules (never imports a harness)."""
    classes = []
    for name in _TASK_MODULES:
        task_cls = getattr(sys.modules.get(name), "Task", None)
        if isinstance(task_cls, type):
            classes.append(task_cls)
    return tuple(classes)


def _task_config(task: Any) -> Any:
    """A task's configuration object (``_config``, else ``config``), or None."""
    config = getattr(task, "_config", None)
    return getattr(task, "config", None) if config is None else config


def _task_name(task: Any) -> str | None:
    """A task's name (``config.task``), or None."""
    config = _task_config(task)
    name = getattr(config, "task", None)
    if name is None and isinstance(config, dict):
        name = config.get("task")
    return name if isinstance(name, str) else None


def _jsonable(value: Any) -> Any:
    """``json.dumps`` default for a task configuration: callables by source digest, others by type."""
    if isinstance(value, functools.partial):
        return {"partial": _jsonable(value.func), "args": list(value.args), "keywords": dict(value.keywords)}
    if isinstance(value, (types.FunctionType, type)):
        return _source_digest(value)
    if isinstance(value, types.MethodType):
        return _jsonable(value.__func__)
    return type(value).__qualname__


def _config_digest(task: Any) -> str:
    """A digest of a task's configuration: its values, and the source of its callables."""
    config = _task_config(task)
    if dataclasses.is_dataclass(config) and not isinstance(config, type):
        items = {f.name: getattr(config, f.name, None) for f in dataclasses.fields(config)}
    elif isinstance(config, dict):
        items = dict(config)
    else:
        items = dict(vars(config)) if config is not None else {}
    try:
        text = json.dumps(items, sort_keys=True, default=_jsonable)
    except (TypeError, ValueError):  # keys json cannot sort: the callables alone
        text = json.dumps({str(k): _jsonable(v) for k, v in items.items() if callable(v)}, sort_keys=True)
    return _sha(text.encode("utf-8"))


def _task_matches(obj: Any, class_qualname: str, task_name: str) -> bool:
    """Whether ``obj`` is a harness task of that class and name."""
    classes = _task_classes()
    return (bool(classes) and isinstance(obj, classes) and type(obj).__qualname__ == class_qualname
            and _task_name(obj) == task_name)


def _resolve_task(class_qualname: str, task_name: str, config_digest: str) -> Any:
    """Unpickling hook: the live task object an entry's requests are bound to.

    It is the task whose code is loading the entry (a ``self`` in a calling frame, as in
    ``build_all_requests``), else one seen by this process when saving or loading.
    """
    task = None
    frame: types.FrameType | None = sys._getframe(1)
    while frame is not None and task is None:
        candidate = frame.f_locals.get("self")
        if candidate is not None and _task_matches(candidate, class_qualname, task_name):
            task = candidate
        frame = frame.f_back
    if task is None:
        task = _live_tasks.get((class_qualname, task_name))
    if task is None:
        raise UnresolvedReferenceError(f"no live {class_qualname} {task_name!r} to bind the cached requests to")
    if _config_digest(task) != config_digest:
        raise StaleCodeError(f"the configuration of task {task_name!r} changed since the entry was saved")
    with contextlib.suppress(TypeError):
        _live_tasks[(class_qualname, task_name)] = task
    return task


# --------------------------------------------------------------------------- pickling


class _ReferencePickler(dill.Pickler):  # type: ignore[misc]
    """dill, with functions, classes of path-loaded modules and tasks stored by reference."""

    def reducer_override(self, obj: Any) -> Any:
        """Reduce functions, bound methods, path-loaded classes and harness tasks to references."""
        if isinstance(obj, types.FunctionType):
            if _is_infrastructure(obj.__module__):
                return NotImplemented
            return _resolve_function, _function_ref(obj)
        if isinstance(obj, types.MethodType):
            name = obj.__func__.__name__
            if getattr(obj.__self__, name, None) == obj:
                return getattr, (obj.__self__, name)
            return types.MethodType, (obj.__func__, obj.__self__)
        if isinstance(obj, type):
            ref = _class_ref(obj)
            return NotImplemented if ref is None else (_resolve_function, ref)
        classes = _task_classes()
        if classes and isinstance(obj, classes):
            task_name = _task_name(obj)
            if task_name is None:
                raise pickle.PicklingError(f"task object {obj!r} has no name to be cached by reference")
            with contextlib.suppress(TypeError):
                _live_tasks[(type(obj).__qualname__, task_name)] = obj
            return _resolve_task, (type(obj).__qualname__, task_name, _config_digest(obj))
        return NotImplemented


class _HashingWriter:
    """A write-only file that hashes what passes through it."""

    def __init__(self, file: io.BufferedWriter) -> None:
        """Write to ``file``."""
        self.file = file
        self.hash = hashlib.sha256()

    def write(self, data: bytes) -> int:
        """Hash and write ``data``; the number of bytes written."""
        self.hash.update(data)
        return self.file.write(data)


def _dump(obj: Any, file: io.BufferedWriter) -> None:
    """Write ``MAGIC``, the pickle of ``obj`` and the SHA-256 of that pickle to ``file``."""
    file.write(MAGIC)
    writer = _HashingWriter(file)
    _ReferencePickler(writer, protocol=pickle.HIGHEST_PROTOCOL).dump(obj)
    file.write(writer.hash.digest())


def _fsync_dir(directory: str) -> None:
    """Make a rename in ``directory`` durable (best effort)."""
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


# --------------------------------------------------------------------------- the API


def load_from_cache(file_name: str, cache: bool = True) -> Any:
    """The object saved under ``file_name``, or None on a miss.

    ``cache=False`` (lm-eval's way of saying "do not read the cache") returns None at once;
    lmms-eval passes no ``cache`` and always reads.  An absent entry is a silent miss; a
    corrupted, truncated or foreign file, or an entry whose functions changed or disappeared
    (stale code), is a miss with one warning.  Never raises for a bad entry.
    """
    if not cache:
        return None
    path = cache_file_path(file_name)
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        logger.debug("%s is not cached", file_name)
        return None
    except OSError as e:
        logger.warning("request cache %s unreadable (%s): rebuilding", path, e)
        return None
    if len(data) < len(MAGIC) + _DIGEST_LEN or not data.startswith(MAGIC):
        logger.warning("request cache %s is corrupted or was not written by lmms_cache: rebuilding", path)
        return None
    payload = memoryview(data)[len(MAGIC):-_DIGEST_LEN]
    if hashlib.sha256(payload).digest() != data[-_DIGEST_LEN:]:
        logger.warning("request cache %s is corrupted or truncated: rebuilding", path)
        return None
    try:
        return dill.loads(payload)
    except CacheEntryUnusable as e:
        logger.warning("request cache %s is stale (%s): rebuilding", path, e)
    except Exception as e:
        logger.warning("request cache %s cannot be loaded (%r): rebuilding", path, e)
    return None


def save_to_cache(file_name: str, obj: Any) -> bool:
    """Save ``obj`` under ``file_name`` atomically; True when it was written.

    The object is pickled (functions as references, see the module docstring) into a
    private temporary file next to the entry, flushed, fsynced and renamed over it, so a
    reader or a crash sees the previous entry or the new one, never a mix.  ``obj`` is not
    modified.  If it cannot be saved (an unpicklable value, a full disk) a warning is
    logged, any previous entry of that name is removed (it is outdated, since it is being
    rebuilt) and False is returned: evaluation goes on uncached.
    """
    path = cache_file_path(file_name)
    directory, basename = os.path.split(path)
    tmp = None
    try:
        os.makedirs(directory, mode=0o700, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{basename}.", suffix=_TMP_SUFFIX)  # mode 0600
        with os.fdopen(fd, "wb") as f:
            _dump(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        tmp = None
        _fsync_dir(directory)
        logger.debug("saved request cache %s", path)
        return True
    except Exception as e:
        logger.warning("request cache %s not saved (%r)", path, e)
        with contextlib.suppress(OSError):
            os.unlink(path)
        return False
    finally:
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp)


def _entry_name(name: str) -> str | None:
    """The entry name of one of our files (an entry or a leftover temporary), else None."""
    if name.endswith(FILE_SUFFIX):
        return name
    if name.startswith(".") and name.endswith(_TMP_SUFFIX):
        inner = name[1:-len(_TMP_SUFFIX)].rpartition(".")[0]
        if inner.endswith(FILE_SUFFIX):
            return inner
    return None


def delete_cache(key: str = "") -> int:
    """Delete the entries whose name starts with ``key`` (all of them for ``""``); the count.

    Only our files are touched: entries ``*<FILE_SUFFIX>`` and the temporary files a
    killed save left behind.  Other files and directories are never removed; an absent
    cache directory is not created.
    """
    directory = cache_dir()
    try:
        names = os.listdir(directory)
    except FileNotFoundError:
        return 0
    prefix = _safe_name(key)
    removed = 0
    for name in names:
        entry = _entry_name(name)
        if entry is None or not entry.startswith(prefix):
            continue
        path = os.path.join(directory, name)
        try:
            if stat.S_ISDIR(os.lstat(path).st_mode):
                continue
            os.unlink(path)
            removed += 1
        except FileNotFoundError:
            pass
    return removed


# --------------------------------------------------------------------------- install

_HARNESSES: dict[str, str] = {"lmms_eval": "lmms_eval.caching.cache", "lm_eval": "lm_eval.caching.cache"}
_NAMES = ("load_from_cache", "save_to_cache", "delete_cache")
_originals: dict[str, dict[str, Any]] = {}  # harness -> name -> its own function
_install_lock = threading.RLock()


def _ours() -> dict[str, Any]:
    """Our functions, by the names the harnesses use."""
    return {"load_from_cache": load_from_cache, "save_to_cache": save_to_cache, "delete_cache": delete_cache}


def _modules() -> Iterator[tuple[str, types.ModuleType]]:
    """The loaded modules (a snapshot), except this one."""
    for name, module in list(sys.modules.items()):
        if isinstance(module, types.ModuleType) and name != __name__:
            yield name, module


def install() -> list[str]:
    """Replace both harnesses' cache functions by ours; the harnesses patched.

    For each installed harness, ``load_from_cache``, ``save_to_cache`` and ``delete_cache``
    are replaced in ``<harness>.caching.cache`` and in every loaded module that holds the
    harness's own function under that name.  Idempotent; a harness that is not installed
    (or cannot be imported) is skipped.
    """
    ours = _ours()
    done = []
    with _install_lock:
        for harness, cache_module_name in _HARNESSES.items():
            try:
                if importlib.util.find_spec(harness) is None:
                    continue
                cache_module = importlib.import_module(cache_module_name)
            except Exception as e:
                logger.warning("%s is present but its cache module cannot be imported (%r): not patched", harness, e)
                continue
            originals = _originals.setdefault(harness, {})
            for name in _NAMES:
                current = vars(cache_module).get(name)
                if name not in originals and current is not None and current is not ours[name]:
                    originals[name] = current
            for _, module in _modules():
                namespace = vars(module)
                for name, original in originals.items():
                    if namespace.get(name) is original:
                        setattr(module, name, ours[name])
            done.append(harness)
    return done


def _harness_of(module_name: str) -> str | None:
    """The patched harness a module belongs to (by package; the only one if just one was patched)."""
    for harness in _originals:
        if module_name == harness or module_name.startswith(harness + "."):
            return harness
    return next(iter(_originals)) if len(_originals) == 1 else None


def uninstall() -> list[str]:
    """Put the harnesses' own functions back wherever ``install()`` put ours; the harnesses restored.

    A module that imported our function after ``install()`` gets its harness's original
    (judged by its package; a module outside both packages when both were patched is left).
    """
    ours = _ours()
    with _install_lock:
        for module_name, module in _modules():
            namespace = vars(module)
            for name in _NAMES:
                if namespace.get(name) is ours[name]:
                    harness = _harness_of(module_name)
                    if harness is not None and name in _originals[harness]:
                        setattr(module, name, _originals[harness][name])
        restored = list(_originals)
        _originals.clear()
    return restored


def installed() -> list[str]:
    """The harnesses whose caching module currently holds our functions."""
    result = []
    for harness, cache_module_name in _HARNESSES.items():
        module = sys.modules.get(cache_module_name)
        if module is not None and vars(module).get("load_from_cache") is load_from_cache:
            result.append(harness)
    return result
