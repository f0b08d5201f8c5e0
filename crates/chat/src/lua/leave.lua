-- KEYS: members, history, rooms   ARGV: channel, room, name, conn, history_ttl_ms
-- Announces the leave only if the entry was there: a sweep may have beaten us.
if redis.call('ZREM', KEYS[1], ARGV[3] .. '\n' .. ARGV[4]) == 1 then
  presence('left', ARGV[1], ARGV[2], ARGV[3], ARGV[4], names(KEYS[1], now_ms()))
  forget_if_empty(KEYS[1], KEYS[2], KEYS[3], ARGV[2], ARGV[5])
  return 1
end
return 0
