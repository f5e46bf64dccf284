-- common.lua: helpers prepended to every script of this folder (one copy, loaded by
-- meter_grpc.storage.scripts). Defines no keys and reads no ARGV of its own.
--
-- opt(v)               -> number or nil for a missing / empty field
-- ceiling(limit, ovg)  -> highest count granted under `limit` with overage strategy `ovg`
--                         (nil = no ceiling); mirrors domain.models.overage_ceiling
-- period_of(reset, p)  -> start, end (ms) of the current period of interval `reset`, read from
--                         `p`, an ARGV of "start,end" pairs for DAILY, WEEKLY, MONTHLY, YEARLY
--                         (domain.periods.period_bounds_arg), or nil when usage never resets
-- Constants defined before this file (storage/scripts.py): MAX_COUNTER, EVENTS_MAXLEN,
-- REQUEST_RECORD_TTL_MS, USAGE_RECORD_TTL_MS, EXPORT (1: usage export on, METER_EXPORT_*),
-- EVENTS_MAX_AGE_MS.
-- emit(stream, maxlen, now, kind, amount, uses, max, rid) -> appends a usage event, keeping
--                         about `maxlen` (EVENTS_MAXLEN, METER_EVENT_RETENTION); none when 0;
--                         with EVENTS_MAX_AGE_MS > 0 (METER_EVENT_RETENTION_AGE) also drops
--                         the events older than that before the new one (by stream id)
-- outbox(ob, lic, kind, delta, uses, rid, now) -> appends a counted change to the outbox
--                         stream `ob` of the license's slot (keys.outbox), only when EXPORT
--                         is 1 and delta ~= 0; its id is "<license id>:<n>" (the id read from
--                         the hash's name), n counted in the license hash (`xseq`)
-- roll_period(lic, stream, now, uses, stored, pstart, max, ob, rid) -> the counter after a
--                         lazy period reset: 0 (and the hash updated, a reset event emitted,
--                         a reset appended to the outbox) when the current period started
--                         after the stored one, else `uses`
-- int(n)               -> n as a decimal integer string; numbers are never handed to Redis
--                         as Lua numbers, whose conversion may use an exponent

local function opt(v)
  if v == false or v == nil or v == '' then
    return nil
  end
  return tonumber(v)
end

local function ceiling(limit, ovg)
  if limit == nil or ovg == 5 then
    return nil
  end
  if ovg == 2 then
    return math.floor(limit * 5 / 4)
  elseif ovg == 3 then
    return math.floor(limit * 3 / 2)
  elseif ovg == 4 then
    return limit * 2
  end
  return limit
end

local function period_of(reset, p)
  if reset ~= nil and reset >= 2 and reset <= 5 then
    local bounds = {}
    for n in string.gmatch(p, '%d+') do
      bounds[#bounds + 1] = tonumber(n)
    end
    local j = (reset - 2) * 2 + 1
    return bounds[j], bounds[j + 1]
  end
  return nil, nil
end

local function int(n)
  return string.format('%.0f', n)
end

local function emit(stream, maxlen, now, kind, amount, uses, max, rid)
  if maxlen <= 0 then
    return
  end
  local id = redis.call('XADD', stream, 'MAXLEN', '~', maxlen, '*', 'type', kind,
    'amount', int(amount), 'uses', int(uses), 'max', max and int(max) or '', 'rid', rid,
    'ts', int(now))
  if EVENTS_MAX_AGE_MS > 0 then
    local ms = tonumber(string.match(id, '^(%d+)'))
    if ms > EVENTS_MAX_AGE_MS then
      redis.call('XTRIM', stream, 'MINID', int(ms - EVENTS_MAX_AGE_MS))
    end
  end
end

local function outbox(ob, lic, kind, delta, uses, rid, now)
  if EXPORT == 0 or delta == 0 then
    return
  end
  local seq = redis.call('HINCRBY', lic, 'xseq', 1)
  local id = string.match(lic, '{lic:(.*)}$')
  redis.call('XADD', ob, '*', 'id', id .. ':' .. seq, 'k', kind, 'd', int(delta),
    'u', int(uses), 'rid', rid, 't', int(now))
end

-- An expired license refuses use under RESTRICT_ACCESS (1, also 0 = unspecified) and
-- REVOKE_ACCESS (2); MAINTAIN_ACCESS (3) and ALLOW_ACCESS (4) keep increments going.
local function expired_refuses_use(expire, strategy, now)
  return expire ~= nil and now >= expire and (strategy == nil or strategy <= 2)
end

local function roll_period(lic, stream, now, uses, stored, pstart, max, ob, rid)
  if pstart == nil or pstart <= (stored or 0) then
    return uses
  end
  if uses ~= 0 then
    emit(stream, EVENTS_MAXLEN, now, 'reset', 0, 0, max, '')
    outbox(ob, lic, 'reset', -uses, 0, rid, now)
  end
  redis.call('HSET', lic, 'uses', 0, 'period', int(pstart))
  return 0
end
