-- wrk script: POST a fresh client assertion per request (each jti is used once).
-- Bodies come from assertions.txt, split between wrk threads.
local bodies = {}
local threads = {}
local next_index = 1

function setup(thread)
  thread:set("id", #threads)
  table.insert(threads, thread)
end

function init(args)
  local file = args[1] or "assertions.txt"
  local count = tonumber(args[2] or "2")
  local n = 0
  for line in io.lines(file) do
    if n % count == id then table.insert(bodies, line) end
    n = n + 1
  end
  wrk.method = "POST"
  wrk.headers["Content-Type"] = "application/x-www-form-urlencoded"
end

function request()
  local body = bodies[next_index]
  next_index = next_index + 1
  if body == nil then body = "exhausted" end
  return wrk.format(nil, "/oauth2/token", nil, body)
end
