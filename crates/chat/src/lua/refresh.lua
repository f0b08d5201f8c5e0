-- KEYS: members, history, rooms   ARGV: channel, room, ttl_ms, then name, conn pairs
-- Pushes this instance's entries forward. An entry that is not there any
-- more comes back: it expired while refreshes failed and was swept, or
-- Redis restarted empty. The names that were gone are announced in one
-- `members` event, `back` listing them, for everyone, the connections
-- themselves included (their pages may have been told a member list
-- without them meanwhile). One event, not a `joined` per name: each of
-- those carries the whole list, so a room of 400 put back at once would
-- send each member 400 lists of up to 400 names, and cut every one of them
-- off as too slow.
-- One pass over the room first, then a set lookup per entry: asking the
-- sorted set about each name instead made the script quadratic in the
-- room's size (Redis blocked for over a second at 2000 members).
local now = now_ms()
local expires = now + tonumber(ARGV[3])
local _, here = names(KEYS[1], now)
local back = {}
for i = 4, #ARGV, 2 do
  local name = ARGV[i]
  if redis.call('ZADD', KEYS[1], expires, name .. '\n' .. ARGV[i + 1]) == 1 and not here[name] then
    here[name] = true
    table.insert(back, name)
  end
end
if #back > 0 then
  table.sort(back)
  presence('members', ARGV[1], ARGV[2], nil, names(KEYS[1], now), now, { back = back })
end
-- And the room comes back with them: a sweep that found it empty meanwhile
-- took it off the list (and sweeps only listed rooms, so its ghosts would
-- stay for ever once this instance died) and set its history to expire.
-- Done at every refresh, not only when an entry came back: it costs two
-- O(1) commands and also heals a list changed by hand.
if #ARGV >= 4 then
  redis.call('SADD', KEYS[3], ARGV[2])
  redis.call('PERSIST', KEYS[2])
end
return #back
