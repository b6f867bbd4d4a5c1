-- check_seats.lua: a chunk of the seat map checked where the data is (read-only).
-- KEYS: the event keys (lib.lua), [17] the seat order list (service/core/keys.py seat_order)
-- ARGV: common [1..4] (lib.lua), [5] the chunk's first position in seat order, [6] seats
--       per call at most, [7] hold or booking records read per call at most
-- Every seat is in exactly one state (on sale, held, sold), and a held or sold seat is
-- backed by a live hold or a confirmed booking that has it. Each seat is checked in one
-- step, so a sale running meanwhile never shows half done; the chunk ends early once it
-- has read [7] records (a sold-out map costs a record per seat), so that no call holds
-- Redis for more than a millisecond or two, whatever the event's size and state.
-- Returns JSON {next = next call's first position, -1 after the last, total, available,
-- held, sold, problems = [[kind, detail], ...], booked = [booking ids]} (the caller checks
-- that the booked ones are durable: in PostgreSQL or the outbox); or {err = "no_order"}
-- when the order list is missing (load.lua "order" builds it).
local order = KEYS[NKEYS + 1]
local first, most, reads = tonumber(ARGV[5]), tonumber(ARGV[6]), tonumber(ARGV[7])
if not (first and most and reads) or most < 1 or reads < 1 then
  return redis.error_reply('check_seats: bad arguments')
end
local labels = redis.call('LRANGE', order, first, first + most - 1)
if #labels == 0 then
  if first == 0 and redis.call('HLEN', K.seatmap) > 0 then return '{"err":"no_order"}' end
  return '{"next":-1,"total":0,"available":0,"held":0,"sold":0}'
end
local states = redis.call('HMGET', K.seatstate, unpack(labels))
local on_sale = redis.call('ZMSCORE', K.free, unpack(labels))
local out = {total = 0, available = 0, held = 0, sold = 0}
local problems, booked, records, read = {}, {}, {}, 0
local function owner(state)
  if records[state] == nil then
    local hash = string.sub(state, 1, 2) == 'h:' and K.holds or K.bookings
    local raw = redis.call('HGET', hash, string.sub(state, 3))
    local r = raw and cjson.decode(raw)
    local live = r and ((hash == K.holds and r.s == 'held') or (hash == K.bookings and r.s == 'confirmed'))
    records[state] = live and r or false
    read = read + 1
    if hash == K.bookings then booked[#booked + 1] = string.sub(state, 3) end
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
  out.total = out.total + 1
  if not state then
    out.available = out.available + 1
    if not on_sale[i] then
      problems[#problems + 1] = {'seat_in_no_state', 'seat ' .. label .. ': not on sale, held nor sold'}
    end
  else
    if string.sub(state, 1, 2) == 'h:' then out.held = out.held + 1 else out.sold = out.sold + 1 end
    if on_sale[i] then
      problems[#problems + 1] = {'seat_in_two_states', 'seat ' .. label .. ' is ' .. state .. ' and on sale'}
    end
    local r = owner(state)
    local has = false
    for _, l in ipairs(r and r.st or {}) do has = has or l == label end
    if not has then
      problems[#problems + 1] = {'seat_without_record', 'seat ' .. label .. ' is ' .. state .. ': no such record of it'}
    end
  end
end
out.next = (done == most or done < #labels) and first + done or -1
out.problems = nonempty(problems)
out.booked = nonempty(booked)
return cjson.encode(out)
