//! The gate's Lua scripts. Each runs atomically on the one Redis (Cluster) slot that holds
//! a spray's keys: KEYS[1] the spray's meta hash, KEYS[2] its list of free share slots,
//! KEYS[3] the hash of receivers (user id -> slot). Share amounts are never computed here:
//! the gate only hands out slot numbers; SQL holds the money.

/// ARGV: user id, now (ms), how long after the window the keys are trusted (ms).
/// Answers, in the contract's rule order: `{"MISSING"}` (rebuild from SQL),
/// `{"OWN", id}`, `{"ALREADY", id, slot}`, `{"EXPIRED", id}`,
/// `{"EXHAUSTED", id, shares}`, `{"SLOT", id, slot}`. Keys past their time by the
/// service's clock are dropped and answered as missing, whatever Redis's own TTL says:
/// SQL then answers for a spray that is long closed, purged or replaced.
pub const CLAIM: &str = r#"
local id = redis.call('HGET', KEYS[1], 'id')
if not id then return {'MISSING'} end
if tonumber(ARGV[2]) >= tonumber(redis.call('HGET', KEYS[1], 'until')) + tonumber(ARGV[3]) then
  redis.call('DEL', KEYS[1], KEYS[2], KEYS[3])
  return {'MISSING'}
end
if redis.call('HGET', KEYS[1], 'owner') == ARGV[1] then return {'OWN', id} end
local held = redis.call('HGET', KEYS[3], ARGV[1])
if held then return {'ALREADY', id, held} end
if tonumber(ARGV[2]) >= tonumber(redis.call('HGET', KEYS[1], 'until')) then return {'EXPIRED', id} end
local slot = redis.call('LPOP', KEYS[2])
if not slot then return {'EXHAUSTED', id, redis.call('HGET', KEYS[1], 'shares')} end
redis.call('HSET', KEYS[3], ARGV[1], slot)
redis.call('PEXPIRE', KEYS[3], math.max(redis.call('PTTL', KEYS[1]), 1))
return {'SLOT', id, slot}
"#;

/// Load-if-absent. ARGV: spray id, owner, receive_until (ms), shares, time to live (ms),
/// number of free slots F, the F free slots in order, then user/slot pairs of receivers.
/// Does nothing (returns 0) if the keys already hold this spray (another request rebuilt
/// it first). Keys that hold an older spray under the same room and token are replaced.
/// The time to live is relative, so the keys' lifetime does not depend on Redis's clock
/// agreeing with ours.
pub const REBUILD: &str = r#"
local held = redis.call('HGET', KEYS[1], 'id')
if held == ARGV[1] then return 0 end
if held then redis.call('DEL', KEYS[1], KEYS[2], KEYS[3]) end
redis.call('HSET', KEYS[1], 'id', ARGV[1], 'owner', ARGV[2], 'until', ARGV[3], 'shares', ARGV[4])
redis.call('PEXPIRE', KEYS[1], ARGV[5])
local free = tonumber(ARGV[6])
local i = 7
while i <= 6 + free do
  local last = math.min(i + 499, 6 + free)
  redis.call('RPUSH', KEYS[2], unpack(ARGV, i, last))
  i = last + 1
end
if free > 0 then redis.call('PEXPIRE', KEYS[2], ARGV[5]) end
local receivers = false
while i < #ARGV do
  redis.call('HSET', KEYS[3], ARGV[i], ARGV[i + 1])
  receivers = true
  i = i + 2
end
if receivers then redis.call('PEXPIRE', KEYS[3], ARGV[5]) end
return 1
"#;

/// Gives a slot back after SQL could not record it (a transient failure), if the user
/// still holds it. ARGV: user id, slot.
pub const RELEASE: &str = r#"
if redis.call('HGET', KEYS[3], ARGV[1]) ~= ARGV[2] then return 0 end
redis.call('HDEL', KEYS[3], ARGV[1])
redis.call('LPUSH', KEYS[2], ARGV[2])
local ttl = redis.call('PTTL', KEYS[1])
if ttl > 0 then redis.call('PEXPIRE', KEYS[2], ttl) end
return 1
"#;

/// Forgets that the user holds a slot that SQL says someone else has. ARGV: user, slot.
pub const FORGET: &str = r#"
if redis.call('HGET', KEYS[3], ARGV[1]) ~= ARGV[2] then return 0 end
redis.call('HDEL', KEYS[3], ARGV[1])
return 1
"#;
