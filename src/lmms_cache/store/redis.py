"""A Redis server as the store: one cache for every machine of a cluster, or for a team.

``RedisStore("redis://host:6379/0?prefix=team-a")``. Redis is run as a *store*, not as a
cache: what it holds are responses someone paid for, so the design follows what a real
server does when things go wrong (issue 13).

**Layout.** Every key lives under one prefix with one hash tag, ``lmc:{team-a}:``, so that
one Lua function may touch all of them (also on a Redis Cluster: one slot). With ``P`` that
prefix and ``K`` an entry's 16 key bytes (raw, not hex: half the memory):

====================  ===================================================================
``P v:K``             string: the header (format byte, creation time, origin, signature,
                      deps; see :data:`_HEADER`) then the value's envelope. All a hit needs,
                      so a lookup is one ``MGET``.
``P m:K``             string: the rest of the metadata, a compact JSON array (model,
                      method, task, split, typed doc_id, model seconds, raw size, size,
                      prompt, key schema), a NUL, then the components (zstd when smaller):
                      read by management and by the functions that delete or replace it.
``P u``               sorted set: K by last use (``used_at``): LRU eviction, ``recent_first``.
``P c``               sorted set: K by creation time: ``--older-than``, oldest-first scans.
``P h``               hash: K -> hit count (only entries with hits).
``P i:d:<task>``      hash per task (``n`` for none, ``s:<task>`` otherwise): document ->
                      the 16-byte keys of its entries, packed (the document as ``i:17`` or
                      ``s:17``: the id keeps its type). Its values are the task's entries.
``P i:t:<task>``      set: K of the task's entries without a document.
``P i:m:<model>``     set of K per model identity digest.
``P i:p``             hash: prompt digest -> the packed keys of entries without a document.
``P t``               hash: totals, exact: ``n`` entries, ``b`` value bytes, ``r`` raw bytes,
                      ``h`` hits, ``s`` model seconds saved by hits, ``ms`` model seconds.
``P g:m`` / ``g:t``   sets of the models / tasks / key schemas present; ``P g:m:<model>``,
/ ``g:s``             ``g:t:<task>``, ``g:s:<schema>``: the same counters per group
                      (``summary`` reads them, never the entries).
``P models``          hash: model identity digest -> its description.
``P layout``          the layout's name and version: a newer one is refused.
====================  ===================================================================

**Writes** are Redis functions (``FUNCTION LOAD``, library ``lmc_<digest of the code>``, so
clients of different versions never replace each other's code). A batch is one function
call: atomic (no other client sees half of it, and a server killed in the middle of it
keeps none of it: its effects reach the append-only file together, after it ran), and
idempotent (run twice, it leaves what it left once): a batch whose reply was lost with a
broken connection is sent again. Functions that may grow memory carry no ``allow-oom`` flag, so a server
over ``maxmemory`` rejects the whole batch before its first write; deleting and evicting
carry it, so a full server can still be pruned. Functions rather than ``EVALSHA``: the
flags, and they survive ``SCRIPT FLUSH`` and reach replicas and the append-only file with
the data. A server without functions (Redis before 7) is served by ``EVALSHA`` of the same
code, where OOM is checked at a script's first write: also never a partial batch.

**Eviction and expiry are ours.** Redis' own eviction drops a value without its metadata
(or the reverse), and ``EXPIRE`` does the same: the store needs ``maxmemory-policy
noeviction`` and ``appendonly yes``, checks both with ``CONFIG GET`` when it connects and
warns once when they differ (or once that it could not check, where ``CONFIG`` is disabled).
``max_size`` is :meth:`RedisStore.evict` over ``P u``; ``expire_after`` compares the creation
time in the value's header on the client.

**A server that goes away never stops the evaluation.** Connecting gives up after
``connect_timeout`` (1.5 s), a reply after ``socket_timeout`` (3 s); a broken connection is
retried once, a timeout never; then every call fails at once with :class:`StoreError` for
``breaker_seconds`` (30 s) before the server is tried again (the URL's ``connect_timeout``,
``timeout`` and ``breaker`` set them). The proxy opens the store ``lazy``: nothing is
contacted until the first call, so a run started while the server is down finds it once
it is back. The proxy turns the errors into misses (the model answers) and says so once
per outage; the store, made ``quiet``, then logs its own account at INFO.

Hit counts are at least once (a ``touch`` replayed after a lost reply counts twice); entry
and byte totals are exact. Management operations over many entries (``delete``,
``delete_where``, ``evict``) run in chunks of :data:`_CHUNK` entries, each atomic, so that
they never block a shared server for long.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import re
import struct
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .base import LEGACY_KEY_SCHEMA, Entry, Store, Stored, StoreError, Where, doc_id_forms, storable_doc_id

if TYPE_CHECKING:
    import redis as _redis

__all__ = ["PASSWORD_ENV", "RedisStore", "RedisTarget", "parse_url", "redact"]

log = logging.getLogger("lmms_cache")

PASSWORD_ENV = "LMMS_CACHE_REDIS_PASSWORD"
"""The environment variable holding the server's password when the URL has none."""

LAYOUT = b"lmms-cache/redis/1"
_LAYOUT_NAME = b"lmms-cache/redis/"
_KEY_BYTES = 16
_HEADER = struct.Struct(">BdiiI")  # format, created_at, origin length, signature length, deps length
_HEADER_FORMAT = 1
_NONE = -1  # a length that stands for None (origin, signature)
_NO_DEPS = 0xFFFFFFFF
_HEAD_READ = 256  # bytes of a value read when only its header is wanted (values=False)
_LOOKUP_CHUNK = 1000  # keys per MGET
_SCAN_PAGE = 256  # entries per round trip of scan()
_CHUNK = 500  # entries per call of a deleting function
_PREFIX_RE = re.compile(r"[A-Za-z0-9._-]{1,64}")
_META_VERSION = 1
_NO_COMPONENTS, _RAW_COMPONENTS, _ZSTD_COMPONENTS = 0, 1, 2
_COMPRESS_COMPONENTS = 128  # components of at least this many bytes are tried with zstd
_local = threading.local()  # zstd (de)compressors are not thread-safe


# -- the Lua functions ------------------------------------------------------------------------

# Shared by every function. ``P`` is the prefix (ARGV[1]); KEYS[1] is ``P t`` (it routes the
# call to the right node of a cluster; every key shares its hash tag). Nothing here may fail
# after a first write: Redis does not undo a script's writes when it raises, so every value
# read is checked (pcall for JSON) and every number written is formatted here.
_LUA_COMMON = r"""
local function fmt_int(x) return string.format('%d', x) end
local function fmt_float(x) return string.format('%.17g', x) end

local function new_deltas() return {order = {}, groups = {}} end

local function group(d, hk, reg, member)
  local g = d.groups[hk]
  if not g then
    g = {reg = reg, member = member, n = 0, b = 0, r = 0, h = 0, s = 0, ms = 0}
    d.groups[hk] = g
    d.order[#d.order + 1] = hk
  end
  return g
end

-- Count an entry in (sign 1) or out (sign -1) of the totals and its groups.
local function count(d, P, sign, model, task_enc, schema, size, raw, hits, secs)
  local gs = {group(d, P .. 't', false, false),
              group(d, P .. 'g:m:' .. model, P .. 'g:m', model),
              group(d, P .. 'g:t:' .. task_enc, P .. 'g:t', task_enc),
              group(d, P .. 'g:s:' .. schema, P .. 'g:s', schema)}
  for _, g in ipairs(gs) do
    g.n = g.n + sign
    g.b = g.b + sign * size
    g.r = g.r + sign * raw
    g.h = g.h + sign * hits
    g.s = g.s + sign * hits * secs
    g.ms = g.ms + sign * secs
  end
end

local function count_hits(d, P, model, task_enc, schema, hits, secs)
  local gs = {group(d, P .. 't', false, false),
              group(d, P .. 'g:m:' .. model, P .. 'g:m', model),
              group(d, P .. 'g:t:' .. task_enc, P .. 'g:t', task_enc),
              group(d, P .. 'g:s:' .. schema, P .. 'g:s', schema)}
  for _, g in ipairs(gs) do
    g.h = g.h + hits
    g.s = g.s + hits * secs
  end
end

local function apply(d)
  for _, hk in ipairs(d.order) do
    local g = d.groups[hk]
    if g.n ~= 0 then redis.call('HINCRBY', hk, 'n', fmt_int(g.n)) end
    if g.b ~= 0 then redis.call('HINCRBY', hk, 'b', fmt_int(g.b)) end
    if g.r ~= 0 then redis.call('HINCRBY', hk, 'r', fmt_int(g.r)) end
    if g.h ~= 0 then redis.call('HINCRBY', hk, 'h', fmt_int(g.h)) end
    if g.s ~= 0 then redis.call('HINCRBYFLOAT', hk, 's', fmt_float(g.s)) end
    if g.ms ~= 0 then redis.call('HINCRBYFLOAT', hk, 'ms', fmt_float(g.ms)) end
    local n = tonumber(redis.call('HGET', hk, 'n') or '0') or 0
    if g.reg then
      if n <= 0 then
        redis.call('DEL', hk)
        redis.call('SREM', g.reg, g.member)
      else
        redis.call('SADD', g.reg, g.member)
      end
    elseif n <= 0 then
      -- no entries: no drift of sums of floats either
      redis.call('HSET', hk, 'n', '0', 'b', '0', 'r', '0', 'h', '0', 's', '0', 'ms', '0')
    end
  end
end

-- Packed lists of 16-byte keys (the document and prompt indexes).
local function packed_find(packed, k)
  for i = 1, #packed, 16 do
    if string.sub(packed, i, i + 15) == k then return i end
  end
  return nil
end

local function packed_add(h, f, k)
  local cur = redis.call('HGET', h, f)
  if not cur then
    redis.call('HSET', h, f, k)
  elseif not packed_find(cur, k) then
    redis.call('HSET', h, f, cur .. k)
  end
end

local function packed_del(h, f, k)
  local cur = redis.call('HGET', h, f)
  if not cur then return end
  local i = packed_find(cur, k)
  if not i then return end
  local rest = string.sub(cur, 1, i - 1) .. string.sub(cur, i + 16)
  if rest == '' then redis.call('HDEL', h, f) else redis.call('HSET', h, f, rest) end
end

-- What the indexes and counters need of a stored entry's metadata (nil: unreadable).
local function parse(meta)
  local cut = string.find(meta, '\0', 1, true)  -- the JSON part ends at the first NUL
  if cut then meta = string.sub(meta, 1, cut - 1) end
  local ok, t = pcall(cjson.decode, meta)
  if not ok or type(t) ~= 'table' or type(t[2]) ~= 'string' or type(t[11]) ~= 'string' then
    return nil
  end
  local task_enc = 'n'
  if type(t[4]) == 'string' then task_enc = 's:' .. t[4] end
  local doc = ''
  if type(t[6]) == 'string' then doc = t[6] end
  local prompt = ''
  if type(t[10]) == 'string' then prompt = t[10] end
  return {model = t[2], task_enc = task_enc, doc = doc, prompt = prompt, schema = t[11],
          secs = tonumber(t[7]) or 0, raw = tonumber(t[8]) or 0, size = tonumber(t[9]) or 0}
end

-- A task's entries are its documents' (P i:d:<task>) and those without one (P i:t:<task>).
local function index(P, k, m)
  if m.doc ~= '' then
    packed_add(P .. 'i:d:' .. m.task_enc, m.doc, k)
  else
    redis.call('SADD', P .. 'i:t:' .. m.task_enc, k)
  end
  redis.call('SADD', P .. 'i:m:' .. m.model, k)
  if m.prompt ~= '' then packed_add(P .. 'i:p', m.prompt, k) end
end

local function unindex(P, k, m)
  if m.doc ~= '' then
    packed_del(P .. 'i:d:' .. m.task_enc, m.doc, k)
  else
    redis.call('SREM', P .. 'i:t:' .. m.task_enc, k)
  end
  redis.call('SREM', P .. 'i:m:' .. m.model, k)
  if m.prompt ~= '' then packed_del(P .. 'i:p', m.prompt, k) end
end

-- Remove one entry entirely; its size, or nil when it was not there.
local function remove(P, d, k)
  local mk = P .. 'm:' .. k
  local meta = redis.call('GET', mk)
  if not meta then return nil end
  local hits = tonumber(redis.call('HGET', P .. 'h', k) or '0') or 0
  local m = parse(meta)
  redis.call('DEL', P .. 'v:' .. k, mk)
  redis.call('ZREM', P .. 'u', k)
  redis.call('ZREM', P .. 'c', k)
  redis.call('HDEL', P .. 'h', k)
  if not m then return 0 end
  unindex(P, k, m)
  count(d, P, -1, m.model, m.task_enc, m.schema, m.size, m.raw, hits, m.secs)
  return m.size
end

local PUT_FIELDS = 13

-- ARGV: P, replace (1/0), then per entry: key, value, meta, created, used, hits, model,
-- task, doc, prompt, schema, size, raw, model seconds (the last seven as parse() gives them).
local function put(keys, args)
  local P = args[1]
  local replace = args[2] == '1'
  local d = new_deltas()
  local new = 0
  for o = 3, #args, PUT_FIELDS + 1 do
    local k = args[o]
    local mk = P .. 'm:' .. k
    local old = redis.call('GET', mk)
    if not old or replace then
      local hits = tonumber(args[o + 5]) or 0
      if old then
        -- Replacing keeps the hit count, as the SQLite store does.
        hits = tonumber(redis.call('HGET', P .. 'h', k) or '0') or 0
        local m = parse(old)
        if m then
          unindex(P, k, m)
          count(d, P, -1, m.model, m.task_enc, m.schema, m.size, m.raw, hits, m.secs)
        end
      else
        new = new + 1
        if hits > 0 then redis.call('HSET', P .. 'h', k, args[o + 5]) end
      end
      local m = {model = args[o + 6], task_enc = args[o + 7], doc = args[o + 8], prompt = args[o + 9],
                 schema = args[o + 10], size = tonumber(args[o + 11]) or 0, raw = tonumber(args[o + 12]) or 0,
                 secs = tonumber(args[o + 13]) or 0}
      redis.call('SET', P .. 'v:' .. k, args[o + 1])
      redis.call('SET', mk, args[o + 2])
      redis.call('ZADD', P .. 'c', args[o + 3], k)
      redis.call('ZADD', P .. 'u', args[o + 4], k)
      index(P, k, m)
      count(d, P, 1, m.model, m.task_enc, m.schema, m.size, m.raw, hits, m.secs)
    end
  end
  apply(d)
  return new
end

-- ARGV: P, when, then key, hits pairs. Hits of absent keys are dropped.
local function touch(keys, args)
  local P = args[1]
  local when = args[2]
  local d = new_deltas()
  for i = 3, #args, 2 do
    local k = args[i]
    local n = tonumber(args[i + 1]) or 0
    if redis.call('ZSCORE', P .. 'u', k) then
      redis.call('ZADD', P .. 'u', 'GT', when, k)
      if n > 0 then
        redis.call('HINCRBY', P .. 'h', k, fmt_int(n))
        local meta = redis.call('GET', P .. 'm:' .. k)
        local m = meta and parse(meta)
        if m then count_hits(d, P, m.model, m.task_enc, m.schema, n, m.secs) end
      end
    end
  end
  apply(d)
  return 0
end

-- ARGV: P, then keys. Returns how many were there.
local function delete(keys, args)
  local P = args[1]
  local d = new_deltas()
  local removed = 0
  for i = 2, #args do
    if remove(P, d, args[i]) then removed = removed + 1 end
  end
  apply(d)
  return removed
end

-- ARGV: P, max bytes, most entries to remove in this call.
-- Returns {removed, bytes freed, 1 when more must go}.
local function evict(keys, args)
  local P = args[1]
  local max = tonumber(args[2])
  local limit = tonumber(args[3])
  local total = tonumber(redis.call('HGET', P .. 't', 'b') or '0') or 0
  local d = new_deltas()
  local removed, freed = 0, 0
  while total > max and removed < limit do
    local page = redis.call('ZRANGE', P .. 'u', 0, 99)
    if #page == 0 then break end
    for _, k in ipairs(page) do
      if total <= max or removed >= limit then break end
      local size = remove(P, d, k)
      if size then
        removed = removed + 1
        freed = freed + size
        total = total - size
      else
        redis.call('ZREM', P .. 'u', k)  -- not an entry (any more): never in the way again
      end
    end
  end
  apply(d)
  local more = 0
  if total > max then more = 1 end
  return {removed, freed, more}
end
"""

# name -> flags. Writing functions that only free memory may run on a full server.
_FUNCTIONS: dict[str, tuple[str, ...]] = {
    "put": (),
    "touch": (),
    "delete": ("allow-oom",),
    "evict": ("allow-oom",),
}
_CODE_DIGEST = hashlib.sha256((_LUA_COMMON + repr(sorted(_FUNCTIONS.items()))).encode()).hexdigest()[:16]
_LIBRARY = f"lmc_{_CODE_DIGEST}"


def _library_code() -> str:
    lines = [f"#!lua name={_LIBRARY}", _LUA_COMMON]
    for name, flags in _FUNCTIONS.items():
        quoted = ", ".join(f"'{f}'" for f in flags)
        lines.append(f"redis.register_function{{function_name='{_LIBRARY}_{name}', callback={name}, "
                     f"flags={{{quoted}}}}}")  # fmt: skip
    return "\n".join(lines) + "\n"


def _script_code(name: str) -> str:
    return f"{_LUA_COMMON}\nreturn {name}(KEYS, ARGV)\n"


# -- locations ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class RedisTarget:
    """A parsed ``redis://``, ``rediss://`` or ``unix://`` location (see :func:`parse_url`)."""

    scheme: str
    host: str | None
    port: int | None
    path: str | None  # unix socket
    db: int
    prefix: str
    username: str | None
    password: str | None = field(repr=False)
    tls: dict[str, str] = field(default_factory=dict)
    # timeout, connect_timeout, breaker (seconds) given in the URL: not part of the location
    timeouts: dict[str, float] = field(default_factory=dict)

    @property
    def location(self) -> str:
        """The URL without the password (safe to log and to show)."""
        user = f"{urllib.parse.quote(self.username, safe='')}@" if self.username else ""
        query = urllib.parse.urlencode({**self.tls, "prefix": self.prefix})
        if self.scheme == "unix":
            return f"unix://{user}{self.path}?db={self.db}&{query}"
        host = f"[{self.host}]" if self.host and ":" in self.host else self.host
        return f"{self.scheme}://{user}{host}:{self.port}/{self.db}?{query}"

    @property
    def key_prefix(self) -> bytes:
        """What every key of this cache starts with: ``lmc:{prefix}:``."""
        return f"lmc:{{{self.prefix}}}:".encode()


_TLS_OPTIONS = ("ssl_ca_certs", "ssl_certfile", "ssl_keyfile", "ssl_cert_reqs")
_TIMEOUT_OPTIONS = ("timeout", "connect_timeout", "breaker")


def parse_url(url: str, *, environ: Mapping[str, str] | None = None) -> RedisTarget:
    """A Redis location: ``redis://[[user]:password@]host[:port][/db][?prefix=name]``,
    ``rediss://...`` (TLS; ``ssl_ca_certs``, ``ssl_certfile``, ``ssl_keyfile``,
    ``ssl_cert_reqs`` in the query) or ``unix://[[user]:password@]/path.sock[?db=0&prefix=name]``.

    The password is the URL's, else ``$LMMS_CACHE_REDIS_PASSWORD``. ``prefix`` (default
    ``default``) names the cache on the server: letters, digits, ``.``, ``_``, ``-``.
    ``timeout`` (a reply, default 3 s), ``connect_timeout`` (1.5 s) and ``breaker`` (how
    long a failed server is skipped, 30 s) tune the fault handling; they are not part of
    the location.

    Example:
        >>> t = parse_url("redis://:s3cret@cache.lan/2?prefix=team-a", environ={})
        >>> t.location, t.password, t.key_prefix
        ('redis://cache.lan:6379/2?prefix=team-a', 's3cret', b'lmc:{team-a}:')

    Raises:
        StoreError: not such a URL, or an unknown option.
    """
    env = os.environ if environ is None else environ
    try:
        parts = urllib.parse.urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise StoreError(f"not a Redis URL: {_redact(url)} ({exc})") from None
    scheme = parts.scheme.lower()
    if scheme not in ("redis", "rediss", "unix"):
        raise StoreError(f"not a Redis URL (redis://, rediss:// or unix://): {_redact(url)}")
    query: dict[str, str] = {}
    for name, value in urllib.parse.parse_qsl(parts.query, keep_blank_values=True):
        if name in query:
            raise StoreError(f"{_redact(url)}: {name} is given twice")
        query[name] = value
    prefix = query.pop("prefix", "default")
    if not _PREFIX_RE.fullmatch(prefix):
        raise StoreError(f"{_redact(url)}: prefix {prefix!r} must be 1-64 letters, digits, '.', '_' or '-'")
    tls = {name: query.pop(name) for name in _TLS_OPTIONS if name in query}
    timeouts: dict[str, float] = {}
    for name in _TIMEOUT_OPTIONS:
        if name in query:
            text = query.pop(name)
            try:
                timeouts[name] = float(text)
            except ValueError:
                timeouts[name] = -1.0
            if not (0 < timeouts[name] < 86400):
                raise StoreError(f"{_redact(url)}: {name} must be a number of seconds, not {text!r}")
    if tls and scheme != "rediss":
        raise StoreError(f"{_redact(url)}: {', '.join(tls)} need rediss:// (TLS)")
    if tls.get("ssl_cert_reqs", "required") not in ("none", "optional", "required"):
        raise StoreError(f"{_redact(url)}: ssl_cert_reqs is none, optional or required")
    db_text = query.pop("db", None) if scheme == "unix" else None
    if query:
        raise StoreError(f"{_redact(url)}: unknown option(s) {', '.join(sorted(query))} "
                         f"(known: prefix, {', '.join(_TIMEOUT_OPTIONS)}{', db' if scheme == 'unix' else ''}"
                         f"{', ' + ', '.join(_TLS_OPTIONS) if scheme == 'rediss' else ''})")  # fmt: skip
    username = urllib.parse.unquote(parts.username) if parts.username else None
    password = urllib.parse.unquote(parts.password) if parts.password else None
    if password is None:
        password = env.get(PASSWORD_ENV) or None
    if scheme == "unix":
        path = urllib.parse.unquote(parts.path)
        if not path:
            raise StoreError(f"{_redact(url)}: no socket path (unix:///path/to/redis.sock)")
        db = _int(db_text or "0", url, "db")
        return RedisTarget("unix", None, None, path, db, prefix, username, password, timeouts=timeouts)
    if not parts.hostname:
        raise StoreError(f"{_redact(url)}: no host")
    db_path = parts.path.strip("/")
    db = _int(db_path or "0", url, "db")
    return RedisTarget(scheme, parts.hostname, port or 6379, None, db, prefix, username, password, tls, timeouts)


def _int(text: str, url: str, what: str) -> int:
    if not text.isdigit():
        raise StoreError(f"{_redact(url)}: {what} must be a number, not {text!r}")
    return int(text)


def redact(url: str) -> str:
    """``url`` without its password, for messages (also of URLs that do not parse)."""
    return re.sub(r"(//[^/@]*?:)[^/@]*@", r"\1***@", url)


_redact = redact


# -- entries <-> Redis ---------------------------------------------------------------------------


def _task_enc(task: str | None) -> bytes:
    return b"n" if task is None else b"s:" + task.encode("utf-8", "surrogatepass")


def _doc_enc(doc_id: int | str | None) -> str | None:
    stored = storable_doc_id(doc_id)
    if stored is None:
        return None
    return f"i:{stored}" if isinstance(stored, int) else f"s:{stored}"


def _doc_dec(enc: str | None) -> int | str | None:
    if enc is None:
        return None
    return int(enc[2:]) if enc.startswith("i:") else enc[2:]


def _finite(x: float) -> float:
    # A NaN or infinite model time would poison the float sums (HINCRBYFLOAT refuses them).
    return float(x) if math.isfinite(x) else 0.0


def _utf8(text: str) -> bytes:
    return text.encode("utf-8", "surrogatepass")


def _header(created_at: float, origin: str | None, signature: bytes | None, deps: bytes | None) -> bytes:
    o = b"" if origin is None else _utf8(origin)
    s = b"" if signature is None else bytes(signature)
    d = b"" if deps is None else bytes(deps)
    return (_HEADER.pack(_HEADER_FORMAT, created_at, _NONE if origin is None else len(o),
                         _NONE if signature is None else len(s), _NO_DEPS if deps is None else len(d))
            + o + s + d)  # fmt: skip


def _header_length(blob: bytes) -> int:
    _, _, lo, ls, ld = _HEADER.unpack_from(blob)
    return int(_HEADER.size + max(lo, 0) + max(ls, 0) + (0 if ld == _NO_DEPS else ld))


def _split(blob: bytes) -> tuple[float, str | None, bytes | None, bytes | None, int]:
    """(created_at, origin, signature, deps, where the envelope starts) of a stored value."""
    fmt, created, lo, ls, ld = _HEADER.unpack_from(blob)
    if fmt != _HEADER_FORMAT:
        raise ValueError(f"value format {fmt}")
    pos = _HEADER.size
    origin = None if lo < 0 else blob[pos : pos + lo].decode("utf-8", "surrogatepass")
    pos += max(lo, 0)
    signature = None if ls < 0 else blob[pos : pos + ls]
    pos += max(ls, 0)
    deps = None if ld == _NO_DEPS else blob[pos : pos + ld]
    pos += 0 if ld == _NO_DEPS else ld
    return created, origin, signature, deps, pos


def _meta(e: Entry, doc: str | None, seconds: float, schema: str) -> bytes:
    """The JSON array the Lua functions read, a NUL (JSON text never holds one), then the
    components (the largest field, read only to explain misses): as they are, or zstd when
    that is smaller. Neither escaped inside the JSON nor parsed by Lua."""
    if e.components is None:
        kind, body = _NO_COMPONENTS, b""
    else:
        body = _utf8(e.components)
        kind = _RAW_COMPONENTS
        if len(body) >= _COMPRESS_COMPONENTS:
            packed = _components_compressor().compress(body)
            if len(packed) < len(body):
                kind, body = _ZSTD_COMPONENTS, packed
    head = json.dumps([_META_VERSION, e.model, e.method, e.task, e.split, doc, seconds, e.raw_size, len(e.value),
                       e.prompt, schema, kind], ensure_ascii=False, separators=(",", ":"))  # fmt: skip
    return head.encode("utf-8", "surrogatepass") + b"\0" + body


def _components_compressor() -> Any:
    c = getattr(_local, "compressor", None)
    if c is None:
        import zstandard

        c = _local.compressor = zstandard.ZstdCompressor(level=3, write_checksum=False, write_dict_id=False)
    return c


def _components(kind: int, body: bytes) -> str | None:
    if kind == _NO_COMPONENTS:
        return None
    if kind == _ZSTD_COMPONENTS:
        d = getattr(_local, "decompressor", None)
        if d is None:
            import zstandard

            d = _local.decompressor = zstandard.ZstdDecompressor()
        body = d.decompress(body)
    return body.decode("utf-8", "surrogatepass")


def _entry(key: bytes, meta: bytes, head: bytes, value: bytes, hits: int, used_at: float) -> Entry:
    cut = meta.index(b"\0")
    m = json.loads(meta[:cut].decode("utf-8", "surrogatepass"))
    created, origin, signature, deps, _ = _split(head)
    return Entry(key=key, value=value, model=m[1], method=m[2], task=m[3], split=m[4], doc_id=_doc_dec(m[5]),
                 created_at=created, model_seconds=m[6], raw_size=m[7], components=_components(m[11], meta[cut + 1 :]),
                 hits=hits, used_at=used_at, prompt=m[9], key_schema=m[10], deps=deps, origin=origin,
                 signature=signature)  # fmt: skip


# -- the store ----------------------------------------------------------------------------------


class _Breaker:
    """Skips the server for ``seconds`` after a failure, so that a dead or hung server costs
    one timeout per window, not one per call."""

    def __init__(self, seconds: float, clock: Callable[[], float]) -> None:
        self.seconds = seconds
        self.clock = clock
        self.until: float | None = None
        self.cause = ""
        self.failures = 0
        self.lock = threading.Lock()

    def check(self, what: str, location: str) -> None:
        with self.lock:
            if self.until is None:
                return
            left = self.until - self.clock()
            if left <= 0:
                return  # half-open: the next call tries the server
            raise StoreError(f"{what} skipped: the Redis server at {location} failed {self.seconds - left:.0f} s "
                             f"ago ({self.cause}); it is tried again in {left:.0f} s")  # fmt: skip

    def trip(self, cause: str) -> bool:
        """Open for a window; True the first time ever (the caller warns then)."""
        with self.lock:
            self.until = self.clock() + self.seconds
            self.cause = cause
            self.failures += 1
            return self.failures == 1

    def close(self) -> bool:
        """Closed again after a success; True when it had been open."""
        with self.lock:
            was_open = self.until is not None
            self.until = None
            return was_open


class RedisStore(Store):
    """Responses on a Redis server (see the module notes for the layout and the guarantees).

    Args:
        url: ``redis://``, ``rediss://`` or ``unix://`` (see :func:`parse_url`).
        readonly: never write (works against a read-only replica); ``touch`` records nothing.
        trust: accepted for the interface; a shared server is written by many users, and
            whether a value loads with full pickle is decided per value (its origin or
            signature, see :mod:`lmms_cache.trust`), not per store.
        durable: accepted for the interface: durability is the server's (``appendonly yes``,
            ``appendfsync everysec`` or ``always``).
        connect_timeout: seconds to wait for a connection.
        socket_timeout: seconds to wait for a reply.
        breaker_seconds: after a failure, how long every call fails at once.
        clock: monotonic seconds for the breaker (tests pass their own).
        functions: use Redis functions (True), ``EVALSHA`` (False), or whichever the
            server supports (None).
        lazy: do not connect now: the first call connects and checks the server (what the
            proxy does, so that a run started while the server is down finds it once it
            is back). The URL's ``timeout``, ``connect_timeout`` and ``breaker`` replace
            the arguments'.

    Raises:
        StoreError: the URL is not usable, the ``redis`` package is missing, or (unless
            ``lazy``) the server cannot be reached or holds a cache of a newer layout
            under this prefix.
    """

    def __init__(
        self, url: str, *, readonly: bool = False, trust: bool = False, durable: bool = True,
        connect_timeout: float = 1.5, socket_timeout: float = 3.0, breaker_seconds: float = 30.0,
        clock: Callable[[], float] = time.monotonic, functions: bool | None = None, lazy: bool = False,
    ) -> None:  # fmt: skip
        self._url = url
        self._target = parse_url(url)
        self.location = self._target.location
        self.readonly = readonly
        self._trust = trust
        self._durable = durable
        self._lazy = lazy
        given = self._target.timeouts
        self._connect_timeout = given.get("connect_timeout", connect_timeout)
        self._socket_timeout = given.get("timeout", socket_timeout)
        self._breaker = _Breaker(given.get("breaker", breaker_seconds), clock)
        self._want_functions = functions
        self._functions: bool | None = None  # decided at the first write
        self._scripts: dict[str, Any] = {}
        self._warned: set[str] = set()
        self._checked = False  # the server's settings (once per store)
        self._ready = False  # the layout under the prefix checked (at the first call that reaches the server)
        self._lock = threading.RLock()
        self._client_obj: _redis.Redis | None = None
        self._p = self._target.key_prefix
        self._totals = self._p + b"t"
        try:
            import redis  # noqa: F401  (the optional dependency: fail here, clearly)
        except ImportError as exc:
            raise StoreError(f"{self.location} needs the redis package: pip install 'lmms-cache[redis]' "
                             f"({exc})") from None  # fmt: skip
        if not lazy:
            self._call("connecting", lambda client: None)

    def __repr__(self) -> str:
        return f"RedisStore({self.location!r}{', readonly=True' if self.readonly else ''})"

    # -- connection, errors, breaker ----------------------------------------------------------

    def _client(self) -> _redis.Redis:
        with self._lock:
            if self._client_obj is None:
                import redis
                from redis.backoff import NoBackoff
                from redis.retry import Retry

                t = self._target
                options: dict[str, Any] = dict(
                    db=t.db, username=t.username, password=t.password,
                    socket_timeout=self._socket_timeout, socket_connect_timeout=self._connect_timeout,
                    socket_keepalive=True, retry=Retry(NoBackoff(), 0),
                    health_check_interval=0, client_name="lmms-cache",
                )  # fmt: skip
                if t.scheme == "unix":
                    options["unix_socket_path"] = t.path
                else:
                    options.update(host=t.host, port=t.port)
                    if t.scheme == "rediss":
                        options["ssl"] = True
                        options.update(t.tls)
                self._client_obj = redis.Redis(**options)
            return self._client_obj

    def _call(self, what: str, action: Callable[[_redis.Redis], Any], *, retry: bool = True) -> Any:
        """Run ``action`` against the server: every failure a :class:`StoreError`, a broken
        connection retried once (``action`` must be idempotent), a timeout never; a failure
        to reach the server opens the breaker."""
        from redis import exceptions as rex

        self._breaker.check(what, self.location)
        attempts = 2 if retry else 1
        for attempt in range(attempts):
            try:
                client = self._client()
                if not self._ready:
                    self._check_server(client)
                    self._ready = True
                result = action(client)
            except rex.TimeoutError as exc:
                self._trip(what, f"no reply within {self._socket_timeout:g} s: {exc}", exc)
            except (rex.AuthenticationError, rex.AuthorizationError) as exc:
                self._trip(what, f"refused the credentials: {exc}", exc)
            except rex.BusyLoadingError as exc:
                self._trip(what, f"still loading its data: {exc}", exc)
            except rex.ConnectionError as exc:
                if attempt + 1 < attempts:
                    continue  # a broken connection (the server restarted): once more, anew
                self._trip(what, str(exc), exc)
            except rex.ResponseError as exc:
                self._response_error(what, exc)
            except rex.RedisError as exc:
                raise StoreError(f"{what} failed on {self.location}: {exc}") from exc
            except OSError as exc:  # e.g. TLS set-up failures that redis-py lets through
                self._trip(what, str(exc), exc)
            else:
                if self._breaker.close():
                    log.info("lmms-cache: the Redis server at %s answers again", self.location)
                return result
        raise AssertionError("unreachable")

    def _trip(self, what: str, cause: str, exc: BaseException) -> None:
        first = self._breaker.trip(cause)
        window = self._breaker.seconds
        message = (f"lmms-cache: the Redis server at {self.location} failed ({cause}); it is skipped for "
                   f"{window:g} s at a time and the evaluation goes on with the model's responses")  # fmt: skip
        if first and not self.quiet:
            log.warning(message)
        else:
            log.info(message)
        raise StoreError(f"{what} failed: the Redis server at {self.location} failed ({cause})") from exc

    def _response_error(self, what: str, exc: Exception) -> None:
        text = str(exc)
        if text.startswith("BUSY"):
            self._trip(what, f"busy running a script: {text}", exc)
        if text.startswith("OOM") or "maxmemory" in text:
            raise StoreError(
                f"{what} failed: the Redis server at {self.location} is out of memory (used memory > "
                "'maxmemory'); the batch was rejected whole. Raise maxmemory or lower lmms-cache's max_size "
                "(lmms-cache prune --max-size)") from exc  # fmt: skip
        if text.startswith("READONLY"):
            raise StoreError(f"{what} failed: {self.location} is a read-only replica ({text})") from exc
        if text.startswith("NOPERM"):
            raise StoreError(f"{what} failed: the server's ACL refuses it ({text})") from exc
        raise StoreError(f"{what} failed on {self.location}: {text}") from exc

    def _warn_once(self, kind: str, message: str) -> None:
        if kind not in self._warned:
            self._warned.add(kind)
            log.warning(message)

    def _check_server(self, client: _redis.Redis) -> None:
        """At connect: the layout under this prefix, and the server's settings (once)."""
        client.ping()
        layout: bytes | None = client.get(self._p + b"layout")  # type: ignore[assignment]
        if layout is None and not self.readonly:
            client.set(self._p + b"layout", LAYOUT, nx=True)
            layout = client.get(self._p + b"layout")  # type: ignore[assignment]
        if layout is not None and layout != LAYOUT:
            if layout.startswith(_LAYOUT_NAME):
                raise StoreError(f"{self.location} holds a cache of a newer lmms-cache ({layout.decode()}); upgrade")
            raise StoreError(f"{self.location}: the prefix holds something else ({layout[:40]!r}); "
                             "choose another prefix")  # fmt: skip
        if not self._checked:
            self._checked = True
            self._check_config(client)

    def _check_config(self, client: _redis.Redis) -> None:
        from redis.exceptions import ResponseError

        try:
            pipe = client.pipeline(transaction=False)
            for name in ("maxmemory-policy", "appendonly", "appendfsync"):
                pipe.config_get(name)
            policy, appendonly, fsync = (
                next(iter(r.values()), None) if isinstance(r, dict) else None for r in pipe.execute()
            )
        except ResponseError as exc:
            self._warn_once(
                "config",
                f"lmms-cache: could not check the Redis server's settings at {self.location} (CONFIG is disabled: "
                f"{exc}; managed services do this). Make sure it runs with maxmemory-policy noeviction (Redis' "
                "own eviction drops values without their metadata) and persistence (appendonly yes), or a "
                "restart loses responses you paid for",
            )  # fmt: skip
            return
        policy, appendonly, fsync = (_text(v) for v in (policy, appendonly, fsync))
        if policy is not None and policy != "noeviction":
            self._warn_once(
                "eviction",
                f"lmms-cache: the Redis server at {self.location} evicts keys by itself (maxmemory-policy "
                f"{policy}): when it is full it drops values without their metadata and metadata without their "
                "values, and the cache's totals go wrong. Set maxmemory-policy noeviction; limit the cache with "
                "lmms-cache's own max_size (least recently used first)",
            )  # fmt: skip
        if appendonly is not None and appendonly != "yes":
            self._warn_once(
                "persistence",
                f"lmms-cache: the Redis server at {self.location} runs without an append-only file (appendonly "
                f"{appendonly}): a restart loses every response written since its last snapshot. Set "
                "appendonly yes (appendfsync everysec)",
            )  # fmt: skip
        elif fsync is not None and fsync not in ("everysec", "always"):
            self._warn_once(
                "persistence",
                f"lmms-cache: the Redis server at {self.location} leaves flushing its append-only file to the "
                f"system (appendfsync {fsync}): a power cut can lose the last ~30 s of responses. Set "
                "appendfsync everysec",
            )  # fmt: skip

    # -- the writing functions ----------------------------------------------------------------

    def _run(self, what: str, name: str, args: Sequence[Any]) -> Any:
        """Call one of the Lua functions (loading it when the server lacks it)."""
        if self.readonly:
            raise StoreError(f"{self.location} is open read-only")

        def action(client: _redis.Redis) -> Any:
            from redis.exceptions import ResponseError

            if self._functions is None:
                self._load(client)
            try:
                return self._invoke(client, name, args)
            except ResponseError as exc:
                if self._functions and "function not found" in str(exc).lower():
                    self._load(client)  # a new server, or FUNCTION FLUSH: once more
                    return self._invoke(client, name, args)
                raise

        return self._call(what, action)

    def _invoke(self, client: _redis.Redis, name: str, args: Sequence[Any]) -> Any:
        if self._functions:
            return client.fcall(f"{_LIBRARY}_{name}", 1, self._totals, self._p, *args)
        return self._scripts[name](keys=[self._totals], args=[self._p, *args], client=client)

    def _load(self, client: _redis.Redis) -> None:
        from redis.exceptions import ResponseError

        use = self._want_functions
        if use is not False:
            try:
                if not client.function_list(library=_LIBRARY):
                    try:
                        client.function_load(_library_code())
                    except ResponseError as exc:
                        if "already exists" not in str(exc):  # not another client winning the race
                            raise
                use = True
            except ResponseError as exc:
                if use or "unknown command" not in str(exc).lower():
                    raise
                use = False  # Redis before 7: no functions
        if not use:
            self._scripts = {name: client.register_script(_script_code(name)) for name in _FUNCTIONS}
        self._functions = use

    # -- the interface ------------------------------------------------------------------------

    def get_many(self, keys: Sequence[bytes], *, created_after: float | None = None) -> dict[bytes, Stored]:
        if not keys:
            return {}
        v = self._p + b"v:"
        chunks = [keys[i : i + _LOOKUP_CHUNK] for i in range(0, len(keys), _LOOKUP_CHUNK)]

        def action(client: _redis.Redis) -> list[Any]:
            if len(chunks) == 1:
                return [client.mget([v + k for k in chunks[0]])]
            pipe = client.pipeline(transaction=False)
            for chunk in chunks:
                pipe.mget([v + k for k in chunk])
            return pipe.execute()

        replies = self._call("reading", action)
        found: dict[bytes, Stored] = {}
        new = tuple.__new__
        unpack = _HEADER.unpack_from
        size = _HEADER.size
        for chunk, blobs in zip(chunks, replies, strict=True):
            for k, blob in zip(chunk, blobs, strict=True):
                if blob is None:
                    continue
                fmt, created, lo, ls, ld = unpack(blob)
                if fmt != _HEADER_FORMAT or (created_after is not None and created < created_after):
                    continue
                pos = size
                origin = None
                if lo >= 0:
                    origin = blob[pos : pos + lo].decode("utf-8", "surrogatepass")
                    pos += lo
                signature = None
                if ls >= 0:
                    signature = blob[pos : pos + ls]
                    pos += ls
                deps = None
                if ld != _NO_DEPS:
                    deps = blob[pos : pos + ld]
                    pos += ld
                found[k] = new(Stored, (blob[pos:], deps, origin, signature))
        return found

    def put_many(self, entries: Sequence[Entry], *, replace: bool = True) -> int:
        if not entries:
            return 0
        if self.readonly:
            raise StoreError(f"{self.location} is open read-only")
        now = time.time()
        args: list[Any] = [b"1" if replace else b"0"]
        for e in entries:
            if len(e.key) != _KEY_BYTES:
                raise ValueError(f"store keys are {_KEY_BYTES}-byte digests, got {len(e.key)} bytes")
            created = e.created_at or now
            used = e.used_at or created
            doc = _doc_enc(e.doc_id)
            seconds = _finite(e.model_seconds)
            schema = e.key_schema or LEGACY_KEY_SCHEMA
            task = _task_enc(e.task)
            args += [
                e.key, _header(created, e.origin, e.signature, e.deps) + e.value, _meta(e, doc, seconds, schema),
                repr(float(created)), repr(float(used)), str(int(e.hits)), _utf8(e.model), task,
                b"" if doc is None else _utf8(doc), b"" if e.prompt is None else _utf8(e.prompt),
                _utf8(schema), str(len(e.value)), str(int(e.raw_size)), repr(seconds),
            ]  # fmt: skip
        new = self._run("writing", "put", args)
        return len(entries) if replace else int(new)

    def touch(self, hits: Mapping[bytes, int], when: float) -> None:
        if not hits or self.readonly:
            return
        args: list[Any] = [repr(float(when))]
        for k, n in hits.items():
            args += [k, str(int(n))]
        self._run("recording hits", "touch", args)

    def get(self, key: bytes) -> Entry | None:
        found = self.entries([key], values=True)
        return found[0] if found else None

    def delete(self, keys: Sequence[bytes]) -> int:
        removed = 0
        for start in range(0, len(keys), _CHUNK):
            removed += int(self._run("deleting", "delete", list(keys[start : start + _CHUNK])))
        return removed

    def delete_where(self, where: Where) -> int:
        if self.readonly:
            raise StoreError(f"{self.location} is open read-only")
        # The keys first (16 bytes each), then the deletions: deleting while paging through
        # the sorted sets would shift the pages.
        doomed = [e.key for e in self.scan(where, values=False)]
        return self.delete(doomed)

    def evict(self, max_bytes: int) -> tuple[int, int]:
        removed = freed = 0
        while True:
            r, f, more = self._run("evicting", "evict", [str(int(max_bytes)), str(_CHUNK)])
            removed += int(r)
            freed += int(f)
            if not int(more) or not int(r):
                return removed, freed

    def scan(self, where: Where | None = None, *, values: bool = True, limit: int | None = None,
             recent_first: bool = False) -> Iterator[Entry]:  # fmt: skip
        where = where or Where()
        if where.models == () or (limit is not None and limit <= 0):
            return
        left = limit
        for keys in self._ordered_keys(where, recent_first):
            for e in self.entries(keys, values=values):
                if where.matches(e):
                    yield e
                    if left is not None:
                        left -= 1
                        if left <= 0:
                            return

    def similar(self, method: str, *, task: str | None, doc_id: int | str | None, prompt: str | None,
                limit: int = 50) -> list[Entry]:  # fmt: skip
        forms = doc_id_forms(doc_id) if task is not None and doc_id is not None else ()
        fields = [_utf8(_doc_enc(f) or "") for f in forms]
        if not fields and prompt is None:
            return []

        def action(client: _redis.Redis) -> list[Any]:
            pipe = client.pipeline(transaction=False)
            if fields:
                pipe.hmget(self._p + b"i:d:" + _task_enc(task), fields)
            if prompt is not None:
                pipe.hget(self._p + b"i:p", _utf8(prompt))
            return pipe.execute()

        replies = self._call("reading", action)
        packed = b"".join(b for b in (replies[0] if fields else []) if b)
        if prompt is not None and replies[-1]:
            packed += replies[-1]
        keys = list(dict.fromkeys(_unpack_keys(packed)))
        stored_forms = set(forms)
        out = [
            e for e in self.entries(keys, values=False)
            if e.method == method and ((e.task == task and storable_doc_id(e.doc_id) in stored_forms)
                                       or (prompt is not None and e.prompt == prompt))
        ]  # fmt: skip
        out.sort(key=lambda e: e.used_at, reverse=True)
        return out[:limit]

    def stats(self) -> dict[str, Any]:
        def action(client: _redis.Redis) -> list[Any]:
            pipe = client.pipeline(transaction=False)
            pipe.hmget(self._totals, [b"n", b"b", b"r"])
            pipe.info("memory")
            replies = pipe.execute(raise_on_error=False)
            if isinstance(replies[0], Exception):
                raise replies[0]
            return replies

        (n, b, r), memory = self._call("reading statistics", action)
        # INFO may be refused (managed services, ACLs): the server's memory is then unknown (0).
        used = int(memory.get("used_memory", 0)) if isinstance(memory, dict) else 0
        # file_bytes: what the cache occupies where it lives; here the server's whole memory
        # (it may hold other caches under other prefixes).
        return {"location": self.location, "entries": _int_of(n), "bytes": _int_of(b), "raw_bytes": _int_of(r),
                "file_bytes": used, "server_bytes": used}  # fmt: skip

    def summary(self) -> dict[str, Any]:
        out = self.stats()
        p = self._p
        kinds = ((b"g:m", "model", "by_model"), (b"g:t", "task", "by_task"), (b"g:s", "key_schema", "by_schema"))

        def members(client: _redis.Redis) -> list[Any]:
            pipe = client.pipeline(transaction=False)
            for registry, _, _ in kinds:
                pipe.smembers(p + registry)
            pipe.hgetall(self._totals)
            return pipe.execute()

        *registries, totals = self._call("reading statistics", members)
        groups = [sorted(r) for r in registries]

        def counters(client: _redis.Redis) -> list[Any]:
            pipe = client.pipeline(transaction=False)
            for (registry, _, _), names in zip(kinds, groups, strict=True):
                for name in names:
                    pipe.hgetall(p + registry + b":" + name)
            return pipe.execute()

        replies = iter(self._call("reading statistics", counters) if any(groups) else [])
        for (_, column, label), names in zip(kinds, groups, strict=True):
            rows = []
            for name in names:
                c = next(replies)
                if not c or _int_of(c.get(b"n")) <= 0:
                    continue  # deleted meanwhile
                text = name.decode("utf-8", "surrogatepass")
                value = (None if text == "n" else text[2:]) if column == "task" else text
                row: dict[str, Any] = {column: value, "entries": _int_of(c.get(b"n")), "bytes": _int_of(c.get(b"b"))}
                if column != "key_schema":
                    row.update(raw_bytes=_int_of(c.get(b"r")), hits=_int_of(c.get(b"h")),
                               seconds_saved=_float_of(c.get(b"s")), model_seconds=_float_of(c.get(b"ms")))  # fmt: skip
                rows.append(row)
            rows.sort(key=lambda row: row["bytes"], reverse=True)
            out[label] = rows
        out["hits"] = _int_of(totals.get(b"h"))
        out["seconds_saved"] = _float_of(totals.get(b"s"))
        return out

    def models(self) -> dict[str, str]:
        raw = self._call("reading models", lambda client: client.hgetall(self._p + b"models"))
        return {k.decode("utf-8", "surrogatepass"): v.decode("utf-8", "surrogatepass") for k, v in raw.items()}

    def remember_model(self, digest: str, description: str) -> None:
        if self.readonly:
            return
        self._call("recording the model identity",
                   lambda client: client.hsetnx(self._p + b"models", _utf8(digest), _utf8(description)))  # fmt: skip

    def compact(self) -> None:
        """Nothing to do: the server frees a deleted entry's memory at once."""

    def close(self) -> None:
        with self._lock:
            client, self._client_obj = self._client_obj, None
        if client is not None:
            with contextlib.suppress(Exception):
                client.close()
                client.connection_pool.disconnect()

    def __getstate__(self) -> dict[str, Any]:
        # The URL may hold the password: a pickled store goes to this run's own workers.
        return {"url": self._url, "readonly": self.readonly, "trust": self._trust, "durable": self._durable,
                "connect_timeout": self._connect_timeout, "socket_timeout": self._socket_timeout,
                "breaker_seconds": self._breaker.seconds, "functions": self._want_functions,
                "lazy": self._lazy}  # fmt: skip

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state.pop("url"), **state)  # type: ignore[misc]

    # -- reading entries ----------------------------------------------------------------------

    def entries(self, keys: Sequence[bytes], *, values: bool = True) -> list[Entry]:
        """The entries of ``keys`` that exist, in that order (one round trip)."""
        if not keys:
            return []
        p = self._p

        def action(client: _redis.Redis) -> list[Any]:
            pipe = client.pipeline(transaction=False)
            pipe.mget([p + b"m:" + k for k in keys])
            if values:
                pipe.mget([p + b"v:" + k for k in keys])
            else:
                for k in keys:
                    pipe.getrange(p + b"v:" + k, 0, _HEAD_READ - 1)
            pipe.hmget(p + b"h", keys)
            pipe.zmscore(p + b"u", list(keys))  # type: ignore[arg-type]  # bytes members
            return pipe.execute()

        replies = self._call("reading", action)
        metas = replies[0]
        blobs = replies[1] if values else replies[1 : 1 + len(keys)]
        hits, used = replies[-2], replies[-1]
        if not values:  # a header longer than what was read: read it whole
            long = [i for i, b in enumerate(blobs) if b and metas[i] and _header_length(b) > len(b)]
            if long:
                rest = self._call("reading", lambda client: [
                    client.getrange(p + b"v:" + keys[i], 0, _header_length(blobs[i]) - 1) for i in long])  # fmt: skip
                blobs = list(blobs)
                for i, b in zip(long, rest, strict=True):
                    blobs[i] = b
        out = []
        for i, k in enumerate(keys):
            meta, blob = metas[i], blobs[i]
            if not meta or not blob:
                continue  # deleted meanwhile
            try:
                start = _split(blob)[4]
                out.append(_entry(k, meta, blob, blob[start:] if values else b"", _int_of(hits[i]),
                                  float(used[i]) if used[i] is not None else 0.0))  # fmt: skip
            except (ValueError, IndexError, TypeError, struct.error) as exc:
                raise StoreError(f"reading failed on {self.location}: entry {k.hex()} is damaged ({exc})") from exc
        return out

    def _ordered_keys(self, where: Where, recent_first: bool) -> Iterator[list[bytes]]:
        """Pages of keys: a superset of what ``where`` selects, oldest first (creation) or
        most recently used first."""
        order = self._p + (b"u" if recent_first else b"c")
        candidates = self._candidates(where)
        if candidates is None:
            below = where.created_before if not recent_first else None
            yield from self._zpages(order, reverse=recent_first, below=below)
            return
        # A selection from an index: order it by the sorted set's scores.
        scored: list[tuple[float, bytes]] = []
        for start in range(0, len(candidates), _LOOKUP_CHUNK):
            chunk = candidates[start : start + _LOOKUP_CHUNK]

            def scores_of(client: _redis.Redis, chunk: list[bytes] = chunk) -> Any:
                return client.zmscore(order, chunk)  # type: ignore[arg-type]  # bytes members

            scores = self._call("scanning", scores_of)
            scored += [(float(s), k) for k, s in zip(chunk, scores, strict=True) if s is not None]
        scored.sort(reverse=recent_first)
        for start in range(0, len(scored), _SCAN_PAGE):
            yield [k for _, k in scored[start : start + _SCAN_PAGE]]

    def _candidates(self, where: Where) -> list[bytes] | None:
        """Keys from the indexes that include every entry ``where`` selects; None: no index
        narrows it (everything)."""
        p = self._p
        if where.doc_id is not None:
            forms = [_utf8(_doc_enc(f) or "") for f in doc_id_forms(where.doc_id)]
            if where.task is not None:
                tasks = [_task_enc(where.task)]
            else:
                tasks = sorted(self._call("scanning", lambda client: client.smembers(p + b"g:t")))
            if not forms or not tasks:
                return []

            def documents(client: _redis.Redis) -> list[Any]:
                pipe = client.pipeline(transaction=False)
                for t in tasks:
                    pipe.hmget(p + b"i:d:" + t, forms)
                return pipe.execute()

            packed = b"".join(b for reply in self._call("scanning", documents) for b in reply if b)
            return list(dict.fromkeys(_unpack_keys(packed)))
        if where.task is not None:
            task = _task_enc(where.task)

            def of_task(client: _redis.Redis) -> list[Any]:
                pipe = client.pipeline(transaction=False)
                pipe.hvals(p + b"i:d:" + task)  # its documents' entries
                pipe.smembers(p + b"i:t:" + task)  # and those without a document
                return pipe.execute()

            with_documents, loose = self._call("scanning", of_task)
            return sorted({*_unpack_keys(b"".join(with_documents)), *loose})
        if where.models is not None:
            sets = [p + b"i:m:" + _utf8(m) for m in where.models]
            return sorted(self._call("scanning", lambda client: client.sunion(sets)))
        return None

    def _zpages(self, zkey: bytes, *, reverse: bool, below: float | None) -> Iterator[list[bytes]]:
        """Members of a sorted set in pages, by score then member (reversed: both), below a
        score when given. Keyset paging: a score and how many of its ties were seen."""
        last: float | None = None
        ties = 0
        top = "+inf" if below is None else f"({below!r}"
        while True:
            # Inclusive of the last page's last score: its ties not yet seen are skipped by offset.
            if reverse:
                hi, lo = (top if last is None else repr(last)), "-inf"
            else:
                hi, lo = top, ("-inf" if last is None else repr(last))
            offset = 0 if last is None else ties

            def action(client: _redis.Redis, hi: str = hi, lo: str = lo, offset: int = offset) -> Any:
                if reverse:
                    return client.zrange(zkey, hi, lo, desc=True, byscore=True, offset=offset, num=_SCAN_PAGE,
                                         withscores=True)  # fmt: skip
                return client.zrange(zkey, lo, hi, byscore=True, offset=offset, num=_SCAN_PAGE, withscores=True)

            rows = self._call("scanning", action)
            if not rows:
                return
            yield [member for member, _ in rows]
            if len(rows) < _SCAN_PAGE:
                return
            end = float(rows[-1][1])
            same = sum(1 for _, s in rows if float(s) == end)
            if last is not None and end == last:
                ties += same
            else:
                last, ties = end, same


def _unpack_keys(packed: bytes) -> Iterable[bytes]:
    return (packed[i : i + _KEY_BYTES] for i in range(0, len(packed) - _KEY_BYTES + 1, _KEY_BYTES))


def _text(value: Any) -> str | None:
    if value is None:
        return None
    return value.decode() if isinstance(value, bytes) else str(value)


def _int_of(value: Any) -> int:
    return 0 if value is None else int(value)


def _float_of(value: Any) -> float:
    return 0.0 if value is None else float(value)
