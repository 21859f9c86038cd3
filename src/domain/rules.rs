//! The rules of receiving and looking up, in the contract's order, as plain functions.
//!
//! The store gathers the facts inside its transaction and asks these functions for the
//! verdict, so the order of the rules lives in one place and is tested without I/O.

use chrono::{DateTime, Utc};

use super::amount::Amount;
use super::ids::UserId;

/// Why a receive was refused. Each variant is one error code of the contract.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReceiveRefusal {
    /// No spray with this token in the caller's room.
    NotFound,
    /// The caller is the sprayer.
    OwnSpray,
    /// The caller already holds a share of this spray (and is among its recipients).
    AlreadyReceived,
    /// The receive window has closed.
    Expired,
    /// Every share has been received.
    Exhausted { shares: u32 },
}

/// What the store knows about a spray and the caller before claiming a share.
#[derive(Debug, Clone, Copy)]
pub struct ReceiveFacts {
    pub owner: UserId,
    pub receive_until: DateTime<Utc>,
    /// The share the caller already holds, if any.
    pub already_received: Option<Amount>,
}

/// Rules 2 to 4 of the contract, in order; rule 1 (the spray exists in the room) is the
/// store's lookup, rule 5 (a share is left) is the claim itself.
pub fn check_receive(facts: &ReceiveFacts, caller: UserId, now: DateTime<Utc>) -> Result<(), ReceiveRefusal> {
    if facts.owner == caller {
        return Err(ReceiveRefusal::OwnSpray);
    }
    if facts.already_received.is_some() {
        return Err(ReceiveRefusal::AlreadyReceived);
    }
    if !window_open(now, facts.receive_until) {
        return Err(ReceiveRefusal::Expired);
    }
    Ok(())
}

/// A window `[start, until)` is open at `now` when `now < until`: the last millisecond
/// inside is `until - 1ms`.
pub fn window_open(now: DateTime<Utc>, until: DateTime<Utc>) -> bool {
    now < until
}

/// Why a lookup was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LookupRefusal {
    NotFound,
    NotOwner,
    Expired,
}

/// How the spray was found: by room (a stranger is told `NOT_OWNER`) or by the caller's
/// own sprays (a stranger cannot find it at all).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LookupScope {
    Room,
    OwnSprays,
}

pub fn check_lookup(
    scope: LookupScope,
    owner: UserId,
    lookup_until: DateTime<Utc>,
    caller: UserId,
    now: DateTime<Utc>,
) -> Result<(), LookupRefusal> {
    if owner != caller {
        return Err(match scope {
            LookupScope::Room => LookupRefusal::NotOwner,
            LookupScope::OwnSprays => LookupRefusal::NotFound,
        });
    }
    if !window_open(now, lookup_until) {
        return Err(LookupRefusal::Expired);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use chrono::TimeDelta;

    use super::*;

    fn user(id: i64) -> UserId {
        UserId::from_stored(id).unwrap()
    }

    fn facts(until: DateTime<Utc>, already: Option<u64>) -> ReceiveFacts {
        ReceiveFacts {
            owner: user(1),
            receive_until: until,
            already_received: already.map(Amount::new),
        }
    }

    #[test]
    fn receive_rules_answer_in_the_contract_order() {
        let until = DateTime::UNIX_EPOCH + TimeDelta::minutes(10);
        let after = until + TimeDelta::milliseconds(1);
        // The owner is refused as OWN_SPRAY even after the window closed.
        assert_eq!(
            check_receive(&facts(until, None), user(1), after),
            Err(ReceiveRefusal::OwnSpray)
        );
        // A recipient is told ALREADY_RECEIVED, also after the window closed.
        assert_eq!(
            check_receive(&facts(until, Some(5)), user(2), after),
            Err(ReceiveRefusal::AlreadyReceived)
        );
        assert_eq!(
            check_receive(&facts(until, None), user(2), until),
            Err(ReceiveRefusal::Expired)
        );
        let last_inside = until - TimeDelta::milliseconds(1);
        assert_eq!(check_receive(&facts(until, None), user(2), last_inside), Ok(()));
    }

    #[test]
    fn lookup_rules_hide_other_peoples_sprays() {
        let until = DateTime::UNIX_EPOCH + TimeDelta::days(7);
        let now = DateTime::UNIX_EPOCH;
        assert_eq!(
            check_lookup(LookupScope::Room, user(1), until, user(2), now),
            Err(LookupRefusal::NotOwner)
        );
        assert_eq!(
            check_lookup(LookupScope::OwnSprays, user(1), until, user(2), now),
            Err(LookupRefusal::NotFound)
        );
        // A stranger learns nothing about the window either.
        assert_eq!(
            check_lookup(LookupScope::Room, user(1), until, user(2), until),
            Err(LookupRefusal::NotOwner)
        );
        assert_eq!(
            check_lookup(LookupScope::Room, user(1), until, user(1), until),
            Err(LookupRefusal::Expired)
        );
        let last_inside = until - TimeDelta::milliseconds(1);
        assert_eq!(
            check_lookup(LookupScope::Room, user(1), until, user(1), last_inside),
            Ok(())
        );
    }
}
