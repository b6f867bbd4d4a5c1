-- rate.lua: count one request against an address's rate limits (lib.lua, rate_take), in
-- turn; the first that refuses ends it (the ones before it have counted the request).
-- It shares lib.lua with the event scripts but takes no event keys: its keys are the
-- limits' own (service/core/keys.py, address_rate), all in the address's slot.
-- KEYS: the limits' keys, one per policy
-- ARGV: per key, three: requests (or tickets) per window, the window in ms, and what this
--       request costs (1; a hold: its tickets)
-- Returns "<remaining> <reset seconds>" per key, space-separated, when counted;
-- "- <retry after seconds> <number of the key that refused>" when over.
local now = now_ms()
local counted = {}
for i, key in ipairs(KEYS) do
  local a = (i - 1) * 3
  local taken = rate_take(key, tonumber(ARGV[a + 1]), tonumber(ARGV[a + 2]), now, tonumber(ARGV[a + 3]))
  if not taken.ok then
    return '- ' .. math.max(1, math.ceil(taken.reset_ms / 1000)) .. ' ' .. i
  end
  counted[#counted + 1] = taken.remaining .. ' ' .. math.ceil(taken.reset_ms / 1000)
end
return table.concat(counted, ' ')
