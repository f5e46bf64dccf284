-- machine_list.lua: one page of a license's live machines, in id (= activation) order.
--
-- KEYS[1..5], ARGV[1..2]  as in machines_common.lua
-- ARGV[3]  the id to continue after ("" for the first page)
-- ARGV[4]  at most this many machines
--
-- Returns answer(0, l, json1, heartbeat1, json2, heartbeat2, ...) or answer(1, ...) when the
-- license does not exist. Machine ids of one license share their prefix and end in
-- fixed-length lowercase hex, so string order is activation order.

local after, limit = ARGV[3], tonumber(ARGV[4])

local l = load_license()
if not l then
  return NO_LICENSE
end
prune(l)
local ids = redis.call('HKEYS', MACHINES)
table.sort(ids)
local out = answer(0, l)
local n = 0
for _, id in ipairs(ids) do
  if n >= limit then
    break
  end
  if after == '' or id > after then
    out[#out + 1] = redis.call('HGET', MACHINES, id)
    out[#out + 1] = tonumber(redis.call('ZSCORE', HBS, id)) or 0
    n = n + 1
  end
end
return out
