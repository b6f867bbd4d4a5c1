-- hold.lua: reserve tickets, all or nothing.
-- uses: holding.lua
-- KEYS: the event keys (lib.lua), [17] this hold's TTL key (its expiry is what the
--       keyspace listener hears), [18] the customer's rate-limit key (keys.py), then the
--       Idempotency-Key counts and record (optional, last)
-- ARGV: common [1..4] (lib.lua), [5] hold id, [6] customer id,
--       [7] items JSON [[category, quantity], ...], [8] seat labels JSON [label, ...],
--       [9] hold attempts a customer may make per window (0: no limit), [10] window, ms
-- Returns JSON: the hold record, followed (when the customer limit is on) by
-- "\n<remaining> <reset seconds>"; or {err = code, ...} (not_on_sale adds the event's
-- status and on_sale_at ms, absent when none; rate_limited adds policy "customer" and
-- retry_after seconds); or {err = "retry"} when overdue holds beyond the reclaim batch
-- may be what stands in the way (the caller reclaims and calls again, so an expired hold
-- never blocks a sale).
-- The work is holding.lua's, which hold_batch.lua shares: here for one request.
local ev = hold_event()
local reply = hold_request(ev, ARGV[5], ARGV[6], ARGV[7], ARGV[8], tonumber(ARGV[9]),
  tonumber(ARGV[10]), KEYS[NKEYS + 1], KEYS[NKEYS + 2])
holds_write(ev)
return reply
