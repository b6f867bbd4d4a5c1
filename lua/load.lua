-- load.lua: make a loaded event live, in one short call: what load_seats.lua and
-- load_bookings.lua staged a chunk at a time is renamed into place, the event's other
-- keys written, stock counted from the staged sales. Until this call the event is not
-- loaded (no meta), so no request sees or sells from a half-loaded event.
-- KEYS: the event keys (lib.lua), [17] the seat order list, [18] the load lease,
--       [19] [20] [21] the staged seat map, free seats and seat order, [22] [23] [24]
--       the staged seat state, sold and per-customer counts, [25] the ids of the
--       bookings counted (load_bookings.lua; service/core/keys.py)
-- ARGV: common [1..4] (lib.lua), [5] mode: "create" replaces whatever is there;
--       "restore" loads an event Redis lost, with the confirmed bookings of the
--       `bookings` hash counted as sold (the caller first adds those that PostgreSQL has,
--       then counts them all with load_bookings.lua), and does nothing when the event is
--       already loaded (another process won); "order" only puts the staged seat order
--       list in place when it is missing (an event loaded by an earlier version),
--       [6] this load's token, [7] the number of seats staged, [8] meta JSON
--       {field = value} (lib.lua lists the fields), [9] categories JSON [{name, p, s,
--       cap, lo, hi, nb = seats from seat blocks}] in event order ([8] and [9] are ""
--       for "order")
-- Returns "ok" when it loaded, "loaded" when the event was already there, "busy" when
-- the lease is no longer this load's or the staging is incomplete (load again).
local order, lease, staged_order = KEYS[NKEYS + 1], KEYS[NKEYS + 2], KEYS[NKEYS + 5]
local sold, counted = KEYS[NKEYS + 7], KEYS[NKEYS + 9]
local mode, count = ARGV[5], tonumber(ARGV[7])
if not (mode == 'create' or mode == 'restore' or mode == 'order') or not count then
  return redis.error_reply('load: bad arguments')
end
if redis.call('GET', lease) ~= ARGV[6] or redis.call('LLEN', staged_order) ~= count then
  return 'busy'
end
-- A booking added since they were counted (none should be: the event is not loaded).
if mode == 'restore' and redis.call('SCARD', counted) ~= redis.call('HLEN', K.bookings) then
  return 'busy'
end

local function put(from, to)
  redis.call('UNLINK', to) -- freed off the main thread, however big
  if redis.call('EXISTS', from) == 1 then
    redis.call('RENAME', from, to)
    redis.call('PERSIST', to)
  end
end
local function done(reply)
  redis.call('UNLINK', unpack(KEYS, NKEYS + 2))
  return reply
end

if mode == 'order' then
  if redis.call('EXISTS', order) == 0 then put(staged_order, order) end
  return done('ok')
end
if mode == 'restore' and loaded() then return done('loaded') end
-- A restore keeps the bookings and the outbox: they may hold confirmations PostgreSQL
-- lacks. Holds are gone with the live state: no hold is left to count.
local last = mode == 'create' and NKEYS or NKEYS - 2
for i = 1, last do redis.call('UNLINK', KEYS[i]) end
put(KEYS[NKEYS + 3], K.seatmap)
put(KEYS[NKEYS + 4], K.free)
put(staged_order, order)
put(KEYS[NKEYS + 6], K.seatstate)
put(KEYS[NKEYS + 8], K.cust)

hset_all(K.meta, cjson.decode(ARGV[8]))
for _, c in ipairs(cjson.decode(ARGV[9])) do
  redis.call('HSET', K.cats, c.name, cjson.encode({p = c.p, s = c.s, lo = c.lo, hi = c.hi, nb = c.nb}))
  redis.call('HSET', K.cap, c.name, c.cap)
  local s = tonumber(redis.call('HGET', sold, c.name) or '0')
  -- Never on sale what is sold, even beyond the capacity (reconcile reports it).
  redis.call('HSET', K.avail, c.name, math.max(0, c.cap - s))
  redis.call('HSET', K.held, c.name, 0)
  redis.call('HSET', K.sold, c.name, s)
end
-- A process may remember the event sold out from before Redis lost it (lib.lua, restocked).
restocked()
return done('ok')
