-- machine_deactivate.lua: deactivates a machine, freeing its slot and its cores. Allowed
-- whatever the license's state.
--
-- KEYS[1..6], ARGV[1..2]  as in machines_common.lua
-- ARGV[3]  machine id
--
-- Returns answer(status, l): OK, LICENSE_NOT_FOUND or MACHINE_NOT_FOUND (also for a machine
-- that died by missing its heartbeat).

local l = load_license()
if not l then
  return NO_LICENSE
end
prune(l)
if not remove_machine(l, ARGV[3]) then
  return answer(2, l)
end
save_counters(l)
return answer(0, l)
