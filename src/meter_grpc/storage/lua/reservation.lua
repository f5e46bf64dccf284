-- reservation.lua: ReserveUsage, CommitReservation, ReleaseReservation. Units held by a
-- reservation count against the counter's limit (uses + reserved <= ceiling) until it is
-- committed (the amount used moves into uses, the rest is freed), released, or expires by
-- itself (release_expired, common.lua, run first by every usage script of the license).
--
-- KEYS[1]  license hash                     (keys.license)
-- KEYS[2]  usage events stream              (keys.license_events)
-- KEYS[3]  outbox stream of the license's slot (keys.outbox), written only when EXPORT = 1
-- KEYS[4..6] reservations, their expiry and closed sets (keys.reservation_keys)
-- KEYS[7]  optional: idempotency record     (keys.request_record), only with a request_id
-- ARGV[1]  now (ms)
-- ARGV[2]  operation: "reserve", "commit" or "release"
-- ARGV[3]  current period bounds (see period_of in common.lua)
-- ARGV[4]  request_id ("" for none)
-- reserve: ARGV[5] meter ("" = the license's own counter), ARGV[6] amount (1 .. 2^50),
--          ARGV[7] ttl (ms), ARGV[8] the new reservation id, ARGV[9] the most open
--          reservations a license may hold (METER_MAX_RESERVATIONS_PER_LICENSE)
-- commit:  ARGV[5] reservation id, ARGV[6] amount (0 = all held)
-- release: ARGV[5] reservation id
--
-- Returns {status, id, state, meter, amount, expire, committed, created,
--          uses, max_uses, overage_limit, period_end, reserved, replayed, open}; -1 = none.
--   status: 0 OK, 1 LICENSE_NOT_FOUND, 2 USAGE_LIMIT_EXCEEDED, 4 LICENSE_SUSPENDED,
--           5 LICENSE_EXPIRED, 6 REQUEST_ID_REUSED, 7 METER_NOT_FOUND, 8 METER_NOT_ENTITLED,
--           9 RESERVATION_NOT_FOUND, 10 RESERVATION_EXPIRED (closed: `state` says how),
--           11 RESERVATION_LIMIT_EXCEEDED, 12 commit amount above the amount held
--   (mirrored by meter_grpc.storage.scripts.ReservationStatus)
-- A reservation is refused like an increment (suspended, expired, not entitled, does not
-- fit); commit and release are not (the work was done: its usage counts). Answers with status
-- 0, 2, 4, 5 are stored under the request_id and replayed (replayed = 1) on a retry with the
-- same digest; nothing else is written by a refusal.

local lic = KEYS[1]
local stream, ob, rk, xk, ck = KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6]
local now = tonumber(ARGV[1])
local op = ARGV[2]
local rid = ARGV[4]
local maxlen = EVENTS_MAXLEN

local digest
if op == 'reserve' then
  digest = 'reserve:' .. ARGV[5] .. ':' .. ARGV[6] .. ':' .. ARGV[7]
elseif op == 'commit' then
  digest = 'commit:' .. ARGV[5] .. ':' .. ARGV[6]
else
  digest = 'release:' .. ARGV[5]
end

local function answer(status, id, r, c)
  local out = {status, id or '', '', '', 0, 0, 0, 0, 0, -1, -1, -1, 0, 0, 0}
  if r then
    out[3], out[4], out[5], out[6] = r.state, r.meter, int(r.amount), int(r.expire)
    out[7], out[8] = int(r.committed), int(r.created)
  end
  if c then
    out[9], out[10], out[11] = int(c.uses), c.max and int(c.max) or -1, c.ceil and int(c.ceil) or -1
    out[12], out[13] = c.pend and int(c.pend) or -1, int(c.reserved)
    out[15] = int(c.rsvn)
  end
  if KEYS[7] and (status == 0 or status == 2 or status == 4 or status == 5) then
    local parts = {}
    for i = 1, 15 do
      parts[i] = tostring(out[i])
    end
    redis.call('SET', KEYS[7], digest .. '|' .. table.concat(parts, ','), 'PX',
      REQUEST_RECORD_TTL_MS)
  end
  return out
end

if redis.call('EXISTS', lic) == 0 then
  return answer(1)
end

if KEYS[7] then
  local stored = redis.call('GET', KEYS[7])
  if stored then
    local sep = string.find(stored, '|', 1, true)
    if string.sub(stored, 1, sep - 1) ~= digest then
      return {6, '', '', '', 0, 0, 0, 0, 0, -1, -1, -1, 0, 0, 0}
    end
    local out = {}
    for part in string.gmatch(string.sub(stored, sep + 1) .. ',', '([^,]*),') do
      out[#out + 1] = part
    end
    for _, i in ipairs({1, 5, 6, 7, 8, 9, 10, 11, 12, 13, 15}) do
      out[i] = tonumber(out[i])
    end
    out[14] = 1
    return out
  end
end

-- always (not only with open reservations, as the counter scripts do): the records of closed
-- ones are forgotten past their retention even when none is open any more
release_expired(lic, stream, rk, xk, ck, now)

if op == 'reserve' then
  local meter = ARGV[5]
  local amount = tonumber(ARGV[6])
  local id = ARGV[8]
  local c = load_counter(lic, meter, ARGV[3])
  if c.missing then
    return answer(7, id)
  end
  roll_counter(lic, stream, ob, now, c, rid)
  if c.suspended then
    return answer(4, id, nil, c)
  elseif expired_refuses_use(c.expire, c.strategy, now) then
    return answer(5, id, nil, c)
  elseif not c.entitled then
    return answer(8, id, nil, c)
  elseif c.rsvn >= tonumber(ARGV[9]) then
    return answer(11, id, nil, c)
  end
  local held = c.uses + c.reserved + amount
  if held > MAX_COUNTER or (c.ceil ~= nil and held > c.ceil) then
    return answer(2, id, nil, c)
  end
  local r = {state = 'o', meter = meter, amount = amount, expire = now + tonumber(ARGV[7]),
    committed = 0, created = now}
  c.reserved = redis.call('HINCRBY', lic, c.rf, ARGV[6])
  c.rsvn = redis.call('HINCRBY', lic, 'rsvn', 1)
  redis.call('HSET', rk, id, rsv_record(r))
  redis.call('ZADD', xk, int(r.expire), id)
  keep_rsv_keys(rk, xk, ck)
  emit(stream, maxlen, now, 'reserve', amount, c.uses, c.max, rid, meter, id)
  return answer(0, id, r, c)
end

-- commit or release
local id = ARGV[5]
local s = redis.call('HGET', rk, id)
if not s then
  return answer(9, id)
end
local r = rsv_parse(s)
local c = load_counter(lic, r.meter, ARGV[3])
if r.state ~= 'o' then
  return answer(10, id, r, c)
end
if c.missing then
  return answer(7, id, r)
end
roll_counter(lic, stream, ob, now, c, rid)
if op == 'release' then
  close_rsv(lic, rk, xk, ck, id, r, 'r', now)
  c.reserved = opt(redis.call('HGET', lic, c.rf)) or 0
  c.rsvn = c.rsvn - 1
  emit(stream, maxlen, now, 'release', r.amount, c.uses, c.max, rid, r.meter, id)
  keep_rsv_keys(rk, xk, ck)
  return answer(0, id, r, c)
end

local amount = tonumber(ARGV[6])
if amount == 0 then
  amount = r.amount
elseif amount > r.amount then
  return answer(12, id, r, c)
end
if c.uses + amount > MAX_COUNTER then
  return answer(2, id, r, c)
end
r.committed = amount
close_rsv(lic, rk, xk, ck, id, r, 'c', now)
c.reserved = opt(redis.call('HGET', lic, c.rf)) or 0
c.rsvn = c.rsvn - 1
local before = c.uses
if amount > 0 then
  c.uses = redis.call('HINCRBY', lic, c.uf, int(amount))
end
emit(stream, maxlen, now, 'commit', amount, c.uses, c.max, rid, r.meter, id)
if c.max ~= nil and before < c.max and c.uses >= c.max then
  emit(stream, maxlen, now, 'limit', amount, c.uses, c.max, rid, r.meter, id)
end
outbox(ob, lic, 'increment', amount, c.uses, rid, now, r.meter)
keep_rsv_keys(rk, xk, ck)
return answer(0, id, r, c)
