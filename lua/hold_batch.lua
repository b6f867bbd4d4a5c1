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
local ev = hold_event()
local replies = {}
local k, a = NKEYS + 1, 5
while a <= #ARGV do
  local nk, na = 2, 7
  if ARGV[a] ~= '' then nk, na = 5, 9 end
  CK, CA = {unpack(KEYS, k, k + nk - 1)}, {unpack(ARGV, a, a + na - 1)}
  local ok, reply = pcall(hold_request, ev, CA[2], CA[3], CA[4], CA[5], tonumber(CA[6]),
    tonumber(CA[7]), CK[1], CK[2])
  if not ok then
    -- redis.call raises a table {err = ...}; a Lua error, a string.
    reply = type(reply) == 'table' and reply or {err = 'ERR hold_batch: ' .. tostring(reply)}
  end
  replies[#replies + 1] = reply
  k, a = k + nk, a + na
end
holds_write(ev)
return replies
