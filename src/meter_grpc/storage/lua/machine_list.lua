-- machine_list.lua: one page of a license's live machines, in id (= activation) order.
--
-- KEYS[1..6], ARGV[1..2]  as in machines_common.lua
-- ARGV[3]  the id to continue after ("" for the first page)
-- ARGV[4]  at most this many machines
--
-- Returns answer(0, l, json1, heartbeat1, json2, heartbeat2, ...) or answer(1, ...) when the
-- license does not exist. Machine ids of one license share their prefix and end in
-- fixed-length lowercase hex, so string order is activation order: the page is read from the
-- id index (KEYS[6]) with ZRANGEBYLEX, O(log N + page) whatever the number of machines.

local after, limit = ARGV[3], tonumber(ARGV[4])

local l = load_license()
if not l then
  return NO_LICENSE
end
prune(l)
index()
local from = '-'
if after ~= '' then
  from = '(' .. after
end
local ids = redis.call('ZRANGEBYLEX', ORDER, from, '+', 'LIMIT', 0, limit)
local out = answer(0, l)
for _, id in ipairs(ids) do
  out[#out + 1] = redis.call('HGET', MACHINES, id)
  out[#out + 1] = tonumber(redis.call('ZSCORE', HBS, id)) or 0
end
return out
