-- wrk script for bench/run's memory workload: every request asks for a distinct, never seen
-- complete-* task (a ~1.1 KB terminal answer the gateway caches). The run tag (wrk's argument
-- after `--`) and the thread number keep ids distinct across threads and successive runs.
local threads = 0

function setup(thread)
   threads = threads + 1
   thread:set("tid", threads)
end

local prefix
local n = 0

function init(args)
   prefix = "/files/v3/files/import-from-url/async/tasks/complete-fill-" .. (args[1] or "x") .. "-" .. tid .. "-"
end

function request()
   n = n + 1
   return wrk.format("GET", prefix .. n .. "/status")
end
