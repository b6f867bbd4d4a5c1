-- release.lua: give a live hold's tickets back at once.
-- KEYS: the event keys (lib.lua), [17] Idempotency-Key record (optional, last)
-- ARGV: common [1..4] (lib.lua), [5] hold id
-- Returns JSON: {status = how the hold ended}, or {err = code} (hold_confirmed adds
-- booking_id). Releasing a hold that already ended changes nothing, so whichever of
-- client, listener and sweeper comes first wins and the others are no-ops.
local h, early = named_hold(ARGV[5])
if early then return early end
if h.s == 'confirmed' then return finish(fail('hold_confirmed', {booking_id = h.b})) end
if h.s == 'held' then
  local now = now_ms()
  end_hold(h, now >= h.ex and 'expired' or 'released', now)
end
return finish(cjson.encode({status = h.s}))
