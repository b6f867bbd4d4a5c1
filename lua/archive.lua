-- archive.lua: take an event that is over out of Redis, all at once, but only what is
-- done with: no live hold, no load under way, an outbox the write-behind has drained
-- (every entry delivered and acknowledged) and no dead letter. PostgreSQL keeps the event
-- and its bookings; whatever is not yet there stays here, and the caller tries later.
-- Atomic with every other script of the event (one slot): a hold or a confirmation that
-- runs first makes this refuse; one that runs after finds the event not loaded.
-- KEYS: the event keys (lib.lua), [17] the seat order list, [18] the load lease, [19..25]
--       the load's staged keys (load.lua), [26..30] the waiting room's keys (lib.lua,
--       queue_keys), [31] the dead-letter stream (service/core/keys.py, EventKeys.archive)
-- ARGV: common [1..4] (lib.lua), [5] the write-behind's consumer group, [6] "now" to
--       archive at once, or "settled" to wait until every ended hold has outlived the
--       ended-hold retention (so that hold records stay readable as long as promised)
-- Returns "archived"; "gone" when the event was not loaded; {err = "retry"} when more
-- holds are overdue than one batch (reclaim, then call again); or why not yet: "holds" (live
-- holds, or ended ones within their retention for "settled"), "busy" (a load holds the
-- lease), "outbox" (entries not yet written behind), "dead_letters" (kept for an operator).
-- Idempotency-Key records of the event are left to their TTL: a retry still gets its answer.
local group, mode = ARGV[5], ARGV[6]
if not (mode == 'now' or mode == 'settled') then return redis.error_reply('archive: bad mode') end
if not loaded() then return 'gone' end
local now = now_ms()
forget_ended(now, RECLAIM_BATCH)
if reclaim(now, RECLAIM_BATCH) then return RETRY end
if redis.call('ZCARD', K.deadlines) > 0 then return 'holds' end
if mode == 'settled' and redis.call('ZCARD', K.ended) > 0 then return 'holds' end
if redis.call('EXISTS', KEYS[NKEYS + 2]) == 1 then return 'busy' end
if redis.call('XLEN', KEYS[NKEYS + 15]) > 0 then return 'dead_letters' end

local function id_parts(id)
  local ms, seq = string.match(id, '^(%d+)-(%d+)$')
  return tonumber(ms), tonumber(seq)
end

-- Whether stream id `a` comes after `b`.
local function after(a, b)
  local ams, aseq = id_parts(a)
  local bms, bseq = id_parts(b)
  return ams > bms or (ams == bms and aseq > bseq)
end

local function drained()
  if redis.call('XLEN', K.outbox) == 0 then return true end
  local last = redis.call('XREVRANGE', K.outbox, '+', '-', 'COUNT', 1)[1][1]
  for _, g in ipairs(redis.call('XINFO', 'GROUPS', K.outbox)) do
    local f = {}
    for i = 1, #g, 2 do f[g[i]] = g[i + 1] end
    if f.name == group then
      return tonumber(f.pending) == 0 and not after(last, f['last-delivered-id'])
    end
  end
  return false -- entries no write-behind has read yet
end
if not drained() then return 'outbox' end

local gone = {}
for i = 1, #KEYS do gone[#gone + 1] = KEYS[i] end
redis.call('UNLINK', unpack(gone))
return 'archived'
