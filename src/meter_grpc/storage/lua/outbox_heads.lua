#!lua flags=no-writes,allow-cross-slot-keys
-- outbox_heads.lua: the id of the newest entry of each outbox stream, so that the exporter
-- reads only the streams that changed (one call per node instead of one XREADGROUP per
-- stream; export/exporter.py `_heads`). Reads only.
--
-- ARGV  outbox streams (keys.outbox_of_slot), all served by the node the call goes to. On a
--       Cluster their slots differ: declared as KEYS they would be refused (CROSSSLOT) before
--       the script runs, so they are arguments, and allow-cross-slot-keys lets the script
--       read them (a slot that moved meanwhile fails the whole call, and the exporter reads
--       those streams one by one). No KEYS.
--
-- Returns one id per key, '' for a stream that is missing or empty.

local out = {}
for i, k in ipairs(ARGV) do
  local newest = redis.call('XREVRANGE', k, '+', '-', 'COUNT', 1)[1]
  out[i] = newest and newest[1] or ''
end
return out
