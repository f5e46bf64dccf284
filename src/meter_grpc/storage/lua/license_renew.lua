-- license_renew.lua: extends a license's expiry by its policy's duration, from the current
-- expiry, or from now when it has already expired (or never had one).
--
-- KEYS[1]  license hash               (keys.license)
-- ARGV[1]  now (ms)
-- ARGV[2]  the latest expiry a renewal may set (ms; the end of year 9999, Timestamp's range)
--
-- Returns {0, license hash as a flat field/value list}, {1} when the license does not exist,
-- {2} when its policy has no duration (a perpetual license cannot be renewed), {3, expiry}
-- when the new expiry would pass ARGV[2] (nothing is written).

local now = tonumber(ARGV[1])
local max_expire = tonumber(ARGV[2])
local f = redis.call('HMGET', KEYS[1], 'id', 'expire', 'p_duration')
if not f[1] then
  return {1}
end
local duration = opt(f[3])
if duration == nil then
  return {2}
end
local base = opt(f[2])
if base == nil or base < now then
  base = now
end
if base + duration > max_expire then
  return {3, int(base + duration)}
end
redis.call('HSET', KEYS[1], 'expire', int(base + duration), 'updated', int(now))
return {0, redis.call('HGETALL', KEYS[1])}
