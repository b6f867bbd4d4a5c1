-- confirm.lua: turn a live hold into a booking and queue it for PostgreSQL.
-- uses: settling.lua
-- KEYS: the event keys (lib.lua), then the Idempotency-Key counts and record (optional, lib.lua)
-- ARGV: common [1..4] (lib.lua), [5] hold id, [6] new booking id, [7] payment ref ("" = none),
--       [8] the customer token's customer ("" = tokens off: anyone's hold),
--       then the Idempotency-Key allowances (optional, lib.lua)
-- Returns JSON: the booking record (the same one again for a confirmed hold), or
-- {err = code} (hold_released adds ended_at ms, hold_expired expires_at ms). The outbox
-- entry is written in this same step: no booking exists that the write-behind worker
-- will not see.
local ev = {}
local reply = confirm_request(ev, ARGV[5], ARGV[6], ARGV[7], ARGV[8])
confirms_write(ev)
return reply
