-- rate.lua: count one request against a per-address rate limit (lib.lua, rate_take).
-- It shares lib.lua with the event scripts but takes no event keys: its one key is the
-- limit's own (service/keys.py, address_rate), on whatever slot that falls.
-- KEYS: [1] the limit's key
-- ARGV: [1] requests per window, [2] window, ms
-- Returns "<remaining> <reset seconds>" when counted; "- <retry after seconds>" when over.
local taken = rate_take(KEYS[1], tonumber(ARGV[1]), tonumber(ARGV[2]), now_ms())
if not taken.ok then
  return '- ' .. math.max(1, math.ceil(taken.reset_ms / 1000))
end
return taken.remaining .. ' ' .. math.ceil(taken.reset_ms / 1000)
