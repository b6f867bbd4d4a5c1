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
local c, reply = seat_chunk('check_seats', '{"next":-1,"total":0,"available":0,"held":0,"sold":0}')
if not c then return reply end
local out = {total = 0, available = 0, held = 0, sold = 0}
local problems, booked, seen = {}, {}, {}
out.next = walk_seats(c, function(i, label, state, record)
  out.total = out.total + 1
  if not state then
    out.available = out.available + 1
    if not c.on_sale[i] then
      problems[#problems + 1] = {'seat_in_no_state', 'seat ' .. label .. ': not on sale, held nor sold'}
    end
    return
  end
  if string.sub(state, 1, 2) == 'h:' then
    out.held = out.held + 1
  else
    out.sold = out.sold + 1
    if not seen[state] then booked[#booked + 1] = string.sub(state, 3) end
    seen[state] = true
  end
  if c.on_sale[i] then
    problems[#problems + 1] = {'seat_in_two_states', 'seat ' .. label .. ' is ' .. state .. ' and on sale'}
  end
  if not has_seat(record, label) then
    problems[#problems + 1] = {'seat_without_record', 'seat ' .. label .. ' is ' .. state .. ': no such record of it'}
  end
end)
out.problems = nonempty(problems)
out.booked = nonempty(booked)
return cjson.encode(out)
