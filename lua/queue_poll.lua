-- queue_poll.lua: a ticket as it reads now; its first look past the frontier admits it.
-- KEYS: the event keys (lib.lua), [17..21] the waiting room's keys (lib.lua, queue_keys)
-- ARGV: common [1..4] (lib.lua), [5] the ticket
-- Returns JSON: the ticket (lib.lua, ticket_view), or {err = "ticket_not_found"} (also
-- once it left, or when the event has no waiting room).
local rm = room_meta()
if not rm.status then return NOT_LOADED end
local q = queue_keys()
local raw = rm.apm and redis.call('HGET', q.tickets, ARGV[5])
local rec = raw and cjson.decode(raw)
if not rec or rec.l then return fail('ticket_not_found') end
local now = now_ms()
local room = advance(q, rm, now)
return cjson.encode(ticket_view(q, rm, room, ARGV[5], rec, now))
