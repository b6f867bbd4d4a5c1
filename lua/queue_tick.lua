-- queue_tick.lua: the background step of a waiting room (service/waitingroom.py, Ticker):
-- in quiet periods nobody's join or poll advances the frontier, and a stall of stock
-- (sold out, then tickets back) would be seen late; this advances it about once a second,
-- and forgets expired passes, a bounded batch per call.
-- KEYS: the event keys (lib.lua), [17..21] the waiting room's keys (lib.lua, queue_keys)
-- ARGV: common [1..4] (lib.lua)
-- Returns "1" when the event has a waiting room, else "0".
local rm = room_meta()
if not rm.status or not rm.apm then return '0' end
local q = queue_keys()
local now = now_ms()
advance(q, rm, now)
local expired = redis.call('ZCOUNT', q.passes, '-inf', now)
if expired > 0 then
  redis.call('ZREMRANGEBYRANK', q.passes, 0, math.min(expired, 1000) - 1)
end
return '1'
