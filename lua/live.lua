-- live.lua: an event's figures for the live view (GET /admin/events/{id}/live), read in
-- one call once a second by each API process that has someone watching the event.
-- KEYS: the event keys (lib.lua), [17..21] the waiting room's keys (lib.lua, queue_keys),
--       then the event's dead-letter stream, last
-- ARGV: common [1..4] (lib.lua), [5] the write-behind's consumer group (service/core/keys.py)
-- Returns JSON {now, meta = {status, on_sale_at, order}, cats = {name -> JSON}, cap,
-- avail, held, sold = {category -> n}, stats = {counter -> n} (holds created, confirmed,
-- released, expired, cancelled, and refused:<code> from service/web/livefeed.py),
-- outbox = {pending, undelivered = entries no worker has read yet, oldest = the id of
-- the oldest entry not yet written (absent when none), dead = dead letters},
-- queue = the waiting room's figures (lib.lua, room_figures) (waiting, admitted,
-- active, apm; absent: the event has no room)}; or {err = "not_loaded"}.
-- Cost: overdue holds expired one batch at most (as view.lua; the next second takes the
-- next batch), the event's small hashes (a field per category or counter), and constant
-- work on the streams: XINFO GROUPS (one group), XPENDING's summary, two XRANGE COUNT 1;
-- with a waiting room, its frontier advanced (as queue_view.lua: a look moves it on to
-- now, so the figures do not wait for the worker's step), a ZCARD and a ZCOUNT.
if not loaded() then return NOT_LOADED end
local now = now_ms()
reclaim(now, RECLAIM_BATCH)

local group = ARGV[5]
local outbox = {pending = 0, undelivered = 0, dead = redis.call('XLEN', KEYS[#KEYS])}
local function first_id(from)
  local e = redis.call('XRANGE', K.outbox, from, '+', 'COUNT', 1)[1]
  return e and e[1]
end
if redis.call('EXISTS', K.outbox) == 1 then
  local ours
  for _, flat in ipairs(redis.call('XINFO', 'GROUPS', K.outbox)) do
    local g = {}
    for i = 1, #flat, 2 do g[flat[i]] = flat[i + 1] end
    if g.name == group then ours = g end
  end
  if ours then
    local p = redis.call('XPENDING', K.outbox, group)
    outbox.pending = p[1]
    -- lag: entries added since the group last read; unknown (nil) only after deletions.
    outbox.undelivered = ours.lag or 0
    local oldest = p[1] > 0 and p[2] or first_id('(' .. ours['last-delivered-id'])
    outbox.oldest = oldest or nil
  else
    -- No worker has seen the stream yet: every entry waits.
    outbox.undelivered = redis.call('XLEN', K.outbox)
    outbox.oldest = first_id('-')
  end
end

local rm = room_meta()
local queue = rm.apm and room_figures(rm, now) or nil

local m = redis.call('HMGET', K.meta, 'status', 'on_sale_at', 'order')
return cjson.encode({
  now = now,
  meta = {status = m[1], on_sale_at = m[2], order = m[3]},
  cats = hash_map(K.cats), cap = hash_map(K.cap), avail = hash_map(K.avail),
  held = hash_map(K.held), sold = hash_map(K.sold), stats = hash_map(K.stats),
  outbox = outbox, queue = queue,
})
