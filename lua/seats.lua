-- seats.lua: every seat with its state, after reclaiming overdue holds.
-- KEYS: the event keys (lib.lua)
-- ARGV: common [1..4] (lib.lua)
-- Returns JSON {seatmap = {label = "position:category"}, state = {label = "h:.."|"b:.."},
-- or {err = "not_loaded"}, or {err = "retry"} (see view.lua).
if not loaded() then return NOT_LOADED end
if reclaim(now_ms(), RECLAIM_BATCH) then return RETRY end
return cjson.encode({seatmap = hash_map(K.seatmap), state = hash_map(K.seatstate)})
