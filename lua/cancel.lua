-- cancel.lua: cancel (refund) a booking; its tickets go back on sale at once, and the
-- cancellation reaches PostgreSQL through the outbox, after the confirmation it cancels.
-- KEYS: the event keys (lib.lua), then the Idempotency-Key counts and record (optional, lib.lua)
-- ARGV: common [1..4] (lib.lua), [5] booking id,
--       [6] the booking record JSON from PostgreSQL, for a booking Redis no longer has ("" = none),
--       then the Idempotency-Key allowances (optional, lib.lua)
-- Returns JSON {status = "cancelled"}, or {err = code}. Cancelling twice changes nothing.
-- Tickets coming back to an empty category are published (lib.lua, restocked).
local cached = replay()
if cached then return cached end
if not loaded() then return NOT_LOADED end
local raw = redis.call('HGET', K.bookings, ARGV[5])
if not raw then
  -- Not remembered: booking ids are the server's own, so a repeat gets this 404 anyway.
  if ARGV[6] == '' then return fail('booking_not_found') end
  raw = ARGV[6]
end
local b = cjson.decode(raw)
if b.s == 'cancelled' then return unchanged('{"status":"cancelled"}') end
local full = idem_full()
if full then return full end

local now = now_ms()
for cat, n in pairs(b.q) do
  redis.call('HINCRBY', K.sold, cat, -n)
  add_stock(cat, n)
end
local mark = 'b:' .. b.id
for _, label in ipairs(b.st or {}) do
  if redis.call('HGET', K.seatstate, label) == mark then
    redis.call('HDEL', K.seatstate, label)
    redis.call('ZADD', K.free, seat_position(label), label)
  end
end
if redis.call('HINCRBY', K.cust, b.c, -b.n) <= 0 then redis.call('HDEL', K.cust, b.c) end
b.s, b.xa = 'cancelled', now
redis.call('HSET', K.bookings, b.id, cjson.encode(b))
redis.call('XADD', K.outbox, '*', 'op', 'cancel', 'booking', b.id, 'at', now)
redis.call('HINCRBY', K.stats, 'cancelled', 1)
return finish('{"status":"cancelled"}')
