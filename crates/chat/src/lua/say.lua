-- KEYS: history   ARGV: channel, room, name, text, history_len
-- Stores and publishes in one atomic step, so the order of publishes is the
-- order of stream ids on every instance.
local id = redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[5], '*', 'name', ARGV[3], 'text', ARGV[4])
redis.call('PUBLISH', ARGV[1], cjson.encode({
  type = 'message', id = id, room = ARGV[2], name = ARGV[3], text = ARGV[4] }))
return id
