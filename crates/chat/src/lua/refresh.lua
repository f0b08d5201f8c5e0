-- KEYS: members, history, rooms   ARGV: channel, room, ttl_ms, then name, conn pairs
-- Pushes this instance's entries forward. An entry that is not there any
-- more comes back: it expired while refreshes failed and was swept, or
-- Redis restarted empty. If its name was gone, that is a `joined` for
-- everyone, the connection itself included (its page may have been told a
-- member list without it meanwhile); it carries no `conn`, as nobody waits
-- for it.
local now = now_ms()
local expires = now + tonumber(ARGV[3])
for i = 4, #ARGV, 2 do
  local back = not present(KEYS[1], ARGV[i], now)
  if redis.call('ZADD', KEYS[1], expires, ARGV[i] .. '\n' .. ARGV[i + 1]) == 1 and back then
    presence('joined', ARGV[1], ARGV[2], ARGV[i], names(KEYS[1], now), now)
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
