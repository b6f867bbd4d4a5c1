-- queue_join.lua: join the event's waiting room, for one buyer or for all the buyers that
-- one API process saw join in one turn of its loop; the same customer keeps their place.
-- KEYS: the event keys (lib.lua), [17..21] the waiting room's keys (lib.lua, queue_keys),
--       then the Idempotency-Key counts and record (optional, last; only with one buyer)
-- ARGV: common [1..4] (lib.lua), [5] JSON [[customer id, k], ...]: k a random whole
--       number below 2^52 from the caller (a script's math.random repeats itself), the
--       buyer's place if they join the pre-queue
-- Returns JSON {places = [[kind, number, new], ...] in the order asked (kind "p": the
-- pre-queue's k, "a": the arrival number; new = 1 when this call placed them), room =
-- lib.lua's room_snapshot}; or {err = code, ...}: no_waiting_room, not_on_sale (the event
-- is closed; adds status), queue_not_open (adds opens_at ms).
local cached = replay()
if cached then return cached end
local rm = room_meta()
if not rm.status then return NOT_LOADED end
if not rm.apm then return unchanged(fail('no_waiting_room')) end
local now = now_ms()
if rm.status == 'closed' then return unchanged(fail('not_on_sale', {status = 'closed'})) end
if rm.opens and now < rm.opens then
  return unchanged(fail('queue_not_open', {opens_at = rm.opens}))
end
local q = queue_keys()
local room = advance(q, rm, now)
local function place_of(score)
  if score < 1 then return {'p', string.format('%.0f', score * PRE)} end
  return {'a', string.format('%.0f', score - 1)}
end
local places, made = {}, false
for i, buyer in ipairs(cjson.decode(ARGV[5])) do
  local customer = buyer[1]
  local score = tonumber(redis.call('ZSCORE', q.order, customer))
  local p
  if score then
    p = place_of(score)
    p[3] = 0
  else
    if not made then
      local full = idem_full()
      if full then return full end
      made = true
    end
    -- Before the opening: a uniformly random place among the pre-queue, decided now and
    -- revealed at the opening. After it: arrival order, behind the pre-queue.
    if room.opened then
      score = 1 + redis.call('HINCRBY', q.state, 'n', 1)
    else
      score = tonumber(buyer[2]) / PRE
    end
    redis.call('ZADD', q.order, score, customer)
    p = place_of(score)
    p[3] = 1
  end
  places[i] = p
end
local reply = cjson.encode({places = places, room = room_snapshot(q, rm, room, now, made)})
if made then return finish(reply) end
return unchanged(reply)
