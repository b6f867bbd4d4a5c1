-- release.lua: give a live hold's tickets back at once.
-- uses: settling.lua
-- KEYS: the event keys (lib.lua), then the Idempotency-Key counts and record (optional, lib.lua)
-- ARGV: common [1..4] (lib.lua), [5] hold id, [6] the customer token's customer ("" = tokens
--       off: anyone's hold), then the Idempotency-Key allowances (optional)
-- Returns JSON: {status = how the hold ended}, or {err = code} (hold_confirmed adds
-- booking_id). Releasing a hold that already ended changes nothing, so whichever of
-- client, listener and sweeper comes first wins and the others are no-ops.
return release_request({}, ARGV[5], ARGV[6])
