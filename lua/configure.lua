-- configure.lua: admin changes to a live event: status, on-sale time, name, capacities,
-- waiting room.
-- KEYS: the event keys (lib.lua), [17..21] the waiting room's keys (lib.lua, queue_keys),
--       then the Idempotency-Key record (optional, last)
-- ARGV: common [1..4] (lib.lua), [5] changes JSON {status?, on_sale_at? (ms, "" = none),
--       name?, caps? = {category = new capacity}, qapm?, qttl?, qopens? (the waiting
--       room, lib.lua; qapm "" = none)}. A room turned on or off starts from an empty
--       queue: the old one's keys are unlinked (freed off the main thread, however big).
-- Returns JSON {ok = 1}, or {err = code, ...}. A capacity change moves the difference into
-- or out of `avail` at once; it may not go below what is held plus sold. Publishes the
-- change (lib.lua, restocked).
local cached = replay()
if cached then return cached end
if not loaded() then return NOT_LOADED end
reclaim(now_ms(), RECLAIM_BATCH)
local ch = cjson.decode(ARGV[5])
local caps = ch.caps or {}
for cat, cap in pairs(caps) do
  local raw = redis.call('HGET', K.cats, cat)
  if not raw then return finish(fail('unknown_category', {category = cat})) end
  if cjson.decode(raw).s == 1 then return finish(fail('seated_capacity', {category = cat})) end
  local committed = tonumber(redis.call('HGET', K.held, cat) or '0')
    + tonumber(redis.call('HGET', K.sold, cat) or '0')
  if cap < committed then
    return finish(fail('capacity_below_committed', {category = cat, committed = committed}))
  end
end
for cat, cap in pairs(caps) do
  local old = tonumber(redis.call('HGET', K.cap, cat))
  redis.call('HSET', K.cap, cat, cap)
  redis.call('HINCRBY', K.avail, cat, cap - old)
end
-- The room's frontier first moves up to now under the settings it ran with until now.
local rm = room_meta()
if rm.apm then advance(queue_keys(), rm, now_ms()) end
if ch.qapm ~= nil then
  local was = redis.call('HGET', K.meta, 'qapm')
  if ch.qapm == '' or not was or was == '' then
    local q = queue_keys()
    redis.call('UNLINK', q.left, q.ladder, q.order, q.state, q.hist)
    -- A room turned on is a new one: its generation now, so that no earlier ticket is
    -- taken for a lost one of it (lib.lua, advance).
    if ch.qapm ~= '' then redis.call('HSET', q.state, 'g', now_ms()) end
  end
end
for _, field in ipairs({'status', 'on_sale_at', 'name', 'qapm', 'qttl', 'qopens'}) do
  if ch[field] ~= nil then redis.call('HSET', K.meta, field, ch[field]) end
end
-- Every change is published (rare, admin): a capacity raise puts tickets on sale, and a
-- status change must reach the processes that answer `sold_out` on their own, so that
-- they ask again and get what the event says now (not_on_sale comes before sold_out).
restocked()
return finish('{"ok":1}')
