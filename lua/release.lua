-- release.lua: give a live hold's tickets back at once.
-- KEYS: the event keys (lib.lua), then the Idempotency-Key counts and record (optional, lib.lua)
-- ARGV: common [1..4] (lib.lua), [5] hold id, [6] the customer token's customer ("" = tokens
--       off: anyone's hold), then the Idempotency-Key allowances (optional)
-- Returns JSON: {status = how the hold ended}, or {err = code} (hold_confirmed adds
-- booking_id). Releasing a hold that already ended changes nothing, so whichever of
-- client, listener and sweeper comes first wins and the others are no-ops.
local h, early = named_hold(ARGV[5], ARGV[6])
if early then return early end
if h.s == 'confirmed' then return unchanged(fail('hold_confirmed', {booking_id = h.b})) end
if h.s ~= 'held' then return unchanged(cjson.encode({status = h.s})) end
local full = idem_full()
if full then return full end
local now = now_ms()
end_hold(h, now >= h.ex and 'expired' or 'released', now)
return finish(cjson.encode({status = h.s}))
