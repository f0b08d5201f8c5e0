-- KEYS: members, history, rooms   ARGV: channel, room, name, conn, history_ttl_ms
-- Removes the connection. The name leaves (and `left` is announced) only
-- with its last connection, and only if the entry was there: a sweep may
-- have beaten us to it.
local now = now_ms()
if redis.call('ZREM', KEYS[1], ARGV[3] .. '\n' .. ARGV[4]) == 0 then
  return 0
end
if not present(KEYS[1], ARGV[3], now) then
  presence('left', ARGV[1], ARGV[2], ARGV[3], names(KEYS[1], now), now)
end
forget_if_empty(KEYS[1], KEYS[2], KEYS[3], ARGV[2], ARGV[5])
return 1
