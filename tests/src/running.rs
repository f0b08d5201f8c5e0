//! A lab's service running in the test's process on a port of its own, the
//! way every lab's harness starts one: `serve(listener, …, shutdown)` on a
//! task, with the token that stops it.
//!
//! `Running<A>` is written once for the five labs; `A` is what a lab keeps
//! beside its service (clients, the key prefix, the settings), reached
//! through `Deref`, and each lab adds its constructors in an
//! `impl Running<A>` of its own module (`CachingApp = Running<Caching>`).
//! Rejected: a struct per lab holding a `Running`, which would forward
//! `stop` and `kill` (they consume it) five times again.

use std::{future::Future, net::SocketAddr, ops::Deref};

use tokio::{net::TcpListener, task::JoinHandle};
use tokio_util::sync::CancellationToken;

use crate::common::{delete_keys, get_json, redis_connection, redis_url, wait_ready};

/// A service serving on `addr` until stopped, killed or dropped (dropping
/// it fires the shutdown token without waiting for the drain).
pub struct Running<A> {
    /// Where its HTTP listener is.
    pub addr: SocketAddr,
    app: A,
    shutdown: CancellationToken,
    task: Option<JoinHandle<anyhow::Result<()>>>,
}

impl<A> Running<A> {
    /// Spawns `serve` on `listener` with a fresh shutdown token; `app` is
    /// what the lab keeps beside it.
    pub fn spawn<F>(
        listener: TcpListener,
        app: A,
        serve: impl FnOnce(TcpListener, CancellationToken) -> F,
    ) -> Self
    where
        F: Future<Output = anyhow::Result<()>> + Send + 'static,
    {
        let addr = listener.local_addr().unwrap();
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(serve(listener, shutdown.clone()));
        Self {
            addr,
            app,
            shutdown,
            task: Some(task),
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// GET `path` and parse the JSON body, whatever the status.
    pub async fn get_json(&self, path: &str) -> serde_json::Value {
        get_json(&self.url(path)).await
    }

    /// Waits for `/readyz` to answer 200 (at most 10 s).
    pub async fn wait_until_ready(&self) {
        wait_ready(&self.url("")).await;
    }

    /// Fires the shutdown token, the way SIGTERM does in the binary.
    pub fn trigger_shutdown(&self) {
        self.shutdown.cancel();
    }

    /// Triggers shutdown and waits for `serve` to drain and return.
    pub async fn stop(mut self) -> anyhow::Result<()> {
        self.shutdown.cancel();
        self.task.take().expect("stopped once").await?
    }

    /// Kills the service mid-flight, the way a crash would: its tasks are
    /// dropped, its connections closed, nothing drains.
    pub fn kill(mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

/// A lab whose service keeps its state in the shared Redis, under a prefix
/// of the test's own.
pub trait RedisKeys {
    fn key_prefix(&self) -> &str;
}

impl<A: RedisKeys> Running<A> {
    /// Stops, then deletes the test's keys from the shared Redis.
    pub async fn finish(self) -> anyhow::Result<()> {
        let prefix = self.app.key_prefix().to_owned();
        let result = self.stop().await;
        delete_keys(&mut redis_connection(&redis_url()).await, &prefix).await;
        result
    }
}

impl<A> Deref for Running<A> {
    type Target = A;

    fn deref(&self) -> &A {
        &self.app
    }
}

impl<A> Drop for Running<A> {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}
