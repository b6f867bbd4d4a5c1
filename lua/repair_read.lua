-- repair_read.lua: the repair's read of the counters it recounts, stamped with the Redis
-- time it was taken at (read-only).
-- KEYS: the event keys (lib.lua)
-- ARGV: common [1..4] (lib.lua), [5] "counters" (the category counters) or a cursor of
--       K.cust (HSCAN: per-customer counts), [6] customers per call (HSCAN's COUNT)
-- The read waits for Redis's clock to pass a millisecond first (a millisecond at most),
-- then takes `at`: every script before this one stamped its records with times below
-- `at`, every one after with `at` or more. So the records, read later, say what each
-- counter should have been at `at` (service/durable/recount.py). Returns JSON {at,
-- cap, avail, held, sold} (hashes category -> count) or {at, cursor, customers = [id,
-- count, ...]}; or {err = "not_loaded"}.
if not loaded() then return NOT_LOADED end
local t, at = now_ms(), now_ms()
while at <= t do at = now_ms() end
if ARGV[5] == 'counters' then
  return cjson.encode({
    at = at, cap = hash_map(K.cap), avail = hash_map(K.avail), held = hash_map(K.held),
    sold = hash_map(K.sold),
  })
end
local reply = redis.call('HSCAN', K.cust, ARGV[5], 'COUNT', ARGV[6])
return cjson.encode({at = at, cursor = reply[1], customers = nonempty(reply[2])})
