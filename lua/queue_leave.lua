-- queue_leave.lua: leave the waiting room. A ticket already admitted keeps its place in
-- the order (taking it out would move everyone behind it up one, and admit one more
-- than the rate); its pass stays valid until it expires. Leaving twice is a no-op. Every
-- leave goes in the room's log, which every API process reads (queue_state.lua): a
-- ticket that left is not found anywhere within a moment.
-- KEYS: the event keys (lib.lua), [17..21] the waiting room's keys (lib.lua, queue_keys),
--       then the Idempotency-Key counts and record (optional, last)
-- ARGV: common [1..4] (lib.lua), [5] the ticket's generation, [6] its place ("p<k>" or
--       "a<arrival number>"), [7] its customer (the API checked the ticket's signature)
-- Returns '{"ok":1}', or {err = "ticket_not_found"} (another room's ticket).
local cached = replay()
if cached then return cached end
local rm = room_meta()
if not rm.status then return NOT_LOADED end
local q = queue_keys()
local now = now_ms()
if not rm.apm then return fail('ticket_not_found') end
local room = advance(q, rm, now)
local gr = redis.call('HMGET', q.state, 'g', 'r')
if gr[1] ~= ARGV[5] and not (gr[2] == '1' and tonumber(ARGV[5]) < tonumber(gr[1])) then
  return fail('ticket_not_found') -- another room's (an earlier one's is a lost ticket, r)
end
local place, customer = ARGV[6], ARGV[7]
local entry = place .. ' ' .. customer
if redis.call('ZSCORE', q.left, entry) then return unchanged('{"ok":1}') end
local full = idem_full()
if full then return full end
local kind, number = string.sub(place, 1, 1), tonumber(string.sub(place, 2))
local score = kind == 'p' and number / PRE or 1 + number
local flags = room.opened and 2 or 0
-- Not in the order under this place: a join a failover lost (the ticket still counts).
if tonumber(redis.call('ZSCORE', q.order, customer)) == score then
  local rank = redis.call('ZRANK', q.order, customer)
  redis.call('ZREM', q.order, customer)
  if room.opened and rank + 1 <= room.through then
    redis.call('ZADD', q.order, score, '\0' .. entry)
  else
    flags = flags + 1
  end
end
local seq = redis.call('HINCRBY', q.state, 'ls', 1)
redis.call('ZADD', q.left, seq * 4 + flags, entry)
return finish('{"ok":1}')
