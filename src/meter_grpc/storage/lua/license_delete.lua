-- license_delete.lua: deletes a license with its machines and usage events.
--
-- KEYS[1]  license hash               (keys.license)
-- KEYS[2..] the license's other keys: machines, fingerprints, heartbeats, dead fingerprints,
--           machine order, events, policy mailbox, reservations; the last one is the tombstone (keys.license_tombstone)
-- ARGV[1]  how long the tombstone stays (ms)
--
-- Returns {key digest, policy_id} of the deleted license (for the caller to drop it from the
-- key lookup and the indexes), or false when it does not exist.

local f = redis.call('HMGET', KEYS[1], 'policy_id', 'kd')
if not f[1] then
  return false
end
redis.call('DEL', unpack(KEYS))
redis.call('SET', KEYS[#KEYS], '1', 'PX', ARGV[1])
return {f[2] or '', f[1]}
