//! The sprays this instance has seen received to the last share, remembered until their
//! receive window closes, so that a crowd of late members is answered without Redis (on
//! the gate's path, `gated.rs`) or without the store (without Redis, `sql.rs`, which says
//! why its sprays are taken for good; what follows is the gate's case).
//!
//! Why the answer cannot change: the gate calls a spray taken for good only when no slot
//! is free and none is held (every share recorded in SQL). From there no script puts a
//! slot back (only a hold can be given back or taken over), and a rebuild from SQL finds
//! no unrecorded share; a share recorded in SQL is never unrecorded. So until the window
//! closes, a member the gate does not list as a receiver gets `SPRAY_EXHAUSTED`, and the
//! sprayer `OWN_SPRAY`, whatever happens next. A listed receiver is not answered from
//! here: "already received" is SQL's to confirm. After the window the token's answer
//! changes (`RECEIVE_EXPIRED`, and later another spray may take the token), so an entry
//! is used only while `now < receive_until` by the service clock.
//!
//! Bounded: at most [`MAX_SPRAYS`] sprays and [`MAX_RECEIVERS`] receivers in all. When
//! full, the sprays whose window has closed are dropped (at most once a [`PURGE_EVERY`]);
//! if that frees too little, the new spray is not remembered and its claims keep asking
//! the gate (or the store), as before. A spray read but too large to fit is marked, so
//! that its crowd does not read it again and again.

use std::collections::HashMap;
use std::ops::{Deref, DerefMut};
use std::sync::{Arc, RwLock, RwLockWriteGuard};

use chrono::{DateTime, Utc};

use crate::domain::{ReceiveRefusal, RoomId, Token, UserId};
use crate::gate::ExhaustedSpray;

/// The answer for `user` at `now` from what is remembered of `spray`, when it can give one.
fn refusal(spray: &ExhaustedSpray, user: UserId, now: DateTime<Utc>) -> Option<ReceiveRefusal> {
    if now >= spray.receive_until {
        return None;
    }
    if user == spray.owner {
        return Some(ReceiveRefusal::OwnSpray);
    }
    if spray.receivers.binary_search(&user).is_ok() {
        return None;
    }
    Some(ReceiveRefusal::Exhausted { shares: spray.shares })
}

/// The most sprays remembered at once.
pub(super) const MAX_SPRAYS: usize = 10_000;
/// The most receivers remembered at once, over all sprays (8 bytes each).
pub(super) const MAX_RECEIVERS: usize = 1_000_000;
/// How often, by the service clock, a full memory looks for sprays whose window has
/// closed (a look goes over every entry, under the write lock).
pub(super) const PURGE_EVERY: chrono::TimeDelta = chrono::TimeDelta::seconds(1);

enum Entry {
    /// One claim is reading the spray from Redis; the others keep asking the gate.
    Loading,
    Known(Arc<ExhaustedSpray>),
    /// Read, but too large for what memory had left: its claims ask the gate, and it is
    /// not read again before its window closes.
    TooLarge {
        receive_until: DateTime<Utc>,
    },
}

impl Entry {
    /// When the entry stops being of use (never for a load under way).
    fn closes(&self) -> Option<DateTime<Utc>> {
        match self {
            Entry::Loading => None,
            Entry::Known(spray) => Some(spray.receive_until),
            Entry::TooLarge { receive_until } => Some(*receive_until),
        }
    }

    fn receivers(&self) -> usize {
        match self {
            Entry::Known(spray) => spray.receivers.len(),
            Entry::Loading | Entry::TooLarge { .. } => 0,
        }
    }
}

#[derive(Default)]
pub(super) struct ExhaustedSprays {
    entries: RwLock<Entries>,
}

#[derive(Default)]
struct Entries {
    by_spray: HashMap<(RoomId, Token), Entry>,
    receivers: usize,
    /// No look for closed sprays before this time.
    next_purge: Option<DateTime<Utc>>,
}

impl ExhaustedSprays {
    /// The entries, to change (see [`Changing`]).
    fn lock(&self) -> Changing<'_> {
        Changing(
            self.entries
                .write()
                .unwrap_or_else(std::sync::PoisonError::into_inner),
        )
    }

    /// The remembered answer to `user` claiming `token` in `room` at `now`, if any.
    pub(super) fn refusal(
        &self,
        room: &RoomId,
        token: &Token,
        user: UserId,
        now: DateTime<Utc>,
    ) -> Option<ReceiveRefusal> {
        let entries = self
            .entries
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        match entries.by_spray.get(&(room.clone(), token.clone()))? {
            Entry::Known(spray) => refusal(spray, user, now),
            Entry::Loading | Entry::TooLarge { .. } => None,
        }
    }

    /// A ticket to read the spray (of `shares` shares) from Redis and
    /// [`Loading::remember`] it: for the first caller only, until that ticket is used or
    /// dropped; none when the spray is known already, or cannot fit beside the sprays
    /// still open at `now`.
    pub(super) fn start_loading(
        &self,
        room: &RoomId,
        token: &Token,
        shares: u32,
        now: DateTime<Utc>,
    ) -> Option<Loading<'_>> {
        let mut entries = self.lock();
        let key = (room.clone(), token.clone());
        match entries.by_spray.get(&key).map(Entry::closes) {
            None => {}
            // An entry of an older spray under this token (its window closed): replaced.
            Some(Some(closes)) if closes <= now => entries.remove(&key),
            Some(_) => return None,
        }
        let shares = usize::try_from(shares).unwrap_or(usize::MAX);
        if !entries.fits(shares, now) {
            return None;
        }
        entries.by_spray.insert(key.clone(), Entry::Loading);
        Some(Loading {
            memory: self,
            key: Some(key),
        })
    }

    /// Ends a load: removes its marker, then remembers `spray` if there is one and it
    /// fits at `now` (else marks it too large).
    fn finish(&self, key: (RoomId, Token), spray: Option<ExhaustedSpray>, now: DateTime<Utc>) {
        let mut entries = self.lock();
        entries.remove(&key);
        let Some(mut spray) = spray else { return };
        if now >= spray.receive_until {
            return;
        }
        if !entries.fits(spray.receivers.len(), now) {
            if entries.by_spray.len() < MAX_SPRAYS {
                let receive_until = spray.receive_until;
                entries.by_spray.insert(key, Entry::TooLarge { receive_until });
            }
            return;
        }
        spray.receivers.sort_unstable();
        entries.receivers += spray.receivers.len();
        entries.by_spray.insert(key, Entry::Known(Arc::new(spray)));
    }

    /// How many sprays are remembered.
    #[cfg(test)]
    fn len(&self) -> usize {
        let entries = self
            .entries
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        entries
            .by_spray
            .values()
            .filter(|e| matches!(e, Entry::Known(_)))
            .count()
    }
}

/// The right to load one spray (see [`ExhaustedSprays::start_loading`]). Dropped unused
/// (the read failed, the task ended early), it lets the next claim try.
pub(super) struct Loading<'a> {
    memory: &'a ExhaustedSprays,
    key: Option<(RoomId, Token)>,
}

impl Loading<'_> {
    /// Remembers `spray` (what Redis said, `None` if it is not taken for good after all)
    /// if it fits, after dropping the sprays whose window has closed by `now`.
    pub(super) fn remember(mut self, spray: Option<ExhaustedSpray>, now: DateTime<Utc>) {
        if let Some(key) = self.key.take() {
            self.memory.finish(key, spray, now);
        }
    }
}

impl Drop for Loading<'_> {
    fn drop(&mut self) {
        if let Some(key) = self.key.take() {
            self.memory.lock().remove(&key);
        }
    }
}

/// The entries under the write lock. Every change goes through it, and the gauges of what
/// they hold (`spray_gate_remembered_*`) are set as it is released, still under the lock:
/// so every change shows, the last one last.
struct Changing<'a>(RwLockWriteGuard<'a, Entries>);

impl Deref for Changing<'_> {
    type Target = Entries;

    fn deref(&self) -> &Entries {
        &self.0
    }
}

impl DerefMut for Changing<'_> {
    fn deref_mut(&mut self) -> &mut Entries {
        &mut self.0
    }
}

impl Drop for Changing<'_> {
    fn drop(&mut self) {
        crate::telemetry::record_remembered(self.0.by_spray.len(), self.0.receivers);
    }
}

impl Entries {
    fn remove(&mut self, key: &(RoomId, Token)) {
        if let Some(entry) = self.by_spray.remove(key) {
            self.receivers = self.receivers.saturating_sub(entry.receivers());
        }
    }

    /// Whether one more spray of `receivers` receivers fits, after dropping the sprays
    /// whose window has closed by `now` if it would not (at most once a [`PURGE_EVERY`]).
    fn fits(&mut self, receivers: usize, now: DateTime<Utc>) -> bool {
        let fits = |entries: &Entries| {
            entries.by_spray.len() < MAX_SPRAYS
                && entries.receivers.saturating_add(receivers) <= MAX_RECEIVERS
        };
        if fits(self) {
            return true;
        }
        if self.next_purge.is_some_and(|next| now < next) {
            return false;
        }
        self.next_purge = Some(now + PURGE_EVERY);
        let mut freed = 0;
        self.by_spray.retain(|_, entry| match entry.closes() {
            Some(closes) if closes <= now => {
                freed += entry.receivers();
                false
            }
            _ => true,
        });
        self.receivers = self.receivers.saturating_sub(freed);
        fits(self)
    }
}

#[cfg(test)]
mod tests {
    use chrono::TimeDelta;

    use super::*;

    fn user(id: i64) -> UserId {
        UserId::from_stored(id).unwrap()
    }

    fn room(name: &str) -> RoomId {
        RoomId::parse(name).unwrap()
    }

    fn token(text: &str) -> Token {
        Token::parse(text).unwrap()
    }

    fn start() -> DateTime<Utc> {
        DateTime::from_timestamp(1_800_000_000, 0).unwrap()
    }

    fn spray(receivers: &[i64]) -> ExhaustedSpray {
        ExhaustedSpray {
            owner: user(1),
            receive_until: start() + TimeDelta::minutes(10),
            shares: u32::try_from(receivers.len()).unwrap(),
            receivers: receivers.iter().rev().map(|&id| user(id)).collect(),
        }
    }

    /// A ticket for a spray of `shares` shares, at `now`.
    fn ticket<'a>(
        memory: &'a ExhaustedSprays,
        room_name: &str,
        text: &str,
        shares: u32,
        now: DateTime<Utc>,
    ) -> Option<Loading<'a>> {
        memory.start_loading(&room(room_name), &token(text), shares, now)
    }

    fn load(
        memory: &ExhaustedSprays,
        room_name: &str,
        text: &str,
        spray: Option<ExhaustedSpray>,
        now: DateTime<Utc>,
    ) {
        let shares = spray.as_ref().map_or(1, |s| s.shares);
        let loading = ticket(memory, room_name, text, shares, now);
        loading.expect("a ticket to load").remember(spray, now);
    }

    fn remembered(memory: &ExhaustedSprays, receivers: &[i64]) {
        load(memory, "R", "abc", Some(spray(receivers)), start());
    }

    #[test]
    fn answers_in_the_rule_order_and_leaves_receivers_to_sql() {
        let memory = ExhaustedSprays::default();
        remembered(&memory, &[2, 3, 4]);
        let answer = |id, at| memory.refusal(&room("R"), &token("abc"), user(id), at);
        assert_eq!(answer(1, start()), Some(ReceiveRefusal::OwnSpray));
        assert_eq!(answer(9, start()), Some(ReceiveRefusal::Exhausted { shares: 3 }));
        for receiver in [2, 3, 4] {
            assert_eq!(answer(receiver, start()), None, "receiver {receiver}");
        }
        // Another room, another token: nothing known.
        assert_eq!(memory.refusal(&room("S"), &token("abc"), user(9), start()), None);
        assert_eq!(memory.refusal(&room("R"), &token("abd"), user(9), start()), None);
        // From the end of the window on, the gate and SQL answer again.
        let closes = start() + TimeDelta::minutes(10);
        assert_eq!(
            answer(9, closes - TimeDelta::milliseconds(1)),
            Some(ReceiveRefusal::Exhausted { shares: 3 })
        );
        assert_eq!(answer(9, closes), None);
        assert_eq!(answer(1, closes), None);
    }

    #[test]
    fn one_caller_loads_a_spray_and_a_failed_load_can_be_tried_again() {
        let memory = ExhaustedSprays::default();
        let first = ticket(&memory, "R", "abc", 1, start()).unwrap();
        assert!(
            ticket(&memory, "R", "abc", 1, start()).is_none(),
            "loaded twice at once"
        );
        assert_eq!(memory.refusal(&room("R"), &token("abc"), user(9), start()), None);
        first.remember(None, start());
        // A ticket dropped unused (its read failed) lets the next claim try.
        drop(ticket(&memory, "R", "abc", 1, start()).unwrap());
        load(&memory, "R", "abc", Some(spray(&[2])), start());
        assert_eq!(memory.len(), 1);
        assert!(ticket(&memory, "R", "abc", 1, start()).is_none(), "loaded again");
    }

    #[test]
    fn a_spray_already_closed_is_not_remembered() {
        let memory = ExhaustedSprays::default();
        let closes = start() + TimeDelta::minutes(10);
        load(&memory, "R", "abc", Some(spray(&[2])), closes);
        assert_eq!(memory.len(), 0);
    }

    #[test]
    fn a_token_taken_again_after_the_window_is_remembered_for_its_new_spray() {
        let memory = ExhaustedSprays::default();
        remembered(&memory, &[2]);
        let later = start() + TimeDelta::days(8);
        let mut next = spray(&[7, 8]);
        next.receive_until = later + TimeDelta::minutes(10);
        load(&memory, "R", "abc", Some(next), later);
        let answer = |id| memory.refusal(&room("R"), &token("abc"), user(id), later);
        assert_eq!(answer(2), Some(ReceiveRefusal::Exhausted { shares: 2 }));
        assert_eq!(answer(7), None);
        assert_eq!(memory.len(), 1);
    }

    #[test]
    fn memory_is_bounded_and_closed_sprays_make_room() {
        let memory = ExhaustedSprays::default();
        let receivers: Vec<i64> = (2..).take(MAX_RECEIVERS - 1).collect();
        remembered(&memory, &receivers);
        // Two more receivers do not fit beside those: no ticket for a spray of two shares.
        assert!(ticket(&memory, "R", "xyz", 2, start()).is_none());
        assert_eq!(memory.refusal(&room("R"), &token("xyz"), user(9), start()), None);
        // Once the first spray's window has closed, it makes room.
        let later = start() + TimeDelta::minutes(10);
        let mut small = spray(&[5, 6]);
        small.receive_until = later + TimeDelta::minutes(10);
        load(&memory, "R", "xyz", Some(small), later);
        assert_eq!(memory.len(), 1);
        assert_eq!(
            memory.refusal(&room("R"), &token("xyz"), user(9), later),
            Some(ReceiveRefusal::Exhausted { shares: 2 })
        );
    }

    #[test]
    fn a_spray_read_but_too_large_is_not_read_again_before_its_window_closes() {
        let memory = ExhaustedSprays::default();
        let receivers: Vec<i64> = (2..).take(MAX_RECEIVERS - 1).collect();
        remembered(&memory, &receivers);
        // One share, as the gate said, but two receivers listed (a hold taken over):
        // read, found too large, and marked.
        let mut listed = spray(&[5, 6]);
        listed.shares = 1;
        load(&memory, "S", "xyz", Some(listed), start());
        assert_eq!(memory.len(), 1);
        assert_eq!(memory.refusal(&room("S"), &token("xyz"), user(9), start()), None);
        assert!(ticket(&memory, "S", "xyz", 1, start()).is_none(), "read again");
        let closes = start() + TimeDelta::minutes(10);
        assert!(ticket(&memory, "S", "xyz", 1, closes).is_some());
    }

    #[test]
    fn at_most_max_sprays_are_remembered_and_a_full_memory_is_purged_at_most_once_a_second() {
        let memory = ExhaustedSprays::default();
        let closes = start() + TimeDelta::milliseconds(500);
        for n in 0..MAX_SPRAYS {
            let mut short = spray(&[2]);
            short.receive_until = closes;
            load(&memory, &format!("R{n}"), "abc", Some(short), start());
        }
        assert_eq!(memory.len(), MAX_SPRAYS);
        // Full of open sprays: no ticket (and a look at them all was just taken).
        assert!(ticket(&memory, "R-more", "abc", 1, start()).is_none());
        // Closed now, but the last look was less than a second ago.
        assert!(ticket(&memory, "R-more", "abc", 1, closes).is_none());
        // A second after the last look, the closed ones make room.
        assert!(ticket(&memory, "R-more", "abc", 1, start() + PURGE_EVERY).is_some());
    }
}
