-- queue_leave.lua: leave the waiting room. A ticket already admitted keeps its place in
-- the order (taking it out would move everyone behind it up one, and admit one more
-- than the rate); its pass stays valid until it expires. Leaving twice is a no-op.
-- KEYS: the event keys (lib.lua), [17..21] the waiting room's keys (lib.lua, queue_keys),
--       then the Idempotency-Key counts and record (optional, last)
-- ARGV: common [1..4] (lib.lua), [5] the ticket, [6] the customer who asks ("": anyone
--       who knows the ticket; another customer's ticket is not found)
-- Returns '{"ok":1}', or {err = "ticket_not_found"}.
local cached = replay()
if cached then return cached end
local rm = room_meta()
if not rm.status then return NOT_LOADED end
local q = queue_keys()
local ticket = ARGV[5]
local raw = rm.apm and redis.call('HGET', q.tickets, ticket)
local rec = raw and cjson.decode(raw)
-- Not remembered: tickets are the server's own, 128-bit, so a repeat gets this 404 anyway.
if not rec or (ARGV[6] ~= '' and rec.c ~= ARGV[6]) then return fail('ticket_not_found') end
if rec.l then return unchanged('{"ok":1}') end
local full = idem_full()
if full then return full end
local room = advance(q, rm, now_ms())
local rank = redis.call('ZRANK', q.order, ticket)
if not (room.opened and rank and rank + 1 <= room.f) then
  redis.call('ZREM', q.order, ticket)
end
rec.l = 1
redis.call('HSET', q.tickets, ticket, cjson.encode(rec))
if redis.call('HGET', q.cust, rec.c) == ticket then redis.call('HDEL', q.cust, rec.c) end
return finish('{"ok":1}')
