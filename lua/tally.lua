-- tally.lua: add one API process's refusals of the last second to the event's counts, which
-- the live view turns into refusals per second by code (service/livefeed.py). Counted in
-- Redis, not per process, so every process's live view shows the same figures.
-- KEYS: the event keys (lib.lua)
-- ARGV: common [1..4] (lib.lua), then pairs [5] code, [6] count, [7] code, [8] count, ...
-- Returns 1; 0 when the event is not loaded (then nothing is counted: a refusal of an
-- event Redis does not have must not make keys for it).
if not loaded() then return 0 end
for i = 5, #ARGV, 2 do
  redis.call('HINCRBY', K.stats, 'refused:' .. ARGV[i], ARGV[i + 1])
end
return 1
