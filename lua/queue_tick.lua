-- queue_tick.lua: the background step of a waiting room (service/selling/waitingroom.py, Ticker):
-- in quiet periods no join or API process's read steps the room, and a stall of stock
-- (sold out, then tickets back) would be seen late; this steps it every STEP_MS
-- (lib.lua, room_step: the frontier advanced, the server checked, the snapshot the API
-- processes read stored; corners no pass needs any more forgotten). While it does, the
-- API processes' reads find the snapshot less than STEP_MS old and do not step it.
-- KEYS: the event keys (lib.lua), [17..21] the waiting room's keys (lib.lua, queue_keys)
-- ARGV: common [1..4] (lib.lua)
-- Returns "1" when the event has a waiting room, else "0".
local rm = room_meta()
if not rm.status or not rm.apm then return '0' end
room_step(queue_keys(), rm, now_ms(), nil, true)
return '1'
