"""Observers of the proxy's calls: they watch, and never take part.

* :class:`Explainer` says why a request misses: in a DEBUG line per miss while a call
  runs (it is told about the misses), and for ``lm.cache_explain(method, requests)``.
* :class:`HitCounter` tallies hits per key (``lmms-cache eval``'s summary line).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from .engine import Clock, Observer
from .explain import describe, explain_against
from .identity import ModelIdentity
from .identity import differences as identity_differences
from .key import KeyBuilder, RequestKey
from .tiers import Tiers

__all__ = ["Explainer", "HitCounter"]

log = logging.getLogger("lmms_cache")


class Explainer(Observer):
    """What differs between a missed request and the nearest stored entries of the same
    document or prompt (``gen_kwargs.max_new_tokens: 16 → 32``, ``model identity changed``).

    Args:
        tiers: where the stored entries are.
        keys: the proxy's key builder (to key requests for :meth:`explain`).
        identity: the model identity now.
        clock, max_age: what counts as stored (expiry).
    """

    def __init__(self, tiers: Tiers, keys: KeyBuilder, identity: Callable[[], ModelIdentity], clock: Clock,
                 max_age: float | None) -> None:  # fmt: skip
        self.tiers = tiers
        self.keys = keys
        self.identity = identity
        self.clock = clock
        self.max_age = max_age

    def misses(self, method: str, missed: Sequence[RequestKey], described: Mapping[bytes, tuple[str, str | None]]) -> None:
        if not log.isEnabledFor(logging.DEBUG):
            return
        for rk in missed:
            assert rk.key is not None
            log.debug("lmms-cache %s miss %s: %s", method, rk.key.hex()[:12], self.why(method, rk, described[rk.key]))

    def explain(self, method: str, requests: Sequence[Any]) -> list[str]:
        """One line per request: ``"hit"``, ``"uncacheable: …"`` or ``"miss: …"``. Keys
        without counting (samples are not used up) and never calls the model."""
        keys = self.keys.keys(method, list(requests), count=False)
        fresh = None if self.max_age is None else self.clock.time() - self.max_age
        stored = self.tiers.present([rk.key for rk in keys if rk.key is not None], fresh)
        out = []
        for rk in keys:
            if rk.key is None:
                out.append(f"uncacheable: {rk.bypass_reason}")
            elif rk.key in stored:
                out.append("hit")
            else:
                out.append("miss: " + self.why(method, rk, describe(rk)))
        return out

    def why(self, method: str, rk: RequestKey, described: tuple[str, str | None]) -> str:
        """What differs between a missed request (``describe(rk)``) and the nearest stored entry."""
        description, prompt = described
        rv = rk.view
        candidates = self.tiers.similar(
            method, task=None if rv is None or rv.task is None else str(rv.task),
            doc_id=None if rv is None or rv.doc_id is None else str(rv.doc_id), prompt=prompt,
        )  # fmt: skip
        return explain_against(description, candidates, self.model_change)

    def model_change(self, digest: str) -> list[str] | None:
        """What differs between the stored model identity ``digest`` and the model now."""
        old = self.tiers.models().get(digest)
        if old is None:
            return None
        try:
            return identity_differences(json.loads(old), self.identity().description) or None
        except ValueError:
            return None


class HitCounter(Observer):
    """Hits per key, as the proxy records them (at the latest when it is closed)."""

    def __init__(self) -> None:
        self.counts: dict[bytes, int] = {}

    def hits(self, counts: Mapping[bytes, int]) -> None:
        for key, n in counts.items():
            self.counts[key] = self.counts.get(key, 0) + n
