-- reclaim.lua: expire the event's overdue holds, one batch, and forget a batch of ended
-- holds past their retention.
-- KEYS: the event keys (lib.lua)
-- ARGV: common [1..4] (lib.lua)
-- Returns 1 when more overdue holds may remain, else 0 (0 too when the event is not loaded).
if not loaded() then return 0 end
local now = now_ms()
forget_ended(now, RECLAIM_BATCH)
return reclaim(now, RECLAIM_BATCH) and 1 or 0
