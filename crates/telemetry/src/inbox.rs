//! The inbox between the MQTT client task and the batcher, and what bounds it.
//!
//! The client task owns the event loop and must never wait: the same loop
//! delivers the batcher's acks, so a client waiting for room in the inbox
//! while the batcher waits for its acks to go out is a deadlock (a bounded
//! channel with `send().await` stalled here after ~1,900 of 3,000 queued
//! readings). So the inbox never makes the client wait; something else has to
//! bound it, and that depends on the QoS:
//!
//! - **QoS 1**: the broker bounds it. With manual acks it sends at most the
//!   *receive maximum* of unacknowledged messages, and the batcher acks only
//!   after commit: while Postgres is down the broker keeps the rest.
//! - **QoS 0**: nothing does. The broker forgets a QoS 0 message once sent,
//!   and the receive maximum does not count it; with Postgres down the inbox
//!   grew at the fleet's rate (5,000 readings a second in `lab bench
//!   telemetry`) until the process ran out of memory. So at QoS 0 the inbox
//!   holds at most `INGEST_QOS0_INBOX` messages, and the client task drops
//!   (sheds) any QoS 0 message beyond that, counting it in
//!   `telemetry_shed_total` and on the dashboard. QoS 0 promised at most once;
//!   shedding keeps that promise visibly instead of breaking the process.
//!
//! Rejected: refusing QoS 0 for the ingest. Losing readings when the ingest
//! falls behind is the honest price of QoS 0, and the lab exists to measure
//! it beside QoS 1 (`lab bench telemetry` runs both). Rejected too: shedding
//! QoS 1 messages the same way. A QoS 1 message that is neither stored nor
//! acknowledged keeps its receive-maximum slot until the next reconnect, so
//! shedding them would quietly shrink the stream to nothing.
//!
//! Each message carries the connection it arrived on: its ack is valid on
//! that connection only (see [`crate::ingest`]).

use std::sync::{
    Arc,
    atomic::{AtomicUsize, Ordering},
};

use prometheus_client::metrics::{counter::Counter, gauge::Gauge};
use rumqttc::v5::mqttbytes::{QoS, v5::Publish};
use tokio::sync::mpsc;

/// A publish, and the broker connection it arrived on (counted from 1).
#[derive(Debug)]
pub(crate) struct Delivery {
    pub publish: Publish,
    pub connection: u64,
}

/// What the inbox counts, shared by its two ends and the HTTP side.
#[derive(Debug, Default)]
pub(crate) struct Counts {
    /// QoS 0 messages waiting: the ones the inbox bounds.
    qos0: AtomicUsize,
    /// Every message waiting (`telemetry_inbox`).
    pub waiting: Gauge,
    /// QoS 0 messages dropped because the inbox was full (`telemetry_shed_total`).
    pub shed: Counter,
}

impl Counts {
    pub fn waiting(&self) -> u64 {
        self.waiting.get().max(0) as u64
    }
}

/// The client task's end.
pub(crate) struct Sender {
    tx: mpsc::UnboundedSender<Delivery>,
    counts: Arc<Counts>,
    qos0_max: usize,
}

/// The batcher's end.
pub(crate) struct Receiver {
    rx: mpsc::UnboundedReceiver<Delivery>,
    counts: Arc<Counts>,
}

/// What became of an offered message.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Offered {
    Queued,
    /// A QoS 0 message beyond the bound: dropped and counted.
    Shed,
    /// The batcher has stopped.
    Closed,
}

pub(crate) fn channel(counts: Arc<Counts>, qos0_max: usize) -> (Sender, Receiver) {
    let (tx, rx) = mpsc::unbounded_channel();
    let sender = Sender {
        tx,
        counts: counts.clone(),
        qos0_max,
    };
    (sender, Receiver { rx, counts })
}

impl Sender {
    /// Queues `delivery` for the batcher, never waiting.
    pub fn offer(&self, delivery: Delivery) -> Offered {
        let qos0 = delivery.publish.qos == QoS::AtMostOnce;
        if qos0 {
            // Only this task adds, so the check and the add cannot race
            // past the bound (the batcher only takes away).
            if self.counts.qos0.load(Ordering::SeqCst) >= self.qos0_max {
                self.counts.shed.inc();
                return Offered::Shed;
            }
            self.counts.qos0.fetch_add(1, Ordering::SeqCst);
        }
        self.counts.waiting.inc();
        if self.tx.send(delivery).is_err() {
            self.counts.waiting.dec();
            if qos0 {
                self.counts.qos0.fetch_sub(1, Ordering::SeqCst);
            }
            return Offered::Closed;
        }
        Offered::Queued
    }
}

impl Receiver {
    pub async fn recv(&mut self) -> Option<Delivery> {
        let delivery = self.rx.recv().await?;
        Some(self.taken(delivery))
    }

    pub fn try_recv(&mut self) -> Option<Delivery> {
        let delivery = self.rx.try_recv().ok()?;
        Some(self.taken(delivery))
    }

    fn taken(&self, delivery: Delivery) -> Delivery {
        self.counts.waiting.dec();
        if delivery.publish.qos == QoS::AtMostOnce {
            self.counts.qos0.fetch_sub(1, Ordering::SeqCst);
        }
        delivery
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn delivery(qos: QoS) -> Delivery {
        Delivery {
            publish: Publish::new("devices/d/telemetry", qos, "{}", None),
            connection: 1,
        }
    }

    #[test]
    fn qos_0_beyond_the_bound_is_shed_and_qos_1_never() {
        let counts = Arc::new(Counts::default());
        let (tx, mut rx) = channel(counts.clone(), 2);
        assert_eq!(tx.offer(delivery(QoS::AtMostOnce)), Offered::Queued);
        assert_eq!(tx.offer(delivery(QoS::AtMostOnce)), Offered::Queued);
        assert_eq!(tx.offer(delivery(QoS::AtMostOnce)), Offered::Shed);
        // The broker's receive maximum bounds QoS 1; the inbox takes it all.
        for _ in 0..5 {
            assert_eq!(tx.offer(delivery(QoS::AtLeastOnce)), Offered::Queued);
        }
        assert_eq!((counts.waiting(), counts.shed.get()), (7, 1));
        // Taking one makes room for one more.
        assert!(rx.try_recv().is_some());
        assert_eq!(tx.offer(delivery(QoS::AtMostOnce)), Offered::Queued);
        assert_eq!(tx.offer(delivery(QoS::AtMostOnce)), Offered::Shed);
        drop(rx);
        assert_eq!(tx.offer(delivery(QoS::AtLeastOnce)), Offered::Closed);
        assert_eq!(counts.waiting(), 7, "what was not queued is not counted");
    }
}
