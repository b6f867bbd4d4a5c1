-- confirm.lua: POST /events/{id}/holds/{hold_id}/confirm, each request a different live
-- hold. Arguments (after --): hold id file, thread count. The URL's path is the event's
-- holds collection, /events/{id}/holds.
dofile(debug.getinfo(1, "S").source:sub(2):match("^(.*/)") .. "common.lua")

local ids, prefix
wrk.headers["Content-Type"] = "application/json"
local body = '{"payment_ref":"pi_bench"}'

function init(args)
  ids = load_pool(args[1], tonumber(args[2]))
  prefix = wrk.path .. "/"
end

function request()
  return wrk.format("POST", prefix .. next_hold(ids) .. "/confirm", nil, body)
end
