-- events_after.lua: the usage events of a license after a position, and whether events
-- after that position may have been trimmed away (METER_EVENT_RETENTION) before they were
-- read, so that a watcher that fell that far behind is told instead of skipping them.
--
-- KEYS[1]  the license's event stream (keys.license_events)
-- ARGV[1]  the position: an event id "<ms>-<seq>" (events after it are read)
-- ARGV[2]  at most this many events
--
-- Returns {gap, entries}: `entries` as XRANGE gives them; `gap` is "" or, when the stream
-- has been trimmed and its oldest retained event comes after the position, the id of that
-- oldest event (events between the position and it are gone, or may be: a position that
-- was itself the last trimmed event is reported too). Read together in one script, so no
-- trim can fall between the check and the read.

local function id_less(a, b)
  -- decimal "<ms>-<seq>" ids of up to 20 digits each: compare without floating point
  local am, as = string.match(a, '^0*(%d-)%-0*(%d-)$')
  local bm, bs = string.match(b, '^0*(%d-)%-0*(%d-)$')
  if #am ~= #bm then return #am < #bm end
  if am ~= bm then return am < bm end
  if #as ~= #bs then return #as < #bs end
  return as < bs
end

if redis.call('EXISTS', KEYS[1]) == 0 then
  return {'', {}}
end
local info = redis.call('XINFO', 'STREAM', KEYS[1])
local length, added, first = 0, 0, nil
for i = 1, #info, 2 do
  local name = info[i]
  if name == 'length' then
    length = info[i + 1]
  elseif name == 'entries-added' then
    added = info[i + 1]
  elseif name == 'first-entry' and type(info[i + 1]) == 'table' then
    first = info[i + 1][1]
  end
end
local gap = ''
if added > length and first and id_less(ARGV[1], first) then
  gap = first
end
return {gap, redis.call('XRANGE', KEYS[1], '(' .. ARGV[1], '+', 'COUNT', ARGV[2])}
