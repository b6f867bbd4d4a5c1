-- repair.lua: put an event's live state back in line with its records, in one step.
-- KEYS: the event keys (lib.lua)
-- ARGV: common [1..4] (lib.lua)
-- Releases every hold past its deadline, then recounts stock, seats and per-customer
-- counts from the confirmed bookings and the live holds (lib.lua, rebuild). The caller
-- first adds to `bookings` the confirmed bookings that PostgreSQL or the outbox has and
-- Redis lacks. Returns JSON: rebuild's summary plus {expired = holds released as
-- overdue, before = {category = {available, held, sold}}}, or {err = "not_loaded"}.
if not loaded() then return NOT_LOADED end
local now = now_ms()
local before = {}
local caps = redis.call('HGETALL', K.cap)
for i = 1, #caps, 2 do
  local cat = caps[i]
  before[cat] = {
    available = tonumber(redis.call('HGET', K.avail, cat) or '0'),
    held = tonumber(redis.call('HGET', K.held, cat) or '0'),
    sold = tonumber(redis.call('HGET', K.sold, cat) or '0'),
  }
end
local expired = 0
for _, id in ipairs(redis.call('ZRANGEBYSCORE', K.deadlines, '-inf', now)) do
  local raw = redis.call('HGET', K.holds, id)
  local h = raw and cjson.decode(raw)
  if h and h.s == 'held' then
    -- Counters are recounted below: only the record and the indexes change here.
    h.s, h.e = 'expired', now
    redis.call('HSET', K.holds, id, cjson.encode(h))
    redis.call('ZADD', K.ended, now, id)
    redis.call('HINCRBY', K.stats, 'expired', 1)
    expired = expired + 1
  end
  redis.call('ZREM', K.deadlines, id)
end
local out = rebuild(now)
restocked() -- stock may have come back: published (lib.lua)
out.before = before
out.expired = expired
return cjson.encode(out)
