-- view.lua: the event with live availability, after reclaiming overdue holds.
-- KEYS: the event keys (lib.lua)
-- ARGV: common [1..4] (lib.lua)
-- Returns JSON {meta, cats, cap, avail, held, sold, now}, or {err = "not_loaded"}, or
-- {err = "retry"} when more holds are overdue than one batch (reclaim, then call again).
if not loaded() then return NOT_LOADED end
local now = now_ms()
forget_ended(now, RECLAIM_BATCH)
if reclaim(now, RECLAIM_BATCH) then return RETRY end
return cjson.encode({
  meta = hash_map(K.meta), cats = hash_map(K.cats), cap = hash_map(K.cap), avail = hash_map(K.avail),
  held = hash_map(K.held), sold = hash_map(K.sold), now = now,
})
