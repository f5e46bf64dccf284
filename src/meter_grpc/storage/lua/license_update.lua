-- license_update.lua: sets fields of an existing license and returns it.
--
-- KEYS[1]  license hash               (keys.license)
-- ARGV[1..] field, value pairs (always including `updated`)
--
-- Returns the license hash as a flat field/value list, or false when it does not exist.

if redis.call('EXISTS', KEYS[1]) == 0 then
  return false
end
redis.call('HSET', KEYS[1], unpack(ARGV))
return redis.call('HGETALL', KEYS[1])
