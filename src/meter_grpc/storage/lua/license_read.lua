-- license_read.lua: reads a license after removing its dead machines (so its machine counters
-- only count live ones), and optionally what it knows of a fingerprint (for validation).
--
-- KEYS[1..6], ARGV[1..2]  as in machines_common.lua
-- ARGV[3]  fingerprint ("" for none)
--
-- Returns false when the license does not exist, else
-- {license hash as a flat field/value list, fingerprint state, machine id}
--   fingerprint state: 0 not asked, 1 alive (machine id given), 2 dead (missed its heartbeat),
--   3 unknown (mirrored by meter_grpc.domain.models.FingerprintState)

local fp = ARGV[3]

local l = load_license()
if not l then
  return false
end
prune(l)
local state, id = 0, ''
if fp ~= '' then
  local holder = redis.call('HGET', FPS, fp)
  if holder then
    state, id = 1, holder
  elseif redis.call('ZSCORE', DEAD, fp) then
    state = 2
  else
    state = 3
  end
end
return {redis.call('HGETALL', LIC), state, id}
