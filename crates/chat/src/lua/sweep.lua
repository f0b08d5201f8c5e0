-- KEYS: members, history, rooms   ARGV: channel, room, history_ttl_ms
-- Removes entries whose instance stopped refreshing them (it crashed, or
-- lost Redis) and announces `left` for each name that has no entry left.
-- Every instance sweeps; the script is atomic, so each ghost leaves once.
local now = now_ms()
local expired = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', '(' .. now)
local seen, gone = {}, {}
for _, entry in ipairs(expired) do
  redis.call('ZREM', KEYS[1], entry)
  local name = string.match(entry, '^([^\n]*)')
  if not seen[name] then
    seen[name] = true
    table.insert(gone, name)
  end
end
table.sort(gone)
local members = names(KEYS[1], now)
for _, name in ipairs(gone) do
  if not present(KEYS[1], name, now) then
    presence('left', ARGV[1], ARGV[2], name, members, now)
  end
end
forget_if_empty(KEYS[1], KEYS[2], KEYS[3], ARGV[2], ARGV[3])
return #expired
