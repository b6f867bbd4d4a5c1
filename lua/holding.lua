-- holding.lua: a hold's work, shared by hold.lua (one hold) and hold_batch.lua (the holds of
-- one event that left an API process together). The loader (service/hotpath/scripts.py)
-- puts it after lib.lua in the scripts whose header says "uses: holding.lua".
-- The work is split three ways, so that a call of several holds does the event's part once:
--   hold_event()        the event's part: meta, server time; reclaim, categories and stock
--                       read on first need and kept for the rest of the call
--   hold_request(ev, …) one request's part, in turn: its replay, rate limit, validation and
--                       reservation against what the call's earlier holds left
--   holds_write(ev)     the writes every hold of the call adds to (stock counters, records,
--                       deadlines, customers' counts, stats), once, after the last request
-- A hold's own writes (seats, its TTL key, its Idempotency-Key's record) are made in turn:
-- later requests of the call must see them.

-- The event's part, or nil when the event is not loaded (a loaded one has a status).
-- `batch`: for several holds (hold_batch.lua), with what only they share.
local function hold_event(batch)
  local m = redis.call('HMGET', K.meta, 'status', 'on_sale_at', 'ttl', 'mpo', 'mpc', 'currency')
  if not m[1] then return nil end
  local now = now_ms()
  return {
    now = now, status = m[1], on_sale_at = tonumber(m[2]), mpo = tonumber(m[4]),
    mpc = m[5] ~= '' and tonumber(m[5]) or nil, currency = m[6], ttl_ms = tonumber(m[3]) * 1000,
    selling = m[1] == 'on_sale' and (m[2] == '' or now >= tonumber(m[2])),
    reclaimed = false, more = false, -- reclaim: done, and whether more were overdue than a batch
    cats = {},        -- category -> its record, or false when unknown
    avail = {},       -- category -> tickets on sale, as the call's holds so far leave it
    json = batch and {}, -- items or seats JSON -> decoded (read only): a batch's are often alike
    known = batch and {}, -- hold id -> its record, or false: the batch's holds, and the ids
                          --   it read ahead
    held = {},        -- the call's holds made, for holds_write: {id, record, expires, q,
                      --   customer, n} each
  }
end

local function hold_category(ev, name)
  local c = ev.cats[name]
  if c == nil then
    local raw = redis.call('HGET', K.cats, name)
    c = raw and cjson.decode(raw) or false
    ev.cats[name] = c
  end
  return c
end

local function hold_decode(ev, json)
  if not ev.json then return cjson.decode(json) end
  local t = ev.json[json]
  if t == nil then
    t = cjson.decode(json)
    ev.json[json] = t
  end
  return t
end

local function hold_avail(ev, cat)
  local a = ev.avail[cat]
  if a == nil then
    a = tonumber(redis.call('HGET', K.avail, cat) or '0')
    ev.avail[cat] = a
  end
  return a
end

-- One request's part: its reply. A hold made is counted in `ev` for holds_write, which the
-- caller runs after the call's last request.
-- `rate_key`, `ttl_key`: the request's keys (keys.py); `limit` attempts per `window_ms`.
local function hold_request(ev, id, customer, items_json, seats_json, limit, window_ms, ttl_key,
                            rate_key)
  local cached = replay()
  if cached then return cached end
  if not ev then return NOT_LOADED end
  local existing = ev.known and ev.known[id]
  if existing == nil then existing = redis.call('HGET', K.holds, id) end
  if existing then return existing end -- the client library retried this very call

  local now = ev.now
  -- Every attempt that reaches a decision counts, refusals too: a bot looping on sold_out
  -- meets the limit like one looping on holds. A replay (above) does not count.
  local rate = rate_take(rate_key, limit, window_ms, now)
  if not rate.ok then return rate_refusal('customer', rate) end
  if not ev.reclaimed then
    ev.reclaimed = true
    ev.more = reclaim(now, RECLAIM_BATCH)
  end
  local more = ev.more
  local items, seats = hold_decode(ev, items_json), hold_decode(ev, seats_json)

  -- Validate everything before the first write.
  local q, n = {}, 0
  for _, it in ipairs(items) do
    if not hold_category(ev, it[1]) then
      return unchanged(fail('unknown_category', {category = it[1]}))
    end
    q[it[1]] = (q[it[1]] or 0) + it[2]
    n = n + it[2]
  end
  local taken = {}
  for _, label in ipairs(seats) do
    local pos = redis.call('HGET', K.seatmap, label)
    if not pos then return unchanged(fail('unknown_seat', {seat = label})) end
    local cat = string.match(pos, '^%d+:(.*)$')
    hold_category(ev, cat)
    q[cat] = (q[cat] or 0) + 1
    n = n + 1
    if redis.call('HEXISTS', K.seatstate, label) == 1 then taken[#taken + 1] = label end
  end
  if n > ev.mpo then return unchanged(fail('too_many', {max_per_order = ev.mpo})) end
  if not ev.selling then
    return unchanged(fail('not_on_sale', {status = ev.status, on_sale_at = ev.on_sale_at}))
  end
  -- Called again once the overdue holds are reclaimed: counted then, not now.
  if #taken > 0 then
    if more then rate_give_back(rate) return RETRY end
    return unchanged(fail('seats_unavailable', {seats = taken}))
  end
  local short, total = nil, 0
  for cat, k in pairs(q) do
    local a = hold_avail(ev, cat)
    if a < k then
      short = short or {}
      short[cat] = a
    end
    total = total + k * ev.cats[cat].p
  end
  if short then
    if more then rate_give_back(rate) return RETRY end
    return unchanged(fail('sold_out', {available = short}))
  end
  -- After sold_out: an API process that knows the categories sold out answers sold_out
  -- itself, without knowing the customer (service/hotpath/soldout.py), and so must the script.
  if ev.mpc then
    local has = tonumber(redis.call('HGET', K.cust, customer) or '0')
    for _, h in ipairs(ev.held) do
      if h[5] == customer then has = has + h[6] end
    end
    if has + n > ev.mpc then
      -- some of what counts against the customer may be overdue
      if more then rate_give_back(rate) return RETRY end
      return unchanged(fail('customer_limit', {remaining = math.max(0, ev.mpc - has)}))
    end
  end

  local full = idem_full()
  if full then
    rate_give_back(rate)
    return full
  end

  -- Reserve: named seats first, then the best available of each seated category.
  local mark = 'h:' .. id
  local assigned = {}
  for _, label in ipairs(seats) do
    redis.call('ZREM', K.free, label)
    redis.call('HSET', K.seatstate, label, mark)
    assigned[#assigned + 1] = label
  end
  for _, it in ipairs(items) do
    local c = ev.cats[it[1]]
    if c.s == 1 then
      for _, label in ipairs(redis.call('ZRANGEBYSCORE', K.free, c.lo, c.hi, 'LIMIT', 0, it[2])) do
        redis.call('ZREM', K.free, label)
        redis.call('HSET', K.seatstate, label, mark)
        assigned[#assigned + 1] = label
      end
    end
  end
  redis.call('SET', ttl_key, '1', 'PX', ev.ttl_ms)

  local expires = now + ev.ttl_ms
  local record = cjson.encode({
    id = id, c = customer, it = nonempty(items), st = nonempty(assigned), q = q, n = n,
    t = total, cu = ev.currency, ca = now, ex = expires, s = 'held',
  })
  -- Remembered now: a later request of the call with the same key must find it.
  local reply = with_rate(finish(record), rate)
  -- The call's shared writes, in Lua until holds_write: nothing below calls Redis.
  for cat, k in pairs(q) do ev.avail[cat] = ev.avail[cat] - k end
  if ev.known then ev.known[id] = record end
  ev.held[#ev.held + 1] = {id, record, expires, q, customer, n}
  return reply
end

-- The writes of the call's holds, once for all of them.
local function holds_write(ev)
  local held = ev and ev.held or {}
  if #held == 0 then return end
  if #held == 1 then -- as they stand: nothing to add up
    local h = held[1]
    for cat, k in pairs(h[4]) do
      redis.call('HINCRBY', K.avail, cat, -k)
      redis.call('HINCRBY', K.held, cat, k)
    end
    redis.call('HINCRBY', K.cust, h[5], h[6])
    redis.call('HSET', K.holds, h[1], h[2])
    redis.call('ZADD', K.deadlines, h[3], h[1])
    redis.call('HINCRBY', K.stats, 'created', 1)
    return
  end
  local take, cust, records, deadlines = {}, {}, {}, {}
  for i, h in ipairs(held) do
    for cat, k in pairs(h[4]) do take[cat] = (take[cat] or 0) + k end
    cust[h[5]] = (cust[h[5]] or 0) + h[6]
    records[2 * i - 1], records[2 * i] = h[1], h[2]
    deadlines[2 * i - 1], deadlines[2 * i] = h[3], h[1]
  end
  for cat, k in pairs(take) do
    redis.call('HINCRBY', K.avail, cat, -k)
    redis.call('HINCRBY', K.held, cat, k)
  end
  for customer, n in pairs(cust) do redis.call('HINCRBY', K.cust, customer, n) end
  redis.call('HSET', K.holds, unpack(records))
  redis.call('ZADD', K.deadlines, unpack(deadlines))
  redis.call('HINCRBY', K.stats, 'created', #held)
end
