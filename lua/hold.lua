-- hold.lua: reserve tickets, all or nothing.
-- KEYS: the event keys (lib.lua), [17] this hold's TTL key (its expiry is what the
--       keyspace listener hears), [18] the customer's rate-limit key (keys.py), then the
--       Idempotency-Key counts and record (optional, last)
-- ARGV: common [1..4] (lib.lua), [5] hold id, [6] customer id,
--       [7] items JSON [[category, quantity], ...], [8] seat labels JSON [label, ...],
--       [9] hold attempts a customer may make per window (0: no limit), [10] window, ms
-- Returns JSON: the hold record, followed (when the customer limit is on) by
-- "\n<remaining> <reset seconds>"; or {err = code, ...} (not_on_sale adds the event's
-- status and on_sale_at ms, absent when none; rate_limited adds policy "customer" and
-- retry_after seconds); or {err = "retry"} when overdue holds beyond the reclaim batch
-- may be what stands in the way (the caller reclaims and calls again, so an expired hold
-- never blocks a sale).
local cached = replay()
if cached then return cached end
-- Read once, and also the test of whether the event is loaded (a loaded one has a status).
local m = redis.call('HMGET', K.meta, 'status', 'on_sale_at', 'ttl', 'mpo', 'mpc', 'currency')
if not m[1] then return NOT_LOADED end
local id, customer = ARGV[5], ARGV[6]
local existing = redis.call('HGET', K.holds, id)
if existing then return existing end -- the client library retried this very call

local now = now_ms()
-- Every attempt that reaches a decision counts, refusals too: a bot looping on sold_out
-- meets the limit like one looping on holds. A replay (above) does not count.
local rate = rate_take(KEYS[NKEYS + 2], tonumber(ARGV[9]), tonumber(ARGV[10]), now)
if not rate.ok then return rate_refusal('customer', rate) end
-- Called again once the overdue holds are reclaimed: counted then, not now.
local function retry()
  rate_give_back(rate)
  return RETRY
end
local more = reclaim(now, RECLAIM_BATCH)
local items, seats = cjson.decode(ARGV[7]), cjson.decode(ARGV[8])

-- Validate everything before the first write.
local cats, q, n = {}, {}, 0
local function category(name)
  if cats[name] == nil then
    local raw = redis.call('HGET', K.cats, name)
    cats[name] = raw and cjson.decode(raw) or false
  end
  return cats[name]
end
for _, it in ipairs(items) do
  if not category(it[1]) then return unchanged(fail('unknown_category', {category = it[1]})) end
  q[it[1]] = (q[it[1]] or 0) + it[2]
  n = n + it[2]
end
local taken = {}
for _, label in ipairs(seats) do
  local pos = redis.call('HGET', K.seatmap, label)
  if not pos then return unchanged(fail('unknown_seat', {seat = label})) end
  local cat = string.match(pos, '^%d+:(.*)$')
  category(cat)
  q[cat] = (q[cat] or 0) + 1
  n = n + 1
  if redis.call('HEXISTS', K.seatstate, label) == 1 then taken[#taken + 1] = label end
end
if n > tonumber(m[4]) then return unchanged(fail('too_many', {max_per_order = tonumber(m[4])})) end
if m[1] ~= 'on_sale' or (m[2] ~= '' and now < tonumber(m[2])) then
  return unchanged(fail('not_on_sale', {status = m[1], on_sale_at = tonumber(m[2])}))
end
if #taken > 0 then
  if more then return retry() end
  return unchanged(fail('seats_unavailable', {seats = taken}))
end
local short, total = {}, 0
for cat, k in pairs(q) do
  local a = tonumber(redis.call('HGET', K.avail, cat) or '0')
  if a < k then short[cat] = a end
  total = total + k * cats[cat].p
end
if next(short) ~= nil then
  if more then return retry() end
  return unchanged(fail('sold_out', {available = short}))
end
-- After sold_out: an API process that knows the categories sold out answers sold_out
-- itself, without knowing the customer (service/hotpath/soldout.py), and so must the script.
if m[5] ~= '' then
  local has = tonumber(redis.call('HGET', K.cust, customer) or '0')
  if has + n > tonumber(m[5]) then
    if more then return retry() end -- some of what counts against the customer may be overdue
    return unchanged(fail('customer_limit', {remaining = math.max(0, tonumber(m[5]) - has)}))
  end
end

local full = idem_full()
if full then
  rate_give_back(rate)
  return full
end

-- Reserve: named seats first, then the best available of each seated category.
for cat, k in pairs(q) do
  redis.call('HINCRBY', K.avail, cat, -k)
  redis.call('HINCRBY', K.held, cat, k)
end
local mark = 'h:' .. id
local assigned = {}
for _, label in ipairs(seats) do
  redis.call('ZREM', K.free, label)
  redis.call('HSET', K.seatstate, label, mark)
  assigned[#assigned + 1] = label
end
for _, it in ipairs(items) do
  local c = cats[it[1]]
  if c.s == 1 then
    for _, label in ipairs(redis.call('ZRANGEBYSCORE', K.free, c.lo, c.hi, 'LIMIT', 0, it[2])) do
      redis.call('ZREM', K.free, label)
      redis.call('HSET', K.seatstate, label, mark)
      assigned[#assigned + 1] = label
    end
  end
end
redis.call('HINCRBY', K.cust, customer, n)

local ttl_ms = tonumber(m[3]) * 1000
local record = cjson.encode({
  id = id, c = customer, it = nonempty(items), st = nonempty(assigned), q = q, n = n,
  t = total, cu = m[6], ca = now, ex = now + ttl_ms, s = 'held',
})
redis.call('HSET', K.holds, id, record)
redis.call('HINCRBY', K.stats, 'created', 1)
redis.call('ZADD', K.deadlines, now + ttl_ms, id)
redis.call('SET', KEYS[NKEYS + 1], '1', 'PX', ttl_ms)
return with_rate(finish(record), rate)
