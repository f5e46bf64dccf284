-- machines_common.lua: prepended (after common.lua) to every script that reads or changes the
-- machines of a license. All of them take the same first KEYS and ARGV:
--
-- KEYS[1]  license hash                     (keys.license)
-- KEYS[2]  machines: id -> machine JSON     (keys.machines)
-- KEYS[3]  fingerprints: fingerprint -> id  (keys.fingerprints)
-- KEYS[4]  heartbeats: id by last heartbeat (keys.heartbeats)
-- KEYS[5]  dead fingerprints by death time  (keys.dead_fingerprints)
-- KEYS[6]  live machine ids, ordered by id   (keys.machine_order: scores 0, ZRANGEBYLEX)
-- ARGV[1]  now (ms)
-- ARGV[2]  how many dead fingerprints to remember
--
-- load_license()  -> the license's machine rules and counters, or nil when it does not exist
-- index()         -> makes sure KEYS[6] holds every live machine id: builds it from KEYS[2]
--                    when it is missing while machines exist (data written before the index
--                    existed). Called before any change of the machine set and before a list,
--                    so the index and the machines hash always change together.
-- prune(l)        -> removes the floating machines that missed their heartbeat (now >= last
--                    heartbeat + heartbeat_duration), keeping the counters exact; their
--                    fingerprints are remembered as dead. Every script calls it before it reads
--                    or checks anything, so a dead machine never counts toward a limit and no
--                    sweeper races an activation.
-- answer(status, l, ...) -> {status, machines, cores, max_machines, machine_ceiling, max_cores,
--                    core_ceiling, ...}; -1 = unlimited. Statuses are mirrored by
--                    meter_grpc.storage.scripts.MachineStatus:
--   0 OK, 1 LICENSE_NOT_FOUND, 2 MACHINE_NOT_FOUND, 3 LICENSE_SUSPENDED, 4 LICENSE_EXPIRED,
--   5 FINGERPRINT_TAKEN, 6 MACHINE_LIMIT_EXCEEDED, 7 CORE_LIMIT_EXCEEDED, 8 CORES_REQUIRED,
--   9 CONFLICT, 10 REQUEST_ID_REUSED, 11 MACHINE_CAP_EXCEEDED (the server's cap per license)
--
-- Machine JSON is written by Python only (cjson.encode would round large numbers); the
-- scripts decode it to read `fingerprint` and `cores`.

local LIC, MACHINES, FPS, HBS, DEAD = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5]
local ORDER = KEYS[6]
local NOW = tonumber(ARGV[1])
local DEAD_CAP = tonumber(ARGV[2])

local function load_license()
  local f = redis.call('HMGET', LIC, 'id', 'suspended', 'expire', 'p_expiry_strategy',
    'o_machines', 'p_machines', 'o_cores', 'p_cores', 'p_overage', 'p_floating', 'p_heartbeat',
    'machines', 'cores')
  if not f[1] then
    return nil
  end
  local l = {
    suspended = f[2] == '1',
    expire = opt(f[3]),
    strategy = opt(f[4]),
    floating = f[10] == '1',
    heartbeat = opt(f[11]),
    machines = tonumber(f[12]) or 0,
    cores = tonumber(f[13]) or 0,
  }
  local ovg = opt(f[9])
  if l.floating then
    l.max_machines = opt(f[5]) or opt(f[6])
    l.machine_ceiling = ceiling(l.max_machines, ovg)
  else
    -- node-locked: exactly one machine, whatever the overrides and the overage strategy
    l.max_machines = 1
    l.machine_ceiling = 1
  end
  l.max_cores = opt(f[7]) or opt(f[8])
  l.core_ceiling = ceiling(l.max_cores, ovg)
  return l
end

local function expired(l)
  return l.expire ~= nil and NOW >= l.expire
end

local indexed = false
local function index()
  if indexed then
    return
  end
  indexed = true
  if redis.call('EXISTS', ORDER) == 1 or redis.call('HLEN', MACHINES) == 0 then
    return
  end
  local ids = redis.call('HKEYS', MACHINES)
  for i = 1, #ids, 1000 do
    local args = {}
    for j = i, math.min(i + 999, #ids) do
      args[#args + 1] = 0
      args[#args + 1] = ids[j]
    end
    redis.call('ZADD', ORDER, unpack(args))
  end
end

-- Removes one live machine; returns its decoded JSON (nil when it is not live).
local function remove_machine(l, id)
  local json = redis.call('HGET', MACHINES, id)
  if not json then
    return nil
  end
  local m = cjson.decode(json)
  index()
  redis.call('HDEL', MACHINES, id)
  redis.call('ZREM', ORDER, id)
  redis.call('ZREM', HBS, id)
  if redis.call('HGET', FPS, m.fingerprint) == id then
    redis.call('HDEL', FPS, m.fingerprint)
  end
  l.machines = l.machines - 1
  l.cores = l.cores - m.cores
  return m
end

local function save_counters(l)
  redis.call('HSET', LIC, 'machines', int(l.machines), 'cores', int(l.cores))
end

local function prune(l)
  if not l.floating or l.heartbeat == nil then
    return
  end
  local dead = redis.call('ZRANGEBYSCORE', HBS, '-inf', int(NOW - l.heartbeat), 'WITHSCORES')
  if #dead == 0 then
    return
  end
  for i = 1, #dead, 2 do
    local m = remove_machine(l, dead[i])
    if m then
      redis.call('ZADD', DEAD, int(tonumber(dead[i + 1]) + l.heartbeat), m.fingerprint)
    else
      redis.call('ZREM', HBS, dead[i])
    end
  end
  save_counters(l)
  local extra = redis.call('ZCARD', DEAD) - DEAD_CAP
  if extra > 0 then
    redis.call('ZREMRANGEBYRANK', DEAD, 0, extra - 1)
  end
end

local function answer(status, l, ...)
  local out = {status, l.machines, l.cores, l.max_machines or -1, l.machine_ceiling or -1,
    l.max_cores or -1, l.core_ceiling or -1}
  for _, v in ipairs({...}) do
    out[#out + 1] = v
  end
  return out
end

local NO_LICENSE = {1, 0, 0, -1, -1, -1, -1}
