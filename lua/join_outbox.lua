-- join_outbox.lua: make the write-behind's consumer group on the event's outbox stream,
-- only while the event is loaded: a worker that found the id a moment before the event
-- was archived (or before a create was undone) must not leave a stream behind.
-- KEYS: the event keys (lib.lua)
-- ARGV: common [1..4] (lib.lua), [5] the consumer group
-- Returns "ok" when the group exists now, "gone" when the event is not loaded.
if not loaded() then return 'gone' end
local r = redis.pcall('XGROUP', 'CREATE', K.outbox, ARGV[5], '0', 'MKSTREAM')
if type(r) == 'table' and r.err and not string.find(r.err, 'BUSYGROUP', 1, true) then
  return redis.error_reply(r.err)
end
return 'ok'
