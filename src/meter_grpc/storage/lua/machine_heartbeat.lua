-- machine_heartbeat.lua: records a heartbeat of a live machine.
--
-- KEYS[1..6], ARGV[1..2]  as in machines_common.lua
-- ARGV[3]  machine id
--
-- Returns answer(0, l, json, now), else answer(status, l) with LICENSE_NOT_FOUND,
-- MACHINE_NOT_FOUND (a machine that already missed its heartbeat is gone: activate it again),
-- LICENSE_SUSPENDED, or LICENSE_EXPIRED (expired under RESTRICT_ACCESS or REVOKE_ACCESS: the
-- license may not be used, so its machines are not kept alive).

local l = load_license()
if not l then
  return NO_LICENSE
end
prune(l)
local json = redis.call('HGET', MACHINES, ARGV[3])
if not json then
  return answer(2, l)
end
if l.suspended then
  return answer(3, l)
end
if expired_refuses_use(l.expire, l.strategy, NOW) then
  return answer(4, l)
end
redis.call('ZADD', HBS, int(NOW), ARGV[3])
return answer(0, l, json, NOW)
