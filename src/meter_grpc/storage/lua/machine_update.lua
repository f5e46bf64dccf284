-- machine_update.lua: replaces a machine's JSON if it is still the one the caller read
-- (optimistic concurrency: the caller re-reads and retries on CONFLICT), re-checking a change
-- of cores against max_cores (with overage). A decrease is always allowed, but not to 0
-- under a core limit.
--
-- KEYS[1..6], ARGV[1..2]  as in machines_common.lua
-- ARGV[3]  machine id
-- ARGV[4]  the machine JSON the caller read
-- ARGV[5]  the new machine JSON
-- ARGV[6]  the new cores (0 .. 2^20)
--
-- Returns answer(0, l, json, last_heartbeat), else answer(status, l, extra) with
-- LICENSE_NOT_FOUND, MACHINE_NOT_FOUND, CONFLICT, CORES_REQUIRED or CORE_LIMIT_EXCEEDED
-- (extra: the cores the change would add).

local id, new_cores = ARGV[3], tonumber(ARGV[6])

local l = load_license()
if not l then
  return NO_LICENSE
end
prune(l)
local json = redis.call('HGET', MACHINES, id)
if not json then
  return answer(2, l)
end
if json ~= ARGV[4] then
  return answer(9, l)
end
local delta = new_cores - cjson.decode(json).cores
if delta ~= 0 and l.max_cores ~= nil and new_cores < 1 then
  return answer(8, l)
end
if delta > 0 and l.core_ceiling ~= nil and l.cores + delta > l.core_ceiling then
  return answer(7, l, delta)
end
redis.call('HSET', MACHINES, id, ARGV[5])
if delta ~= 0 then
  l.cores = l.cores + delta
  save_counters(l)
end
return answer(0, l, ARGV[5], tonumber(redis.call('ZSCORE', HBS, id)) or 0)
