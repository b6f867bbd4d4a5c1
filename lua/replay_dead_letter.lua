-- replay_dead_letter.lua: put a dead letter back in its event's outbox, for the
-- write-behind to write again (after its cause was fixed).
-- KEYS: the event keys (lib.lua), [17] the event's dead-letter stream
-- ARGV: common [1..4] (lib.lua), [5] the dead letter's id, [6..] the fields the dead
--       letter added to the entry (service/durable/outbox.py DEAD_LETTER_META)
-- Returns the new outbox entry's id, or "" when there is no such dead letter. One atomic
-- step: the entry is in exactly one of the two streams at any moment.
local deadletter = KEYS[NKEYS + 1]
local found = redis.call('XRANGE', deadletter, ARGV[5], ARGV[5])
if #found == 0 then return '' end
local added = {}
for i = 6, #ARGV do added[ARGV[i]] = true end
local fields, entry, op, booking = found[1][2], {}, nil, nil
for i = 1, #fields, 2 do
  if not added[fields[i]] then
    entry[#entry + 1] = fields[i]
    entry[#entry + 1] = fields[i + 1]
  end
  if fields[i] == 'op' then op = fields[i + 1] end
  if fields[i] == 'booking' then booking = fields[i + 1] end
end
local id = redis.call('XADD', K.outbox, '*', unpack(entry))
redis.call('XDEL', deadletter, ARGV[5])
-- A confirmation replayed after its booking was cancelled: the cancellation went by while
-- the confirmation was a dead letter (and changed nothing then), so it follows again.
if op == 'confirm' and booking then
  local ok, b = pcall(cjson.decode, booking)
  local raw = ok and type(b) == 'table' and type(b.id) == 'string'
    and redis.call('HGET', K.bookings, b.id)
  if raw then
    local live = cjson.decode(raw)
    if live.s == 'cancelled' and live.xa then
      redis.call('XADD', K.outbox, '*', 'op', 'cancel', 'booking', b.id, 'at', live.xa)
    end
  end
end
return id
