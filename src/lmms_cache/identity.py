"""A stable identity of the wrapped model: what it is, never where or how it runs.

Derived (when no ``model_id`` is given) from:

* the class (module and qualified name);
* its plain-valued settings (``str``, numbers, ``bool``, ``None`` and containers of them),
  leading underscores ignored when judging a name;
* the checkpoint of every wrapped Hugging Face model it holds (``config._name_or_path``,
  ``config._commit_hash``, ``dtype``);
* the base URL of an API client it holds.

Left out: process-local and operational values (rank, world size, device, device_map,
batch sizes, timeouts, retries, concurrency, logging, cache settings, counters) so that
rank 0 and rank 7 of one run share entries; and secrets (API keys, tokens, passwords,
credentials in URLs), which reach neither the key, the store nor a log. A name is secret
when one of its words is (``hf_token``), so ``max_new_tokens`` stays a setting.

The identity is taken when the model is wrapped: plain attributes a model changes as it
runs would otherwise move it (a pickled proxy carries its identity along).
"""

from __future__ import annotations

import json
import logging
import re
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from .fingerprint import Encoder

__all__ = ["ModelIdentity", "identify"]

log = logging.getLogger("lmms_cache")

# A name is secret when one of its words is (``hf_token``, ``authToken``, ``api_key``), not
# when it merely contains one: ``max_new_tokens`` and ``author`` are settings.
_SECRET_WORDS = frozenset({
    "token", "secret", "secrets", "password", "passwd", "pwd", "credential", "credentials",
    "auth", "oauth", "authorization", "cookie", "cookies", "apikey", "bearer",
})  # fmt: skip
_SECRET_NAME = re.compile(r"(api_?key|private_?key|access_?key|secret_?key|passw(or)?d)", re.I)
_CAMEL = re.compile(r"([a-z0-9])([A-Z])")
_OPERATIONAL = re.compile(
    r"^(rank|local_rank|global_rank|process_index|world_size|num_processes|device|devices|"
    r"device_map|.*batch_size.*|.*timeout.*|.*retr(y|ies).*|.*backoff.*|.*concurren.*|"
    r"max_workers|num_workers|num_threads|accelerator|distributed_type|verbose|verbosity|"
    r"log(ger|ging)?(_.*)?|.*_log|.*log_dir|cache_.*|.*_cache_dir|.*cache_path|use_cache|"
    r"task_dict|progress.*|.*_bar|prefix_aware_queue|prefix_hash_chars|adaptive_.*|"
    r"continual_mode|response_persistent_.*|rate_limit.*|.*_pid|pid|"
    r"start_time|.*_queue|.*_lock|.*_semaphore|.*counter.*)$"
)
_NAME_HINT = re.compile(r"(pretrained|model_name|model_version|model_id|checkpoint|name_or_path|model_path|^model$|engine|^path$)")
_SECRET_IN_TEXT = re.compile(r"((api_?key|token|secret|password)\s*[=:]\s*)[^,\s&]+", re.I)
_URL_IN_TEXT = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://[^\s'\"<>]+")
_PLAIN = (str, int, float, bool, type(None))


@dataclass(frozen=True)
class ModelIdentity:
    """What a model is, for the key: ``description`` (JSON, no secrets) and its ``digest``."""

    description: dict[str, Any]
    digest: str  # 32 hex characters

    @property
    def label(self) -> str:
        """A short human name: the model_id, else class and checkpoint."""
        d = self.description
        if "model_id" in d:
            return str(d["model_id"])
        name = d["class"].rsplit(".", 1)[-1]
        names = [c.get("name_or_path") for c in d.get("checkpoints", ())] + [
            v for k, v in d.get("settings", {}).items() if _NAME_HINT.search(k) and isinstance(v, str)
        ]
        return f"{name}({names[0]})" if names else name

    def json(self) -> str:
        return json.dumps(self.description, sort_keys=True, default=str)


def identify(model: Any, model_id: str | None = None) -> ModelIdentity:
    """The identity of ``model``; ``model_id`` replaces the derived one when given."""
    if model_id is not None:
        if not isinstance(model_id, str) or not model_id:
            raise ValueError(f"model_id must be a non-empty string, not {model_id!r}")
        description: dict[str, Any] = {"model_id": model_id}
    else:
        description = _derive(model)
        if not description.get("checkpoints") and not any(
            _NAME_HINT.search(k) for k in description["settings"]
        ):
            log.warning(
                "lmms-cache: found no checkpoint or model name on %s; two instances of it "
                "with different weights would share cache entries. Pass cached(model, "
                "model_id=...) to name the model.", description["class"],
            )
    digest = Encoder().digest(description).hex()
    return ModelIdentity(description, digest)


def _is_secret(name: str) -> bool:
    if _SECRET_NAME.search(name):
        return True
    words = re.split(r"[^a-z0-9]+", _CAMEL.sub(r"\1_\2", name).lower())
    return any(w in _SECRET_WORDS for w in words)


def _derive(model: Any) -> dict[str, Any]:
    cls = type(model)
    settings: dict[str, Any] = {}
    checkpoints: list[dict[str, Any]] = []
    clients: list[str] = []
    for name, value in sorted(_attributes(model).items()):
        bare = name.lstrip("_").lower()
        if _is_secret(name) or _OPERATIONAL.match(bare):
            continue
        if _is_plain(value):
            settings[bare] = _scrub(value)
            continue
        try:  # arbitrary objects: a property may raise anything
            checkpoint = _checkpoint(value)
            url = getattr(value, "base_url", None)
        except Exception:
            continue
        if checkpoint:
            checkpoints.append(checkpoint)
        if url is not None and not callable(url):
            clients.append(_scrub_url(str(url)))
    description: dict[str, Any] = {"class": f"{cls.__module__}.{cls.__qualname__}", "settings": settings}
    if checkpoints:
        description["checkpoints"] = sorted(checkpoints, key=json.dumps)
    if clients:
        description["clients"] = sorted(set(clients))
    return description


def _attributes(model: Any) -> dict[str, Any]:
    try:
        return dict(vars(model))
    except TypeError:  # __slots__ classes
        names = [n for c in type(model).__mro__ for n in getattr(c, "__slots__", ())]
        return {n: getattr(model, n) for n in names if hasattr(model, n)}


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


def _scrub(v: Any) -> Any:
    """Remove secrets from plain values: secret-named keys, credentials in text and URLs."""
    if isinstance(v, str):
        if "://" in v:
            v = _URL_IN_TEXT.sub(lambda m: _scrub_url(m.group()), v)
        return _SECRET_IN_TEXT.sub(r"\1***", v)
    if isinstance(v, (list, tuple)):
        return [_scrub(x) for x in v]
    if isinstance(v, Mapping):
        return {k: _scrub(x) for k, x in v.items() if not _is_secret(k)}
    return v


def _scrub_url(url: str) -> str:
    try:
        parts = urllib.parse.urlsplit(url)
    except ValueError:  # malformed: at least drop user:password@
        return re.sub(r"//[^/]*@", "//", url)
    netloc = parts.netloc.rpartition("@")[2]  # host[:port] without user:password@
    query = urllib.parse.urlencode(
        [(k, val) for k, val in urllib.parse.parse_qsl(parts.query) if not _is_secret(k)]
    )
    return urllib.parse.urlunsplit((parts.scheme, netloc, parts.path.rstrip("/"), query, ""))


def _checkpoint(value: Any) -> dict[str, Any] | None:
    """Name, revision and dtype of a Hugging Face model (or a wrapper holding one)."""
    for candidate in (value, getattr(value, "model", None), getattr(value, "_model", None)):
        # A model carries .config; a bare PretrainedConfig is its own config.
        config = getattr(candidate, "config", None) or candidate
        name = getattr(config, "_name_or_path", None)
        if isinstance(name, str) and name:
            found: dict[str, Any] = {"name_or_path": name}
            commit = getattr(config, "_commit_hash", None)
            if isinstance(commit, str):
                found["commit"] = commit
            dtype = getattr(candidate, "dtype", None)
            if dtype is not None:
                found["dtype"] = str(dtype)
            return found
    return None


def model_id_from_arguments(harness: str, name: str, arguments: Mapping[str, Any]) -> str:
    """A ``model_id`` for a model a harness builds from its name and ``--model_args``.

    Operational arguments and secrets are left out, as for a derived identity; the rest
    is sorted, so argument order never matters.

    Example:
        >>> model_id_from_arguments("lmms-eval", "openai", {"model_version": "gpt-4o",
        ...     "api_key": "sk-123", "num_concurrent": 8})
        'lmms-eval/openai?model_version=gpt-4o'
    """
    kept = []
    for key in sorted(arguments):
        bare = key.lstrip("_").lower()
        if _is_secret(bare) or _OPERATIONAL.match(bare):
            continue
        value = _scrub(arguments[key])
        kept.append(f"{key}={json.dumps(value) if not isinstance(value, str) else value}")
    return f"{harness}/{name}" + ("?" + "&".join(kept) if kept else "")
