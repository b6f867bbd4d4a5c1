-- repair_adjust.lua: the repair's last step: counters moved by what they were off.
-- KEYS: the event keys (lib.lua)
-- ARGV: common [1..4] (lib.lua), [5] JSON {cats = {category = [available, held, sold]},
--       cust = {customer id = count}}: what to add to each (negative: take away)
-- Adds, never sets: whatever sales did since the counters were read stays counted. A
-- per-customer count that reaches 0 goes, as the sales scripts leave it; stock that comes
-- back is published (lib.lua add_stock). Returns "ok", or {err = "not_loaded"}.
if not loaded() then return NOT_LOADED end
local d = cjson.decode(ARGV[5])
for cat, v in pairs(d.cats or {}) do
  if v[2] ~= 0 then redis.call('HINCRBY', K.held, cat, v[2]) end
  if v[3] ~= 0 then redis.call('HINCRBY', K.sold, cat, v[3]) end
  if v[1] ~= 0 then add_stock(cat, v[1]) end
end
for customer, n in pairs(d.cust or {}) do
  if redis.call('HINCRBY', K.cust, customer, n) <= 0 then redis.call('HDEL', K.cust, customer) end
end
return 'ok'
