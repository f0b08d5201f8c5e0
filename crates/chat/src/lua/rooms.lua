-- KEYS: rooms   ARGV: key prefix
-- Every room with its member count, across all instances. The member keys
-- are derived here rather than passed in: fine on one Redis, not on a cluster.
local now = now_ms()
local out = {}
for _, room in ipairs(redis.call('SMEMBERS', KEYS[1])) do
  local members = names(ARGV[1] .. 'room:' .. room .. ':members', now)
  table.insert(out, { room, #members })
end
return out
