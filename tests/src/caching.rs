//! The caching lab served in-process on an ephemeral port, with its own key
//! prefix in the shared Redis and its own database.

use sqlx::PgPool;

use crate::{
    common::{ephemeral_listener, redis_connection, redis_url, unique_prefix},
    running::{RedisKeys, Running},
};

/// What the harness keeps beside a running caching service.
pub struct Caching {
    pub http: reqwest::Client,
    pub prefix: String,
    /// A direct connection to the Redis the service uses (never through a
    /// proxy).
    pub redis: lab_core::redis::Redis,
}

pub type CachingApp = Running<Caching>;

impl RedisKeys for Caching {
    fn key_prefix(&self) -> &str {
        &self.prefix
    }
}

impl Running<Caching> {
    /// Test settings: a fresh prefix, fast flushes and claims.
    pub fn settings() -> caching::Settings {
        caching::Settings {
            key_prefix: unique_prefix("caching"),
            flush_interval_ms: 100,
            flush_claim_idle_ms: 300,
            ..caching::Settings::from_env().expect("caching settings")
        }
    }

    pub async fn start(pool: PgPool, settings: caching::Settings) -> Self {
        Self::start_with_redis(pool, settings, &redis_url()).await
    }

    /// Starts the service against `service_redis_url` (a proxy, say), while
    /// the test keeps a direct connection to the real Redis.
    pub async fn start_with_redis(
        pool: PgPool,
        settings: caching::Settings,
        service_redis_url: &str,
    ) -> Self {
        let app = Caching {
            http: reqwest::Client::new(),
            prefix: settings.key_prefix.clone(),
            redis: redis_connection(&redis_url()).await,
        };
        let service_redis = lab_core::redis::connect(service_redis_url).unwrap();
        let service_redis_url = service_redis_url.to_owned();
        Running::spawn(ephemeral_listener().await, app, |listener, shutdown| {
            caching::serve(
                listener,
                pool,
                service_redis,
                service_redis_url,
                settings,
                shutdown,
            )
        })
    }

    /// Starts the service against a Redis of the test's own (a
    /// [`PrivateRedis`](crate::PrivateRedis), say); the test's direct
    /// connection goes to that Redis too.
    pub async fn start_on_redis(pool: PgPool, settings: caching::Settings, url: &str) -> Self {
        let app = Caching {
            http: reqwest::Client::new(),
            prefix: settings.key_prefix.clone(),
            redis: redis_connection(url).await,
        };
        let service_redis = lab_core::redis::connect(url).unwrap();
        let url = url.to_owned();
        Running::spawn(ephemeral_listener().await, app, |listener, shutdown| {
            caching::serve(listener, pool, service_redis, url, settings, shutdown)
        })
    }

    pub async fn stats(&self) -> serde_json::Value {
        self.get_json("/stats").await
    }
}
