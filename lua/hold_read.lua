-- hold_read.lua: one hold's record, read with Redis's clock (overdue is expired).
-- KEYS: the event keys (lib.lua)
-- ARGV: common [1..4] (lib.lua), [5] hold id
-- Returns "<now ms> <hold record JSON>", or "<now ms> " when there is no such hold; or
-- {err = "not_loaded"}.
if not loaded() then return NOT_LOADED end
return now_ms() .. ' ' .. (redis.call('HGET', K.holds, ARGV[5]) or '')
