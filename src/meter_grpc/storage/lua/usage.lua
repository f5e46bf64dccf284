-- usage.lua: the only place where a usage counter is checked against its limit and moved.
--
-- KEYS[1]  license hash                     (keys.license)
-- KEYS[2]  usage events stream              (keys.license_events)
-- KEYS[3]  outbox stream of the license's slot (keys.outbox), written only when EXPORT = 1
-- KEYS[4]  optional: idempotency record     (keys.request_record), only with a request_id
-- ARGV[1]  now (ms)
-- ARGV[2]  operation: "inc", "dec", "reset" or "get"
-- ARGV[3]  amount (1 .. 2^50; ignored by reset and get)
-- ARGV[4]  request_id ("" for none)
-- ARGV[5]  current period bounds (see period_of in common.lua)
-- No counter passes MAX_COUNTER (2^53 - 1), even without a limit; the idempotency record
-- ("<operation>:<amount>|<answer>") lives REQUEST_RECORD_TTL_MS.
--
-- Returns {status, uses, max_uses, overage_limit, period_end, replayed}; -1 = none/unlimited.
--   status: 0 OK, 1 LICENSE_NOT_FOUND, 2 USAGE_LIMIT_EXCEEDED, 3 USAGE_UNDERFLOW,
--           4 LICENSE_SUSPENDED, 5 LICENSE_EXPIRED, 6 REQUEST_ID_REUSED
--   (mirrored by meter_grpc.storage.scripts.UsageStatus)
-- A bulk increment is all-or-nothing; a period rollover (lazy, no cron) resets the counter
-- before the operation is applied. Answers with status 0, 2, 3, 4, 5 are stored under the
-- request_id and replayed verbatim (replayed = 1) on a retry with the same digest.

local lic = KEYS[1]
local now = tonumber(ARGV[1])
local op = ARGV[2]
local amount = tonumber(ARGV[3])
local rid = ARGV[4]
local maxlen = EVENTS_MAXLEN
local digest = op .. ':' .. ARGV[3]

local f = redis.call('HMGET', lic, 'uses', 'o_uses', 'p_uses', 'p_overage', 'suspended',
  'expire', 'p_expiry_strategy', 'p_reset', 'period')
if not f[1] then
  return {1, 0, -1, -1, -1, 0}
end

if KEYS[4] then
  local stored = redis.call('GET', KEYS[4])
  if stored then
    local sep = string.find(stored, '|', 1, true)
    if string.sub(stored, 1, sep - 1) ~= digest then
      return {6, 0, -1, -1, -1, 0}
    end
    local out = {}
    for n in string.gmatch(string.sub(stored, sep + 1), '[^,]+') do
      out[#out + 1] = tonumber(n)
    end
    out[6] = 1
    return out
  end
end

local uses = tonumber(f[1])
local max = opt(f[2]) or opt(f[3])
local ceil = ceiling(max, opt(f[4]))
local reset = opt(f[8])
local pstart, pend = period_of(reset, ARGV[5])

uses = roll_period(lic, KEYS[2], now, uses, opt(f[9]), pstart, max, KEYS[3], rid)

local status = 0
if op == 'inc' then
  local expire = opt(f[6])
  if f[5] == '1' then
    status = 4
  elseif expired_refuses_use(expire, opt(f[7]), now) then
    status = 5
  else
    local new = uses + amount
    if new > MAX_COUNTER or (ceil ~= nil and new > ceil) then
      status = 2
    else
      redis.call('HINCRBY', lic, 'uses', ARGV[3])
      emit(KEYS[2], maxlen, now, 'inc', amount, new, max, rid)
      if max ~= nil and uses < max and new >= max then
        emit(KEYS[2], maxlen, now, 'limit', amount, new, max, rid)
      end
      outbox(KEYS[3], lic, 'increment', amount, new, rid, now)
      uses = new
    end
  end
elseif op == 'dec' then
  if amount > uses then
    status = 3
  else
    uses = redis.call('HINCRBY', lic, 'uses', '-' .. ARGV[3])
    emit(KEYS[2], maxlen, now, 'dec', amount, uses, max, rid)
    outbox(KEYS[3], lic, 'decrement', -amount, uses, rid, now)
  end
elseif op == 'reset' then
  redis.call('HSET', lic, 'uses', 0)
  emit(KEYS[2], maxlen, now, 'reset', 0, 0, max, rid)
  outbox(KEYS[3], lic, 'reset', -uses, 0, rid, now)
  uses = 0
end

local out = {status, uses, max or -1, ceil or -1, pend or -1, 0}
if KEYS[4] then
  local parts = {}
  for i = 1, 5 do
    parts[i] = int(out[i])
  end
  redis.call('SET', KEYS[4], digest .. '|' .. table.concat(parts, ','), 'PX', REQUEST_RECORD_TTL_MS)
end
return out
