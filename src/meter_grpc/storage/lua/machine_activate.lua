-- machine_activate.lua: activates a machine on a license, the only place where a machine is
-- added: checks the fingerprint, max_machines and max_cores (with the policy's overage) and
-- moves the counters in one step. Besides the license's own limits, no license ever holds more
-- than the server's cap (METER_MAX_MACHINES_PER_LICENSE), with or without max_machines.
--
-- KEYS[1..6], ARGV[1..2]  as in machines_common.lua
-- KEYS[7]  optional: idempotency record     (keys.request_record), only with a request_id
-- ARGV[3]  machine id (minted by the caller, embeds the license id)
-- ARGV[4]  fingerprint
-- ARGV[5]  cores (0 .. 2^20)
-- ARGV[6]  machine JSON
-- ARGV[7]  the server's cap of live machines per license (>= 1)
-- ARGV[8]  with KEYS[7]: digest of the request's arguments
--
-- Returns answer(status, l, extra): extra is the machine id holding the fingerprint for
-- FINGERPRINT_TAKEN. Refused: suspended licenses, and expired ones unless ALLOW_ACCESS (4).
-- The counters in the answer are after the activation (OK) or at the refusal.
-- With a request_id the outcome is stored ("<digest>|<status>|<extra>", where extra is
-- "<activation time>|<machine JSON>" for OK) for REQUEST_RECORD_TTL_MS; a retry with the same
-- digest gets it back as answer(0, l, json, activation time) or the same refusal, another
-- digest gets 10 (REQUEST_ID_REUSED). Nothing is activated twice. CORES_REQUIRED (8, bad
-- input) and CONFLICT (9) are not stored. Status 11 (MACHINE_CAP_EXCEEDED): one more machine
-- would pass the server's cap.

local id, fp, cores, cap = ARGV[3], ARGV[4], tonumber(ARGV[5]), tonumber(ARGV[7])
local rec = KEYS[7]

local l = load_license()
if not l then
  return NO_LICENSE
end
prune(l)

if rec then
  local stored = redis.call('GET', rec)
  if stored then
    local digest, status, extra = string.match(stored, '^([^|]*)|(%d+)|(.*)$')
    if digest ~= ARGV[8] then
      return answer(10, l)
    end
    status = tonumber(status)
    if status == 0 then
      local at, json = string.match(extra, '^(%d+)|(.*)$')
      return answer(0, l, json, at)
    end
    if extra == '' then
      return answer(status, l)
    end
    return answer(status, l, extra)
  end
end

local function activate()
  if l.max_cores ~= nil and cores < 1 then
    return 8
  end
  if l.suspended then
    return 3
  end
  if expired(l) and l.strategy ~= 4 then
    return 4
  end
  local holder = redis.call('HGET', FPS, fp)
  if holder then
    return 5, holder
  end
  if redis.call('HEXISTS', MACHINES, id) == 1 then
    return 9
  end
  if l.machine_ceiling ~= nil and l.machines + 1 > l.machine_ceiling then
    return 6
  end
  if l.machines + 1 > cap then
    return 11
  end
  if l.core_ceiling ~= nil and l.cores + cores > l.core_ceiling then
    return 7
  end
  index()
  redis.call('HSET', MACHINES, id, ARGV[6])
  redis.call('ZADD', ORDER, 0, id)
  redis.call('HSET', FPS, fp, id)
  redis.call('ZADD', HBS, int(NOW), id)
  redis.call('ZREM', DEAD, fp)
  l.machines = l.machines + 1
  l.cores = l.cores + cores
  save_counters(l)
  return 0
end

local status, extra = activate()
-- CORES_REQUIRED (8) is bad input (INVALID_ARGUMENT): a retry with the cores set is decided
-- afresh. CONFLICT (9) is retried by the caller.
if rec and status ~= 9 and status ~= 8 then
  local kept = extra or ''
  if status == 0 then
    kept = int(NOW) .. '|' .. ARGV[6]
  end
  redis.call('SET', rec, ARGV[8] .. '|' .. status .. '|' .. kept, 'PX', REQUEST_RECORD_TTL_MS)
end
if extra then
  return answer(status, l, extra)
end
return answer(status, l)
