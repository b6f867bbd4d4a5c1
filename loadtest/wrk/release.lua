-- release.lua: DELETE /events/{id}/holds/{hold_id}, each request a different live hold.
-- Arguments (after --): hold id file, thread count. The URL's path is the event's holds
-- collection, /events/{id}/holds.
dofile(debug.getinfo(1, "S").source:sub(2):match("^(.*/)") .. "common.lua")

local ids, prefix

function init(args)
  ids = load_pool(args[1], tonumber(args[2]))
  prefix = wrk.path .. "/"
end

function request()
  return wrk.format("DELETE", prefix .. next_hold(ids))
end
