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
-- emit and outbox take an optional argument `meter`: the meter code (a field `m` of the
--                         event / outbox entry), nil or '' for the license's own counter;
--                         emit a last one `rsv`, the reservation id of a reservation event.
-- Reservations (reservation.lua; keys.reservations, reservation_expiry, reservation_closed):
-- rsv_parse(s) / rsv_record(r) -> a record "state|meter|amount|expire|committed|created"
--                         (state o open, c committed, r released, x expired)
-- close_rsv(lic, rk, xk, ck, id, r, state, now) -> closes open reservation `id` (record `r`):
--                         its units leave the counter's reserved total (`rsv`, `m:<code>:r`,
--                         never below 0), `rsvn` (open reservations) drops by one, the record
--                         is kept RESERVATION_RETENTION_MS
-- release_expired(lic, stream, rk, xk, ck, now) -> closes (state x) the open reservations
--                         whose expire time has come, at most RESERVATION_BATCH of them,
--                         oldest first (the rest stay held: conservative), and forgets as
--                         many records past their retention; an `expire` event for each
-- load_counter(lic, meter, pbounds) -> c: one counter of a license (its own: meter ''; or a
--                         meter: `pm:<code>`, `m:<code>:u/:per/:r`, override in `mo`) with the
--                         license fields every usage script checks; nil when the license
--                         does not exist. c.missing: the policy has no such meter.
-- roll_counter(lic, stream, ob, now, c, rid) -> lazy period reset of counter c: its uses
--                         become 0 (the hash updated, a reset event emitted, a reset appended
--                         to the outbox) when the current period started after the stored one
-- forget_meters(lic, old) -> after a policy snapshot was written into license hash `lic`: drops
--                         the fields of the meters listed in `old` (the `p_meters` before)
--                         that the new `p_meters` no longer lists, and an empty `p_meters`
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

local function emit(stream, maxlen, now, kind, amount, uses, max, rid, meter, rsv)
  if maxlen <= 0 then
    return
  end
  local extra = {}
  if meter ~= nil and meter ~= '' then
    extra[#extra + 1] = 'm'
    extra[#extra + 1] = meter
  end
  if rsv ~= nil then
    extra[#extra + 1] = 'rsv'
    extra[#extra + 1] = rsv
  end
  local id = redis.call('XADD', stream, 'MAXLEN', '~', maxlen, '*', 'type', kind,
    'amount', int(amount), 'uses', int(uses), 'max', max and int(max) or '', 'rid', rid,
    'ts', int(now), unpack(extra))
  if EVENTS_MAX_AGE_MS > 0 then
    local ms = tonumber(string.match(id, '^(%d+)'))
    if ms > EVENTS_MAX_AGE_MS then
      redis.call('XTRIM', stream, 'MINID', int(ms - EVENTS_MAX_AGE_MS))
    end
  end
end

local function outbox(ob, lic, kind, delta, uses, rid, now, meter)
  if EXPORT == 0 or delta == 0 then
    return
  end
  local seq = redis.call('HINCRBY', lic, 'xseq', 1)
  local id = string.match(lic, '{lic:(.*)}$')
  if meter ~= nil and meter ~= '' then
    redis.call('XADD', ob, '*', 'id', id .. ':' .. seq, 'k', kind, 'd', int(delta),
      'u', int(uses), 'rid', rid, 't', int(now), 'm', meter)
    return
  end
  redis.call('XADD', ob, '*', 'id', id .. ':' .. seq, 'k', kind, 'd', int(delta),
    'u', int(uses), 'rid', rid, 't', int(now))
end

-- An expired license refuses use under RESTRICT_ACCESS (1, also 0 = unspecified) and
-- REVOKE_ACCESS (2); MAINTAIN_ACCESS (3) and ALLOW_ACCESS (4) keep increments going.
local function expired_refuses_use(expire, strategy, now)
  return expire ~= nil and now >= expire and (strategy == nil or strategy <= 2)
end


-- The fields of one counter in the license hash: uses, period start, reserved units.
local function counter_fields(meter)
  if meter == '' then
    return 'uses', 'period', 'rsv'
  end
  local p = 'm:' .. meter
  return p .. ':u', p .. ':per', p .. ':r'
end

local function split_bar(s)
  local out = {}
  for part in string.gmatch(s .. '|', '([^|]*)|') do
    out[#out + 1] = part
  end
  return out
end

local function holds(ents_json, code)
  if ents_json == false or ents_json == nil or ents_json == '' then
    return false
  end
  for _, e in ipairs(cjson.decode(ents_json)) do
    if e == code then
      return true
    end
  end
  return false
end

local function load_counter(lic, meter, pbounds)
  local uf, pf, rf = counter_fields(meter)
  local c = {meter = meter, uf = uf, pf = pf, rf = rf, entitled = true, missing = false}
  local f
  if meter == '' then
    f = redis.call('HMGET', lic, 'uses', 'suspended', 'expire', 'p_expiry_strategy', 'rsvn',
      'period', 'rsv', 'o_uses', 'p_uses', 'p_overage', 'p_reset')
    c.max = opt(f[8]) or opt(f[9])
    c.ovg = opt(f[10])
    c.reset = opt(f[11])
    c.uses = tonumber(f[1])
  else
    f = redis.call('HMGET', lic, 'uses', 'suspended', 'expire', 'p_expiry_strategy', 'rsvn',
      uf, pf, rf, 'pm:' .. meter, 'mo', 'ents')
    if f[9] then
      local spec = split_bar(f[9])
      c.max = opt(spec[1])
      c.ovg = opt(spec[2])
      c.reset = opt(spec[3])
      if spec[4] ~= nil and spec[4] ~= '' then
        c.entitled = holds(f[11], spec[4])
        c.entitlement = spec[4]
      end
      if f[10] and f[10] ~= '' then
        local o = cjson.decode(f[10])[meter]
        if o ~= nil then
          c.max = tonumber(o)
        end
      end
    else
      c.missing = true
    end
    c.uses = tonumber(f[6] or '0')
    f[6] = f[7]
    f[7] = f[8]
  end
  if not f[1] then
    return nil
  end
  c.suspended = f[2] == '1'
  c.expire = opt(f[3])
  c.strategy = opt(f[4])
  c.rsvn = opt(f[5]) or 0
  c.stored = opt(f[6])
  c.reserved = opt(f[7]) or 0
  c.ceil = ceiling(c.max, c.ovg)
  c.pstart, c.pend = period_of(c.reset, pbounds)
  return c
end

local function roll_counter(lic, stream, ob, now, c, rid)
  if c.pstart == nil or c.pstart <= (c.stored or 0) then
    return
  end
  if c.uses ~= 0 then
    emit(stream, EVENTS_MAXLEN, now, 'reset', 0, 0, c.max, '', c.meter)
    outbox(ob, lic, 'reset', -c.uses, 0, rid, now, c.meter)
  end
  redis.call('HSET', lic, c.uf, 0, c.pf, int(c.pstart))
  c.uses = 0
end

local function forget_meters(lic, old)
  local now_listed = redis.call('HGET', lic, 'p_meters')
  if now_listed == '' then
    redis.call('HDEL', lic, 'p_meters')
    now_listed = false
  end
  if not old or old == '' then
    return
  end
  local keep = {}
  for code in string.gmatch(now_listed or '', '[^,]+') do
    keep[code] = true
  end
  for code in string.gmatch(old, '[^,]+') do
    if not keep[code] then
      local uf, pf, rf = counter_fields(code)
      redis.call('HDEL', lic, 'pm:' .. code, uf, pf, rf)
    end
  end
end

local function rsv_parse(s)
  local p = split_bar(s)
  return {state = p[1], meter = p[2], amount = tonumber(p[3]), expire = tonumber(p[4]),
    committed = tonumber(p[5]), created = tonumber(p[6])}
end

local function rsv_record(r)
  return r.state .. '|' .. r.meter .. '|' .. int(r.amount) .. '|' .. int(r.expire) .. '|' ..
    int(r.committed) .. '|' .. int(r.created)
end

local function keep_rsv_keys(rk, xk, ck)
  redis.call('PEXPIRE', rk, RESERVATION_KEEP_MS)
  redis.call('PEXPIRE', xk, RESERVATION_KEEP_MS)
  redis.call('PEXPIRE', ck, RESERVATION_KEEP_MS)
end

local function close_rsv(lic, rk, xk, ck, id, r, state, now)
  local _, _, rf = counter_fields(r.meter)
  local left = tonumber(redis.call('HGET', lic, rf) or '0') - r.amount
  if left <= 0 then
    redis.call('HDEL', lic, rf)
  else
    redis.call('HSET', lic, rf, int(left))
  end
  if redis.call('HINCRBY', lic, 'rsvn', -1) <= 0 then
    redis.call('HDEL', lic, 'rsvn')
  end
  r.state = state
  redis.call('HSET', rk, id, rsv_record(r))
  redis.call('ZREM', xk, id)
  redis.call('ZADD', ck, int(now + RESERVATION_RETENTION_MS), id)
end

local function release_expired(lic, stream, rk, xk, ck, now)
  local due = redis.call('ZRANGEBYSCORE', xk, '-inf', int(now), 'LIMIT', 0, RESERVATION_BATCH)
  for _, id in ipairs(due) do
    local s = redis.call('HGET', rk, id)
    if s then
      local r = rsv_parse(s)
      close_rsv(lic, rk, xk, ck, id, r, 'x', now)
      local uf = counter_fields(r.meter)
      local uses = tonumber(redis.call('HGET', lic, uf) or '0')
      emit(stream, EVENTS_MAXLEN, now, 'expire', r.amount, uses, nil, '', r.meter, id)
    else
      redis.call('ZREM', xk, id)
    end
  end
  local old = redis.call('ZRANGEBYSCORE', ck, '-inf', int(now), 'LIMIT', 0, RESERVATION_BATCH)
  if #old > 0 then
    redis.call('HDEL', rk, unpack(old))
    redis.call('ZREM', ck, unpack(old))
  end
  if #due > 0 then
    keep_rsv_keys(rk, xk, ck)
  end
end
