-- Many clients for one wrk run: requests rotate over N client ids, each with a fixed client region,
-- so consistent hashing spreads them over the backends and lbd's dynamic mode creates sessions once
-- and then keeps them (sticky). Every proxied row and the direct row send this same stream.
--
--   wrk -s bench/wrk/clients.lua http://127.0.0.1:PORT -- /tiny 10000
--
-- Requests are built once in init() with wrk.format, so request() only indexes a table. done()
-- prints one line, "BENCH_JSON {...}", with exact figures (latencies in microseconds) for compare.py.

local regions = { "us-east", "us-west", "ca-central", "eu-west", "me-central", "asia-south", "oceania" }
local prepared = {}
local count = 0
local index = 0

function init(args)
  local path = args[1] or wrk.path
  count = tonumber(args[2] or "10000")
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
