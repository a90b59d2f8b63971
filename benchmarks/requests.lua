-- wrk script: sends the requests listed in a file, picked at random, and
-- prints one line of JSON for the benchmark suite at the end.
--
--   wrk -s requests.lua URL -- FILE [PAUSE_MS]
--
-- Each line of FILE is METHOD, PATH, COOKIE and BODY split by tabs; the
-- cookie and the body may be empty. With PAUSE_MS, each connection waits
-- that long before each request, which holds the load below the most the
-- server can take.

local requests = {}
local pause = 0

local function split(line)
  local fields = {}
  for field in (line .. "\t"):gmatch("([^\t]*)\t") do
    fields[#fields + 1] = field
  end
  return fields
end

local function build(fields)
  local method, path, cookie, body = fields[1], fields[2], fields[3], fields[4]
  local headers = {}
  if cookie ~= "" then
    headers["Cookie"] = cookie
  end
  if body ~= "" then
    headers["Content-Type"] = "application/json"
  else
    body = nil
  end
  return wrk.format(method, path, headers, body)
end

local counter = 0

function setup(thread)
  -- Each thread draws its own sequence of requests.
  counter = counter + 1
  thread:set("seed", counter)
end

function init(args)
  math.randomseed(os.time() * 1000 + seed)
  for line in io.lines(args[1]) do
    if line ~= "" then
      requests[#requests + 1] = build(split(line))
    end
  end
  pause = tonumber(args[2] or "0")
end

function request()
  return requests[math.random(#requests)]
end

function delay()
  return pause
end

function done(summary, latency, _)
  local errors = summary.errors
  io.write(string.format(
    'RESULT {"requests": %d, "seconds": %.6f, "p50_ms": %.3f, ' ..
    '"p99_ms": %.3f, "failed": %d}\n',
    summary.requests,
    summary.duration / 1e6,
    latency:percentile(50) / 1e3,
    latency:percentile(99) / 1e3,
    errors.connect + errors.read + errors.write + errors.status + errors.timeout
  ))
end
