-- Many clients for one wrk run: requests rotate over N client ids, each with a fixed client region,
-- so consistent hashing spreads them over the backends and lbd's dynamic mode creates sessions once
-- and then keeps them (sticky). Every proxied row and the direct row send this same stream.
--
--   wrk -s bench/wrk/clients.lua http://127.0.0.1:PORT -- /tiny 10000
--   wrk -s bench/wrk/clients.lua http://127.0.0.1:PORT -- /tiny 0 new   # a new client id every request
--
-- Requests are built once in init() with wrk.format, so request() only indexes a table; with "new",
-- request() formats each one (a client id never sent before, as a service with millions of clients
-- sees). done() prints one line, "BENCH_JSON {...}", with exact figures (latencies in microseconds)
-- for compare.py.

local regions = { "us-east", "us-west", "ca-central", "eu-west", "me-central", "asia-south", "oceania" }
local prepared = {}
local count = 0
local index = 0
local fresh = false
local fresh_path = "/"
local fresh_headers = {}
local fresh_prefix = ""

function init(args)
  local path = args[1] or wrk.path
  count = tonumber(args[2] or "10000")
  fresh = args[3] == "new"
  if fresh then
    fresh_path = path
    for name, value in pairs(wrk.headers) do
      fresh_headers[name] = value
    end
    math.randomseed(os.time())
    fresh_prefix = string.format("new-%d-%d-", os.time(), math.random(1, 1000000000))
    return
  end
  for i = 1, count do
    local headers = {}
    for name, value in pairs(wrk.headers) do
      headers[name] = value
    end
    headers["client-id"] = string.format("client-%06d", i)
    headers["client-region"] = regions[(i % #regions) + 1]
    prepared[i] = wrk.format("GET", path, headers)
  end
end

function request()
  if fresh then
    index = index + 1
    fresh_headers["client-id"] = fresh_prefix .. index
    fresh_headers["client-region"] = regions[(index % #regions) + 1]
    return wrk.format("GET", fresh_path, fresh_headers)
  end
  index = index % count + 1
  return prepared[index]
end

function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'BENCH_JSON {"requests": %d, "duration_us": %d, "bytes": %d, "p50_us": %d, "p90_us": %d, "p99_us": %d, '
      .. '"max_us": %d, "mean_us": %.1f, "connect": %d, "read": %d, "write": %d, "status": %d, "timeout": %d}\n',
    summary.requests, summary.duration, summary.bytes,
    latency:percentile(50), latency:percentile(90), latency:percentile(99),
    latency.max, latency.mean, e.connect, e.read, e.write, e.status, e.timeout))
end
