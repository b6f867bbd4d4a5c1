-- load.lua: put an event's live inventory into Redis, from the catalog in PostgreSQL.
-- KEYS: the event keys (lib.lua), [17] the seat order list (service/keys.py seat_order)
-- ARGV: common [1..4] (lib.lua), [5] mode: "create" replaces whatever is there;
--       "restore" loads an event Redis lost, counting as sold the confirmed bookings in
--       the `bookings` hash (the caller first adds those that PostgreSQL has), and does
--       nothing when the event is already loaded (another process won);
--       "order" only builds the seat order list when it is missing (an event loaded by
--       an earlier version), [6] meta JSON {field = value} (lib.lua lists the fields),
--       [7] categories JSON [{name, p, s, cap, lo, hi, nb = seats from seat blocks}]
--       in event order ([6] and [7] are "" for "order"),
--       [8...] seat labels in event seat order (position = index from 0)
-- Returns 1 when it loaded, 0 when the event was already there.
local order = KEYS[NKEYS + 1]
local function load_order()
  redis.call('DEL', order)
  for i = 8, #ARGV, 1000 do
    redis.call('RPUSH', order, unpack(ARGV, i, math.min(i + 999, #ARGV)))
  end
end
if ARGV[5] == 'order' then
  if redis.call('EXISTS', order) == 0 then load_order() end
  return 1
end
if ARGV[5] == 'restore' and loaded() then return 0 end
-- A restore keeps the bookings and the outbox: they may hold confirmations PostgreSQL lacks.
local last = ARGV[5] == 'create' and NKEYS or NKEYS - 2
for i = 1, last do redis.call('DEL', KEYS[i]) end

hset_all(K.meta, cjson.decode(ARGV[6]))
for _, c in ipairs(cjson.decode(ARGV[7])) do
  redis.call('HSET', K.cats, c.name, cjson.encode({p = c.p, s = c.s, lo = c.lo, hi = c.hi, nb = c.nb}))
  redis.call('HSET', K.cap, c.name, c.cap)
  local seatmap = {}
  for pos = c.lo, c.hi do seatmap[ARGV[8 + pos]] = pos .. ':' .. c.name end
  hset_all(K.seatmap, seatmap)
end
load_order()
rebuild(now_ms())
return 1
