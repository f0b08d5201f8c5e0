//! The HTTP side every lab service shares: `/healthz`, `/readyz`, `/metrics`,
//! the body limit, the JSON 404, and serving with TCP_NODELAY and a graceful
//! drain.

use std::{future::Future, sync::Arc, time::Duration};

use axum::{
    Router,
    extract::connect_info::Connected,
    extract::{DefaultBodyLimit, State},
    http::{StatusCode, header},
    response::{IntoResponse, Response},
    routing::get,
    serve::IncomingStream,
};
use futures::future::{BoxFuture, join_all};
use serde::Serialize;
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

use crate::{ApiError, metrics::Metrics};

/// Request bodies larger than this are refused with 413.
pub const BODY_LIMIT: usize = 64 * 1024;

/// How long one readiness probe may take before it counts as failed. Longer
/// than the pools' two-second acquire timeout, so a dead dependency reports
/// its own error (with its address) rather than a bare timeout.
const PROBE_TIMEOUT: Duration = Duration::from_secs(3);

type Probe = Arc<dyn Fn() -> BoxFuture<'static, Result<(), String>> + Send + Sync>;

/// A backing service that `/readyz` checks, by name.
#[derive(Clone)]
pub struct Dependency {
    name: &'static str,
    probe: Probe,
    warning: Option<Arc<dyn Fn() -> Option<String> + Send + Sync>>,
}

impl Dependency {
    /// `probe` answers `Ok(())` when the service works, or why it does not.
    pub fn new<F, Fut>(name: &'static str, probe: F) -> Self
    where
        F: Fn() -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<(), String>> + Send + 'static,
    {
        Self {
            name,
            probe: Arc::new(move || Box::pin(probe())),
            warning: None,
        }
    }

    /// Adds a warning to the check while `warning` says one: the service
    /// works and stays ready, but something about it deserves a look (a
    /// Redis that forgets what write-behind acknowledged, say).
    pub fn with_warning(
        mut self,
        warning: impl Fn() -> Option<String> + Send + Sync + 'static,
    ) -> Self {
        self.warning = Some(Arc::new(warning));
        self
    }

    pub fn name(&self) -> &'static str {
        self.name
    }

    /// Runs the probe, failing it when it takes longer than three seconds.
    pub async fn check(&self) -> Result<(), String> {
        match tokio::time::timeout(PROBE_TIMEOUT, (self.probe)()).await {
            Ok(result) => result,
            Err(_) => Err(format!("no answer within {PROBE_TIMEOUT:?}")),
        }
    }
}

#[derive(Clone)]
struct Ops {
    dependencies: Arc<[Dependency]>,
    metrics: Arc<Metrics>,
}

/// Wraps a lab's routes with the shared endpoints and behaviour:
/// `/healthz`, `/readyz` (probing each dependency), `/metrics`, the 64 KiB
/// body limit, request metrics and a JSON 404 for unknown paths.
pub fn service_router(
    routes: Router,
    dependencies: Vec<Dependency>,
    metrics: Arc<Metrics>,
) -> Router {
    let ops = Ops {
        dependencies: dependencies.into(),
        metrics: metrics.clone(),
    };
    let ops_routes = Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics_text))
        .with_state(ops);
    routes
        .merge(ops_routes)
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(metrics.layer())
        .layer(DefaultBodyLimit::max(BODY_LIMIT))
}

async fn healthz() -> &'static str {
    "ok\n"
}

#[derive(Serialize)]
struct Readiness {
    status: &'static str,
    checks: Vec<Check>,
}

#[derive(Serialize)]
struct Check {
    name: &'static str,
    ok: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    warning: Option<String>,
}

/// 200 when every dependency answers; 503 naming each one that does not.
async fn readyz(State(ops): State<Ops>) -> Response {
    let results = join_all(ops.dependencies.iter().map(Dependency::check)).await;
    let checks: Vec<Check> = ops
        .dependencies
        .iter()
        .zip(results)
        .map(|(dep, result)| Check {
            name: dep.name,
            ok: result.is_ok(),
            warning: dep.warning.as_ref().and_then(|warning| warning()),
            error: result.err(),
        })
        .collect();
    let failing: Vec<&str> = checks.iter().filter(|c| !c.ok).map(|c| c.name).collect();
    if failing.is_empty() {
        (
            StatusCode::OK,
            axum::Json(Readiness {
                status: "ready",
                checks,
            }),
        )
            .into_response()
    } else {
        tracing::warn!(?failing, "not ready");
        (
            StatusCode::SERVICE_UNAVAILABLE,
            axum::Json(Readiness {
                status: "unavailable",
                checks,
            }),
        )
            .into_response()
    }
}

async fn metrics_text(State(ops): State<Ops>) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        ops.metrics.encode(),
    )
        .into_response()
}

async fn not_found() -> ApiError {
    ApiError::not_found("no such route")
}

async fn method_not_allowed() -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        "this route does not accept that method",
    )
}

/// Serves `router` on `listener` until `shutdown` fires, then stops accepting
/// and lets in-flight requests finish. Speaks HTTP/1.1 and HTTP/2 cleartext
/// (prior knowledge) on the same port.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    axum::serve(Tuned(listener), router)
        .with_graceful_shutdown(shutdown.cancelled_owned())
        .await
}

/// The listener [`serve`] accepts on: a `TcpListener` whose connections
/// all get `TCP_NODELAY`. Nagle's algorithm holds small writes back waiting
/// for an ACK, which adds up to ~40 ms to a small response on some stacks;
/// latency labs turn it off.
pub struct Tuned(TcpListener);

impl axum::serve::Listener for Tuned {
    type Io = TcpStream;
    type Addr = std::net::SocketAddr;

    async fn accept(&mut self) -> (TcpStream, std::net::SocketAddr) {
        let (tcp, addr) = axum::serve::Listener::accept(&mut self.0).await;
        if let Err(err) = tcp.set_nodelay(true) {
            tracing::warn!(%err, "cannot set TCP_NODELAY");
        }
        (tcp, addr)
    }

    fn local_addr(&self) -> std::io::Result<std::net::SocketAddr> {
        self.0.local_addr()
    }
}

/// Like [`serve`], and hands every request `ConnectInfo<C>`, made by `C`
/// from its connection when it was accepted (chat keeps a handle on each
/// WebSocket's socket this way, to size its send buffer).
pub async fn serve_with_connect_info<C>(
    listener: TcpListener,
    router: Router,
    shutdown: CancellationToken,
) -> std::io::Result<()>
where
    C: for<'a> Connected<IncomingStream<'a, Tuned>> + Clone + Send + Sync + 'static,
{
    axum::serve(
        Tuned(listener),
        router.into_make_service_with_connect_info::<C>(),
    )
    .with_graceful_shutdown(shutdown.cancelled_owned())
    .await
}

/// Binds `addr`, saying which setting to change when the port is taken.
pub async fn bind(addr: &str, variable: &str) -> anyhow::Result<TcpListener> {
    use anyhow::Context;
    TcpListener::bind(addr).await.with_context(|| {
        format!(
            "cannot listen on {addr}; is another process using it? (set {variable} to change it)"
        )
    })
}
