-- unknown.lua: requests for event ids that do not exist, each id new (no cache of a
-- miss helps): GET /events/{id}, POST /events/{id}/holds and GET /events/{id}/holds/{hold}
-- in turn, every answer 404 event_not_found. The URL's path is not used. The requests are
-- formatted in init(), before the run (wrk shares the two cores with the server).
dofile(debug.getinfo(1, "S").source:sub(2):match("^(.*/)") .. "common.lua")

local POOL = 60000 -- per thread: no id asked twice in a run of up to a minute
local requests, i = {}, 0
local body = '{"customer_id":"bench","items":[{"category":"GA","quantity":1}]}'

function init(args)
  math.randomseed(os.time() * 1000 + tid)
  local headers = {["Content-Type"] = "application/json"}
  for n = 1, POOL do
    local path = string.format("/events/ev-%d-%08x%08x", tid, math.random(0, 0x7fffffff),
      math.random(0, 0x7fffffff))
    local kind = n % 3
    if kind == 0 then
      requests[n] = wrk.format("GET", path)
    elseif kind == 1 then
      requests[n] = wrk.format("POST", path .. "/holds", headers, body)
    else
      requests[n] = wrk.format("GET", path .. "/holds/h" .. n)
    end
  end
end

function request()
  i = i % #requests + 1
  return requests[i]
end
