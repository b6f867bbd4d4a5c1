-- load_seats.lua: begin a load of an event, or stage one chunk of its seats; load.lua
-- then makes the staged seats live together with the rest of the event, in one short
-- call. A chunk at a time, no call blocks Redis for long, however many seats.
-- KEYS: the event keys (lib.lua), [17] the seat order list (load.lua takes it),
--       [18] the load lease (string: the token of the load in progress, with a TTL),
--       [19] [20] [21] the staged seat map, free seats and seat order, [22...] the other
--       staged keys (load_bookings.lua; service/core/keys.py lists them all)
-- ARGV: common [1..4] (lib.lua), [5] mode: "create", "restore" or "order" (load.lua),
--       [6] this load's token, [7] lease ms, [8] categories JSON [[name, lo, hi], ...]
--       in seat order ("[]" for "order"), [9] "" to begin, else the position of the
--       chunk's first seat, [10...] the chunk's seat labels in seat order
-- Begin: "loaded" when a restore finds the event loaded, or "order" its order list
-- (another process did it); "busy" while another load holds the lease (a create takes
-- it regardless: nobody else can load an event PostgreSQL has not committed); else
-- takes the lease, drops what a load that died left staged, "ok".
-- Chunk: "ok"; "busy" when the lease is no longer this load's or the staged seats are
-- not the ones before this chunk (the caller begins again). Repeating a chunk is "ok".
local lease, map, free, order = KEYS[NKEYS + 2], KEYS[NKEYS + 3], KEYS[NKEYS + 4], KEYS[NKEYS + 5]
local mode, token, ms, first = ARGV[5], ARGV[6], tonumber(ARGV[7]), tonumber(ARGV[9])
if not (mode == 'create' or mode == 'restore' or mode == 'order') or not ms
  or (ARGV[9] ~= '' and not first) then
  return redis.error_reply('load_seats: bad arguments')
end

if ARGV[9] == '' then
  if mode == 'restore' and loaded() then return 'loaded' end
  if mode == 'order' and redis.call('EXISTS', KEYS[NKEYS + 1]) == 1 then return 'loaded' end
  local holder = redis.call('GET', lease)
  if holder and holder ~= token and mode ~= 'create' then return 'busy' end
  redis.call('SET', lease, token, 'PX', ms)
  redis.call('UNLINK', unpack(KEYS, NKEYS + 3))
  return 'ok'
end

if redis.call('GET', lease) ~= token then return 'busy' end
local staged = redis.call('LLEN', order)
if staged == first + #ARGV - 9 then return 'ok' end -- a repeat: already staged
if staged ~= first then return 'busy' end

local cats, c = cjson.decode(ARGV[8]), 1
if mode ~= 'order' and (#cats == 0 or first + #ARGV - 10 > cats[#cats][3]) then
  return redis.error_reply('load_seats: a seat beyond the categories')
end
local fields, scores, labels = {}, {}, {}
local function flush()
  if mode ~= 'order' then
    redis.call('HSET', map, unpack(fields))
    redis.call('ZADD', free, unpack(scores))
  end
  redis.call('RPUSH', order, unpack(labels))
  fields, scores, labels = {}, {}, {}
end
for i = 10, #ARGV do
  local label, pos = ARGV[i], first + i - 10
  labels[#labels + 1] = label
  if mode ~= 'order' then
    while cats[c][3] < pos do c = c + 1 end
    fields[#fields + 1] = label
    fields[#fields + 1] = pos .. ':' .. cats[c][1]
    scores[#scores + 1] = pos
    scores[#scores + 1] = label
  end
  if #labels == 1000 then flush() end
end
if #labels > 0 then flush() end
-- Whatever a load that dies leaves behind goes with its lease.
for i = NKEYS + 2, #KEYS do redis.call('PEXPIRE', KEYS[i], ms) end
return 'ok'
