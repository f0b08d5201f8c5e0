-- KEYS: members, history, rooms   ARGV: channel, room, history_ttl_ms
-- Removes entries whose instance stopped refreshing them (it crashed, or
-- lost Redis) and announces each as `left`. Every instance sweeps; the
-- script is atomic, so each ghost leaves once.
local now = now_ms()
local expired = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', '(' .. now)
for _, entry in ipairs(expired) do
  redis.call('ZREM', KEYS[1], entry)
  local name, conn = string.match(entry, '^([^\n]*)\n(.*)$')
  presence('left', ARGV[1], ARGV[2], name, conn, names(KEYS[1], now))
end
forget_if_empty(KEYS[1], KEYS[2], KEYS[3], ARGV[2], ARGV[3])
return #expired
