-- queue_state.lua: the room's state as an API process keeps it (service/selling/roomstate.py), read
-- at most a few times a second per room and process, never per poll: the frontier (after
-- advancing it to now), and what changed since the process last read: leaves, corners
-- of the frontier, and once the ladder of the pre-queue.
-- KEYS: the event keys (lib.lua), [17..21] the waiting room's keys (lib.lua, queue_keys)
-- ARGV: common [1..4] (lib.lua), [5] leaves the process has (the last leave number), [6]
--       corners it has (how many since the room began), [7] "1" to get the ladder, [8]
--       JSON [[kind, number, customer], ...]: tickets whose joins were lost with a primary
--       (the API checked their signatures): arrivals ("a") polled with a number the room
--       had not reached, and any ticket of an earlier generation in a room that Redis
--       lost (lib.lua, r); put back at their own places unless there already, or left
-- Returns JSON {room = lib.lua's room_snapshot, left = ["<place> <customer>", 4 x leave
-- number + flags, ...] (at most LEFT_BATCH: more = 1 when there are more), corners =
-- ["t f", ...] from corner number `from` on, from, ladder = "rank k ..." (when asked and
-- open)}; {room = {none = 1}} when the event has no room.
local LEFT_BATCH = 5000
local rm = room_meta()
if not rm.status then return NOT_LOADED end
if not rm.apm then return '{"room":{"none":1}}' end
local q = queue_keys()
local now = now_ms()
local room = advance(q, rm, now)
local n = tonumber(redis.call('HGET', q.state, 'n') or '0')
local ranked = false
for _, lost in ipairs(cjson.decode(ARGV[8])) do
  local kind, number, customer = lost[1], tonumber(lost[2]), lost[3]
  local place = kind .. string.format('%.0f', number)
  if not redis.call('ZSCORE', q.order, customer)
      and not redis.call('ZSCORE', q.left, place .. ' ' .. customer) then
    if kind == 'p' then
      redis.call('ZADD', q.order, number / PRE, customer)
      ranked = ranked or room.opened -- ranks behind it move: the ladder and P change
    else
      -- nl: the arrival number the lost ones start after, so API processes know which
      -- tickets to offer back once n has moved past them.
      if not redis.call('HGET', q.state, 'nl') then redis.call('HSET', q.state, 'nl', n) end
      redis.call('ZADD', q.order, 1 + number, customer)
      if number > n then -- later arrivals go behind it
        n = number
        redis.call('HSET', q.state, 'n', n)
      end
    end
  end
end
if ranked then
  rank_pre_queue(q)
  redis.call('HINCRBY', q.state, 'lv', 1)
end
local out = {room = room_snapshot(q, rm, room, now)}
local left = redis.call('ZRANGEBYSCORE', q.left, (tonumber(ARGV[5]) + 1) * 4, '+inf',
  'WITHSCORES', 'LIMIT', 0, LEFT_BATCH)
out.left = nonempty(left)
out.more = #left == 2 * LEFT_BATCH and 1 or 0
local from = math.max(tonumber(ARGV[6]), out.room.hb)
out.from = from
out.corners = nonempty(redis.call('LRANGE', q.hist, from - out.room.hb, -1))
if ARGV[7] == '1' and room.opened then out.ladder = redis.call('GET', q.ladder) or '' end
return cjson.encode(out)
