-- release.lua: DELETE /events/{id}/holds/{hold_id}, each request a different live hold.
-- Arguments (after --): hold id file, thread count. The URL's path is the event's holds
-- collection, /events/{id}/holds.
dofile(debug.getinfo(1, "S").source:sub(2):match("^(.*/)") .. "common.lua")

local requests

function init(args)
  local prefix = wrk.path .. "/"
  requests = prepare(args[1], tonumber(args[2]), function(id)
    return wrk.format("DELETE", prefix .. id)
  end)
end

function request()
  return next_request(requests)
end
