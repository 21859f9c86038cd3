//! The gate's Lua scripts. Each runs atomically on the one Redis (Cluster) slot that holds
//! a spray's keys: KEYS[1] the spray's meta hash, KEYS[2] its list of free share slots,
//! KEYS[3] the hash of receivers (user id -> slot), KEYS[4] the holds not yet confirmed
//! as recorded in SQL (a sorted set of `slot:user` scored by when the slot was handed
//! out, in ms of the service's clock). Share amounts are never computed here: the gate
//! only hands out slot numbers; SQL holds the money.
//!
//! The life of a slot: free (KEYS[2]) -> held (KEYS[3] and KEYS[4], by CLAIM) -> recorded
//! (KEYS[3] only, by CONFIRM once SQL committed it), or back to free (RELEASE, when SQL
//! could not record it). A hold whose claim died without either (its instance was killed)
//! is taken over by CLAIM once it is older than the claim lease: SQL's conditional update
//! then decides between the new holder and a late original one.
//!
//! The meta hash also counts what the three other keys hold (`free`, `held`, `recv`), and
//! every script that changes one changes its count in the same step. Redis can lose one
//! key of a spray and keep the others (an eviction under any `maxmemory-policy` but
//! `noeviction` picks keys one by one): a lost free list would read as "no share left", a
//! lost set of holds as "none held" (the spray then looks taken for good), lost receivers
//! as "never received". So CLAIM checks the counts first, and keys that disagree with
//! them are dropped and answered as missing: the claim rebuilds them from SQL. Every
//! script that would change a count leaves the keys alone once the meta hash is gone, so
//! that nothing is made without a time to live.

/// One claim or several on one spray, each run exactly as if it were a call of its own,
/// in the order given: a batch is what the calls one after the other would have done (the
/// script is atomic, so nothing runs between them). Claims of a hot spray arrive by the
/// dozen (see `claim/gathered.rs`), and most of a claim's cost in Redis was the script's
/// own calls into Redis, about 1 µs each: so what each call would repeat (reading and
/// checking the counts, writing them back, the keys' time to live) is done once a batch,
/// the counts kept in the script meanwhile, and a winner costs four calls instead of
/// fourteen.
///
/// ARGV: how long after the window the keys are trusted (ms), the claim lease (ms), then
/// for each claim its user id and its now (ms). Answers one verdict per claim, in order:
/// `{"MISSING"}` (rebuild from SQL), `{"OWN", id}`, `{"ALREADY", id, slot}`,
/// `{"EXPIRED", id}`, `{"EXHAUSTED", id, shares, for_good}`, `{"SLOT", id, slot,
/// taken_over}`, in the contract's rule order; `for_good` is 1 when no share is held
/// either (every one is recorded: see [`EXHAUSTED_SPRAY`]). Keys past their time by the
/// service's clock are dropped and answered as missing, whatever Redis's own TTL says:
/// SQL then answers for a spray that is long closed, purged or replaced.
///
/// With no free slot left, the oldest hold past its lease is taken over before the spray
/// is called exhausted; so "exhausted" means every share is recorded or held by a claim
/// younger than the lease. The previous holder keeps its entry in KEYS[3]: if it did
/// record the share (only its confirmation was lost), its retries are still answered
/// "already received" after SQL confirms it.
pub(crate) const CLAIM: &str = r#"
local keep, lease = tonumber(ARGV[1]), tonumber(ARGV[2])
local meta = redis.call('HMGET', KEYS[1], 'id', 'until', 'owner', 'free', 'held', 'recv')
local id = meta[1]
local verdicts = {}
if not id then
  for i = 3, #ARGV - 1, 2 do verdicts[#verdicts + 1] = {'MISSING'} end
  return verdicts
end
local closes, owner = tonumber(meta[2]), meta[3]
local free, held, recv = tonumber(meta[4]), tonumber(meta[5]), tonumber(meta[6])
-- The counts agree with the keys (checked once: from here on this script changes both),
-- or the first claim drops the keys, as a call of its own would.
local consistent = free == redis.call('LLEN', KEYS[2])
  and held == redis.call('ZCARD', KEYS[4])
  and recv == redis.call('HLEN', KEYS[3])
local gone, shares, handed_out = false, nil, false
for i = 3, #ARGV - 1, 2 do
  local user, now = ARGV[i], tonumber(ARGV[i + 1])
  local verdict
  if gone then
    verdict = {'MISSING'}
  elseif not consistent or now >= closes + keep then
    redis.call('DEL', KEYS[1], KEYS[2], KEYS[3], KEYS[4])
    gone = true
    verdict = {'MISSING'}
  elseif owner == user then
    verdict = {'OWN', id}
  else
    local holding = redis.call('HGET', KEYS[3], user)
    if holding then
      verdict = {'ALREADY', id, holding}
    elseif now >= closes then
      verdict = {'EXPIRED', id}
    else
      local taken_over = 0
      local slot = redis.call('LPOP', KEYS[2])
      if slot then
        free = free - 1
        held = held + 1
      else
        local stale = redis.call('ZRANGEBYSCORE', KEYS[4], '-inf', now - lease, 'LIMIT', 0, 1)
        if #stale > 0 then
          -- One hold out, one in: `held` stays.
          redis.call('ZREM', KEYS[4], stale[1])
          slot = string.match(stale[1], '^(%d+):')
          taken_over = 1
        end
      end
      if slot then
        redis.call('HSET', KEYS[3], user, slot)
        recv = recv + 1
        redis.call('ZADD', KEYS[4], now, slot .. ':' .. user)
        handed_out = true
        verdict = {'SLOT', id, slot, taken_over}
      else
        shares = shares or redis.call('HGET', KEYS[1], 'shares')
        local for_good = 0
        if held == 0 then for_good = 1 end
        verdict = {'EXHAUSTED', id, shares, for_good}
      end
    end
  end
  verdicts[#verdicts + 1] = verdict
end
-- The counts, and the time to live of keys a slot handed out may have created, once.
if handed_out and not gone then
  redis.call('HSET', KEYS[1], 'free', free, 'held', held, 'recv', recv)
  local ttl = math.max(redis.call('PTTL', KEYS[1]), 1)
  redis.call('PEXPIRE', KEYS[3], ttl)
  redis.call('PEXPIRE', KEYS[4], ttl)
end
return verdicts
"#;
/// Load-if-absent. ARGV: spray id, owner, receive_until (ms), shares, time to live (ms),
/// number of free slots F, the F free slots in order, then user/slot pairs of receivers.
/// Does nothing (returns 0) if the keys already hold this spray (another request rebuilt
/// it first). Otherwise whatever the keys hold (an older spray under the same room and
/// token, or what was left of this one's keys after one was lost) is replaced.
/// The time to live is relative, so the keys' lifetime does not depend on Redis's clock
/// agreeing with ours. A rebuilt spray has no holds: SQL lists every share it has not
/// recorded as free.
pub(crate) const REBUILD: &str = r#"
if redis.call('HGET', KEYS[1], 'id') == ARGV[1] then return 0 end
redis.call('DEL', KEYS[1], KEYS[2], KEYS[3], KEYS[4])
local free = tonumber(ARGV[6])
local i = 7
while i <= 6 + free do
  local last = math.min(i + 499, 6 + free)
  redis.call('RPUSH', KEYS[2], unpack(ARGV, i, last))
  i = last + 1
end
if free > 0 then redis.call('PEXPIRE', KEYS[2], ARGV[5]) end
local receivers = 0
while i < #ARGV do
  receivers = receivers + redis.call('HSET', KEYS[3], ARGV[i], ARGV[i + 1])
  i = i + 2
end
if receivers > 0 then redis.call('PEXPIRE', KEYS[3], ARGV[5]) end
redis.call('HSET', KEYS[1], 'id', ARGV[1], 'owner', ARGV[2], 'until', ARGV[3], 'shares', ARGV[4],
  'free', redis.call('LLEN', KEYS[2]), 'held', 0, 'recv', receivers)
redis.call('PEXPIRE', KEYS[1], ARGV[5])
return 1
"#;

/// SQL recorded the slots for their users: each hold becomes a plain receipt and can no
/// longer be taken over. ARGV: user id, slot, for one hold or more (at most
/// `gate::CONFIRM_AT_ONCE`, well inside Lua's `unpack` bound).
pub(crate) const CONFIRM: &str = r#"
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
local holds = {}
for i = 1, #ARGV, 2 do holds[#holds + 1] = ARGV[i + 1] .. ':' .. ARGV[i] end
local confirmed = redis.call('ZREM', KEYS[4], unpack(holds))
redis.call('HINCRBY', KEYS[1], 'held', -confirmed)
return confirmed
"#;

/// Gives a slot back after SQL could not record it (a transient failure), or after SQL
/// said the user already holds another share, if the user still holds it. A hold taken
/// over meanwhile belongs to its new holder: the user's entry is dropped, but the slot is
/// not put back. ARGV: user id, slot, and `1` when the user holds a share in SQL and so
/// stays listed as a receiver (their retries are then "already received", confirmed by
/// SQL, never "exhausted").
pub(crate) const RELEASE: &str = r#"
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
if redis.call('HGET', KEYS[3], ARGV[1]) ~= ARGV[2] then return 0 end
if ARGV[3] ~= '1' then
  redis.call('HDEL', KEYS[3], ARGV[1])
  redis.call('HINCRBY', KEYS[1], 'recv', -1)
end
if redis.call('ZREM', KEYS[4], ARGV[2] .. ':' .. ARGV[1]) == 0 then return 0 end
redis.call('HINCRBY', KEYS[1], 'held', -1)
redis.call('LPUSH', KEYS[2], ARGV[2])
redis.call('HINCRBY', KEYS[1], 'free', 1)
redis.call('PEXPIRE', KEYS[2], math.max(redis.call('PTTL', KEYS[1]), 1))
return 1
"#;

/// Forgets that the user holds a slot that SQL says is taken, and lists the share's
/// holder in SQL as a receiver if the gate did not know them (they received through SQL
/// alone, while this instance could not reach Redis), so that their retries are answered
/// "already received" rather than "exhausted". ARGV: user, slot, and the holder's id when
/// SQL names one. Only into existing keys: keys lost meanwhile are rebuilt from SQL, which
/// lists every receiver, and a key made here would have no time to live.
pub(crate) const FORGET: &str = r#"
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
redis.call('HINCRBY', KEYS[1], 'held', -redis.call('ZREM', KEYS[4], ARGV[2] .. ':' .. ARGV[1]))
if ARGV[3] and redis.call('EXISTS', KEYS[3]) == 1 then
  redis.call('HINCRBY', KEYS[1], 'recv', redis.call('HSETNX', KEYS[3], ARGV[3], ARGV[2]))
end
if ARGV[3] == ARGV[1] then return 0 end
if redis.call('HGET', KEYS[3], ARGV[1]) ~= ARGV[2] then return 0 end
redis.call('HDEL', KEYS[3], ARGV[1])
redis.call('HINCRBY', KEYS[1], 'recv', -1)
return 1
"#;

/// A spray taken for good: no share free, none held, so every share is recorded in SQL
/// and no script can free one again (see `claim/exhausted.rs`). ARGV: spray id.
/// Answers nil unless the keys hold that spray in that state, else
/// `{owner, receive_until (ms), shares, {receivers...}}`.
pub(crate) const EXHAUSTED_SPRAY: &str = r#"
local meta = redis.call('HMGET', KEYS[1], 'id', 'owner', 'until', 'shares', 'free', 'held', 'recv')
if meta[1] ~= ARGV[1] then return false end
if redis.call('LLEN', KEYS[2]) > 0 or redis.call('ZCARD', KEYS[4]) > 0 then return false end
if tonumber(meta[5]) ~= 0 or tonumber(meta[6]) ~= 0
  or tonumber(meta[7]) ~= redis.call('HLEN', KEYS[3]) then return false end
return {meta[2], meta[3], meta[4], redis.call('HKEYS', KEYS[3])}
"#;
