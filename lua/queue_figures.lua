#!lua flags=no-writes
-- queue_figures.lua: the waiting room's figures for /metrics (service/web/metrics.py), as
-- queue_view.lua gives them, but read-only (Redis refuses any write here: the flag above,
-- kept first by the loader): the frontier is moved on to now in the computation only
-- (lib.lua, room_figures_read), so a scrape changes nothing in the room.
-- KEYS: the event keys (lib.lua), [17..21] the waiting room's keys (lib.lua, queue_keys)
-- ARGV: common [1..4] (lib.lua)
-- Returns JSON {waiting, admitted, active, apm}; "" when the event has no room (or is
-- not in Redis: /metrics loads nothing).
local rm = room_meta()
if not rm.apm then return '' end
return cjson.encode(room_figures_read(rm, now_ms()))
