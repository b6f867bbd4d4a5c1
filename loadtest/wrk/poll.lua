-- poll.lua: GET /events/{event}/queue/{ticket} over a file of tickets (loadtest/bench_room.py):
-- wrk ... -s poll.lua URL -- <event id> <tickets file>. Each thread takes every
-- nthreads-th ticket and polls them round and round (a poll changes nothing).
dofile(debug.getinfo(1, "S").source:sub(2):match("^(.*/)") .. "common.lua")

function init(args)
  local event, path = args[1], args[2]
  requests = {}
  for _, ticket in ipairs(load_pool(path, tonumber(args[3] or "1"))) do
    requests[#requests + 1] = wrk.format("GET", "/events/" .. event .. "/queue/" .. ticket)
  end
  at = 0
end

function request()
  at = at % #requests + 1
  return requests[at]
end
