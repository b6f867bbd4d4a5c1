-- hold_batch.lua: several holds of one event in one call, each all or nothing and each
-- answered on its own, as if each had been a call of hold.lua: the event's part (meta,
-- time, reclaim, categories, stock) is done once, each request's part in turn, and the
-- writes they share once at the end (holding.lua). A request refused, or failing with an
-- error, changes nothing of the others'.
-- uses: holding.lua
-- KEYS: the event keys (lib.lua), then for each hold in turn: its TTL key, its customer's
--       rate-limit key (keys.py), then with an Idempotency-Key the event's two counts of
--       remembered keys and the key's record (hold.lua's KEYS after the event keys)
-- ARGV: common [1..4] (lib.lua; [1] ""), then for each hold in turn: its Idempotency-Key
--       fingerprint ("" = none), hold id, customer id, items JSON, seat labels JSON,
--       attempts per window (0: no limit), window ms, then with a fingerprint the key's
--       two allowances (hold.lua's ARGV [5..], its fingerprint first)
-- Returns an array of one reply per hold, in order: what hold.lua would have returned, or
-- an error reply for a request whose part failed with an error.
local ev = hold_event(true)
-- Where each request's keys and arguments start, and its hold id.
local firsts, ids = {}, {}
local k, a = NKEYS + 1, 5
while a <= #ARGV do
  firsts[#firsts + 1] = {k, a}
  ids[#ids + 1] = ARGV[a + 1]
  if ARGV[a] == '' then k, a = k + 2, a + 7 else k, a = k + 5, a + 9 end
end
-- A hold id is new unless a client library sent its call again: one read for all.
if ev then
  for i, record in ipairs(redis.call('HMGET', K.holds, unpack(ids))) do
    ev.known[ids[i]] = record
  end
end
local NO_KEY = {''}
local replies = {}
for i, first in ipairs(firsts) do
  k, a = first[1], first[2]
  if ARGV[a] == '' then
    CK, CA = KEYS, NO_KEY -- lib.lua's idempotency helpers read only CA[1] then
  else
    CK, CA = {unpack(KEYS, k, k + 4)}, {unpack(ARGV, a, a + 8)}
  end
  local ok, reply = pcall(hold_request, ev, ARGV[a + 1], ARGV[a + 2], ARGV[a + 3], ARGV[a + 4],
    tonumber(ARGV[a + 5]), tonumber(ARGV[a + 6]), KEYS[k], KEYS[k + 1])
  if not ok then
    -- redis.call raises a table {err = ...}; a Lua error, a string.
    reply = type(reply) == 'table' and reply or {err = 'ERR hold_batch: ' .. tostring(reply)}
  end
  replies[i] = reply
end
holds_write(ev)
return replies
