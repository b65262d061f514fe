"""What lmms-eval and lm-eval requests look like, and how their media are resolved.

A request is anything with an ``.args`` tuple (both harnesses' ``Instance``), or a bare
tuple. :func:`view` names each argument's role for the key:

=========  ==========================================================================
role       how the key treats it
=========  ==========================================================================
value      by value (callables inside by code identity)
media      by content: images, arrays, files and directories named by a path
resolve    a callable the model calls on the document (``doc_to_visual``,
           ``doc_to_messages``, ``doc_to_target``): called here on the same
           document, the result keyed as media
step       a multi-round step function the model calls once per round: by its
           code, module source and configuration; the media its rounds return are
           recorded with the entry and re-checked on a hit
=========  ==========================================================================

After the arguments, a request of either harness's ``Instance`` counts by its address
(task, split, doc id, idx) and its whole document, by content.

Every argument counts, the document's address too: lmms-eval's task, split and doc id
(models branch on the task name), lm-eval's task name and doc id from the metadata, and
both harnesses' ``idx``. The document is lmms-eval's ``task_dict[task][split][doc_id]``
(what models read themselves) or lm-eval's ``Instance.doc``.

lmms-eval 0.7.3 layouts (``.args``):

* simple ``generate_until``: ``(context, gen_kwargs, doc_to_visual, doc_id, task, split)``
* chat ``generate_until``: ``(context, doc_to_messages, gen_kwargs, doc_id, task, split)``
* ``generate_until_multi_round``:
  ``(context, gen_kwargs, doc_to_visual, doc_to_text, doc_id, task, split)``, or the chat
  layout ``(context, doc_to_messages, gen_kwargs, doc_id, task, split)``
* ``loglikelihood``: ``(context, doc_to_target | continuation, doc_to_visual, doc_id, task, split)``

lm-eval: ``(context, gen_kwargs[, {"visual": [...]}])``, ``(context, continuation)``,
``(text,)``. Anything else is keyed argument by argument as values, which is always safe.
"""

from __future__ import annotations

import random
import sys
from collections.abc import Mapping
from typing import Any, NamedTuple

__all__ = ["DocumentUnavailable", "Part", "RandomStateMoved", "RequestView", "Resolver", "view"]

VALUE, MEDIA, RESOLVE, STEP = "value", "media", "resolve", "step"
# Keys of an lm-eval auxiliary-arguments mapping whose values the model loads as media.
_MEDIA_KEYS = frozenset({"visual", "visuals", "image", "images", "video", "videos", "audio", "audios"})
NO_DOCUMENT = object()


class Part(NamedTuple):
    name: str
    value: Any
    role: str


class RequestView:
    """A request's arguments with their roles, and the document they came from.

    A plain slotted class: one is built per request on the hit path.
    """

    __slots__ = ("callables", "doc", "doc_id", "gen_kwargs", "idx", "located", "parts", "repeats", "split", "step",
                 "task")  # fmt: skip

    def __init__(self, parts: list[Part], task: Any = None, split: Any = None, doc_id: Any = None,
                 gen_kwargs: Mapping[str, Any] | None = None, repeats: int = 1, doc: Any = NO_DOCUMENT,
                 step: int | None = None, idx: Any = None, located: bool = False) -> None:  # fmt: skip
        self.parts = parts  # the arguments; the address and the document are keyed after them
        self.task = task
        self.split = split
        self.doc_id = doc_id
        self.idx = idx
        self.located = located  # an Instance: (task, split, doc_id, idx) and the document count
        self.gen_kwargs = gen_kwargs
        self.repeats = repeats
        self.doc = doc  # the document itself (lm-eval), else NO_DOCUMENT: found by its address
        self.step = step  # the argument index of a multi-round step function
        # (id, callable, whether it reads the document) of each resolve part, in order, as the
        # key builder finds them (it computes each once per request)
        self.callables: list[tuple[Any, Any, bool]] | None = None

    @property
    def address(self) -> tuple[Any, Any, Any] | None:
        if self.task is None or self.doc_id is None:
            return None
        return (self.task, self.split, self.doc_id)


def _args(request: Any) -> tuple[Any, ...]:
    args = getattr(request, "arguments", None)  # lmms-eval's Instance (.args is a property of it)
    if type(args) is tuple:
        return args
    args = getattr(request, "args", None)
    if args is None:
        if isinstance(request, tuple):
            return request
        raise TypeError(
            f"a request must have an .args tuple (an lmms-eval or lm-eval Instance), "
            f"not {type(request).__name__}"
        )
    return args if isinstance(args, tuple) else (args,)


def _metadata(request: Any) -> tuple[Any, Any, Any, int, bool]:
    """(task, split, doc_id, repeats, has_metadata) from either harness's metadata."""
    meta = getattr(request, "metadata", None)
    task = split = doc_id = None
    repeats: Any = 1
    found = False
    if type(meta) is dict or isinstance(meta, Mapping):
        task, doc_id, split = meta.get("task"), meta.get("doc_id"), meta.get("split")
        repeats = meta.get("repeats", 1)
        found = True
    elif isinstance(meta, tuple) and len(meta) == 3:
        task, doc_id, repeats = meta
        found = True
    if type(repeats) is not int:
        try:
            repeats = int(repeats or 1)
        except (TypeError, ValueError):
            repeats = 1
    return task, split, doc_id, repeats or 1, found


def _is_doc_id(v: Any) -> bool:
    return isinstance(v, (int, str)) and not isinstance(v, bool)


def _is_mapping(v: Any) -> bool:
    return type(v) is dict or isinstance(v, Mapping)


def _fn_or_none(v: Any) -> bool:
    return v is None or callable(v)


# Part(name, value, role) without the namedtuple's Python-level constructor (the hit path
# builds several per request).
_new = tuple.__new__


def view(method: str, request: Any) -> RequestView:
    """Name the roles of a request's arguments (see the module notes)."""
    args = _args(request)
    n = len(args)
    if n < 6 or not isinstance(args[-1], str) or not isinstance(args[-2], str) or not _is_doc_id(args[-3]):
        return _generic(request, args, *_metadata(request))
    step = None
    if n == 6 and method == "generate_until" and _is_mapping(args[1]) and _fn_or_none(args[2]):
        parts = [_new(Part, ("context", args[0], VALUE)), _new(Part, ("gen_kwargs", args[1], VALUE)),
                 _new(Part, ("visual", args[2], RESOLVE))]  # fmt: skip
        gen = args[1]
    elif n == 6 and method == "generate_until" and callable(args[1]) and _is_mapping(args[2]):
        parts = [_new(Part, ("context", args[0], VALUE)), _new(Part, ("messages", args[1], RESOLVE)),
                 _new(Part, ("gen_kwargs", args[2], VALUE))]  # fmt: skip
        gen = args[2]
    elif n == 6 and method == "generate_until_multi_round" and callable(args[1]) and _is_mapping(args[2]):
        # Chat-layout multi-round: the model calls doc_to_messages once per round (with a
        # round index): a step function; its first round's media are in the document.
        parts = [Part("context", args[0], VALUE), Part("messages", args[1], STEP), Part("gen_kwargs", args[2], VALUE)]
        gen, step = args[2], 1
    elif n == 7 and method == "generate_until_multi_round" and _is_mapping(args[1]):
        parts = [
            Part("context", args[0], VALUE), Part("gen_kwargs", args[1], VALUE), Part("visual", args[2], RESOLVE),
            Part("step", args[3], STEP),
        ]  # fmt: skip
        gen, step = args[1], 3
    elif (
        n == 6
        and method == "loglikelihood"
        and _fn_or_none(args[2])
        and (callable(args[1]) or isinstance(args[1], (str, list, tuple)))
    ):
        target_role = RESOLVE if callable(args[1]) else VALUE
        parts = [_new(Part, ("context", args[0], VALUE)), _new(Part, ("target", args[1], target_role)),
                 _new(Part, ("visual", args[2], RESOLVE))]  # fmt: skip
        gen = None
    else:
        return _generic(request, args, *_metadata(request))
    # The address is in the arguments: only the number of repeats is read from the metadata.
    meta = getattr(request, "metadata", None)
    repeats = meta.get("repeats", 1) if type(meta) is dict else _metadata(request)[3]
    if type(repeats) is not int:
        repeats = _metadata(request)[3]
    return RequestView(parts, args[-2], args[-1], args[-3], gen, repeats or 1, NO_DOCUMENT, step,
                       getattr(request, "idx", None), True)  # fmt: skip


def _generic(request: Any, args: tuple[Any, ...], task: Any, split: Any, doc_id: Any, repeats: int,
             has_meta: bool) -> RequestView:  # fmt: skip
    parts = []
    gen = None
    for i, a in enumerate(args):
        name = _ARG_NAMES[i] if i < len(_ARG_NAMES) else f"arg{i}"
        if i == 0 or type(a) is str or not (type(a) is dict or isinstance(a, Mapping)):
            parts.append(_new(Part, (name, a, VALUE)))
        elif _MEDIA_KEYS.isdisjoint(a):
            if gen is None:
                gen = a
            parts.append(_new(Part, (name, a, VALUE)))
        else:  # lm-eval's auxiliary arguments: {"visual": [...]}
            for k in sorted(a, key=str):
                parts.append(Part(f"{name}.{k}", a[k], MEDIA if k in _MEDIA_KEYS else VALUE))
    # An Instance: what the model can read besides its arguments (lm-eval's carries its doc)
    doc = getattr(request, "doc", NO_DOCUMENT) if has_meta else NO_DOCUMENT
    return RequestView(parts, task, split, doc_id, gen, repeats, doc, None, getattr(request, "idx", None), has_meta)


_ARG_NAMES = tuple(f"arg{i}" for i in range(16))


class DocumentUnavailable(LookupError):
    """The model has no ``task_dict`` entry for a request's document."""


class RandomStateMoved(RuntimeError):
    """A callable drew from the global random state: the model, calling it after other
    documents did, would draw something else than keying it here saw."""


class Resolver:
    """Calls a request's callables on its document, as the model would.

    The global random states (``random``, numpy's, torch's) are restored after each call,
    so keying a request never changes what the model itself would draw; a callable that
    moved them raises :class:`RandomStateMoved` (its result depends on what ran before it).
    Nothing is kept: a call of 10,000 image requests must not hold 10,000 decoded images
    (the key builder memoizes digests instead).
    """

    def __init__(self, model: Any) -> None:
        self._model = model

    def collection(self, task: Any, split: Any) -> Any:
        """``model.task_dict[task][split]``."""
        try:
            return self._model.task_dict[task][split]
        except (AttributeError, KeyError, IndexError, TypeError) as exc:
            raise DocumentUnavailable(
                f"no {task}/{split} in model.task_dict ({type(exc).__name__}: {exc})"
            ) from exc

    def document(self, address: tuple[Any, Any, Any]) -> Any:
        """``model.task_dict[task][split][doc_id]``."""
        task, split, doc_id = address
        try:
            return self._model.task_dict[task][split][doc_id]
        except (AttributeError, KeyError, IndexError, TypeError) as exc:
            raise DocumentUnavailable(
                f"no document {task}/{split}/{doc_id} in model.task_dict ({type(exc).__name__}: {exc})"
            ) from exc

    def resolve(self, fn: Any, address: tuple[Any, Any, Any]) -> Any:
        """``fn(document)``.

        Raises:
            DocumentUnavailable: no task_dict entry for the document.
            RandomStateMoved: ``fn`` drew from a global random state.
            Exception: whatever ``fn`` raises.
        """
        constant = document_free_result(fn)
        if constant is not NEEDS_DOCUMENT:
            return constant
        doc = self.document(address)
        states = _save_random_states()
        try:
            result = fn(doc)
            moved = _moved(states)
        finally:
            _restore_random_states(states)
        if moved:
            raise RandomStateMoved(f"{getattr(fn, '__qualname__', 'a request callable')} drew from the {moved} "
                                   "random state")  # fmt: skip
        return result


NEEDS_DOCUMENT = object()


def document_free_result(fn: Any) -> Any:
    """What lmms-eval's own ``ConfigurableTask.doc_to_visual`` returns without reading the
    document: for a task whose ``doc_to_visual`` is neither a column name nor a function
    (a text-only task), the configured value itself (``None``).

    Reading a row of a ``datasets`` dataset costs ~0.1-0.2 ms (the whole row is converted),
    more than everything else a text hit costs; a text task asks for no row at all. Only
    the harness's unmodified method qualifies (a subclass overriding it does not), so the
    answer is exactly what the call would give.
    """
    task_module = sys.modules.get("lmms_eval.api.task")
    if task_module is None or getattr(fn, "__func__", None) is not _original_doc_to_visual(task_module):
        return NEEDS_DOCUMENT
    configured = getattr(getattr(fn.__self__, "config", None), "doc_to_visual", NEEDS_DOCUMENT)
    if configured is NEEDS_DOCUMENT or type(configured) is str or callable(configured):
        return NEEDS_DOCUMENT
    return configured


def _original_doc_to_visual(task_module: Any) -> Any:
    task_class = getattr(task_module, "ConfigurableTask", None)
    return getattr(task_class, "doc_to_visual", None) if task_class is not None else None


def _save_random_states() -> list[tuple[str, Any, Any, Any]]:
    """(name, setter, getter, state) of each global random state there is."""
    states: list[tuple[str, Any, Any, Any]] = [("Python", random.setstate, random.getstate, random.getstate())]
    np = sys.modules.get("numpy")
    if np is not None:
        states.append(("numpy", np.random.set_state, np.random.get_state, np.random.get_state()))
    torch = sys.modules.get("torch")
    if torch is not None and hasattr(torch, "get_rng_state"):
        states.append(("torch", torch.set_rng_state, torch.get_rng_state, torch.get_rng_state()))
    return states


def _moved(states: list[tuple[str, Any, Any, Any]]) -> str | None:
    """The name of the first random state that differs from what it was saved as."""
    for name, _, getter, before in states:
        after = getter()
        if name == "Python":
            same = after == before
        elif name == "numpy":
            same = after[0] == before[0] and after[2:] == before[2:] and bool((after[1] == before[1]).all())
        else:
            same = bool((after == before).all())
        if not same:
            return name
    return None


def _restore_random_states(states: list[tuple[str, Any, Any, Any]]) -> None:
    for _, setter, _, state in states:
        setter(state)
