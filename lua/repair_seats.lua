-- repair_seats.lua: seats -> records, a chunk of the seat map at a time in seat order (a
-- repair step, after repair_claims.lua): each seat ends in exactly one state.
-- KEYS: the event keys (lib.lua), [17] the seat order list (service/core/keys.py seat_order)
-- ARGV: common [1..4] (lib.lua), [5] the chunk's first position in seat order, [6] seats
--       per call at most, [7] hold or booking records read per call at most
-- A seat naming a record that is not live or does not have it goes back on sale; a held
-- or sold seat also on sale is taken off sale; a seat in no state goes on sale. Each
-- seat is read and written in one step, so a sale meanwhile is never overwritten; the
-- chunk ends early once it has read [7] records, as check_seats.lua does. Returns JSON
-- {next = next call's first position, -1 after the last, freed = seats put on sale,
-- unlisted = seats taken off sale}, or {err = "no_order"} when the order list is missing.
local order = KEYS[NKEYS + 1]
local first, most, reads = tonumber(ARGV[5]), tonumber(ARGV[6]), tonumber(ARGV[7])
if not (first and most and reads) or most < 1 or reads < 1 then
  return redis.error_reply('repair_seats: bad arguments')
end
local labels = redis.call('LRANGE', order, first, first + most - 1)
if #labels == 0 then
  if first == 0 and redis.call('HLEN', K.seatmap) > 0 then return '{"err":"no_order"}' end
  return '{"next":-1,"freed":0,"unlisted":0}'
end
local states = redis.call('HMGET', K.seatstate, unpack(labels))
local on_sale = redis.call('ZMSCORE', K.free, unpack(labels))
local records, read, freed, unlisted = {}, 0, 0, 0
local function owner(state)
  if records[state] == nil then
    local hold = string.sub(state, 1, 2) == 'h:'
    local raw = redis.call('HGET', hold and K.holds or K.bookings, string.sub(state, 3))
    local r = raw and cjson.decode(raw)
    records[state] = r and r.s == (hold and 'held' or 'confirmed') and r or false
    read = read + 1
  end
  return records[state]
end
local done = #labels
for i, label in ipairs(labels) do
  local state = states[i]
  if state and records[state] == nil and read >= reads then
    done = i - 1 -- the next call starts at this seat
    break
  end
  local has = false
  if state then
    for _, l in ipairs(owner(state) and owner(state).st or {}) do has = has or l == label end
    if not has then redis.call('HDEL', K.seatstate, label) end
  end
  if has and on_sale[i] then
    redis.call('ZREM', K.free, label)
    unlisted = unlisted + 1
  elseif not has and not on_sale[i] then
    redis.call('ZADD', K.free, seat_position(label), label)
    freed = freed + 1
  end
end
local next = (done == most or done < #labels) and first + done or -1
return cjson.encode({next = next, freed = freed, unlisted = unlisted})
