-- confirm_batch.lua: several confirms of one event in one call, each answered on its own as
-- if it had been a call of confirm.lua (settling.lua); an error in one is its own.
-- uses: settling.lua
-- KEYS: the event keys (lib.lua), then for each confirm with an Idempotency-Key in turn,
--       the event's two counts of remembered keys and the key's record
-- ARGV: common [1..4] (lib.lua; [1] ""), then for each confirm in turn: its Idempotency-Key
--       fingerprint ("" = none), hold id, new booking id, payment ref ("" = none), the
--       customer token's customer ("" = tokens off), then with a fingerprint the key's two
--       allowances (confirm.lua's ARGV [5..], its fingerprint first)
-- Returns an array of one reply per confirm, in order: what confirm.lua would have
-- returned, or an error reply for a request whose part failed with an error.
local ev = {}
local replies = settle_batch(ev, 4, confirm_request)
confirms_write(ev)
return replies
