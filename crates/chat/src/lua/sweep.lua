-- KEYS: members, history, rooms   ARGV: channel, room, history_ttl_ms
-- Removes entries whose instance stopped refreshing them (it crashed, or
-- lost Redis) and announces the names left with no entry in one `members`
-- event, `gone` listing them: an instance that died with 400 members in
-- the room is one frame for each of the others, not 400 lists each.
-- Every instance sweeps; the script is atomic, so each ghost goes once.
local now = now_ms()
local expired = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', '(' .. now)
if #expired > 0 then
  redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', '(' .. now)
  local members, here = names(KEYS[1], now)
  local gone = {}
  for _, entry in ipairs(expired) do
    local name = string.match(entry, '^([^\n]*)')
    if not here[name] then
      here[name] = true -- once, however many of its connections expired
      table.insert(gone, name)
    end
  end
  if #gone > 0 then
    table.sort(gone)
    presence('members', ARGV[1], ARGV[2], nil, members, now, { gone = gone })
  end
end
forget_if_empty(KEYS[1], KEYS[2], KEYS[3], ARGV[2], ARGV[3])
return #expired
