-- get.lua: GET of the URL as given (GET /health, GET /events/{id}); only the done() hook.
dofile(debug.getinfo(1, "S").source:sub(2):match("^(.*/)") .. "common.lua")
