-- repair_claims.lua: records -> seats, for a batch of bookings or holds named by id: each
-- live record gets the seats it claims (a repair step; the caller walks the records).
-- KEYS: the event keys (lib.lua)
-- ARGV: common [1..4] (lib.lua), [5] "b" (booking ids follow) or "h" (hold ids),
--       [6..] the ids
-- Each record is read again here, so a sale or a release since the caller listed it is
-- seen as it is now. A confirmed booking takes each of its seats that is free or that
-- names no live record having it; a live hold that has one of them is released (a sale
-- is never undone for a hold); a seat another confirmed booking has is left (sold twice:
-- the check reports it). A live hold takes its seats, or is released when one of them is
-- another live record's. Counters move with each release (lib.lua end_hold); the recount
-- that follows puts them right anyway. Returns JSON {released = [hold ids]}, or
-- {err = "not_loaded"}.
if not loaded() then return NOT_LOADED end
local kind = ARGV[5]
if kind ~= 'b' and kind ~= 'h' then return redis.error_reply('repair_claims: bad arguments') end
local now = now_ms()
local released = {}

-- The live record a seat state names, when it has that seat; else false.
local function claimant(state, label)
  local r = live_record(state)
  return has_seat(r, label) and r
end

local function take(label, state)
  if redis.call('HEXISTS', K.seatmap, label) == 0 then return end -- no such seat
  redis.call('HSET', K.seatstate, label, state)
  redis.call('ZREM', K.free, label)
end

local function release(h)
  end_hold(h, 'released', now, true)
  released[#released + 1] = h.id
end

for i = 6, #ARGV do
  local id = ARGV[i]
  local raw = redis.call('HGET', kind == 'b' and K.bookings or K.holds, id)
  local r = raw and cjson.decode(raw)
  local mine = kind .. ':' .. id
  if r and kind == 'b' and r.s == 'confirmed' then
    for _, label in ipairs(r.st or {}) do
      local state = redis.call('HGET', K.seatstate, label)
      if state == mine then
        redis.call('ZREM', K.free, label) -- never on sale as well
      else
        local other = state and claimant(state, label)
        if not other then
          take(label, mine)
        elseif string.sub(state, 1, 2) == 'h:' then
          release(other)
          take(label, mine)
        end
      end
    end
  elseif r and kind == 'h' and r.s == 'held' then
    local clash = false
    for _, label in ipairs(r.st or {}) do
      local state = redis.call('HGET', K.seatstate, label)
      clash = clash or (state and state ~= mine and claimant(state, label) ~= false)
    end
    if clash then
      release(r)
    else
      for _, label in ipairs(r.st or {}) do take(label, mine) end
    end
  end
end
return cjson.encode({released = nonempty(released)})
