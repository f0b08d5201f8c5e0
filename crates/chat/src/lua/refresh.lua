-- KEYS: members, history, rooms   ARGV: channel, room, ttl_ms, then name, conn pairs
-- Pushes this instance's entries forward. An entry that is not there any
-- more (it expired while refreshes failed, and was swept) comes back, with
-- a `joined`: the member is still connected here.
local now = now_ms()
local expires = now + tonumber(ARGV[3])
for i = 4, #ARGV, 2 do
  if redis.call('ZADD', KEYS[1], expires, ARGV[i] .. '\n' .. ARGV[i + 1]) == 1 then
    presence('joined', ARGV[1], ARGV[2], ARGV[i], ARGV[i + 1], names(KEYS[1], now))
  end
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
return 0
