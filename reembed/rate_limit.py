"""One rate limit per embeddings endpoint, shared in Redis by every process that calls it.

A provider limits requests and tokens per minute per key, whatever the number of workers a
migration runs; a limit counted per process either wastes the allowance or provokes 429s as
workers are added. So the limit lives in Redis: two token buckets (requests, tokens) per
endpoint, refilled at the declared per-minute rates, holding at most ``BURST_S`` seconds of
allowance, changed only inside one Lua script (atomic across workers, timed by Redis's clock,
so workers on machines with skewed clocks agree).

The server's own view wins when it is stricter: ``x-ratelimit-remaining-requests`` / ``-tokens``
lower the buckets, and a 429 empties them and blocks everyone for the time it asked.

Keys hold a digest of the endpoint's URL and model, never a key or a URL's credentials.
"""

from __future__ import annotations

import hashlib
import random
import time
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING

import redis
import structlog

from reembed.api_client import Limiter, NoLimit
from reembed.progress import redis_client

if TYPE_CHECKING:
    from reembed.api_models import ApiModelDeclaration

log = structlog.get_logger(__name__)

#: Seconds of allowance a bucket holds: a steady flow rather than a minute's burst at once, which
#: a provider counting per minute window may answer with 429s.
BURST_S = 6.0

# KEYS[1]: the hash. ARGV: rpm, tpm, tokens wanted, mode (acquire | observe | block), a, b.
# Returns the seconds to wait (as a string: Lua numbers are truncated to integers by Redis).
_SCRIPT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1e6
local rpm, tpm = tonumber(ARGV[1]), tonumber(ARGV[2])
local s = redis.call('HMGET', KEYS[1], 'r', 't', 'ts', 'blocked')
local rcap, tcap = rpm * BURST / 60, tpm * BURST / 60
local r = tonumber(s[1]) or rcap
local tk = tonumber(s[2]) or tcap
local ts = tonumber(s[3]) or now
local blocked = tonumber(s[4]) or 0
local dt = math.max(0, now - ts)
r = math.min(rcap, r + dt * rpm / 60)
tk = math.min(tcap, tk + dt * tpm / 60)
local wait = 0
local mode = ARGV[4]
if mode == 'acquire' then
  local want = tonumber(ARGV[3])
  if now < blocked then
    wait = blocked - now
  else
    local rw, tw = 0, 0
    if rpm > 0 and r < 1 then rw = (1 - r) * 60 / rpm end
    if tpm > 0 and tk < math.min(want, tcap) then tw = (math.min(want, tcap) - tk) * 60 / tpm end
    wait = math.max(rw, tw)
    if wait == 0 then
      if rpm > 0 then r = r - 1 end
      if tpm > 0 then tk = tk - want end
    end
  end
elseif mode == 'observe' then
  local rr, rt = tonumber(ARGV[5]), tonumber(ARGV[6])
  if rr and rr >= 0 and rpm > 0 then r = math.min(r, rr) end
  if rt and rt >= 0 and tpm > 0 then tk = math.min(tk, rt) end
elseif mode == 'block' then
  blocked = math.max(blocked, now + tonumber(ARGV[5]))
  r, tk = math.min(r, 0), math.min(tk, 0)
end
redis.call('HSET', KEYS[1], 'r', r, 't', tk, 'ts', now, 'blocked', blocked)
redis.call('EXPIRE', KEYS[1], 3600)
return tostring(wait)
""".replace("BURST", repr(BURST_S))


def endpoint_key(decl: ApiModelDeclaration) -> str:
    """The Redis key of an endpoint's buckets: a digest, so no URL or credential is stored."""
    digest = hashlib.sha256(f"{decl.base_url.rstrip('/')}|{decl.model}".encode()).hexdigest()[:16]
    return f"reembed:ratelimit:{digest}"


class RedisLimiter:
    """Requests and tokens per minute for one endpoint, shared through Redis."""

    def __init__(self, client: redis.Redis, key: str, requests_per_minute: int, tokens_per_minute: int,
                 sleep: Callable[[float], None] = time.sleep) -> None:
        self.client, self.key = client, key
        self.rpm, self.tpm = requests_per_minute, tokens_per_minute
        self._script = client.register_script(_SCRIPT)
        self._sleep = sleep

    def _run(self, mode: str, tokens: int = 0, a: float = -1, b: float = -1) -> float:
        try:
            return float(self._script(keys=[self.key], args=[self.rpm, self.tpm, tokens, mode, a, b]))
        except redis.RedisError as exc:  # the limit is a courtesy: never stop embedding for it
            log.warning("shared rate limit unavailable; going on without it", error=type(exc).__name__)
            return 0.0

    def acquire(self, tokens: int) -> None:
        while (wait := self._run("acquire", tokens)) > 0:
            self._sleep(min(wait, 5.0) * (1 + 0.1 * random.random()))

    def observe(self, headers: Mapping[str, str]) -> None:
        requests, tokens = _header_int(headers, "x-ratelimit-remaining-requests"), _header_int(
            headers, "x-ratelimit-remaining-tokens")
        if requests is not None or tokens is not None:
            self._run("observe", 0, -1 if requests is None else requests, -1 if tokens is None else tokens)

    def throttled(self, wait_s: float) -> None:
        self._run("block", 0, wait_s)


def _header_int(headers: Mapping[str, str], name: str) -> int | None:
    value = headers.get(name)
    try:
        return int(value) if value is not None else None
    except ValueError:
        return None


def limiter_for(decl: ApiModelDeclaration, redis_url: str) -> Limiter:
    """The shared limiter of ``decl``'s endpoint, or none when this process has no Redis (a
    one-off ``evaluate`` on a laptop): then only the server's 429s slow it down."""
    if not redis_url:
        return NoLimit()
    return RedisLimiter(redis_client(redis_url), endpoint_key(decl), decl.requests_per_minute, decl.tokens_per_minute)

