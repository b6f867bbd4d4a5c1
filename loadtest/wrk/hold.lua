-- hold.lua: POST /events/{id}/holds (the URL's path), general admission, one ticket.
-- The same request for the service, the twin and the PostgreSQL baseline.
dofile(debug.getinfo(1, "S").source:sub(2):match("^(.*/)") .. "common.lua")

wrk.method = "POST"
wrk.body = '{"customer_id":"bench","items":[{"category":"GA","quantity":1}]}'
wrk.headers["Content-Type"] = "application/json"
