-- key_migrate.lua: moves one record of the earlier format, which held license keys in clear,
-- to keys at rest as digests (storage/migrate.py). Each call is idempotent: several replicas
-- may migrate at once, and a migration cut short is completed by the next start.
--
-- KEYS[1]  the record
-- ARGV[1]  operation:
--          license  KEYS[1] a license hash; ARGV[2] the key's digest, ARGV[3] SHA-256(key)
--                   sealed: if the hash still has its `key` field, sets `kd` and `kf` and
--                   deletes `key`, in one step
--          create   KEYS[1] a create record (keys.create_request); ARGV[2] its `secret`
--                   sealed ('' = leave it), ARGV[3] SHA-1 of its `answer` as read ('' = leave
--                   it), ARGV[4] the answer in the current format: replaces a clear `secret`
--                   by `sealed`, and the answer if it is still the one read
--
-- Returns 1 when it changed something, else 0.

local op = ARGV[1]
if op == 'license' then
  if redis.call('HEXISTS', KEYS[1], 'key') == 0 then
    return 0
  end
  redis.call('HSET', KEYS[1], 'kd', ARGV[2], 'kf', ARGV[3])
  redis.call('HDEL', KEYS[1], 'key')
  return 1
end
if op == 'create' then
  local changed = 0
  if ARGV[2] ~= '' and redis.call('HEXISTS', KEYS[1], 'secret') == 1 then
    redis.call('HSET', KEYS[1], 'sealed', ARGV[2])
    redis.call('HDEL', KEYS[1], 'secret')
    changed = 1
  end
  if ARGV[3] ~= '' then
    local answer = redis.call('HGET', KEYS[1], 'answer')
    if answer and redis.sha1hex(answer) == ARGV[3] then
      redis.call('HSET', KEYS[1], 'answer', ARGV[4])
      changed = 1
    end
  end
  return changed
end
return redis.error_reply('key_migrate.lua: unknown operation ' .. op)
