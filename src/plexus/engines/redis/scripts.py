"""The Lua scripts of the Redis engine. Redis runs a script as one atomic step,
so a publish's offset, history entry, pub/sub message and idempotency record
can never be seen apart, and pub/sub order is offset order on every node."""

from __future__ import annotations

from typing import Final

# Channels of a namespace holding state, for `Retention.max_channels`: a sorted
# set per namespace (on each server, for the channels that server holds) of
# channel -> when its meta expires on the server's clock (ms; +inf: never).
# Expired members are dropped when a channel is created, so the set never
# holds more than the limit. Outside this module's scripts nothing reads it.
# Its key is not the channel's hash tag: Redis Cluster is not supported.
COUNTED: Final = """
local function clock()
  local t = redis.call('time')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
-- May `name` hold state in the namespace counted in `ns`, at most `limit` channels?
local function room(ns, limit, name)
  if limit <= 0 then return true end
  redis.call('zremrangebyscore', ns, '-inf', clock())
  if redis.call('zscore', ns, name) then return true end
  return redis.call('zcard', ns) < limit
end
-- `name`'s meta now lives `ms` more (nil: for ever).
local function counted(ns, limit, name, ms)
  if limit <= 0 then return end
  if ms then
    redis.call('zadd', ns, clock() + ms, name)
  else
    redis.call('zadd', ns, '+inf', name)
  end
end
"""

# KEYS: meta, stream, idempotency (the meta key again when there is none), the
#       namespace's channel count (see COUNTED)
# ARGV: body, size, ttl_ms, max_bytes, grace_ms, pubsub channel, idempotency_ttl_ms
#       (0 = no key), a new epoch (used if the channel has none), now_ms,
#       max_channels on this server (0 = no limit), the channel's name
# Returns {offset, epoch, duplicate (0/1)}; offset -1: the namespace is full.
PUBLISH: Final = (
    COUNTED
    + """
local meta, stream, idem, ns = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local body = ARGV[1]
local size = tonumber(ARGV[2])
local ttl = tonumber(ARGV[3])
local max_bytes = tonumber(ARGV[4])
local grace = tonumber(ARGV[5])
local pubsub = ARGV[6]
local idem_ttl = tonumber(ARGV[7])
local now = tonumber(ARGV[9])
local limit = tonumber(ARGV[10])
local name = ARGV[11]
-- Byte limits count the payload only (what follows the header's newline).
local function payload_size(stored)
  return #stored - string.find(stored, '\\n', 1, true)
end
if idem_ttl > 0 then
  local seen = redis.call('hmget', idem, 'o', 'e')
  if seen[1] then return {tonumber(seen[1]), seen[2], 1} end
end
local epoch = redis.call('hget', meta, 'e')
if not epoch then
  epoch = ARGV[8]
  if size == 0 and redis.call('pubsub', 'numsub', pubsub)[2] == 0 then
    -- Nothing is kept and no node listens: the channel keeps no state.
    if idem_ttl > 0 then
      redis.call('hset', idem, 'o', 1, 'e', epoch)
      redis.call('pexpire', idem, idem_ttl)
    end
    return {1, epoch, 0}
  end
  if not room(ns, limit, name) then return {-1, '', 0} end
  -- A new epoch starts empty, whatever an expired or evicted meta left behind.
  redis.call('del', stream)
  redis.call('hset', meta, 'e', epoch, 't', 0, 'b', 0)
  -- Where the channel is counted, for the refreshes of calls that do not know.
  if limit > 0 then redis.call('hset', meta, 'n', ns) end
end
local offset = redis.call('hincrby', meta, 't', 1)
if size > 0 then
  local expires = 0
  if ttl > 0 then expires = now + ttl end
  redis.call('xadd', stream, offset .. '-0', 'x', expires, 'd', body)
  local bytes = redis.call('hincrby', meta, 'b', payload_size(body))
  local count = redis.call('xlen', stream)
  -- Drop from the head what is over the size, expired, or over the byte
  -- budget; the newest message is always kept.
  while count > 1 do
    local head = redis.call('xrange', stream, '-', '+', 'COUNT', 1)[1]
    local fields = head[2]
    local head_expires = tonumber(fields[2])
    local expired = head_expires > 0 and head_expires <= now
    if count > size or expired or (max_bytes > 0 and bytes > max_bytes) then
      redis.call('xdel', stream, head[1])
      bytes = bytes - payload_size(fields[4])
      count = count - 1
    else
      break
    end
  end
  redis.call('hset', meta, 'b', bytes)
  if ttl > 0 then
    redis.call('pexpire', stream, ttl + grace)
  else
    redis.call('persist', stream)
  end
end
if size > 0 and ttl == 0 then
  redis.call('persist', meta)
  counted(ns, limit, name, nil)
else
  redis.call('pexpire', meta, ttl + grace)
  counted(ns, limit, name, ttl + grace)
end
redis.call('publish', pubsub, 'm' .. offset .. ' ' .. epoch .. ' ' .. body)
if idem_ttl > 0 then
  redis.call('hset', idem, 'o', offset, 'e', epoch)
  redis.call('pexpire', idem, idem_ttl)
end
return {offset, epoch, 0}
"""
)

# KEYS: meta, stream, the namespace's channel count (see COUNTED; with create)
# ARGV: create (0/1), a new epoch, keep_ms (the meta lives at least this long now),
#       max_channels on this server (0 = no limit), the channel's name
# Returns {top, epoch or nil}; top -1: the namespace is full.
POSITION: Final = (
    COUNTED
    + """
local epoch = redis.call('hget', KEYS[1], 'e')
local keep = tonumber(ARGV[3])
local limit = tonumber(ARGV[4])
local name = ARGV[5]
if not epoch then
  if ARGV[1] == '0' then return {0, false} end
  if not room(KEYS[3], limit, name) then return {-1, false} end
  epoch = ARGV[2]
  redis.call('del', KEYS[2])
  redis.call('hset', KEYS[1], 'e', epoch, 't', 0, 'b', 0)
  -- Where the channel is counted, for the refreshes of calls that do not know.
  if limit > 0 then redis.call('hset', KEYS[1], 'n', KEYS[3]) end
  redis.call('pexpire', KEYS[1], keep)
  counted(KEYS[3], limit, name, keep)
  return {0, epoch}
end
local left = redis.call('pttl', KEYS[1])
if left >= 0 and left < keep then
  redis.call('pexpire', KEYS[1], keep)
  local ns = redis.call('hget', KEYS[1], 'n')
  if ns then redis.call('zadd', ns, 'XX', 'GT', clock() + keep, name) end
end
return {tonumber(redis.call('hget', KEYS[1], 't')), epoch}
"""
)

# KEYS: meta, stream
# ARGV: since, count (-1 = all), max_bytes (-1 = no limit), now_ms, how many of
#       the entries count against max_bytes (-1 = all: the caller may fetch one
#       more than it wants, only to learn what follows)
# Returns {epoch or nil, top, cut (0/1), id, body, id, body, ...}: entries after
# `since`, oldest first, skipping expired ones; `cut` when the byte budget ran out.
READ: Final = """
local epoch = redis.call('hget', KEYS[1], 'e')
if not epoch then return {false, 0, 0} end
local out = {epoch, tonumber(redis.call('hget', KEYS[1], 't')), 0}
local start = tonumber(ARGV[1]) + 1
local want = tonumber(ARGV[2])
local budget = tonumber(ARGV[3])
local now = tonumber(ARGV[4])
local budgeted = tonumber(ARGV[5])
local got = 0
local function payload_size(stored)
  return #stored - string.find(stored, '\\n', 1, true)
end
while want < 0 or got < want do
  local chunk = 256
  if want >= 0 and want - got < chunk then chunk = want - got end
  local entries = redis.call('xrange', KEYS[2], start .. '-0', '+', 'COUNT', chunk)
  for _, entry in ipairs(entries) do
    local fields = entry[2]
    local expires = tonumber(fields[2])
    if expires == 0 or expires > now then
      if budget >= 0 and (budgeted < 0 or got < budgeted) then
        budget = budget - payload_size(fields[4])
        if budget < 0 then
          out[3] = 1
          return out
        end
      end
      out[#out + 1] = entry[1]
      out[#out + 1] = fields[4]
      got = got + 1
    end
    start = tonumber(string.match(entry[1], '^(%d+)')) + 1
  end
  if #entries < chunk then break end
end
return out
"""

# KEYS: presence hash, presence expiry zset
# ARGV: now_ms
# Returns the hash's fields and values, after dropping the expired entries.
PRESENCE_GET: Final = """
while true do
  -- In chunks: unpack() of a long list would overflow Lua's stack.
  local expired = redis.call('zrangebyscore', KEYS[2], '-inf', ARGV[1], 'LIMIT', 0, 1000)
  if #expired == 0 then break end
  redis.call('hdel', KEYS[1], unpack(expired))
  redis.call('zrem', KEYS[2], unpack(expired))
end
return redis.call('hgetall', KEYS[1])
"""
