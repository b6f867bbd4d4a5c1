-- hold_token.lua: POST /events/{id}/holds as hold.lua, with customer tokens on: each
-- request carries a customer's token (Authorization: Bearer) and names that customer in
-- its body. Arguments (after --): a file of "<customer> <token>" lines, thread count.
-- The customers take turns, so that each token is verified again and again, as a buyer's is.
dofile(debug.getinfo(1, "S").source:sub(2):match("^(.*/)") .. "common.lua")

local requests
local turn = 0

function init(args)
  requests = prepare(args[1], tonumber(args[2]), function(line)
    local customer, token = line:match("^(%S+) (%S+)$")
    local body = '{"customer_id":"' .. customer .. '","items":[{"category":"GA","quantity":1}]}'
    local headers = {["Content-Type"] = "application/json", ["Authorization"] = "Bearer " .. token}
    return wrk.format("POST", wrk.path, headers, body)
  end)
end

function request()
  turn = turn % #requests + 1
  return requests[turn]
end
