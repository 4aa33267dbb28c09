-- wrk script for bench_memory.py: GET BENCH_WRK_PATH with %d replaced by a random id in
-- 1..BENCH_WRK_IDS, each thread stopping after BENCH_WRK_REQUESTS responses; at the end,
-- one line "pid <X-Pid> <responses>" per worker that answered (counted from the header).
local threads = {}

function setup(thread)
  table.insert(threads, thread)
end

function init(args)
  path = os.getenv("BENCH_WRK_PATH") or "/"
  ids = tonumber(os.getenv("BENCH_WRK_IDS") or "1")
  limit = tonumber(os.getenv("BENCH_WRK_REQUESTS") or "0")
  count = 0
  pids = {}
  math.randomseed(os.time() + math.floor(os.clock() * 1000000))
end

request = function()
  local target = string.gsub(path, "%%d", tostring(math.random(1, ids)))
  return wrk.format("GET", target)
end

function response(status, headers, body)
  count = count + 1
  local pid = headers["X-Pid"]
  if pid then
    pids[pid] = (pids[pid] or 0) + 1
  end
  if limit > 0 and count >= limit then
    wrk.thread:stop()
  end
end

function done(summary, latency, requests)
  local total = {}
  for _, thread in ipairs(threads) do
    for pid, n in pairs(thread:get("pids")) do
      total[pid] = (total[pid] or 0) + n
    end
  end
  for pid, n in pairs(total) do
    io.write(string.format("pid %s %d\n", pid, n))
  end
end
