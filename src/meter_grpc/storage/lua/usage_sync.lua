-- usage_sync.lua: SyncUsage. Applies offline usage records in order, each checked against the
-- limit exactly as usage.lua checks an increment, each answered once per record id.
--
-- KEYS[1]      license hash                    (keys.license)
-- KEYS[2]      usage events stream             (keys.license_events)
-- KEYS[3]      outbox stream of the license's slot (keys.outbox), written only when EXPORT = 1
-- KEYS[4..6]   reservations, their expiry and closed sets (keys.reservation_keys)
-- KEYS[6 + i]  record i's answer               (keys.usage_record), i = 1 .. n
-- ARGV[1]      now (ms)
-- ARGV[2]      current period bounds (see period_of in common.lua)
-- ARGV[3i], ARGV[3i + 1], ARGV[3i + 2]  record i's id, amount (1 .. 2^50, as a decimal
--              string) and meter ("" = the license's own counter)
-- No counter passes MAX_COUNTER (2^53 - 1); answers live USAGE_RECORD_TTL_MS.
--
-- Returns {found, uses, code_1, ..., code_n}: found 0 = LICENSE_NOT_FOUND (nothing else);
--   uses: the license's own counter after the call;
--   code: 1 APPLIED, 2 DUPLICATE, 3 USAGE_LIMIT_EXCEEDED, 4 LICENSE_SUSPENDED,
--         5 LICENSE_EXPIRED, 6 REQUEST_ID_REUSED, 7 METER_NOT_FOUND, 8 METER_NOT_ENTITLED
--         (mirrored by scripts.SyncCode)
-- Each record's first answer is stored as "<amount>|<code>" (a meter's: "<amount>:<meter>|
-- <code>") for the ttl, but for METER_NOT_FOUND and METER_NOT_ENTITLED, which are answered
-- anew. A record whose id is stored answers DUPLICATE when it was applied, its first code
-- when it was rejected, and REQUEST_ID_REUSED (nothing stored) when the amount or meter
-- differs. Units held by reservations count against the limit; expired reservations are
-- released first. A period rollover (lazy) resets each counter before its first record; each
-- counter is written once, at the end.

local lic = KEYS[1]
local now = tonumber(ARGV[1])
local ttl = USAGE_RECORD_TTL_MS
local max_counter = MAX_COUNTER
local maxlen = EVENTS_MAXLEN

if redis.call('EXISTS', lic) == 0 then
  return {0, 0}
end
if redis.call('HEXISTS', lic, 'rsvn') == 1 then
  release_expired(lic, KEYS[2], KEYS[4], KEYS[5], KEYS[6], now)
end

-- meter code -> counter (loaded, rolled and checked once), with `before` its uses then
local counters = {}
local order = {}
local function counter(meter)
  local c = counters[meter]
  if c == nil then
    c = load_counter(lic, meter, ARGV[2])
    if not c.missing then
      roll_counter(lic, KEYS[2], KEYS[3], now, c, '')
    end
    c.before = c.uses
    counters[meter] = c
    order[#order + 1] = meter
  end
  return c
end

local own = counter('')
local refusal = nil
if own.suspended then
  refusal = 4
elseif expired_refuses_use(own.expire, own.strategy, now) then
  refusal = 5
end

local out = {1, 0}
local n = (#ARGV - 2) / 3
for i = 1, n do
  local key = KEYS[6 + i]
  local rid = ARGV[3 * i]
  local amount_s = ARGV[3 * i + 1]
  local meter = ARGV[3 * i + 2]
  local digest = amount_s
  if meter ~= '' then
    digest = amount_s .. ':' .. meter
  end
  local code
  local stored = redis.call('GET', key)
  if stored then
    local sep = string.find(stored, '|', 1, true)
    if string.sub(stored, 1, sep - 1) ~= digest then
      code = 6
    else
      code = tonumber(string.sub(stored, sep + 1))
      if code == 1 then
        code = 2
      end
    end
  else
    local c = counter(meter)
    if c.missing then
      code = 7
    elseif refusal ~= nil then
      code = refusal
    elseif not c.entitled then
      code = 8
    else
      local amount = tonumber(amount_s)
      local new = c.uses + amount
      if new > max_counter or (c.ceil ~= nil and new + c.reserved > c.ceil) then
        code = 3
      else
        emit(KEYS[2], maxlen, now, 'inc', amount, new, c.max, rid, meter)
        if c.max ~= nil and c.uses < c.max and new >= c.max then
          emit(KEYS[2], maxlen, now, 'limit', amount, new, c.max, rid, meter)
        end
        outbox(KEYS[3], lic, 'sync', amount, new, rid, now, meter)
        c.uses = new
        code = 1
      end
    end
    if code ~= 7 and code ~= 8 then
      redis.call('SET', key, digest .. '|' .. code, 'PX', ttl)
    end
  end
  out[2 + i] = code
end

for _, meter in ipairs(order) do
  local c = counters[meter]
  if c.uses ~= c.before then
    redis.call('HSET', lic, c.uf, int(c.uses))
  end
end
out[2] = own.uses
return out
