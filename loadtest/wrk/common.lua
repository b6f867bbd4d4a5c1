-- common.lua: loaded by every wrk script of loadtest/bench.py (dofile, next to them).
-- setup() numbers the threads; done() prints one line the bench parses:
--   BENCH_RESULT {"requests": …, "duration_us": …, "p50_us": …, "p99_us": …, …}
-- Latencies are wrk's own (microseconds, every completed request of the run).

local threads = {}

function setup(thread)
  thread:set("tid", #threads)
  threads[#threads + 1] = thread
end

-- Hold ids for this thread: every nthreads-th line of the file, so that no two threads
-- (and no two requests) ever use the same hold.
function load_pool(path, nthreads)
  local ids, i = {}, 0
  for line in io.lines(path) do
    if line ~= "" then
      if i % nthreads == tid then ids[#ids + 1] = line end
      i = i + 1
    end
  end
  return ids
end

-- This thread's requests, one per hold id, each formatted by `build(id)` before the run:
-- the run itself only hands out ready strings (wrk shares the two cores with the server).
function prepare(path, nthreads, build)
  local requests = {}
  for _, id in ipairs(load_pool(path, nthreads)) do requests[#requests + 1] = build(id) end
  if #requests == 0 then requests[1] = build("none") end -- an empty pool: counted as exhausted
  return requests
end

-- The next request of this thread; counts (in the global `exhausted`) each one made after
-- the pool ran out, which then repeats the last: the bench rejects the run.
function next_request(requests)
  pool_next = (pool_next or 0) + 1
  local r = requests[pool_next]
  if r == nil then
    exhausted = (exhausted or 0) + 1
    r = requests[#requests]
  end
  return r
end

function done(summary, latency, requests)
  local exhausted = 0
  for _, t in ipairs(threads) do exhausted = exhausted + (t:get("exhausted") or 0) end
  local e = summary.errors
  io.write(string.format(
    'BENCH_RESULT {"requests": %.0f, "duration_us": %.0f, "bytes": %.0f, ' ..
    '"p50_us": %.0f, "p90_us": %.0f, "p99_us": %.0f, "mean_us": %.1f, "max_us": %.0f, ' ..
    '"errors_connect": %.0f, "errors_read": %.0f, "errors_write": %.0f, ' ..
    '"errors_status": %.0f, "errors_timeout": %.0f, "exhausted": %.0f}\n',
    summary.requests, summary.duration, summary.bytes,
    latency:percentile(50), latency:percentile(90), latency:percentile(99),
    latency.mean, latency.max,
    e.connect, e.read, e.write, e.status, e.timeout, exhausted))
end
