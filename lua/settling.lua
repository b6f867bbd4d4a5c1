-- settling.lua: a live hold's end by its buyer (confirmed into a booking, or released),
-- shared by confirm.lua and release.lua (one request) and confirm_batch.lua and
-- release_batch.lua (the requests of one event that left an API process together, each
-- answered on its own). The loader puts it after lib.lua in the scripts whose header says
-- "uses: settling.lua". Each request's work is its own, in turn; a call shares the
-- dispatch, lib.lua's prologue and the server time (`ev`, read on first need), and its
-- confirms share their writes (confirms_write, once after the call's last request, as
-- holding.lua's holds_write does): the counters, the records, the sets and the stats.
-- What a later request of the call must see is kept in `ev` meanwhile.

local function settle_now(ev)
  if not ev.now then ev.now = now_ms() end
  return ev.now
end

-- Confirm: the booking record (the same one again for a confirmed hold), or {err = code}.
local function confirm_request(ev, hold_id, booking_id, payment_ref, customer)
  local pending = ev.confirmed and ev.confirmed[hold_id]
  local h, early = named_hold(hold_id, customer, pending and pending[1])
  if early then return early end
  if h.s == 'confirmed' then
    return unchanged(pending and pending[2] or redis.call('HGET', K.bookings, h.b))
  end
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

  local mark = 'b:' .. booking_id
  for _, label in ipairs(h.st or {}) do redis.call('HSET', K.seatstate, label, mark) end
  h.s, h.b, h.e = 'confirmed', booking_id, now
  local booking = cjson.encode({
    id = booking_id, h = h.id, c = h.c, it = h.it, st = h.st, q = h.q, n = h.n, t = h.t,
    cu = h.cu, pr = payment_ref ~= '' and payment_ref or nil, ca = now, s = 'confirmed',
  })
  -- Written by confirms_write; a later request of the call for this hold reads them here.
  ev.confirmed = ev.confirmed or {}
  ev.confirmed[h.id] = {cjson.encode(h), booking, h}
  ev.order = ev.order or {}
  ev.order[#ev.order + 1] = h.id
  return finish(booking)
end

-- The writes of the call's confirms, once for all of them: what each would have written
-- on its own (the stock moved from held to sold, the hold's record and sets, the booking,
-- the stats), and each booking's outbox entry, in the order they were made.
local function confirms_write(ev)
  local order = ev.order
  if not order then return end
  local sold, holds, bookings, ended = {}, {}, {}, {}
  for i, id in ipairs(order) do
    local record, booking, h = unpack(ev.confirmed[id])
    for cat, n in pairs(h.q) do sold[cat] = (sold[cat] or 0) + n end
    holds[2 * i - 1], holds[2 * i] = id, record
    bookings[2 * i - 1], bookings[2 * i] = h.b, booking
    ended[2 * i - 1], ended[2 * i] = h.e, id
  end
  for cat, n in pairs(sold) do
    redis.call('HINCRBY', K.held, cat, -n)
    redis.call('HINCRBY', K.sold, cat, n)
  end
  redis.call('HSET', K.holds, unpack(holds))
  redis.call('ZREM', K.deadlines, unpack(order))
  redis.call('ZADD', K.ended, unpack(ended))
  redis.call('HSET', K.bookings, unpack(bookings))
  redis.call('HINCRBY', K.stats, 'confirmed', #order)
  for i = 2, #bookings, 2 do
    redis.call('XADD', K.outbox, '*', 'op', 'confirm', 'booking', bookings[i])
  end
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
-- `ev`: the call's shared part, for the writes the caller makes after the last request.
local function settle_batch(ev, own, request)
  local replies = {}
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
