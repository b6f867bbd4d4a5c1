-- confirm.lua: POST /events/{id}/holds/{hold_id}/confirm, each request a different live
-- hold. Arguments (after --): hold id file, thread count. The URL's path is the event's
-- holds collection, /events/{id}/holds.
dofile(debug.getinfo(1, "S").source:sub(2):match("^(.*/)") .. "common.lua")

local requests
wrk.headers["Content-Type"] = "application/json"
local body = '{"payment_ref":"pi_bench"}'

function init(args)
  local prefix = wrk.path .. "/"
  requests = prepare(args[1], tonumber(args[2]), function(id)
    return wrk.format("POST", prefix .. id .. "/confirm", nil, body)
  end)
end

function request()
  return next_request(requests)
end
