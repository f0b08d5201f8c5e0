//! Where an event's time goes between its commit and its consumer's commit.
//!
//! An end-to-end latency says *that* the path is slow, not *where*. So the
//! relay and the consumer can report the instant each event reaches each
//! [`Stage`] of its way, on the one monotonic clock of their process, to
//! whoever listens: `lab bench outbox` runs the three roles in one process,
//! listens, and prints the breakdown. Nobody listens in a deployed service,
//! and a [`Probe`] that is off costs a branch.
//!
//! Rejected: timestamps in Postgres rows. `now()` is the *start* of the
//! transaction that writes the row, not the instant it commits, so a
//! difference of two `now()`s can hide a whole transaction (or a lock wait)
//! on either side; `clock_timestamp()` is a real instant but exists only in
//! the statements that run in Postgres, and the relay's publish, the
//! broker's confirm and the delivery run in none. Also rejected: one
//! histogram per stage in `/metrics`: bucketed, and each stage alone, where
//! the question is how one event's path adds up.

use std::time::Instant;

use tokio::sync::mpsc;
use uuid::Uuid;

/// A point on an event's way from the outbox to the consumer's commit, in
/// the order an event passes them (though not strictly: the broker may
/// deliver an event before its confirm reaches the relay).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Stage {
    /// The relay woke up (a notification, or its poll) for the batch that
    /// carried the event.
    Woke,
    /// The relay's `SELECT` returned the event in its batch.
    Selected,
    /// The relay handed the event to the broker connection.
    Published,
    /// The broker confirmed the batch that carried the event.
    Confirmed,
    /// The relay's transaction marking the event published committed.
    Marked,
    /// The consumer received the event from the broker.
    Delivered,
    /// The consumer's transaction that applied the event committed (for an
    /// event that arrived early and was parked, the one that applied its
    /// predecessor and released it). Parking an event, or dropping a
    /// redelivery of one applied before, is not this stage.
    Committed,
}

impl Stage {
    pub const ALL: [Stage; 7] = [
        Stage::Woke,
        Stage::Selected,
        Stage::Published,
        Stage::Confirmed,
        Stage::Marked,
        Stage::Delivered,
        Stage::Committed,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Stage::Woke => "woke",
            Stage::Selected => "selected",
            Stage::Published => "published",
            Stage::Confirmed => "confirmed",
            Stage::Marked => "marked",
            Stage::Delivered => "delivered",
            Stage::Committed => "consumed",
        }
    }
}

/// Some events reached `stage` at `at`.
#[derive(Debug, Clone)]
pub struct Stamp {
    pub stage: Stage,
    pub at: Instant,
    pub event_ids: Vec<Uuid>,
}

/// Where the relay and the consumer report stages: nowhere (the default),
/// or a channel whose receiver the caller reads.
#[derive(Debug, Clone, Default)]
pub struct Probe(Option<mpsc::UnboundedSender<Stamp>>);

impl Probe {
    /// A probe and the receiving end of its stamps.
    pub fn channel() -> (Self, mpsc::UnboundedReceiver<Stamp>) {
        let (tx, rx) = mpsc::unbounded_channel();
        (Self(Some(tx)), rx)
    }

    pub fn is_on(&self) -> bool {
        self.0.is_some()
    }

    /// Reports that the events `ids` gives reached `stage` at `at`; `ids`
    /// runs only when someone listens.
    pub(crate) fn stamp<I>(&self, stage: Stage, at: Instant, ids: impl FnOnce() -> I)
    where
        I: IntoIterator<Item = Uuid>,
    {
        if let Some(tx) = &self.0 {
            let event_ids = ids().into_iter().collect();
            // A listener that went away is no reason to stop the pipeline.
            let _ = tx.send(Stamp {
                stage,
                at,
                event_ids,
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_probe_that_is_off_does_not_even_list_the_events() {
        let unlisted = || -> Vec<Uuid> { panic!("nobody listens: the ids are not needed") };
        Probe::default().stamp(Stage::Woke, Instant::now(), unlisted);
    }

    #[test]
    fn a_probe_hands_each_stamp_to_its_listener_in_order() {
        let (probe, mut stamps) = Probe::channel();
        let (first, second) = (Uuid::now_v7(), Uuid::now_v7());
        probe.stamp(Stage::Delivered, Instant::now(), || [first, second]);
        probe.stamp(Stage::Committed, Instant::now(), || [first]);
        let stamp = stamps.try_recv().unwrap();
        assert_eq!(
            (stamp.stage, stamp.event_ids),
            (Stage::Delivered, vec![first, second])
        );
        assert_eq!(stamps.try_recv().unwrap().stage, Stage::Committed);
    }
}
