//! How long to wait before trying a broken connection again.
//!
//! Every reconnect loop in the labs (a relay losing RabbitMQ, an ingest
//! losing Mosquitto, a chat instance losing its Redis subscription) waits
//! before it tries again, longer after each failure, up to a cap. The loops
//! stay in the labs, because what to do when a connection breaks is each
//! lab's lesson; the schedule lives here, once.
//!
//! Why each part: retrying at once turns a broker restart into a storm of
//! connection attempts from every client; doubling the wait keeps that storm
//! small; the cap keeps a recovered broker from being noticed minutes late;
//! and jitter (a random part of each wait) keeps many clients that lost the
//! broker at the same moment from all coming back at the same moment too.
//! `reset` after a success, so that a blip hours later starts from the short
//! wait again.

use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBackoff, ExponentialBuilder};

/// Exponential backoff: the first wait is between `min` and twice `min`,
/// each next one about twice as long, never more than `max`. The random part
/// (jitter) is what keeps clients that lost a service together from coming
/// back together.
#[derive(Debug)]
pub struct Backoff {
    builder: ExponentialBuilder,
    delays: ExponentialBackoff,
    max: Duration,
}

impl Backoff {
    pub fn new(min: Duration, max: Duration) -> Self {
        let builder = ExponentialBuilder::new()
            .with_min_delay(min)
            .with_max_delay(max)
            .with_jitter()
            .without_max_times();
        Self {
            builder,
            delays: builder.build(),
            max,
        }
    }

    /// The labs' usual schedule for a lost connection: 100 ms, doubling, up
    /// to 5 s.
    pub fn reconnect() -> Self {
        Self::new(Duration::from_millis(100), Duration::from_secs(5))
    }

    /// The wait before the next attempt; each call gives a longer one.
    pub fn next_delay(&mut self) -> Duration {
        // Without a limit on attempts the schedule never ends. backon adds
        // its jitter (up to the wait itself) after its own cap: cap again.
        self.delays.next().unwrap_or(self.max).min(self.max)
    }

    /// Starts over from the shortest wait, after an attempt that worked.
    pub fn reset(&mut self) {
        self.delays = self.builder.build();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn waits_grow_to_the_cap_and_start_over_after_a_reset() {
        let (min, max) = (Duration::from_millis(100), Duration::from_secs(1));
        let mut backoff = Backoff::new(min, max);
        let waits: Vec<Duration> = (0..12).map(|_| backoff.next_delay()).collect();
        // Jitter adds up to one more wait of the same size, never less.
        assert!(waits[0] >= min && waits[0] <= 2 * min, "{waits:?}");
        assert!(
            waits.iter().all(|w| *w <= max),
            "never over the cap: {waits:?}"
        );
        assert_eq!(waits[11], max, "reaches the cap: {waits:?}");
        backoff.reset();
        let again = backoff.next_delay();
        assert!(again <= 2 * min, "starts over: {again:?}");
    }
}
