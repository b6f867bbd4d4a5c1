-- seats.lua: one page of the seat map, in seat order, with each seat's state.
-- KEYS: the event keys (lib.lua), [17] the seat order list (service/core/keys.py seat_order)
-- ARGV: common [1..4] (lib.lua), [5] first position, [6] positions per page (the work
--       of one call is bounded by it, whatever the event's size), [7] category ("" =
--       every seated one), [8] status letter ("" = any; a, h or b as below)
-- Returns JSON {next = next call's first position or -1, cats = [[name, lo, hi, nb =
-- seats from seat blocks], ...] the seated categories in seat order, first = the first
-- position examined, labels = [label, ...], st = one letter per label ("a"vailable,
-- "h"eld, "b"ooked), pos = [position, ...] (only with a status filter: else the labels
-- are consecutive from `first`)}; or {err = "unknown_category", category}; or
-- {err = "no_order"} when the order list is missing (load.lua "order" builds it); or
-- {err = "not_loaded"} / {err = "retry"} (see view.lua). Its work is bounded by [6]
-- (the caller keeps it to a thousand, about a millisecond), whatever the event's size.
if not loaded() then return NOT_LOADED end
if reclaim(now_ms(), RECLAIM_BATCH) then return RETRY end
local order = KEYS[NKEYS + 1]
local lo, hi
if ARGV[7] ~= '' then
  local raw = redis.call('HGET', K.cats, ARGV[7])
  if not raw then return fail('unknown_category', {category = ARGV[7]}) end
  local c = cjson.decode(raw)
  lo, hi = c.lo, c.hi -- a general-admission category: an empty range
else
  lo, hi = 0, redis.call('LLEN', order) - 1
  if hi < 0 and redis.call('HLEN', K.seatmap) > 0 then return '{"err":"no_order"}' end
end
local first = math.max(tonumber(ARGV[5]), lo)
if first > hi then return '{"next":-1}' end
local last = math.min(first + tonumber(ARGV[6]) - 1, hi)
local labels = redis.call('LRANGE', order, first, last)
if #labels == 0 then return '{"err":"no_order"}' end
local states = redis.call('HMGET', K.seatstate, unpack(labels))

-- The seated categories in seat order, to tell each position's category.
local cats = {}
local flat = redis.call('HGETALL', K.cats)
for i = 1, #flat, 2 do
  local c = cjson.decode(flat[i + 1])
  if c.hi >= c.lo then cats[#cats + 1] = {flat[i], c.lo, c.hi, c.nb or 0} end
end
table.sort(cats, function(a, b) return a[2] < b[2] end)

local want = ARGV[8]
local out, st, pos = {}, {}, {}
for i, label in ipairs(labels) do
  local state = states[i]
  local s = state and string.sub(state, 1, 1) or 'a'
  if want == '' or want == s then
    local n = #out + 1
    out[n], st[n] = label, s
    if want ~= '' then pos[n] = first + i - 1 end
  end
end
return cjson.encode({
  next = last < hi and last + 1 or -1, cats = cats, first = first, labels = nonempty(out),
  st = table.concat(st), pos = nonempty(pos),
})
