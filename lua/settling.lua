-- settling.lua: a live hold's end by its buyer (confirmed into a booking, or released),
-- shared by confirm.lua and release.lua (one request) and confirm_batch.lua and
-- release_batch.lua (the requests of one event that left an API process together, each
-- answered on its own). The loader puts it after lib.lua in the scripts whose header says
-- "uses: settling.lua". Each request's work is its own, in turn; a call shares the
-- dispatch, lib.lua's prologue and the server time (`ev`, read on first need).

local function settle_now(ev)
  if not ev.now then ev.now = now_ms() end
  return ev.now
end

-- Confirm: the booking record (the same one again for a confirmed hold), or {err = code}.
local function confirm_request(ev, hold_id, booking_id, payment_ref, customer)
  local h, early = named_hold(hold_id, customer)
  if early then return early end
  if h.s == 'confirmed' then return unchanged(redis.call('HGET', K.bookings, h.b)) end
  if h.s == 'released' then return unchanged(fail('hold_released', {ended_at = h.e})) end
  if h.s == 'expired' then return unchanged(fail('hold_expired', {expires_at = h.ex})) end
  local now = settle_now(ev)
  if now >= h.ex then
    -- Overdue but not reclaimed yet: reclaim it now rather than sell it late.
    -- (what the sweeper would do anyway: no change of this request's own)
    end_hold(h, 'expired', now)
    return unchanged(fail('hold_expired', {expires_at = h.ex}))
  end
  local full = idem_full()
  if full then return full end

  for cat, n in pairs(h.q) do
    redis.call('HINCRBY', K.held, cat, -n)
    redis.call('HINCRBY', K.sold, cat, n)
  end
  local mark = 'b:' .. booking_id
  for _, label in ipairs(h.st or {}) do redis.call('HSET', K.seatstate, label, mark) end
  h.s, h.b, h.e = 'confirmed', booking_id, now
  redis.call('HSET', K.holds, h.id, cjson.encode(h))
  redis.call('ZREM', K.deadlines, h.id)
  redis.call('ZADD', K.ended, now, h.id)

  local booking = cjson.encode({
    id = booking_id, h = h.id, c = h.c, it = h.it, st = h.st, q = h.q, n = h.n, t = h.t,
    cu = h.cu, pr = payment_ref ~= '' and payment_ref or nil, ca = now, s = 'confirmed',
  })
  redis.call('HSET', K.bookings, booking_id, booking)
  redis.call('HINCRBY', K.stats, 'confirmed', 1)
  redis.call('XADD', K.outbox, '*', 'op', 'confirm', 'booking', booking)
  return finish(booking)
end

-- Release: {status = how the hold ended}, or {err = code} (hold_confirmed adds booking_id).
-- Releasing a hold that already ended changes nothing, so whichever of client, listener
-- and sweeper comes first wins and the others are no-ops.
local function release_request(ev, hold_id, customer)
  local h, early = named_hold(hold_id, customer)
  if early then return early end
  if h.s == 'confirmed' then return unchanged(fail('hold_confirmed', {booking_id = h.b})) end
  if h.s ~= 'held' then return unchanged(cjson.encode({status = h.s})) end
  local full = idem_full()
  if full then return full end
  local now = settle_now(ev)
  end_hold(h, now >= h.ex and 'expired' or 'released', now)
  return finish(cjson.encode({status = h.s}))
end

-- The requests of a batch script in turn: `own` arguments each after its fingerprint (and
-- then, with a fingerprint, its Idempotency-Key's three keys and two allowances), each
-- answered by request(ev, its arguments...), under pcall: an error is that request's alone.
local function settle_batch(own, request)
  local ev, replies = {}, {}
  local k, a = NKEYS + 1, 5
  local NO_KEY = {''}
  while a <= #ARGV do
    local na = own
    if ARGV[a] == '' then
      CK, CA = KEYS, NO_KEY -- lib.lua's idempotency helpers read only CA[1] then
    else
      na = own + 2
      CK, CA = {unpack(KEYS, k, k + 2)}, {unpack(ARGV, a, a + na)}
      k = k + 3
    end
    local ok, reply = pcall(request, ev, unpack(ARGV, a + 1, a + own))
    if not ok then
      reply = type(reply) == 'table' and reply or {err = 'ERR batch: ' .. tostring(reply)}
    end
    replies[#replies + 1] = reply
    a = a + 1 + na
  end
  return replies
end
