-- check_seats.lua: a chunk of the seat map checked where the data is (read-only).
-- KEYS: the event keys (lib.lua)
-- ARGV: common [1..4] (lib.lua), [5] HSCAN cursor of `seatmap`, [6] seats per call
-- Every seat is in exactly one state (on sale, held, sold), and a held or sold seat is
-- backed by a live hold or a confirmed booking that has it. Returns JSON {cursor, total,
-- available, held, sold, problems = [[kind, detail], ...], booked = [booking ids]}; the
-- caller checks that the booked ones are durable (in PostgreSQL or the outbox).
local scan = redis.call('HSCAN', K.seatmap, ARGV[5], 'COUNT', ARGV[6])
local out = {cursor = scan[1], total = 0, available = 0, held = 0, sold = 0}
local problems, booked, records = {}, {}, {}
local function owner(state)
  if records[state] == nil then
    local hash = string.sub(state, 1, 2) == 'h:' and K.holds or K.bookings
    local raw = redis.call('HGET', hash, string.sub(state, 3))
    local r = raw and cjson.decode(raw)
    local live = r and ((hash == K.holds and r.s == 'held') or (hash == K.bookings and r.s == 'confirmed'))
    records[state] = live and r or false
    if hash == K.bookings then booked[#booked + 1] = string.sub(state, 3) end
  end
  return records[state]
end
local fields = scan[2]
for i = 1, #fields, 2 do
  local label = fields[i]
  local state = redis.call('HGET', K.seatstate, label)
  local on_sale = redis.call('ZSCORE', K.free, label)
  out.total = out.total + 1
  if not state then
    out.available = out.available + 1
    if not on_sale then
      problems[#problems + 1] = {'seat_in_no_state', 'seat ' .. label .. ': not on sale, held nor sold'}
    end
  else
    if string.sub(state, 1, 2) == 'h:' then out.held = out.held + 1 else out.sold = out.sold + 1 end
    if on_sale then
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
out.problems = nonempty(problems)
out.booked = nonempty(booked)
return cjson.encode(out)
