"""The Lua scripts of the Redis store, and the wrapper that names each by its SHA1.

Every write that must be atomic per session is one script, so ordering holds across nodes
without locks: the append script checks idempotency keys, concatenates token streams, assigns
seqs, XADDs and PUBLISHes the committed events in one step. All scripts are loaded at
``start()``; callers use ``EVALSHA`` and load again on ``NOSCRIPT`` (a restarted or flushed
server).

Event time is the Redis server's ``TIME`` read inside the script (Redis 7 replicates script
effects, so non-deterministic commands are allowed): one clock for every node, so event times
follow seq order across nodes and age-based trimming compares like with like.

Token streams: each ``stream.append`` APPENDs its text, JSON-escaped by the client, to
``st:STREAM``; the client encodes ``stream.end`` with ``"text":""`` as the last member of
its data, and the script splices the accumulated escaped text in between those quotes. The
escaping of a concatenation is the concatenation of the escapings, so the stored text is the
deltas' text byte for byte, and Lua never parses or re-encodes JSON (cjson would mangle it).

Replies are flat arrays where they can be: nested replies cost Redis more than the commands
that produce them.
"""

from __future__ import annotations

import hashlib

# Op codes of the append script's events: one of PLAIN, APPEND (stream.append) or END
# (stream.end), plus KEYED when the event carries an idempotency key.
OP_PLAIN, OP_APPEND, OP_END, OP_KEYED = 0, 1, 2, 3

# Values per special outcome of the append script, counting its index: see _APPEND_SOURCE.
SPECIAL_WIDTH = {1: 3, 2: 5, 3: 2}
# Special outcomes of the append script.
OUTCOME_END, OUTCOME_DUPLICATE, OUTCOME_CLOSED = 1, 2, 3

_HELPERS = """
local function int(n) return string.format('%d', n) end
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
"""

_APPEND_SOURCE = "#!lua\n" + _HELPERS + """
-- One call commits a batch for one or more sessions.
-- KEYS: per session: meta, log, then per event [idempotency key] [stream text, stream closed]
-- ARGV: max events, idempotency window ms, stream ttl ms, then per session: epoch candidate,
--       channel, event count, then per event: op, payload [, escaped text of stream.append]
-- op: 0 plain, 1 stream.append, 2 stream.end; +3 when the event has an idempotency key
-- Returns one flat array (nested replies cost Redis more than the commands themselves):
-- time, then per session: epoch, first seq, the number of values that follow for the
-- session's special outcomes, then per special outcome: its event's (1-based) index and
--   1, payload          a committed stream.end (its text filled in)
--   2, seq, time, payload  a duplicate idempotency key (payload '' if trimmed away)
--   3                   an event on an ended stream
-- Every other event committed, with seqs counting up from the first seq.
local maxlen, window, ttl = ARGV[1], ARGV[2], ARGV[3]
local now = int(now_ms())
local out = {tonumber(now)}
local k, i = 1, 4
while i <= #ARGV do
  local meta, log = KEYS[k], KEYS[k + 1]
  k = k + 2
  local candidate, channel, count = ARGV[i], ARGV[i + 1], tonumber(ARGV[i + 2])
  i = i + 3
  local state = redis.call('HMGET', meta, 'epoch', 'seq')
  local epoch = state[1]
  if not epoch then
    -- A new incarnation: a log left without its meta must not collide with seqs from 1.
    epoch = candidate
    redis.call('HSET', meta, 'epoch', epoch)
    redis.call('DEL', log)
  end
  local seq = tonumber(state[2]) or 0
  local first = seq + 1
  local published, special = {}, {}
  for index = 1, count do
    local op = tonumber(ARGV[i])
    local payload = ARGV[i + 1]
    i = i + 2
    local ikey, tkey, ckey, fragment, done
    if op >= 3 then
      op = op - 3
      ikey = KEYS[k]
      k = k + 1
    end
    if op > 0 then
      tkey, ckey = KEYS[k], KEYS[k + 1]
      k = k + 2
    end
    if op == 1 then
      fragment = ARGV[i]
      i = i + 1
    end
    if ikey then
      local original = redis.call('GET', ikey)
      if original then
        local id = original .. '-0'
        local entry = redis.call('XRANGE', log, id, id)
        local time, body = 0, ''
        if #entry > 0 then
          time, body = tonumber(entry[1][2][2]), entry[1][2][4]
        end
        local n = #special
        special[n + 1], special[n + 2], special[n + 3] = index, 2, tonumber(original)
        special[n + 4], special[n + 5] = time, body
        done = true
      end
    end
    if not done and op > 0 and redis.call('EXISTS', ckey) == 1 then
      local n = #special
      special[n + 1], special[n + 2] = index, 3
      done = true
    end
    if not done then
      if op == 1 then
        redis.call('APPEND', tkey, fragment)
        redis.call('PEXPIRE', tkey, ttl)
      elseif op == 2 then
        -- The client encoded data with "text":"" last: splice the escaped text into it.
        local text = redis.call('GET', tkey) or ''
        payload = string.sub(payload, 1, -4) .. text .. string.sub(payload, -3)
        redis.call('DEL', tkey)
        redis.call('SET', ckey, '1', 'PX', ttl)
      end
      seq = seq + 1
      redis.call('XADD', log, 'MAXLEN', '~', maxlen, int(seq) .. '-0', 't', now, 'e', payload)
      if ikey then
        redis.call('SET', ikey, int(seq), 'PX', window)
      end
      published[#published + 1] = payload
      if op == 2 then
        local n = #special
        special[n + 1], special[n + 2], special[n + 3] = index, 1, payload
      end
    end
  end
  if seq >= first then
    redis.call('HSET', meta, 'seq', int(seq))
    redis.call('PUBLISH', channel, '[0,"' .. epoch .. '",' .. now .. ',' .. int(first) .. ',['
      .. table.concat(published, ',') .. ']]')
  end
  local n = #out
  out[n + 1], out[n + 2], out[n + 3] = epoch, first, #special
  for j = 1, #special do
    out[n + 3 + j] = special[j]
  end
end
return out
"""

_HEAD_SOURCE = "#!lua\n" + """
-- KEYS: meta, log. ARGV: epoch candidate
redis.call('HSETNX', KEYS[1], 'epoch', ARGV[1])
local state = redis.call('HMGET', KEYS[1], 'epoch', 'seq')
local last = tonumber(state[2]) or 0
local first = last + 1
local entry = redis.call('XRANGE', KEYS[2], '-', '+', 'COUNT', 1)
if #entry > 0 then
  first = tonumber(string.match(entry[1][1], '^(%d+)'))
end
return {state[1], last, first}
"""

_READ_SOURCE = "#!lua flags=no-writes\n" + """
-- KEYS: meta, log. ARGV: exclusive start id, count
local epoch = redis.call('HGET', KEYS[1], 'epoch')
if not epoch then
  return {}
end
return {epoch, redis.call('XRANGE', KEYS[2], ARGV[1], '+', 'COUNT', ARGV[2])}
"""

_TRIM_SOURCE = "#!lua\n" + _HELPERS + """
-- KEYS: log. ARGV: max events, max age ms. Returns the number of entries removed.
local log = KEYS[1]
local removed = redis.call('XTRIM', log, 'MAXLEN', ARGV[1])
local cutoff = now_ms() - tonumber(ARGV[2])
while true do
  local page = redis.call('XRANGE', log, '-', '+', 'COUNT', 256)
  if #page == 0 then
    break
  end
  local keep
  for j = 1, #page do
    if tonumber(page[j][2][2]) >= cutoff then
      keep = page[j][1]
      break
    end
  end
  if keep then
    removed = removed + redis.call('XTRIM', log, 'MINID', keep)
    break
  end
  local last = tonumber(string.match(page[#page][1], '^(%d+)'))
  removed = removed + redis.call('XTRIM', log, 'MINID', int(last + 1) .. '-0')
  if #page < 256 then
    break
  end
end
return removed
"""

_PRESENCE_SET_SOURCE = "#!lua\n" + _HELPERS + """
-- KEYS: expiries zset, info hash. ARGV: member, info, ttl ms
local expires = now_ms() + tonumber(ARGV[3])
redis.call('ZADD', KEYS[1], int(expires), ARGV[1])
redis.call('HSET', KEYS[2], ARGV[1], ARGV[2])
-- Let an abandoned session's presence vanish with its last member.
local last = redis.call('ZRANGE', KEYS[1], -1, -1, 'WITHSCORES')
local at = int(math.ceil(tonumber(last[2])))
redis.call('PEXPIREAT', KEYS[1], at)
redis.call('PEXPIREAT', KEYS[2], at)
return 1
"""

_PRESENCE_GET_SOURCE = "#!lua\n" + _HELPERS + """
-- KEYS: expiries zset, info hash. Drops expired members, returns the live members' info.
local now = int(now_ms())
local gone = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now)
for j = 1, #gone, 1000 do
  redis.call('HDEL', KEYS[2], unpack(gone, j, math.min(j + 999, #gone)))
end
if #gone > 0 then
  redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
end
local live = redis.call('ZRANGE', KEYS[1], 0, -1)
local out = {}
for j = 1, #live, 1000 do
  local infos = redis.call('HMGET', KEYS[2], unpack(live, j, math.min(j + 999, #live)))
  for _, info in ipairs(infos) do
    if info then
      out[#out + 1] = info
    end
  end
end
return out
"""


class Script:
    """A script's source and the SHA1 that ``EVALSHA`` calls it by."""

    __slots__ = ("sha", "source")

    def __init__(self, source: str) -> None:
        self.source = source
        self.sha = hashlib.sha1(source.encode()).hexdigest()


APPEND = Script(_APPEND_SOURCE)
# Against a Redis Cluster: the same script, fanning out on the session's shard channel (its name
# carries the session's hash tag, so it hashes to the slot of the script's keys, which Redis
# requires of a SPUBLISH inside a script).
APPEND_SHARDED = Script(_APPEND_SOURCE.replace("redis.call('PUBLISH'", "redis.call('SPUBLISH'"))
HEAD = Script(_HEAD_SOURCE)
READ = Script(_READ_SOURCE)
TRIM = Script(_TRIM_SOURCE)
PRESENCE_SET = Script(_PRESENCE_SET_SOURCE)
PRESENCE_GET = Script(_PRESENCE_GET_SOURCE)
# Loaded by RedisStore.start().
SCRIPTS = (APPEND, HEAD, READ, TRIM, PRESENCE_SET, PRESENCE_GET)
# Loaded on every master of a cluster.
CLUSTER_SCRIPTS = (APPEND_SHARDED, HEAD, READ, TRIM, PRESENCE_SET, PRESENCE_GET)
