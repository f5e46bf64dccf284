-- machine_activate.lua: activates a machine on a license, the only place where a machine is
-- added: checks the fingerprint, max_machines and max_cores (with the policy's overage) and
-- moves the counters in one step.
--
-- KEYS[1..5], ARGV[1..2]  as in machines_common.lua
-- ARGV[3]  machine id (minted by the caller, embeds the license id)
-- ARGV[4]  fingerprint
-- ARGV[5]  cores (0 .. 2^20)
-- ARGV[6]  machine JSON
--
-- Returns answer(status, l, extra): extra is the machine id holding the fingerprint for
-- FINGERPRINT_TAKEN. Refused: suspended licenses, and expired ones unless ALLOW_ACCESS (4).
-- The counters in the answer are after the activation (OK) or at the refusal.

local id, fp, cores = ARGV[3], ARGV[4], tonumber(ARGV[5])

local l = load_license()
if not l then
  return NO_LICENSE
end
prune(l)
if l.max_cores ~= nil and cores < 1 then
  return answer(8, l)
end
if l.suspended then
  return answer(3, l)
end
if expired(l) and l.strategy ~= 4 then
  return answer(4, l)
end
local holder = redis.call('HGET', FPS, fp)
if holder then
  return answer(5, l, holder)
end
if redis.call('HEXISTS', MACHINES, id) == 1 then
  return answer(9, l)
end
if l.machine_ceiling ~= nil and l.machines + 1 > l.machine_ceiling then
  return answer(6, l)
end
if l.core_ceiling ~= nil and l.cores + cores > l.core_ceiling then
  return answer(7, l)
end

redis.call('HSET', MACHINES, id, ARGV[6])
redis.call('HSET', FPS, fp, id)
redis.call('ZADD', HBS, int(NOW), id)
redis.call('ZREM', DEAD, fp)
l.machines = l.machines + 1
l.cores = l.cores + cores
save_counters(l)
return answer(0, l)
