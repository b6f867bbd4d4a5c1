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
local c, reply = seat_chunk('repair_seats', '{"next":-1,"freed":0,"unlisted":0}')
if not c then return reply end
local freed, unlisted = 0, 0
local next = walk_seats(c, function(i, label, state, record)
  local has = state and has_seat(record, label)
  if state and not has then redis.call('HDEL', K.seatstate, label) end
  if has and c.on_sale[i] then
    redis.call('ZREM', K.free, label)
    unlisted = unlisted + 1
  elseif not has and not c.on_sale[i] then
    redis.call('ZADD', K.free, seat_position(label), label)
    freed = freed + 1
  end
end)
return cjson.encode({next = next, freed = freed, unlisted = unlisted})
