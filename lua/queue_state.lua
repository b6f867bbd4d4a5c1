-- queue_state.lua: the room's state as an API process keeps it (service/selling/roomstate.py).
-- Most reads of it are not this script: a process reads the snapshot the last step stored
-- (lib.lua, room_snapshot: the state's sj) with one HMGET, and calls this only when that
-- snapshot is older than STEP_MS (lib.lua, step_due; then this steps the room: room_step), when it
-- changed the room itself, or when it lacks leaves, corners or the ladder, or has lost
-- tickets that are not in the order to put back. So the room is stepped about once per STEP_MS whatever the number
-- of processes, and a process's poll costs nothing.
-- KEYS: the event keys (lib.lua), [17..21] the waiting room's keys (lib.lua, queue_keys)
-- ARGV: common [1..4] (lib.lua), [5] leaves the process has (the last leave number), [6]
--       corners it has (how many since the room began), [7] "1" to get the ladder, [8]
--       JSON [[kind, number, customer], ...]: tickets whose joins were lost with a primary
--       (the API checked their signatures): arrivals ("a") polled with a number the room
--       had not reached, and any ticket of an earlier generation in a room that Redis
--       lost (lib.lua, r) or polled while the room is suspect (lib.lua, check_server);
--       put back at their own places unless there already, or left; [9] "1": step the
--       room now (the process changed it, or heard that stock returned), else only when
--       its snapshot is STEP_MS old or tickets are put back
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
-- The offered tickets not in the order and not left: lost, to be put back.
local lost = {}
for _, one in ipairs(cjson.decode(ARGV[8])) do
  local place = one[1] .. string.format('%.0f', tonumber(one[2]))
  if not redis.call('ZSCORE', q.order, one[3])
      and not redis.call('ZSCORE', q.left, place .. ' ' .. one[3]) then
    lost[#lost + 1] = one
  end
end
local st = read_state(q, {'sj', 'st'})
local snap
if ARGV[9] ~= '1' and #lost == 0 and st.sj and not step_due(st.ct, st.st, now) then
  snap = cjson.decode(st.sj) -- the last step's; the logs' counts as they are now
  snap.hb, snap.ls = tonumber(st.hb or '0'), tonumber(st.ls or '0')
  snap.hc = tonumber(st.hc or '0')
else
  snap = room_step(q, rm, now, function(room)
    local n = tonumber(room.st.n or '0')
    local ranked = false
    for _, one in ipairs(lost) do
      local kind, number, customer = one[1], tonumber(one[2]), one[3]
      if kind == 'p' then
        redis.call('ZADD', q.order, number / PRE, customer)
        ranked = ranked or room.opened -- ranks behind it move: the ladder and P change
      else
        -- nl: the arrival number the lost ones start after, so API processes know which
        -- tickets to offer back once n has moved past them.
        if not room.st.nl then
          redis.call('HSET', q.state, 'nl', n)
          room.st.nl = tostring(n)
        end
        redis.call('ZADD', q.order, 1 + number, customer)
        if number > n then -- later arrivals go behind it
          n = number
          redis.call('HSET', q.state, 'n', n)
        end
      end
    end
    if ranked then
      rank_pre_queue(q)
      redis.call('HINCRBY', q.state, 'lv', 1)
    end
    return #lost > 0
  end, false, st)
end
local out = {room = snap}
if tonumber(ARGV[5]) < snap.ls then
  local left = redis.call('ZRANGEBYSCORE', q.left, (tonumber(ARGV[5]) + 1) * 4, '+inf',
    'WITHSCORES', 'LIMIT', 0, LEFT_BATCH)
  out.left = nonempty(left)
  out.more = #left == 2 * LEFT_BATCH and 1 or 0
end
local from = math.max(tonumber(ARGV[6]), snap.hb)
out.from = from
if snap.hc > from then -- hc: corners ever kept
  out.corners = nonempty(redis.call('LRANGE', q.hist, from - snap.hb, -1))
end
if ARGV[7] == '1' and snap.o == 1 then out.ladder = redis.call('GET', q.ladder) or '' end
return cjson.encode(out)
