-- queue_tick.lua: the background step of a waiting room (service/selling/waitingroom.py, Ticker):
-- in quiet periods no join or API process's read advances the frontier, and a stall of
-- stock (sold out, then tickets back) would be seen late; this advances it about once a
-- second (and forgets corners no pass needs any more).
-- KEYS: the event keys (lib.lua), [17..21] the waiting room's keys (lib.lua, queue_keys)
-- ARGV: common [1..4] (lib.lua)
-- Returns "1" when the event has a waiting room, else "0".
local rm = room_meta()
if not rm.status or not rm.apm then return '0' end
advance(queue_keys(), rm, now_ms())
return '1'
