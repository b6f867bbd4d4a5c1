-- load_bookings.lua: count a batch of the event's bookings into the staged seats of a
-- restore (load_seats.lua staged them), a short call per batch: the confirmed ones take
-- their seats out of the staged free seats, into the staged seat state, and add to the
-- staged tickets sold per category and per customer. load.lua puts them in place.
-- KEYS: the event keys (lib.lua), [17] the seat order list, [18] the load lease,
--       [19] [20] [21] the staged seat map, free seats and seat order, [22] [23] [24]
--       the staged seat state, sold and per-customer counts (hashes as K.seatstate,
--       K.sold, K.cust), [25] the ids of the bookings counted (set) (service/core/keys.py)
-- ARGV: common [1..4] (lib.lua), [5] this load's token, [6] lease ms, [7] HSCAN cursor
--       of the `bookings` hash ("0" first)
-- Returns the next cursor, "done" after the last batch, or "busy" when the lease is no
-- longer this load's. A booking is counted once, however often HSCAN returns it or the
-- call is repeated.
local lease, free = KEYS[NKEYS + 2], KEYS[NKEYS + 4]
local state, sold, cust, counted = KEYS[NKEYS + 6], KEYS[NKEYS + 7], KEYS[NKEYS + 8], KEYS[NKEYS + 9]
if not tonumber(ARGV[7]) or not tonumber(ARGV[6]) then
  return redis.error_reply('load_bookings: bad arguments')
end
if redis.call('GET', lease) ~= ARGV[5] then return 'busy' end

local scan = redis.call('HSCAN', K.bookings, ARGV[7], 'COUNT', 100)
local flat = scan[2]
for i = 1, #flat, 2 do
  local b = cjson.decode(flat[i + 1])
  if redis.call('SADD', counted, flat[i]) == 1 and b.s == 'confirmed' then
    for cat, n in pairs(b.q) do redis.call('HINCRBY', sold, cat, n) end
    redis.call('HINCRBY', cust, b.c, b.n)
    for _, label in ipairs(b.st or {}) do
      -- Not free: not a seat of the event, or a booking before took it (double sold).
      if redis.call('ZREM', free, label) == 1 then
        redis.call('HSET', state, label, 'b:' .. b.id)
      end
    end
  end
end
for i = NKEYS + 2, #KEYS do redis.call('PEXPIRE', KEYS[i], ARGV[6]) end
if scan[1] == '0' then return 'done' end
return scan[1]
