-- usage_sync.lua: SyncUsage. Applies offline usage records in order, each checked against the
-- limit exactly as usage.lua checks an increment, each answered once per record id.
--
-- KEYS[1]      license hash                    (keys.license)
-- KEYS[2]      usage events stream             (keys.license_events)
-- KEYS[3]      outbox stream of the license's slot (keys.outbox), written only when EXPORT = 1
-- KEYS[3 + i]  record i's answer               (keys.usage_record), i = 1 .. n
-- ARGV[1]      now (ms)
-- ARGV[2]      current period bounds (see period_of in common.lua)
-- ARGV[1 + 2i], ARGV[2 + 2i]  record i's id and amount (1 .. 2^50, as a decimal string)
-- No counter passes MAX_COUNTER (2^53 - 1); answers live USAGE_RECORD_TTL_MS.
--
-- Returns {found, uses, code_1, ..., code_n}: found 0 = LICENSE_NOT_FOUND (nothing else);
--   code: 1 APPLIED, 2 DUPLICATE, 3 USAGE_LIMIT_EXCEEDED, 4 LICENSE_SUSPENDED,
--         5 LICENSE_EXPIRED, 6 REQUEST_ID_REUSED (mirrored by scripts.SyncCode)
-- Each record's first answer is stored as "<amount>|<code>" for the ttl. A record whose id is
-- stored answers DUPLICATE when it was applied, its first code when it was rejected, and
-- REQUEST_ID_REUSED (nothing stored) when the amount differs. A period rollover (lazy) resets
-- the counter before the first record; the counter is written once, at the end.

local lic = KEYS[1]
local now = tonumber(ARGV[1])
local ttl = USAGE_RECORD_TTL_MS
local max_counter = MAX_COUNTER
local maxlen = EVENTS_MAXLEN

local f = redis.call('HMGET', lic, 'uses', 'o_uses', 'p_uses', 'p_overage', 'suspended',
  'expire', 'p_expiry_strategy', 'p_reset', 'period')
if not f[1] then
  return {0, 0}
end

local uses = tonumber(f[1])
local max = opt(f[2]) or opt(f[3])
local ceil = ceiling(max, opt(f[4]))
local pstart = period_of(opt(f[8]), ARGV[2])

uses = roll_period(lic, KEYS[2], now, uses, opt(f[9]), pstart, max, KEYS[3], '')
local before = uses

local refusal = nil
if f[5] == '1' then
  refusal = 4
elseif expired_refuses_use(opt(f[6]), opt(f[7]), now) then
  refusal = 5
end

local out = {1, 0}
for i = 1, #KEYS - 3 do
  local key = KEYS[3 + i]
  local rid = ARGV[1 + 2 * i]
  local amount_s = ARGV[2 + 2 * i]
  local code
  local stored = redis.call('GET', key)
  if stored then
    local sep = string.find(stored, '|', 1, true)
    if string.sub(stored, 1, sep - 1) ~= amount_s then
      code = 6
    else
      code = tonumber(string.sub(stored, sep + 1))
      if code == 1 then
        code = 2
      end
    end
  else
    if refusal ~= nil then
      code = refusal
    else
      local amount = tonumber(amount_s)
      local new = uses + amount
      if new > max_counter or (ceil ~= nil and new > ceil) then
        code = 3
      else
        emit(KEYS[2], maxlen, now, 'inc', amount, new, max, rid)
        if max ~= nil and uses < max and new >= max then
          emit(KEYS[2], maxlen, now, 'limit', amount, new, max, rid)
        end
        outbox(KEYS[3], lic, 'sync', amount, new, rid, now)
        uses = new
        code = 1
      end
    end
    redis.call('SET', key, amount_s .. '|' .. code, 'PX', ttl)
  end
  out[2 + i] = code
end

if uses ~= before then
  redis.call('HSET', lic, 'uses', int(uses))
end
out[2] = uses
return out
