-- machine_get.lua: reads one live machine (after removing the dead ones).
--
-- KEYS[1..6], ARGV[1..2]  as in machines_common.lua
-- ARGV[3]  machine id
--
-- Returns answer(status, l, json, last_heartbeat) with OK, else answer(status, l) with
-- LICENSE_NOT_FOUND or MACHINE_NOT_FOUND.

local l = load_license()
if not l then
  return NO_LICENSE
end
prune(l)
local json = redis.call('HGET', MACHINES, ARGV[3])
if not json then
  return answer(2, l)
end
return answer(0, l, json, tonumber(redis.call('ZSCORE', HBS, ARGV[3])) or 0)
