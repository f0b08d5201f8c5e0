//! What a chat instance counts, for `/metrics`.
//!
//! The counters are bumped where things happen (a connection opening, the
//! bus delivering, a frame refused) and read by Prometheus. Two are the
//! ones to watch: `redis_up` at 0 means this instance's members hear only
//! each other; `slow_disconnects` rising means clients stop reading and the
//! hub is closing them rather than letting their queues grow.
//!
//! Every label has a fixed set of values chosen here (a path, a frame
//! error code), never something a client sends, so `/metrics` cannot grow
//! without bound.

use lab_core::metrics::Metrics;
use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family, gauge::Gauge},
};

use crate::hub::Delivery;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PathLabel {
    path: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CodeLabel {
    code: String,
}

/// The chat's Prometheus metrics.
pub(crate) struct Stats {
    pub connections: Gauge,
    pub redis_up: Gauge,
    said: Family<PathLabel, Counter>,
    deliveries: Counter,
    slow_disconnects: Counter,
    rejected: Family<CodeLabel, Counter>,
}

impl Stats {
    pub fn new(metrics: &Metrics) -> Self {
        let stats = Self {
            connections: Gauge::default(),
            redis_up: Gauge::default(),
            said: Family::default(),
            deliveries: Counter::default(),
            slow_disconnects: Counter::default(),
            rejected: Family::default(),
        };
        metrics.register(
            "connections",
            "Open WebSocket connections on this instance",
            stats.connections.clone(),
        );
        metrics.register(
            "redis_up",
            "Whether the Redis pub/sub bus is subscribed (1) or this instance is on its own (0)",
            stats.redis_up.clone(),
        );
        metrics.register(
            "messages_said",
            "Messages accepted, by path: redis (every instance) or local (Redis down)",
            stats.said.clone(),
        );
        metrics.register(
            "deliveries",
            "Frames queued for a connection by fan-out",
            stats.deliveries.clone(),
        );
        metrics.register(
            "slow_disconnects",
            "Connections closed with 1008 because their outbound queue was full",
            stats.slow_disconnects.clone(),
        );
        metrics.register(
            "frames_rejected",
            "Client frames answered with an error frame, by code",
            stats.rejected.clone(),
        );
        stats
    }

    /// A message accepted, by `redis` or `local` (Redis down).
    pub fn said(&self, path: &str) {
        self.said
            .get_or_create(&PathLabel { path: path.into() })
            .inc();
    }

    /// A client frame answered with an error frame of this code.
    pub fn rejected(&self, code: &str) {
        self.rejected
            .get_or_create(&CodeLabel { code: code.into() })
            .inc();
    }

    pub fn delivered(&self, delivery: Delivery) {
        self.deliveries.inc_by(delivery.queued);
        self.slow_disconnects.inc_by(delivery.kicked);
    }
}
