-- lib.lua: helpers shared by every event script. The loader (service/hotpath/scripts.py)
-- prepends this file to each script, so a helper is written once and never copied.
--
-- Every event script receives the event's keys first, in this order (service/core/keys.py):
local K = {
  meta = KEYS[1],       -- hash: name, starts_at, on_sale_at (ms, "" = none), status, ttl, mpo, mpc, currency, order,
                        --   the waiting room's qapm (admit per minute, "" or absent = no room), qttl (pass s), qopens (ms, "" = at once)
  cats = KEYS[2],       -- hash: category -> JSON {p = price, s = seated 0/1, lo, hi = seat positions}
  cap = KEYS[3],        -- hash: category -> capacity
  avail = KEYS[4],      -- hash: category -> tickets on sale
  held = KEYS[5],       -- hash: category -> tickets in live holds
  sold = KEYS[6],       -- hash: category -> tickets sold
  seatmap = KEYS[7],    -- hash: seat label -> "position:category" (static)
  seatstate = KEYS[8],  -- hash: seat label -> "h:<hold_id>" or "b:<booking_id>"; absent = available
  free = KEYS[9],       -- zset: available seat labels scored by position (best available = lowest)
  deadlines = KEYS[10], -- zset: live hold id -> expires_at ms
  holds = KEYS[11],     -- hash: hold id -> hold record JSON
  ended = KEYS[12],     -- zset: ended hold id -> ended_at ms, to forget records after retention
  cust = KEYS[13],      -- hash: customer id -> tickets held plus bought
  stats = KEYS[14],     -- hash: holds created / confirmed / released / expired, for /metrics
  bookings = KEYS[15],  -- hash: booking id -> booking record JSON
  outbox = KEYS[16],    -- stream: confirmed and cancelled bookings for the write-behind worker
}
local NKEYS = 16

-- Every event script gets the same leading ARGV (service/hotpath/scripts.py):
--   [1] Idempotency-Key fingerprint ("" = no key; with one, KEYS ends with the event's
--       two counts of remembered keys (answers that changed state, answers that changed
--       nothing) and the key's record, and ARGV with the most records of each kind the
--       event may make per TTL)
--   [2] idempotency record TTL, seconds  [3] reclaim batch  [4] ended-hold retention, ms
-- Op-specific ARGV start at [5].
local RECLAIM_BATCH = tonumber(ARGV[3])
local RETENTION_MS = tonumber(ARGV[4])
local IDEM_TTL = ARGV[2]
-- The request's own keys and arguments, as the idempotency helpers below read them: its
-- fingerprint first in CA, its Idempotency-Key's two counts and record last in CK, its two
-- allowances last in CA. A script of one request leaves them at KEYS and ARGV; a script of
-- several (hold_batch.lua) points them at each request's own in turn.
local CK, CA = KEYS, ARGV

-- Redis server time, so that every API process and worker agrees on what "overdue" means.
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

local function fail(code, extra)
  local r = extra or {}
  r.err = code
  return cjson.encode(r)
end

-- cjson encodes an empty table as {}; leave empty lists out and let the reader default them.
local function nonempty(t)
  if next(t) == nil then return nil end
  return t
end

local function seat_position(label)
  return tonumber(string.match(redis.call('HGET', K.seatmap, label), '^(%d+):'))
end

-- Tickets may be on sale again: tell every API process, which then forgets that the
-- event was sold out (service/hotpath/soldout.py). At most once per call, on the event's shard
-- channel: SPUBLISH stays in the event's slot on a cluster, and works on a single node
-- too. Its name is the event's tag and ':restock' (service/core/keys.py restock_channel).
local restock_told = false
local function restocked()
  if restock_told then return end
  restock_told = true
  redis.call('SPUBLISH', string.sub(K.meta, 1, -5) .. 'restock', '1')
end

-- Add n tickets to a category's stock; told only when it was empty: an API process only
-- ever marks a category sold out after seeing it at 0, and from 0 any increase crosses.
local function add_stock(cat, n)
  local a = redis.call('HINCRBY', K.avail, cat, n)
  if a > 0 and a - n <= 0 then restocked() end
end

-- Put a live hold's tickets back on sale and record how it ended. `guarded` (the repair,
-- on state that may have drifted): a seat is freed only while it still names this hold,
-- never one that a sale has.
local function end_hold(h, status, now, guarded)
  for cat, n in pairs(h.q) do
    redis.call('HINCRBY', K.held, cat, -n)
    add_stock(cat, n)
  end
  for _, label in ipairs(h.st or {}) do
    if not guarded or redis.call('HGET', K.seatstate, label) == 'h:' .. h.id then
      redis.call('HDEL', K.seatstate, label)
      redis.call('ZADD', K.free, seat_position(label), label)
    end
  end
  if redis.call('HINCRBY', K.cust, h.c, -h.n) <= 0 then redis.call('HDEL', K.cust, h.c) end
  h.s = status
  h.e = now
  redis.call('HINCRBY', K.stats, status, 1)
  redis.call('HSET', K.holds, h.id, cjson.encode(h))
  redis.call('ZREM', K.deadlines, h.id)
  redis.call('ZADD', K.ended, now, h.id)
end

-- Expire up to `limit` overdue holds. Returns true when more may remain beyond the batch.
local function reclaim(now, limit)
  local ids = redis.call('ZRANGEBYSCORE', K.deadlines, '-inf', now, 'LIMIT', 0, limit)
  for _, id in ipairs(ids) do
    local raw = redis.call('HGET', K.holds, id)
    local h = raw and cjson.decode(raw)
    if h and h.s == 'held' then
      end_hold(h, 'expired', now)
    else
      redis.call('ZREM', K.deadlines, id)
    end
  end
  return #ids == limit
end

-- Forget up to `limit` ended holds past their retention. Off the hot path: the sweeper
-- and the listener do it (reclaim.lua), and so does reading the event (view.lua).
local function forget_ended(now, limit)
  local old = redis.call('ZRANGEBYSCORE', K.ended, '-inf', now - RETENTION_MS, 'LIMIT', 0, limit)
  for _, id in ipairs(old) do
    redis.call('HDEL', K.holds, id)
    redis.call('ZREM', K.ended, id)
  end
end

local function idem_key()
  if CA[1] ~= '' then return CK[#CK] end
  return nil
end

-- The key holds "<fingerprint>\n<first reply>". A replay gets the first reply; the same
-- key with another request gets idempotency_key_reused.
local function replay()
  local key = idem_key()
  if not key then return nil end
  local v = redis.call('GET', key)
  if not v then return nil end
  local sep = string.find(v, '\n', 1, true)
  if string.sub(v, 1, sep - 1) ~= CA[1] then return fail('idempotency_key_reused') end
  return string.sub(v, sep + 1)
end

-- Records are counted per window, which opens with the count's first record and lasts a
-- TTL: no client can make an event remember more than twice a count's allowance at once.
local function under(count, allowance)
  return tonumber(redis.call('GET', count) or '0') < tonumber(allowance)
end

local function remember(reply, count)
  redis.call('SET', CK[#CK], CA[1] .. '\n' .. reply, 'EX', IDEM_TTL)
  if redis.call('INCR', count) == 1 then redis.call('EXPIRE', count, IDEM_TTL) end
end

-- Called before the first write of a request that changes state: with a new key, it is
-- refused (rate_limited, nothing done) once the event made as many records of changes as
-- it may in the window. Only changes count, so no one's refusals can lock others out.
local function idem_full()
  if not idem_key() then return nil end
  local count = CK[#CK - 2]
  if under(count, CA[#CA - 1]) then return nil end
  return fail('rate_limited', {retry_after = math.max(1, redis.call('TTL', count))})
end

-- Return an answer that changed state, remembering it when the request carries a key.
local function finish(reply)
  if idem_key() then remember(reply, CK[#CK - 2]) end
  return reply
end

-- Return an answer that changed nothing (a refusal, or a no-op): remembered only while the
-- event's allowance for these lasts, and otherwise just returned. Never refused for want
-- of room: a repeat that is not remembered runs again, which is harmless since the first
-- changed nothing.
local function unchanged(reply)
  if idem_key() and under(CK[#CK - 1], CA[#CA]) then remember(reply, CK[#CK - 1]) end
  return reply
end

local NOT_LOADED = '{"err":"not_loaded"}'
-- "Call me again after reclaiming the event's overdue holds": more than one batch is due.
local RETRY = '{"err":"retry"}'
local function loaded() return redis.call('EXISTS', K.meta) == 1 end

-- The hold a confirm or release names; or, instead, the reply to give at once (a replayed
-- Idempotency-Key, an event not loaded, no such hold).
-- `customer`: the caller's customer token's ("" = tokens off, anyone's hold): another
-- customer's hold is not found, as if it did not exist. `pending`: the hold's record as the
-- call has changed it and not written yet (settling.lua), if it has.
local function named_hold(hold_id, customer, pending)
  local cached = replay()
  if cached then return nil, cached end
  local raw = pending or redis.call('HGET', K.holds, hold_id)
  if raw then
    local h = cjson.decode(raw)
    if customer ~= '' and h.c ~= customer then return nil, fail('hold_not_found') end
    return h, nil
  end
  -- Only a miss asks whether the event is loaded at all: one call fewer on the hot path.
  if not loaded() then return nil, NOT_LOADED end
  -- Not remembered: hold ids are the server's own, 128-bit, so a repeat gets this 404 anyway.
  return nil, fail('hold_not_found')
end

-- A hash as a Lua table (field -> value).
local function hash_map(key)
  local flat, out = redis.call('HGETALL', key), {}
  for i = 1, #flat, 2 do out[flat[i]] = flat[i + 1] end
  return out
end

local function hset_all(key, t)
  local args = {}
  for k, v in pairs(t) do
    args[#args + 1] = k
    args[#args + 1] = v
    if #args == 1000 then
      redis.call('HSET', key, unpack(args))
      args = {}
    end
  end
  if #args > 0 then redis.call('HSET', key, unpack(args)) end
end

-- The record a seat state ("h:<hold id>" or "b:<booking id>") names, when it is live (a
-- held hold, a confirmed booking); else false. And whether a record has a seat.
local function live_record(state)
  local hold = string.sub(state, 1, 2) == 'h:'
  local raw = redis.call('HGET', hold and K.holds or K.bookings, string.sub(state, 3))
  local r = raw and cjson.decode(raw)
  return r and r.s == (hold and 'held' or 'confirmed') and r or false
end

local function has_seat(r, label)
  for _, l in ipairs(r and r.st or {}) do
    if l == label then return true end
  end
  return false
end

-- A chunk of the seat map in seat order, for the scripts that walk it a bounded call at a
-- time (check_seats.lua, repair_seats.lua): KEYS[NKEYS + 1] the seat order list, ARGV [5]
-- the chunk's first position, [6] seats per call at most, [7] records read per call at
-- most. Returns {first, most, reads, labels, states (K.seatstate), on_sale (K.free
-- scores)}; or nil and the reply to give at once: `empty` past the last seat, {err =
-- "no_order"} when the order list is missing (load.lua "order" builds it).
local function seat_chunk(script, empty)
  local first, most, reads = tonumber(ARGV[5]), tonumber(ARGV[6]), tonumber(ARGV[7])
  if not (first and most and reads) or most < 1 or reads < 1 then
    return nil, redis.error_reply(script .. ': bad arguments')
  end
  local labels = redis.call('LRANGE', KEYS[NKEYS + 1], first, first + most - 1)
  if #labels == 0 then
    if first == 0 and redis.call('HLEN', K.seatmap) > 0 then return nil, '{"err":"no_order"}' end
    return nil, empty
  end
  return {
    first = first, most = most, reads = reads, labels = labels,
    states = redis.call('HMGET', K.seatstate, unpack(labels)),
    on_sale = redis.call('ZMSCORE', K.free, unpack(labels)),
  }
end

-- Visit the chunk's seats in order, each as visit(i, label, state, record), `record` the
-- live record its state names (lib.lua live_record, read once per state) or false; stop
-- before a seat whose record would be one more than the chunk may read. Returns where
-- the next call starts: -1 after the last seat.
local function walk_seats(c, visit)
  local records, read, done = {}, 0, #c.labels
  for i, label in ipairs(c.labels) do
    local state = c.states[i]
    if state and records[state] == nil then
      if read >= c.reads then
        done = i - 1 -- the next call starts at this seat
        break
      end
      records[state] = live_record(state)
      read = read + 1
    end
    visit(i, label, state, state and records[state])
  end
  return (done == c.most or done < #c.labels) and c.first + done or -1
end

-- --- the waiting room (queue_*.lua; configure.lua clears it) ------------------------------
-- Its keys follow the event's keys (service/core/keys.py, EventKeys.queue). Polls never reach
-- Redis: a ticket is signed by the API (service/selling/queuetickets.py) and carries its place;
-- each API process reads the room's state (queue_state.lua) a few times a second and
-- places tickets itself (service/selling/roomstate.py). So the room keeps only what that needs.
local PRE = 4503599627370496 -- 2^52: a pre-queue place k is the score k / 2^52, in [0, 1)
local function queue_keys()
  return {
    left = KEYS[NKEYS + 1],   -- zset: "<place> <customer>" of every ticket that left ->
                              --   4 x leave number + flags (1: taken out of the order,
                              --   2: after the opening), read by the API a batch at a time
    ladder = KEYS[NKEYS + 2], -- string: "rank k rank k ..." of the pre-queue at the opening:
                              --   every rank of the first 1000, then one at least every 10
                              --   places or 1% of the rank
    order = KEYS[NKEYS + 3],  -- zset: customer -> place score: the pre-queue's k / 2^52 (k
                              --   random from the caller), later arrivals 1 + arrival number;
                              --   an admitted ticket that left keeps its score under
                              --   "\0<place> <customer>", so that no rank moves
    state = KEYS[NKEYS + 4],  -- hash: g = the room's generation (tickets carry it), o = 1
                              --   once open, f = admitted up to this rank (fractional), t =
                              --   when f was last advanced (ms), sl = f's slope since the
                              --   last corner, n = arrivals since the opening, P = the
                              --   pre-queue's size at the opening, hb = corners dropped,
                              --   ls = leaves so far, c = the order's size when last
                              --   looked at with stock left, nl = the arrival number
                              --   after which joins were lost with a primary (once any
                              --   were put back: queue_state.lua), r = 1 when the room
                              --   began without the admin turning it on (with its event,
                              --   or loaded again after Redis lost it): tickets of an
                              --   earlier generation are its own, put back from their
                              --   polls, lv = how often the pre-queue was ranked again
                              --   after the opening (put-backs: the ladder changed),
                              --   hc = corners kept so far, sj = the snapshot the API
                              --   processes read (room_snapshot, JSON), st = when the
                              --   room was last stepped (room_step), rid = the run id of
                              --   the Redis process that stepped it, rt = when that was
                              --   last asked, fe, ft = how often and when last the room
                              --   found itself on another (check_server)
    hist = KEYS[NKEYS + 5],   -- list: "t f" corners of the frontier (where its slope
                              --   changed), as old as a pass lives: when each rank was
                              --   admitted, for the pass's expiry and the active passes
  }
end

-- The event's fields that the room reads, once per call. apm = nil: the event has no room.
local function room_meta()
  local m = redis.call('HMGET', K.meta, 'status', 'on_sale_at', 'qapm', 'qttl', 'qopens')
  return {
    status = m[1], on_sale_at = tonumber(m[2] or ''),
    apm = tonumber(m[3] or ''), ttl = tonumber(m[4] or ''), opens = tonumber(m[5] or ''),
  }
end

local function in_stock()
  for _, v in ipairs(redis.call('HVALS', K.avail)) do
    if tonumber(v) > 0 then return true end
  end
  return false
end

-- in_stock() once the overdue holds of one reclaim batch are back on sale (as advance()
-- puts them back before it looks), without writing: what end_hold would add is counted.
local function in_stock_after_reclaim(now)
  if in_stock() then return true end
  local back = {}
  for _, id in ipairs(redis.call('ZRANGEBYSCORE', K.deadlines, '-inf', now, 'LIMIT', 0,
      RECLAIM_BATCH)) do
    local raw = redis.call('HGET', K.holds, id)
    local h = raw and cjson.decode(raw)
    if h and h.s == 'held' then
      for cat, n in pairs(h.q) do back[cat] = (back[cat] or 0) + n end
    end
  end
  for cat, n in pairs(back) do
    if tonumber(redis.call('HGET', K.avail, cat) or '0') + n > 0 then return true end
  end
  return false
end

-- The opening: the pre-queue's order is fixed from now on (later arrivals go behind it,
-- leaves are told apart), so a ladder of its scores at known ranks lets an API process
-- place any pre-queued ticket without asking: exactly among the first LADDER_EXACT, then
-- within 10 places or 1% of its rank (the ladder's steps). Ranked again when lost
-- pre-queued tickets are put back after the opening (queue_state.lua). P counts the
-- pre-queue only: arrivals put back before a restored room opens are not of it.
local LADDER_EXACT = 1000
local function rank_pre_queue(q)
  local size = redis.call('ZCOUNT', q.order, '-inf', '(1')
  local parts = {}
  local head = {}
  if size > 0 then -- (ZRANGE 0 -1 is all of it)
    head = redis.call('ZRANGE', q.order, 0, math.min(size, LADDER_EXACT) - 1, 'WITHSCORES')
  end
  for i = 1, #head, 2 do
    parts[#parts + 1] = (i + 1) / 2 .. ' ' .. string.format('%.0f', tonumber(head[i + 1]) * PRE)
  end
  local r = LADDER_EXACT
  while r < size do
    r = math.min(size, r + math.max(10, math.floor(r / 100)))
    local e = redis.call('ZRANGE', q.order, r - 1, r - 1, 'WITHSCORES')
    parts[#parts + 1] = r .. ' ' .. string.format('%.0f', tonumber(e[2]) * PRE)
  end
  redis.call('SET', q.ladder, table.concat(parts, ' '))
  redis.call('HSET', q.state, 'P', size)
end

-- Forget the corners a pass no longer needs: those before the one in force ttl ago.
local function trim_corners(q, ttl, now)
  for i = 1, 100 do
    local second = redis.call('LINDEX', q.hist, 1)
    if not second or tonumber(string.match(second, '^(%S+)')) >= now - ttl * 1000 - 5000 then
      return i - 1
    end
    redis.call('LPOP', q.hist)
    redis.call('HINCRBY', q.state, 'hb', 1)
  end
  return 100
end

-- The frontier's step, written by advance() and only computed by room_figures_read():
-- from rank f at time t on to `now`, at the rate while `moving`, at most one rank past the
-- queue's end (card). Returns the new frontier, and its slope since t when now > t and
-- that slope is a corner (it differs from `was`, the slope in force).
local function frontier_step(rm, moving, f, t, card, now, was)
  local nf = f
  if moving and now > t then
    nf = math.max(f, math.min(f + (now - t) * rm.apm / 60000, card + 1))
  end
  if now <= t then return nf, nil end
  local slope = (nf - f) / (now - t)
  was = tonumber(was or '')
  if not was or math.abs(slope - was) > 1e-9 + 1e-7 * math.abs(was) then return nf, slope end
  return nf, nil
end

-- The state fields advance() and the room's snapshot read, in one HMGET (room.st by name).
local STATE_FIELDS = {'o', 'f', 't', 'g', 'sl', 'c', 'n', 'P', 'hb', 'ls', 'nl', 'r', 'lv',
  'hc', 'ct', 'fe', 'ft', 'rid', 'rt'}

-- The room's state fields by name: STATE_FIELDS and `more`, in one HMGET.
local function read_state(q, more)
  local names = {unpack(STATE_FIELDS)}
  for _, name in ipairs(more or {}) do names[#names + 1] = name end
  local got = redis.call('HMGET', q.state, unpack(names))
  local st = {}
  for i, name in ipairs(names) do st[name] = got[i] end
  return st
end

-- Advance the admission frontier to `now` by rate x elapsed time, only while the event
-- sells and something is left: the room never admits into nothing. The first look at or
-- after the on-sale moment opens the queue (the pre-queue's random scores then rank it)
-- and admission counts from that moment. The frontier runs at most one rank past the
-- queue's end, so an idle room admits the next arrival at once but stores no burst.
-- Where its slope changes (a pause, a burst after idling, a new rate) the corner is kept:
-- the line through the corners says when each rank was admitted.
-- Returns {opened, f = admitted up to this rank, frac = the fractional frontier, stock,
-- through = the rank admission has reached (f, less the spare rank while out of stock)}.
-- `defer`: the frontier's own fields (f, t, c, sl, hc) are not written but left in
-- room.pending, for the caller's one HSET (room_step: with the snapshot). `st`: the
-- state as read_state() read it in this call, if it did.
local function advance(q, rm, now, defer, st)
  local selling = rm.status == 'on_sale' and (not rm.on_sale_at or now >= rm.on_sale_at)
  st = st or read_state(q)
  local had_g = st.g
  local opened, f, t = st.o == '1', tonumber(st.f or '0'), tonumber(st.t or '0')
  local pending = {}
  -- No generation: not turned on by the admin (configure.lua gives it one), so new with
  -- its event or lost with Redis: its lost tickets will be put back (r).
  if not st.g then
    redis.call('HSET', q.state, 'g', now, 'r', 1)
    st.g, st.r = tostring(now), '1'
  end
  if not opened then
    if not selling then
      return {opened = false, f = 0, frac = 0, stock = true, st = st, pending = pending}
    end
    -- Admission counts from the on-sale moment, or from now for a room that begins now:
    -- one loaded again long after it must not let a burst through.
    opened, f, t = true, 0, had_g and math.min(now, rm.on_sale_at or now) or now
    rank_pre_queue(q)
    redis.call('HSET', q.state, 'o', 1, 'f', 0, 't', t)
    st.P = tostring(redis.call('HGET', q.state, 'P'))
  end
  if not st.hc then -- corners ever kept: counted from when this was written
    st.hc = tostring(tonumber(st.hb or '0') + redis.call('LLEN', q.hist))
    pending[#pending + 1], pending[#pending + 2] = 'hc', st.hc
  end
  local stock = in_stock()
  if not stock then
    -- An overdue hold not yet reclaimed is no reason to stop admitting.
    reclaim(now, RECLAIM_BATCH)
    stock = in_stock()
  end
  local card = tonumber(st.c or '0')
  if stock then
    card = redis.call('ZCARD', q.order)
    pending[#pending + 1], pending[#pending + 2] = 'c', card
  end
  local nf, corner = frontier_step(rm, selling and stock, f, t, card, now, st.sl)
  if now > t then
    if corner then
      redis.call('RPUSH', q.hist, t .. ' ' .. f)
      local hc = tonumber(st.hc or '0') + 1
      st.hc, st.ct = tostring(hc), tostring(now)
      for _, v in ipairs({'sl', corner, 'hc', hc, 'ct', now}) do pending[#pending + 1] = v end
      local hb = trim_corners(q, rm.ttl, now)
      st.hb = tostring(tonumber(st.hb or '0') + hb)
    end
    for _, v in ipairs({'f', nf, 't', now}) do pending[#pending + 1] = v end
    st.f, st.t = tostring(nf), tostring(now)
  end
  if not defer and #pending > 0 then
    redis.call('HSET', q.state, unpack(pending))
    pending = {}
  end
  -- The rank one past the end admits the next arrival, but not into nothing: without
  -- stock, admission stops where the queue ended when there was some.
  local through = stock and math.floor(nf) or math.min(math.floor(nf), card)
  return {
    opened = true, f = math.floor(nf), frac = nf, stock = stock, through = through,
    moving = selling and stock and nf < card + 1, card = stock and card or nil, st = st,
    pending = pending,
  }
end

-- How far the frontier had got at time `at` (ms), from its corners ("t f", oldest first)
-- and where it is now (rank f at time t).
local function frontier_along(corners, t, f, at)
  local pt, pf = nil, 0
  for _, c in ipairs(corners) do
    local ct, cf = string.match(c, '^(%S+) (%S+)$')
    ct, cf = tonumber(ct), tonumber(cf)
    if ct > at then
      if not pt then return 0 end
      return pf + (cf - pf) * (at - pt) / (ct - pt)
    end
    pt, pf = ct, cf
  end
  if not pt or at >= t or t == pt then return pt and f or 0 end
  return pf + (f - pf) * (at - pt) / (t - pt)
end

local function frontier_at(q, at)
  local st = redis.call('HMGET', q.state, 'f', 't')
  local corners = redis.call('LRANGE', q.hist, 0, -1)
  return frontier_along(corners, tonumber(st[2] or '0'), tonumber(st[1] or '0'), at)
end

-- `card`: the order's size, `f`: the rank the frontier passed (0 before the opening),
-- `before`: the frontier a pass's lifetime ago.
local function figures(rm, card, f, before)
  local admitted = math.min(f, card)
  before = math.floor(before)
  return {
    waiting = card - admitted, admitted = admitted, apm = rm.apm,
    active = math.max(0, admitted - math.min(admitted, before)),
  }
end

-- The room's figures for the admin (queue_view.lua) and the live view (live.lua), after
-- advancing the frontier to now: waiting, admitted (ranks the frontier passed: tickets
-- admitted, whether they have looked yet or not), active (passes not expired: admitted
-- ranks the frontier passed within the last pass_ttl_seconds, since a pass lives that
-- long from its rank's admission), apm.
local function room_figures(rm, now)
  local q = queue_keys()
  local room = advance(q, rm, now)
  local card = redis.call('ZCARD', q.order)
  local before = frontier_at(q, now - rm.ttl * 1000)
  return figures(rm, card, room.opened and room.f or 0, before)
end

-- room_figures() without a write (queue_figures.lua, for /metrics): where advance() would
-- take the room (opened at the on-sale moment, the overdue holds it would reclaim back
-- on sale, the frontier moved on to now, the corner it would keep) is computed, not
-- stored: the same figures, and a scrape changes nothing.
local function room_figures_read(rm, now)
  local q = queue_keys()
  local selling = rm.status == 'on_sale' and (not rm.on_sale_at or now >= rm.on_sale_at)
  local st = redis.call('HMGET', q.state, 'o', 'f', 't', 'sl', 'c')
  local card = redis.call('ZCARD', q.order)
  local f, t = tonumber(st[2] or '0'), tonumber(st[3] or '0')
  if st[1] ~= '1' then
    if not selling then return figures(rm, card, 0, 0) end
    f, t = 0, math.min(now, rm.on_sale_at or now)
  end
  local stock = in_stock_after_reclaim(now)
  local known = stock and card or tonumber(st[5] or '0')
  local nf, corner = frontier_step(rm, selling and stock, f, t, known, now, st[4])
  local corners = redis.call('LRANGE', q.hist, 0, -1)
  if corner then corners[#corners + 1] = t .. ' ' .. f end
  if now > t then t, f = now, nf end
  return figures(rm, card, math.floor(nf), frontier_along(corners, t, f, now - rm.ttl * 1000))
end

-- What an API process needs to place any ticket (service/selling/roomstate.py, RoomState): the
-- generation, whether the room is open, closed, stocked, admitting (mv: the frontier
-- moves at the rate, short of the queue's end), the frontier (rank f at
-- time t; fk = the pre-queue place k admitted through, "all" once all of it is, "" none
-- yet; fa = the arrival number admitted through), the sizes, the settings; r (tickets of
-- an earlier generation are the room's: it was lost), lv (the ladder's version), fe and
-- ft (how often, and when last, the room found itself on another Redis process than
-- the one that last stepped it: a failover or a restart, which may have lost joins).
-- `fresh`: the state fields were changed since advance() read them (a join's arrival
-- number, put-backs): read again. Stored in the state (sj), with the pending writes.
local function room_snapshot(q, rm, room, now, fresh)
  local st = room.st
  if fresh or not st then
    if room.pending and #room.pending > 0 then
      redis.call('HSET', q.state, unpack(room.pending))
      room.pending = {}
    end
    st = read_state(q)
  end
  local s = {
    g = tonumber(st.g), now = now, o = room.opened and 1 or 0, mv = room.moving and 1 or 0,
    closed = rm.status == 'closed' and 1 or 0, stock = room.stock and 1 or 0,
    apm = rm.apm, ttl = rm.ttl, on = rm.on_sale_at, f = tostring(st.f or '0'),
    t = tonumber(st.t or '0'), n = tonumber(st.n or '0'), P = tonumber(st.P or '0'),
    hb = tonumber(st.hb or '0'), ls = tonumber(st.ls or '0'), nl = tonumber(st.nl or '0'),
    r = tonumber(st.r or '0'), lv = tonumber(st.lv or '0'), fe = tonumber(st.fe or '0'),
    ft = tonumber(st.ft or '0'), hc = tonumber(st.hc or '0'), ct = tonumber(st.ct or '0'),
    fk = '', fa = 0,
    w = room.worker and 1 or 0,
  }
  local through = room.through
  if room.opened and through >= 1 then
    local card = (not fresh and room.card) or redis.call('ZCARD', q.order)
    local score
    if through <= card then
      score = tonumber(redis.call('ZRANGE', q.order, through - 1, through - 1, 'WITHSCORES')[2])
    else
      score = 1 + s.n + through - card -- all admitted, and the next arrivals as they come
    end
    if score < 1 then
      s.fk = string.format('%.0f', score * PRE)
    else
      s.fk, s.fa = 'all', score - 1
    end
  end
  local pending = room.pending or {}
  pending[#pending + 1], pending[#pending + 2] = 'sj', cjson.encode(s)
  redis.call('HSET', q.state, unpack(pending))
  room.pending = {}
  return s
end

-- How long a stored snapshot (sj) serves the API processes before one of them steps the
-- room again (service/selling/roomstate.py, STEP_MS: the same; the worker steps every
-- room as often, waitingroom.py TICK_SECONDS). For SETTLE_MS after the frontier's slope
-- changed (ct: the opening, a sell-out, stock back, a pause, a new rate) a snapshot
-- serves only SETTLE_STEP_MS: the change's first effects show at once.
local STEP_MS = 750
local SETTLE_MS = 2000
local SETTLE_STEP_MS = 250
local function step_due(snap_ct, stepped, now)
  local due = now - tonumber(snap_ct or '0') < SETTLE_MS and SETTLE_STEP_MS or STEP_MS
  return now - tonumber(stepped or '0') >= due
end
-- Whether this Redis process is the one that last stepped the room: INFO's run_id, kept
-- in the state (rid), is replicated with it, so a replica promoted (or a restart from
-- disk) finds another. Either may have lost the last joins a primary acknowledged: the
-- room is then suspect (fe counts these, ft is the last one's time), and for a while
-- the API processes offer the tickets polled for putting back (queue_state.lua), which
-- the run_id alone cannot tell lost. Asked at most once a second (rt).
local function check_server(st, now, pending)
  if st.rt and now - tonumber(st.rt) < 1000 then return end
  local rid = string.match(redis.call('INFO', 'server'), 'run_id:(%w+)')
  local add = {'rt', now}
  if rid ~= st.rid then
    add[#add + 1], add[#add + 2] = 'rid', rid
    if st.rid then
      st.fe, st.ft = tostring(tonumber(st.fe or '0') + 1), tostring(now)
      for _, v in ipairs({'fe', st.fe, 'ft', now}) do add[#add + 1] = v end
    end
    st.rid = rid
  end
  for _, v in ipairs(add) do pending[#pending + 1] = v end
end

-- The room's step (queue_state.lua, queue_tick.lua): advanced to now, the server checked,
-- `between(room)` run (put-backs: it returns true when it changed the state fields), the
-- snapshot stored for the API processes (sj, and st = when) with every write in one HSET.
-- `worker`: the worker's step (queue_tick.lua), marked w = 1 in the snapshot: the API
-- processes then leave the next step to it, a little longer (roomstate.py, WORKER_MS).
local function room_step(q, rm, now, between, worker, st)
  local room = advance(q, rm, now, true, st)
  check_server(room.st, now, room.pending)
  local changed = between and between(room)
  local p = room.pending
  p[#p + 1], p[#p + 2] = 'st', now
  room.worker = worker
  return room_snapshot(q, rm, room, now, changed)
end

-- Rate limits (GCRA, the generic cell rate algorithm): `limit` attempts per `window_ms`,
-- as a burst of up to `limit` at once, then one more every window/limit. No window edge
-- to burst across: the key holds one number, the "theoretical arrival time" (TAT) of the
-- next attempt, and lives no longer than it matters. A refused attempt counts too (the
-- time is pushed on, at most one window ahead): a client that tries again before its
-- Retry-After stays limited, so a loop without pauses gets nothing, while one that waits
-- as told gets the rate the limit allows. No human meets either.
-- Returns a table: ok, remaining (attempts left now), reset_ms (until the whole quota is
-- back; when refused, until the next attempt is allowed), and what give_back needs.
-- `cost` (default 1): how many of the `limit` this attempt uses (the tickets of a hold);
-- at most `limit`, or it could never pass.
local RATE_OFF = {ok = true} -- no limit: the same answer every time, never changed
local function rate_take(key, limit, window_ms, now, cost)
  if limit <= 0 then return RATE_OFF end
  local interval = window_ms / limit
  local before = redis.call('GET', key)
  local tat = math.max(tonumber(before or '0'), now)
  local step = interval * math.min(cost or 1, limit)
  local next_tat = tat + step
  local allowed_at = next_tat - window_ms
  -- 0.01 ms of slack: window/limit need not be a whole number of ms, and the stored time
  -- is rounded, so attempts in the same ms would otherwise lose one to rounding.
  if allowed_at - now > 0.01 then
    local counted = math.max(tat, math.min(next_tat, now + window_ms))
    if counted > tat then
      redis.call('SET', key, string.format('%.3f', counted), 'PX', math.max(1, math.ceil(counted - now)))
    end
    local wait = counted + step - window_ms - now
    return {ok = false, remaining = 0, reset_ms = wait, limit = limit, window_ms = window_ms}
  end
  -- At least 1 ms: an interval far below a ms may vanish in the time's rounding.
  redis.call('SET', key, string.format('%.3f', next_tat), 'PX', math.max(1, math.ceil(next_tat - now)))
  local remaining = math.min(limit - 1, math.max(0, math.floor((now - allowed_at) / interval + 1e-6)))
  return {ok = true, remaining = remaining, reset_ms = next_tat - now, key = key, before = before, now = now}
end

-- Undo a rate_take whose request turned out to change nothing for another reason (it is
-- called again, or refused as rate_limited by another limit): the attempt is not counted.
local function rate_give_back(taken)
  if not taken.key then return end
  if taken.before and tonumber(taken.before) > taken.now then
    redis.call('SET', taken.key, taken.before, 'PX', math.ceil(tonumber(taken.before) - taken.now))
  else
    redis.call('DEL', taken.key)
  end
end

-- "<reply>\n<remaining> <seconds until the quota is whole>": what the API turns into the
-- RateLimit header of a success. No reply contains a raw newline (cjson escapes it).
local function with_rate(reply, taken)
  if not taken.key then return reply end
  return reply .. '\n' .. taken.remaining .. ' ' .. math.ceil(taken.reset_ms / 1000)
end

-- The 429 of a rate limit (with the policy, for the RateLimit-Policy header), never
-- remembered under an Idempotency-Key: the same request, repeated once the limit allows
-- it, is answered anew.
local function rate_refusal(policy, taken)
  return fail('rate_limited', {
    policy = policy, quota = taken.limit, window = math.ceil(taken.window_ms / 1000),
    retry_after = math.max(1, math.ceil(taken.reset_ms / 1000)),
  })
end
