-- drop_consumer.lua: forget a dead write-behind consumer, but only one that holds nothing.
-- KEYS: [1] an outbox stream
-- ARGV: [1] the consumer group, [2] the consumer, [3] idle ms it must have been silent
-- Returns 1 when it was deleted, else 0. One atomic step: no read can hand the consumer an
-- entry between the check and XGROUP DELCONSUMER (which would drop that entry unwritten).
for _, c in ipairs(redis.call('XINFO', 'CONSUMERS', KEYS[1], ARGV[1])) do
  local info = {}
  for i = 1, #c, 2 do info[c[i]] = c[i + 1] end
  if info.name == ARGV[2] then
    if info.pending == 0 and info.idle >= tonumber(ARGV[3]) then
      redis.call('XGROUP', 'DELCONSUMER', KEYS[1], ARGV[1], ARGV[2])
      return 1
    end
    return 0
  end
end
return 0
