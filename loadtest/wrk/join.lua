-- join.lua: POST /events/{id}/queue (the URL's path), each request a new customer.
-- Argument (after --): a prefix that this run's customer ids start with (a new one per
-- run: a customer of an earlier run would only read its ticket again).
dofile(debug.getinfo(1, "S").source:sub(2):match("^(.*/)") .. "common.lua")

wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
local prefix, n = "c", 0

function init(args)
  prefix = (args[1] or "c") .. "-" .. tid .. "-"
end

function request()
  n = n + 1
  return wrk.format(nil, nil, nil, '{"customer_id":"' .. prefix .. n .. '"}')
end
