-- poll.lua: GET /events/{id}/queue/{ticket}, cycling through this thread's tickets (a
-- poll may repeat: buyers poll again and again). Arguments (after --): ticket file,
-- thread count. The URL's path is the event's queue, /events/{id}/queue.
dofile(debug.getinfo(1, "S").source:sub(2):match("^(.*/)") .. "common.lua")

local requests, i = nil, 0

function init(args)
  local prefix = wrk.path .. "/"
  requests = prepare(args[1], tonumber(args[2]), function(ticket)
    return wrk.format("GET", prefix .. ticket)
  end)
end

function request()
  i = i % #requests + 1
  return requests[i]
end
