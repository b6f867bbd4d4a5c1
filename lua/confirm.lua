-- confirm.lua: turn a live hold into a booking and queue it for PostgreSQL.
-- KEYS: the event keys (lib.lua), then the Idempotency-Key counts and record (optional, lib.lua)
-- ARGV: common [1..4] (lib.lua), [5] hold id, [6] new booking id, [7] payment ref ("" = none),
--       [8] the customer token's customer ("" = tokens off: anyone's hold),
--       then the Idempotency-Key allowances (optional, lib.lua)
-- Returns JSON: the booking record (the same one again for a confirmed hold), or
-- {err = code} (hold_released adds ended_at ms, hold_expired expires_at ms). The outbox
-- entry is written in this same step: no booking exists that the write-behind worker
-- will not see.
local h, early = named_hold(ARGV[5], ARGV[8])
if early then return early end
if h.s == 'confirmed' then return unchanged(redis.call('HGET', K.bookings, h.b)) end
if h.s == 'released' then return unchanged(fail('hold_released', {ended_at = h.e})) end
if h.s == 'expired' then return unchanged(fail('hold_expired', {expires_at = h.ex})) end
local now = now_ms()
if now >= h.ex then
  -- Overdue but not reclaimed yet: reclaim it now rather than sell it late.
  -- (what the sweeper would do anyway: no change of this request's own)
  end_hold(h, 'expired', now)
  return unchanged(fail('hold_expired', {expires_at = h.ex}))
end
local full = idem_full()
if full then return full end

for cat, n in pairs(h.q) do
  redis.call('HINCRBY', K.held, cat, -n)
  redis.call('HINCRBY', K.sold, cat, n)
end
local mark = 'b:' .. ARGV[6]
for _, label in ipairs(h.st or {}) do redis.call('HSET', K.seatstate, label, mark) end
h.s, h.b, h.e = 'confirmed', ARGV[6], now
redis.call('HSET', K.holds, h.id, cjson.encode(h))
redis.call('ZREM', K.deadlines, h.id)
redis.call('ZADD', K.ended, now, h.id)

local booking = cjson.encode({
  id = ARGV[6], h = h.id, c = h.c, it = h.it, st = h.st, q = h.q, n = h.n, t = h.t,
  cu = h.cu, pr = ARGV[7] ~= '' and ARGV[7] or nil, ca = now, s = 'confirmed',
})
redis.call('HSET', K.bookings, ARGV[6], booking)
redis.call('HINCRBY', K.stats, 'confirmed', 1)
redis.call('XADD', K.outbox, '*', 'op', 'confirm', 'booking', booking)
return finish(booking)
