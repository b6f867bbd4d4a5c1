-- repair_expire.lua: the repair's first step, a batch at a time: holds past their deadline
-- are expired (the sweeper's work, done now: its workers may be away).
-- KEYS: the event keys (lib.lua)
-- ARGV: common [1..4] (lib.lua), [5] holds expired per call at most
-- Like reclaim.lua, with the counters moved along with each hold, except that a seat is
-- freed only while it still names the hold (lib.lua end_hold, guarded): on drifted state
-- a seat the hold names may be sold. Returns JSON {expired = holds expired, more = true
-- when more may be overdue beyond the batch}, or {err = "not_loaded"}.
if not loaded() then return NOT_LOADED end
local most = tonumber(ARGV[5])
if not most or most < 1 then return redis.error_reply('repair_expire: bad arguments') end
local now = now_ms()
local ids = redis.call('ZRANGEBYSCORE', K.deadlines, '-inf', now, 'LIMIT', 0, most)
local expired = 0
for _, id in ipairs(ids) do
  local raw = redis.call('HGET', K.holds, id)
  local h = raw and cjson.decode(raw)
  if h and h.s == 'held' then
    end_hold(h, 'expired', now, true)
    expired = expired + 1
  else
    redis.call('ZREM', K.deadlines, id)
  end
end
return cjson.encode({expired = expired, more = #ids == most})
