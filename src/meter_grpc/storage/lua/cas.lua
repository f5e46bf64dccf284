-- cas.lua: compare-and-set on one key, for leases, the license-key index and the pending
-- propagations: a value is changed only by whoever saw what is there now.
--
-- KEYS[1]  the key: a string, or for 'hdel' a hash
-- ARGV[1]  operation:
--          set     SET KEYS[1] to ARGV[3] (with a TTL of ARGV[4] ms unless '') if its value is
--                  ARGV[2] ('' = only if the key does not exist)
--          del     DEL KEYS[1] if its value is ARGV[2]
--          expire  PEXPIRE KEYS[1] ARGV[3] if its value is ARGV[2]
--          hdel    HDEL field ARGV[2] of hash KEYS[1] if its value is ARGV[3]
--
-- Returns {1} when done, else {0, the value there now (false when none)}.

local op, expected = ARGV[1], ARGV[2]
local current
if op == 'hdel' then
  current = redis.call('HGET', KEYS[1], expected)
  if current ~= ARGV[3] then
    return {0, current}
  end
  redis.call('HDEL', KEYS[1], expected)
  return {1}
end
current = redis.call('GET', KEYS[1])
if (current or '') ~= expected then
  return {0, current}
end
if op == 'set' then
  if ARGV[4] ~= nil and ARGV[4] ~= '' then
    redis.call('SET', KEYS[1], ARGV[3], 'PX', ARGV[4])
  else
    redis.call('SET', KEYS[1], ARGV[3])
  end
elseif op == 'del' then
  redis.call('DEL', KEYS[1])
elseif op == 'expire' then
  redis.call('PEXPIRE', KEYS[1], ARGV[3])
else
  return redis.error_reply('cas.lua: unknown operation ' .. op)
end
return {1}
