"""Why did this miss? Name what differs from the nearest stored entry.

Every entry stores a digest of each key component (model identity, method, the prompt,
each generation setting, each media argument) and the readable value of each setting.
A miss is compared with the stored entries of the same document or the same prompt, and
the one with the fewest differences explains it: ``gen_kwargs.max_new_tokens: 16 → 32``,
``visual: content changed``, ``model identity changed``.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from typing import Any

import xxhash

from .fingerprint import Encoder
from .key import RequestKey
from .store import Entry

__all__ = ["describe", "differences", "explain_against"]

_SHORT = 40
_ORDER = {"model": 0, "method": 1}


def describe(rk: RequestKey) -> tuple[str, str | None]:
    """(components JSON, prompt digest) of a request: what an entry stores to explain misses.

    Call it before the model sees the request: the readable setting values are taken from
    the request as it is now, and models change ``gen_kwargs`` in place.
    """
    digests = rk.components()
    values: dict[str, str] = {}
    if rk.view is not None:
        # Settings one by one: computed here, for misses only, so that keying a hit stays
        # one pass over the request.
        encoder = Encoder()
        for part in rk.view.parts:
            if part.role == "value" and isinstance(part.value, Mapping):
                for k, v in part.value.items():
                    name = f"{part.name}.{k}"
                    digests[name] = xxhash.xxh3_64_hexdigest(encoder.encode(k) + encoder.encode(v))
                    values[name] = _short(v)
    prompt = digests.get("context") or digests.get("arg0")
    return json.dumps({"d": digests, "v": values}, separators=(",", ":"), sort_keys=True), prompt


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
            out.append("model identity changed")
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


def explain_against(description: str, candidates: Iterable[Entry]) -> str:
    """One line: why a request described by ``description`` matches none of ``candidates``."""
    new = json.loads(description)
    best: list[str] | None = None
    for entry in candidates:
        if not entry.components:
            continue
        diffs = differences(new, json.loads(entry.components))
        if best is None or len(diffs) < len(best):
            best = diffs
    if best is None:
        return "nothing stored for this document or prompt"
    return "; ".join(best) if best else "an entry with identical components exists (another key schema?)"


def _short(value: Any) -> str:
    t = type(value)
    if t is str:
        text = repr(value)
    elif t is int or t is float or t is bool or value is None:
        text = "null" if value is None else "true" if value is True else "false" if value is False else repr(value)
    else:
        text = json.dumps(value, default=str, ensure_ascii=False)
    return text if len(text) <= _SHORT else text[: _SHORT - 1] + "…"
