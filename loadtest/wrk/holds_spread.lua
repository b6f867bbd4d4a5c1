-- holds_spread.lua: POST /events/{id}/holds over several events in turn, general
-- admission, one ticket: the hot events spread over a Redis Cluster's primaries (and the
-- same number of events on one node, to compare with). Arguments (after --): the event
-- ids. The URL's path is not used.
dofile(debug.getinfo(1, "S").source:sub(2):match("^(.*/)") .. "common.lua")

local requests, n, i
wrk.headers["Content-Type"] = "application/json"
local body = '{"customer_id":"bench","items":[{"category":"GA","quantity":1}]}'

function init(args)
  requests = {}
  for _, id in ipairs(args) do
    requests[#requests + 1] = wrk.format("POST", "/events/" .. id .. "/holds", nil, body)
  end
  n = #requests
  i = tid % n -- each thread starts on another event
end

function request()
  i = i % n + 1
  return requests[i]
end
