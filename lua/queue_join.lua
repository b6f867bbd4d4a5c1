-- queue_join.lua: join the event's waiting room; the same customer gets the same ticket.
-- KEYS: the event keys (lib.lua), [17..21] the waiting room's keys (lib.lua, queue_keys),
--       then the Idempotency-Key counts and record (optional, last)
-- ARGV: common [1..4] (lib.lua), [5] a new ticket (128 random bits from the caller),
--       [6] customer id, [7] a random whole number below 2^52 from the caller (a
--       script's math.random repeats itself): the ticket's place if it joins the pre-queue
-- Returns JSON: the ticket as it reads now (lib.lua, ticket_view), with new = 1 when this
-- call made it; or {err = code, ...}: no_waiting_room, not_on_sale (the event is
-- closed; adds status), queue_not_open (adds opens_at ms).
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
local customer = ARGV[6]
local ticket = redis.call('HGET', q.cust, customer)
if ticket then
  local rec = cjson.decode(redis.call('HGET', q.tickets, ticket))
  return unchanged(cjson.encode(ticket_view(q, rm, room, ticket, rec, now)))
end
local full = idem_full()
if full then return full end

ticket = ARGV[5]
-- Before the opening: a uniformly random place among the pre-queue, decided now and
-- revealed at the opening as the rank. After it: arrival order, behind the pre-queue.
local score
if room.opened then
  score = 1 + redis.call('HINCRBY', q.state, 'n', 1)
else
  score = tonumber(ARGV[7]) / 4503599627370496 -- 2^52
end
local rec = {c = customer}
redis.call('HSET', q.tickets, ticket, cjson.encode(rec))
redis.call('HSET', q.cust, customer, ticket)
redis.call('ZADD', q.order, score, ticket)
local v = ticket_view(q, rm, room, ticket, rec, now)
v.new = 1
return finish(cjson.encode(v))
