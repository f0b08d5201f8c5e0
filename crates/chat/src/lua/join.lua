-- KEYS: members, history, rooms   ARGV: channel, room, name, conn, ttl_ms, history_count
-- Adds the connection, announces it, and returns what its welcome shows, in
-- one atomic step: every message published before this script is in the
-- returned history, every one after reaches the connection live.
-- The `joined` is always published, because the joining connection waits
-- for its own; `again` says the name was here already (another tab), so the
-- instances pass it to that connection alone.
local now = now_ms()
local again = present(KEYS[1], ARGV[3], now)
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[5]), ARGV[3] .. '\n' .. ARGV[4])
redis.call('SADD', KEYS[3], ARGV[2])
redis.call('PERSIST', KEYS[2])
local members = names(KEYS[1], now)
presence('joined', ARGV[1], ARGV[2], ARGV[3], members, now, { conn = ARGV[4], again = again })
return { members, redis.call('XREVRANGE', KEYS[2], '+', '-', 'COUNT', ARGV[6]) }
