-- queue_view.lua: the waiting room's figures for the admin, after advancing the frontier.
-- KEYS: the event keys (lib.lua), [17..21] the waiting room's keys (lib.lua, queue_keys)
-- ARGV: common [1..4] (lib.lua)
-- Returns JSON {waiting, admitted (ranks the frontier passed: tickets admitted, whether
-- they have looked yet or not), active (passes not expired), apm (absent: no room)}.
local rm = room_meta()
if not rm.status then return NOT_LOADED end
if not rm.apm then return '{"waiting":0,"admitted":0,"active":0}' end
return cjson.encode(room_figures(rm, now_ms()))
