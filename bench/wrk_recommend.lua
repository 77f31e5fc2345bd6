-- wrk script for bench/serve.py: POST recommendation requests for users drawn uniformly
-- (seeded) from a file, and count what the answers say.
--
-- Environment (set by bench/serve.py):
--   STRATAREC_WRK_USERS  file with one user id per line
--   STRATAREC_WRK_BODY   "object" ({"user_id":..,"k":..}), "list" ([{..}]) or the name of the
--                        list argument of a batchable API ({"<name>":[{..}]})
--   STRATAREC_WRK_K      k
--   STRATAREC_WRK_SEED   seed; thread i uses seed + i
--
-- done() prints one JSON line: wrk's own counts and latency percentiles (microseconds), plus,
-- summed over threads, the non-200 statuses, degraded and cold-start answers and the
-- Server-Timing durations (feast, score) of every answer, so bench/serve.py can take
-- percentiles of them.

local threads = {}
local next_id = 0

function setup(thread)
  thread:set("id", next_id)
  next_id = next_id + 1
  table.insert(threads, thread)
end

local users = {}
local k = tonumber(os.getenv("STRATAREC_WRK_K") or "10")
local mode = os.getenv("STRATAREC_WRK_BODY") or "object"

function init(args)
  for line in io.lines(os.getenv("STRATAREC_WRK_USERS")) do
    users[#users + 1] = tonumber(line)
  end
  math.randomseed(tonumber(os.getenv("STRATAREC_WRK_SEED") or "7") + id)
  statuses = {}
  degraded = 0
  cold = 0
  feast = {}
  score = {}
  headers_out = { ["Content-Type"] = "application/json" }
end

function request()
  local one = string.format('{"user_id":%d,"k":%d}', users[math.random(#users)], k)
  local body
  if mode == "object" then
    body = one
  elseif mode == "list" then
    body = "[" .. one .. "]"
  else
    body = string.format('{"%s":[%s]}', mode, one)
  end
  return wrk.format("POST", nil, headers_out, body)
end

function response(status, headers, body)
  if status ~= 200 then
    local key = tostring(status)
    statuses[key] = (statuses[key] or 0) + 1
    return
  end
  if string.find(body, '"degraded":true', 1, true) then degraded = degraded + 1 end
  if string.find(body, '"cold_start":true', 1, true) then cold = cold + 1 end
  local timing = headers["Server-Timing"] or headers["server-timing"]
  if timing then
    local f = string.match(timing, "feast;dur=([%d%.]+)")
    local s = string.match(timing, "score;dur=([%d%.]+)")
    if f then feast[#feast + 1] = f end
    if s then score[#score + 1] = s end
  end
end

function done(summary, latency, requests)
  local all_status, all_feast, all_score = {}, {}, {}
  local n_degraded, n_cold = 0, 0
  for _, thread in ipairs(threads) do
    for key, n in pairs(thread:get("statuses")) do all_status[key] = (all_status[key] or 0) + n end
    n_degraded = n_degraded + thread:get("degraded")
    n_cold = n_cold + thread:get("cold")
    for _, v in ipairs(thread:get("feast")) do all_feast[#all_feast + 1] = v end
    for _, v in ipairs(thread:get("score")) do all_score[#all_score + 1] = v end
  end
  local status_parts = {}
  for key, n in pairs(all_status) do status_parts[#status_parts + 1] = string.format('"%s":%d', key, n) end
  local e = summary.errors
  io.write(string.format(
    '{"requests":%d,"duration_us":%d,"bytes":%d,' ..
    '"socket_errors":{"connect":%d,"read":%d,"write":%d,"timeout":%d},"non_2xx":%d,"statuses":{%s},' ..
    '"degraded":%d,"cold_start":%d,' ..
    '"latency_us":{"p50":%d,"p95":%d,"p99":%d,"max":%d,"mean":%.1f},' ..
    '"feast_ms":[%s],"score_ms":[%s]}\n',
    summary.requests, summary.duration, summary.bytes,
    e.connect, e.read, e.write, e.timeout, e.status, table.concat(status_parts, ","),
    n_degraded, n_cold,
    latency:percentile(50), latency:percentile(95), latency:percentile(99), latency.max, latency.mean,
    table.concat(all_feast, ","), table.concat(all_score, ",")))
end
