-- Shared by every chat script (prepended in store.rs).
-- Presence is a sorted set per room: member "<name>\n<connection id>",
-- score = when the entry expires (ms). Instances refresh their own entries;
-- an entry whose instance died expires and is swept. Entries are per
-- connection, announcements per name: a name joins with its first
-- connection and leaves with its last.

local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

-- The distinct names present in a room, sorted, and the same as a set
-- (name -> true): one pass over the room, however many names a script
-- then asks about.
local function names(members_key, now)
  local seen, out = {}, {}
  for _, entry in ipairs(redis.call('ZRANGEBYSCORE', members_key, now, '+inf')) do
    local name = string.match(entry, '^([^\n]*)')
    if not seen[name] then
      seen[name] = true
      table.insert(out, name)
    end
  end
  table.sort(out)
  return out, seen
end

-- Whether a name has a live entry in the room: one connection of several
-- (two tabs, two instances) leaving does not make the name leave. A pass
-- over the room: for one name only; a script asking about many uses the
-- set `names` returns, or it costs a pass per name (quadratic).
local function present(members_key, name, now)
  local prefix = name .. '\n'
  for _, entry in ipairs(redis.call('ZRANGEBYSCORE', members_key, now, '+inf')) do
    if string.sub(entry, 1, #prefix) == prefix then
      return true
    end
  end
  return false
end

-- Publishes a change of who is present, with the member list after it and
-- when it happened by Redis's clock (`at`, ms): one clock for every instance.
-- `extra` adds fields (the connection id of a join). A `members` event has
-- no `name` (nil): it names several, in `back` or `gone`.
local function presence(kind, channel, room, name, members, now, extra)
  local event = { type = kind, room = room, name = name, members = members, at = now }
  for key, value in pairs(extra or {}) do
    event[key] = value
  end
  redis.call('PUBLISH', channel, cjson.encode(event))
end

-- A room nobody is in any more leaves the room list, and its history
-- expires unless someone comes back (join.lua clears the expiry): rooms are
-- created by naming them, so without this they would pile up for ever.
local function forget_if_empty(members_key, history_key, rooms_key, room, history_ttl_ms)
  if redis.call('ZCARD', members_key) == 0 then
    redis.call('SREM', rooms_key, room)
    redis.call('PEXPIRE', history_key, history_ttl_ms)
  end
end
