//! One cancellation token that fires on Ctrl-C or SIGTERM.
//!
//! Every server and worker of a service receives a clone (or a child) of this
//! token. When it fires, listeners stop accepting, in-flight requests finish,
//! buffers are flushed, and `run` returns so the process exits 0. A token
//! rather than a bare future because it can be cloned to many tasks and
//! awaited many times; tests cancel it by hand instead of sending signals.

use std::time::Duration;

use anyhow::Context;
use futures::future::BoxFuture;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

/// How long in-flight work may take to finish once shutdown has begun.
/// Compose waits 10 s between SIGTERM and SIGKILL; finish a little sooner.
pub const DRAIN_TIMEOUT: Duration = Duration::from_secs(8);

/// A token cancelled when the process receives SIGINT or SIGTERM.
pub fn on_signal() -> CancellationToken {
    let token = CancellationToken::new();
    let trigger = token.clone();
    tokio::spawn(async move {
        wait_for_signal().await;
        tracing::info!("shutdown signal received; draining");
        trigger.cancel();
    });
    token
}

async fn wait_for_signal() {
    let ctrl_c = async {
        if let Err(err) = tokio::signal::ctrl_c().await {
            tracing::error!(%err, "cannot listen for Ctrl-C");
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut sig) => {
                sig.recv().await;
            }
            Err(err) => {
                tracing::error!(%err, "cannot listen for SIGTERM");
                std::future::pending::<()>().await;
            }
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {},
        () = terminate => {},
    }
}

/// Runs a service's servers and workers side by side until all of them
/// return. The first one to fail cancels `shutdown`, so the others drain
/// instead of running on half a service. The first failure is returned (the
/// caller reports it); any later one is logged here, so none goes unsaid.
/// Once shutdown has begun they get
/// [`DRAIN_TIMEOUT`] to finish: a stream that never ends (a gRPC health
/// `Watch`, a forgotten long poll) must not keep the process alive forever.
pub async fn supervise(
    shutdown: &CancellationToken,
    tasks: Vec<(&'static str, BoxFuture<'static, anyhow::Result<()>>)>,
) -> anyhow::Result<()> {
    let mut running = JoinSet::new();
    for (name, task) in tasks {
        let shutdown = shutdown.clone();
        running.spawn(async move {
            let result = task.await.with_context(|| format!("{name} failed"));
            if result.is_err() {
                shutdown.cancel();
            }
            result
        });
    }
    let mut first_error = None;
    let all_done = async {
        while let Some(joined) = running.join_next().await {
            if joined.is_err() {
                // A panic skipped the task's own cancel: stop the rest too.
                shutdown.cancel();
            }
            let result = joined.context("a task panicked").and_then(|r| r);
            match (result, &first_error) {
                (Err(err), None) => first_error = Some(err),
                (Err(err), Some(_)) => tracing::error!("{err:#}"),
                (Ok(()), _) => {}
            }
        }
    };
    let deadline = async {
        shutdown.cancelled().await;
        tokio::time::sleep(DRAIN_TIMEOUT).await;
    };
    tokio::select! {
        () = all_done => {}
        () = deadline => {
            tracing::warn!("still draining after {DRAIN_TIMEOUT:?}; stopping the rest");
        }
    }
    first_error.map_or(Ok(()), Err)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A failure is not lost because another task is slow to drain: the
    /// drain deadline cuts the wait short, and the failure is still what
    /// `supervise` returns (a `lab up` whose lab failed must not exit 0).
    #[tokio::test(start_paused = true)]
    async fn a_failure_is_returned_even_when_a_task_outlives_the_drain() {
        let shutdown = CancellationToken::new();
        let failing: BoxFuture<'static, anyhow::Result<()>> =
            Box::pin(async { anyhow::bail!("the port is taken") });
        let stubborn: BoxFuture<'static, anyhow::Result<()>> = Box::pin(async {
            std::future::pending::<()>().await;
            Ok(())
        });
        let result = supervise(&shutdown, vec![("a", failing), ("b", stubborn)]).await;
        let err = result.expect_err("the failure must come back");
        assert!(
            format!("{err:#}").contains("a failed: the port is taken"),
            "{err:#}"
        );
        assert!(shutdown.is_cancelled(), "the failure stops the others");
    }
}
