-- wrk script: each thread replays its own file of pre-signed raw requests (see deliveries.py),
-- so every request is a distinct, correctly signed delivery and wrk does no signing.
-- Usage: wrk -s replay.lua ... -- <file prefix>   (thread N reads <prefix>.N)

local threads = {}
local counter = 0

function setup(thread)
   thread:set("id", counter)
   counter = counter + 1
   table.insert(threads, thread)
end

function init(args)
   local f = assert(io.open(args[1] .. "." .. id, "rb"))
   local data = f:read("*a")
   f:close()
   requests, at = {}, 1
   while at <= #data do
      local newline = string.find(data, "\n", at, true)
      local length = tonumber(string.sub(data, at, newline - 1))
      table.insert(requests, string.sub(data, newline + 1, newline + length))
      at = newline + 1 + length
   end
   nxt, wrapped = 1, 0
end

function request()
   local r = requests[nxt]
   nxt = nxt + 1
   if nxt > #requests then
      nxt, wrapped = 1, 1
   end
   return r
end

function done(summary, latency, requests)
   local wrapped = 0
   for _, t in ipairs(threads) do
      wrapped = wrapped + (t:get("wrapped") or 0)
   end
   io.write(string.format(
      'WRK_JSON {"requests": %d, "seconds": %f, "non2xx": %d, "socket_errors": %d, ' ..
      '"p50": %f, "p99": %f, "p999": %f, "wrapped": %d}\n',
      summary.requests, summary.duration / 1e6, summary.errors.status,
      summary.errors.connect + summary.errors.read + summary.errors.write + summary.errors.timeout,
      latency:percentile(50) / 1e3, latency:percentile(99) / 1e3, latency:percentile(99.9) / 1e3,
      wrapped))
end
