-- create_record.lua: the idempotency record of a create with a request_id (AIP-155). It binds
-- the request to the id of the resource being created before anything is written, so that a
-- retry after a crash, a deadline or an outage completes the same create instead of making a
-- second one, and holds the answer once the create is done.
--
-- KEYS[1]  the record, a hash `fp`, `id`, `sealed`, `answer`   (keys.create_request)
-- ARGV[1]  operation:
--          begin   ARGV[2] fingerprint of the request, ARGV[3] a fresh id, ARGV[4] TTL (ms),
--                  ARGV[5] a secret the create generates (a license key sealed under the
--                  server secret, never in clear; '' for none): records the request unless it
--                  is recorded already
--          rebind  ARGV[2] the id bound now, ARGV[3] a fresh id: binds the request to the fresh
--                  id (its first id can no longer be created; see the create window)
--          finish  ARGV[2] the id bound now, ARGV[3] the answer: stores the answer
--          abandon ARGV[2] the id bound now: drops the record unless it holds an answer (the
--                  create was refused, and a refusal leaves nothing behind)
--
-- begin returns {0} when the request id was used for another request (another fingerprint),
-- else {1, id, answer or '', secret}: the id to create, when the create is done its answer,
-- and the secret to use (the first attempt's, so a retry never generates a second key).
-- rebind, finish and abandon return 1 when done, 0 when the record is gone or bound to another
-- id (abandon: or holds an answer).

local op = ARGV[1]
if op == 'begin' then
  local r = redis.call('HMGET', KEYS[1], 'fp', 'id', 'answer', 'sealed')
  if r[1] then
    if r[1] ~= ARGV[2] then
      return {0}
    end
    return {1, r[2], r[3] or '', r[4] or ''}
  end
  redis.call('HSET', KEYS[1], 'fp', ARGV[2], 'id', ARGV[3], 'sealed', ARGV[5])
  redis.call('PEXPIRE', KEYS[1], ARGV[4])
  return {1, ARGV[3], '', ARGV[5]}
end
if redis.call('HGET', KEYS[1], 'id') ~= ARGV[2] then
  return 0
end
if op == 'rebind' then
  redis.call('HSET', KEYS[1], 'id', ARGV[3])
elseif op == 'finish' then
  redis.call('HSET', KEYS[1], 'answer', ARGV[3])
elseif op == 'abandon' then
  if redis.call('HEXISTS', KEYS[1], 'answer') == 1 then
    return 0
  end
  redis.call('DEL', KEYS[1])
else
  return redis.error_reply('create_record.lua: unknown operation ' .. op)
end
return 1
