"""Why did this miss? Name what differs from the nearest stored entry.

Every entry stores a digest of each key component (model identity, method, the prompt,
each generation setting, each media argument) and the readable value of each setting.
A miss is compared with the stored entries of the same document or the same prompt, and
the one with the fewest differences explains it: ``gen_kwargs.max_new_tokens: 16 → 32``,
``visual: content changed``, ``model identity changed``.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import xxhash

from .fingerprint import Encoder
from .key import RequestKey
from .store import Entry

__all__ = ["describe", "differences", "explain_against"]

_SHORT = 40
# A JSON string literal (the C function json.dumps uses for strings).
_json_str = json.encoder.encode_basestring_ascii
_ORDER = {"model": 0, "method": 1}


def describe(rk: RequestKey, memo: dict[bytes, tuple[str, str]] | None = None) -> tuple[str, str | None]:
    """(components JSON, prompt digest or None) of a request: what an entry stores to explain
    misses.

    The JSON is ``{"d": {component: digest}, "v": {setting: readable value}}``, with each
    setting of a mapping argument (``gen_kwargs.max_new_tokens``) a component of its own.
    Call it before the model sees the request: the readable setting values are taken from
    the request as it is now, and models change ``gen_kwargs`` in place. ``memo`` (one per
    call) shares the work for settings whose canonical bytes are the same: an evaluator's
    requests nearly all carry equal ``gen_kwargs``.
    """
    span_list = rk.spans()
    digests = rk.components(span_list)
    d_parts = [f"{_quoted(name)}:{_json_str(d)}" for name, d in digests.items()]
    v_parts = []
    if rk.view is not None:
        # Settings one by one: computed here, for misses only, so that keying a hit stays
        # one pass over the request.
        spans = {name: (a, b) for name, a, b in span_list}
        for part in rk.view.parts:
            if part.role != "value" or not isinstance(part.value, Mapping):
                continue
            span = spans.get(part.name)
            canonical = part.name.encode() + b"\0" + rk.material[span[0] : span[1]] if span else None
            found = memo.get(canonical) if memo is not None and canonical is not None else None
            if found is None:
                found = _settings(part.name, part.value)
                if memo is not None and canonical is not None:
                    memo[canonical] = found
            if found[0]:
                d_parts.append(found[0])
                v_parts.append(found[1])
    # The prompt digest finds the entries to compare with only for requests without a
    # document (those are found by task and doc_id): a random value per row would cost an
    # index page write per stored row.
    prompt = digests.get("context") or digests.get("arg0") if rk.view is None or rk.view.address is None else None
    return '{"d":{' + ",".join(d_parts) + '},"v":{' + ",".join(v_parts) + "}}", prompt


_QUOTED: dict[str, str] = {}


def _quoted(name: str) -> str:
    """A component name as a JSON string (a dozen distinct names: quoted once each)."""
    found = _QUOTED.get(name)
    if found is None:
        found = _json_str(name)
        if len(_QUOTED) < 4096:
            _QUOTED[name] = found
    return found


def _settings(name: str, mapping: Mapping[Any, Any]) -> tuple[str, str]:
    """Each setting's digest and readable value, named ``name.setting``, as the members of
    two JSON objects."""
    encoder = Encoder()
    digests, values = [], []
    for k, v in mapping.items():
        full = _json_str(f"{name}.{k}")
        digests.append(f"{full}:{_json_str(xxhash.xxh3_64_hexdigest(encoder.encode(k) + encoder.encode(v)))}")
        values.append(f"{full}:{_json_str(_short(v))}")
    return ",".join(digests), ",".join(values)


def differences(new: Mapping[str, Any], old: Mapping[str, Any]) -> list[str]:
    """What differs between two described requests (``describe``'s JSON, parsed)."""
    d_new, d_old = new.get("d", {}), old.get("d", {})
    v_new, v_old = new.get("v", {}), old.get("v", {})
    out = []
    settings_changed = {name.split(".", 1)[0] for name in set(d_new) | set(d_old)
                        if "." in name and d_new.get(name) != d_old.get(name)}  # fmt: skip
    for name in sorted(set(d_new) | set(d_old), key=lambda n: (_ORDER.get(n, 2), n)):
        a, b = d_old.get(name), d_new.get(name)
        if a == b or name in settings_changed:  # a mapping is named by the settings that changed
            continue
        if name == "model":
            out.append(_MODEL_CHANGED)
        elif name == "occurrence":
            out.append(f"sample #{int(b) + 1 if b is not None else '?'} is not stored yet" if b is not None
                       else "sampled then, deterministic now")  # fmt: skip
        elif a is None:
            out.append(f"{name} added" + (f": {v_new[name]}" if name in v_new else ""))
        elif b is None:
            out.append(f"{name} removed" + (f" (was {v_old[name]})" if name in v_old else ""))
        elif name in v_new or name in v_old:
            out.append(f"{name}: {v_old.get(name, '?')} → {v_new.get(name, '?')}")
        else:
            out.append(f"{name}: content changed")
    return out


def explain_against(description: str, candidates: Iterable[Entry],
                    model_change: Callable[[str], list[str] | None] | None = None) -> str:  # fmt: skip
    """One line: why a request described by ``description`` matches none of ``candidates``.

    ``model_change(digest)`` names what differs between the model identity ``digest`` of a
    stored entry and the model now (``model code changed: x.py``), when it can.
    """
    new = json.loads(description)
    best: list[str] | None = None
    best_entry: Entry | None = None
    for entry in candidates:
        if not entry.components:
            continue
        diffs = differences(new, json.loads(entry.components))
        if best is None or len(diffs) < len(best):
            best, best_entry = diffs, entry
    if best is None:
        return "nothing stored for this document or prompt"
    if model_change is not None and best_entry is not None and _MODEL_CHANGED in best:
        named = model_change(best_entry.model)
        if named:
            at = best.index(_MODEL_CHANGED)
            best[at : at + 1] = named
    return "; ".join(best) if best else "an entry with identical components exists (another key schema?)"


_MODEL_CHANGED = "model identity changed"


def _short(value: Any) -> str:
    t = type(value)
    if t is str:
        text = repr(value)
    elif t is int or t is float or t is bool or value is None:
        text = "null" if value is None else "true" if value is True else "false" if value is False else repr(value)
    else:
        text = json.dumps(value, default=str, ensure_ascii=False)
    return text if len(text) <= _SHORT else text[: _SHORT - 1] + "…"
