-- usage.lua: the only place where a usage counter is checked against its limit and moved.
--
-- KEYS[1]  license hash                     (keys.license)
-- KEYS[2]  usage events stream              (keys.license_events)
-- KEYS[3]  outbox stream of the license's slot (keys.outbox), written only when EXPORT = 1
-- KEYS[4..6] reservations, their expiry and closed sets (keys.reservation_keys)
-- KEYS[7]  optional: idempotency record     (keys.request_record), only with a request_id
-- ARGV[1]  now (ms)
-- ARGV[2]  operation: "inc", "dec", "reset" or "get"
-- ARGV[3]  amount (1 .. 2^50; ignored by reset and get)
-- ARGV[4]  request_id ("" for none)
-- ARGV[5]  current period bounds (see period_of in common.lua)
-- ARGV[6]  optional: meter code ("" or absent: the license's own counter)
-- No counter passes MAX_COUNTER (2^53 - 1), even without a limit; the idempotency record
-- ("<operation>:<amount>[:<meter>]|<answer>") lives REQUEST_RECORD_TTL_MS.
--
-- Returns {status, uses, max_uses, overage_limit, period_end, replayed, reserved};
-- -1 = none/unlimited.
--   status: 0 OK, 1 LICENSE_NOT_FOUND, 2 USAGE_LIMIT_EXCEEDED, 3 USAGE_UNDERFLOW,
--           4 LICENSE_SUSPENDED, 5 LICENSE_EXPIRED, 6 REQUEST_ID_REUSED, 7 METER_NOT_FOUND,
--           8 METER_NOT_ENTITLED
--   (mirrored by meter_grpc.storage.scripts.UsageStatus)
-- Expired reservations of the license are released first (release_expired, common.lua; only
-- when it has open ones). A bulk increment is all-or-nothing: uses + reserved + amount must stay within the ceiling
-- (units held by reservations count against it); a period rollover (lazy, no cron) resets the
-- counter before the operation is applied. A meter counts exactly like the license's own
-- counter, in fields of its own (common.lua, counter_fields); increments of a meter whose
-- entitlement the license lacks are refused. Answers with status 0, 2, 3, 4, 5 are stored
-- under the request_id and replayed verbatim (replayed = 1) on a retry with the same digest;
-- METER_NOT_FOUND and METER_NOT_ENTITLED are not (nothing is written: a retry once the
-- policy has the meter, or the license the entitlement, is answered anew).

local lic = KEYS[1]
local now = tonumber(ARGV[1])
local op = ARGV[2]
local amount = tonumber(ARGV[3])
local rid = ARGV[4]
local meter = ARGV[6] or ''
local maxlen = EVENTS_MAXLEN
local digest = op .. ':' .. ARGV[3]
if meter ~= '' then
  digest = digest .. ':' .. meter
end

local c = load_counter(lic, meter, ARGV[5])
if c == nil then
  return {1, 0, -1, -1, -1, 0, 0}
end

if KEYS[7] then
  local stored = redis.call('GET', KEYS[7])
  if stored then
    local sep = string.find(stored, '|', 1, true)
    if string.sub(stored, 1, sep - 1) ~= digest then
      return {6, 0, -1, -1, -1, 0, 0}
    end
    local out = {}
    for n in string.gmatch(string.sub(stored, sep + 1), '[^,]+') do
      out[#out + 1] = tonumber(n)
    end
    out[7] = out[6] or 0
    out[6] = 1
    return out
  end
end

if c.rsvn > 0 then
  release_expired(lic, KEYS[2], KEYS[4], KEYS[5], KEYS[6], now)
  c.reserved = opt(redis.call('HGET', lic, c.rf)) or 0
end

local status = 0
if c.missing then
  status = 7
else
  roll_counter(lic, KEYS[2], KEYS[3], now, c, rid)
end

local uses, max, ceil = c.uses, c.max, c.ceil
if status ~= 0 then
  uses = 0
elseif op == 'inc' then
  if c.suspended then
    status = 4
  elseif expired_refuses_use(c.expire, c.strategy, now) then
    status = 5
  elseif not c.entitled then
    status = 8
  else
    local new = uses + amount
    if new > MAX_COUNTER or (ceil ~= nil and new + c.reserved > ceil) then
      status = 2
    else
      redis.call('HINCRBY', lic, c.uf, ARGV[3])
      emit(KEYS[2], maxlen, now, 'inc', amount, new, max, rid, meter)
      if max ~= nil and uses < max and new >= max then
        emit(KEYS[2], maxlen, now, 'limit', amount, new, max, rid, meter)
      end
      outbox(KEYS[3], lic, 'increment', amount, new, rid, now, meter)
      uses = new
    end
  end
elseif op == 'dec' then
  if amount > uses then
    status = 3
  else
    uses = redis.call('HINCRBY', lic, c.uf, '-' .. ARGV[3])
    emit(KEYS[2], maxlen, now, 'dec', amount, uses, max, rid, meter)
    outbox(KEYS[3], lic, 'decrement', -amount, uses, rid, now, meter)
  end
elseif op == 'reset' then
  redis.call('HSET', lic, c.uf, 0)
  emit(KEYS[2], maxlen, now, 'reset', 0, 0, max, rid, meter)
  outbox(KEYS[3], lic, 'reset', -uses, 0, rid, now, meter)
  uses = 0
end

if status == 7 then
  return {7, 0, -1, -1, -1, 0, 0}
end
local out = {status, uses, max or -1, ceil or -1, c.pend or -1, 0, c.reserved}
if KEYS[7] and status ~= 8 then
  local parts = {}
  for i = 1, 5 do
    parts[i] = int(out[i])
  end
  if c.reserved ~= 0 then
    parts[6] = int(c.reserved)
  end
  redis.call('SET', KEYS[7], digest .. '|' .. table.concat(parts, ','), 'PX', REQUEST_RECORD_TTL_MS)
end
return out
