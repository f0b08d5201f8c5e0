//! Prometheus metrics, one registry per service instance.
//!
//! A registry passed down rather than a global one: tests run several
//! services in one process, and each must count only its own requests.
//! prometheus-client (the Prometheus project's Rust client) works that way.

use std::{
    sync::{Arc, Mutex},
    task::{Context, Poll},
    time::Instant,
};

use axum::{
    extract::MatchedPath,
    http::{Request, Response},
};
use futures::future::BoxFuture;
use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{
        counter::Counter,
        family::Family,
        histogram::{Histogram, exponential_buckets},
    },
    registry::{Metric, Registry},
};

/// A service's metrics registry. Labs register their own metrics next to the
/// HTTP ones with [`Metrics::register`].
pub struct Metrics {
    registry: Mutex<Registry>,
    http: HttpMetrics,
}

impl Metrics {
    /// A registry whose metric names start with `prefix_` (e.g. `catalog_`).
    pub fn new(prefix: &str) -> Arc<Self> {
        let mut registry = Registry::with_prefix(prefix);
        let http = HttpMetrics::default();
        registry.register(
            "http_requests",
            "Requests handled, by method, route and status",
            http.requests.clone(),
        );
        registry.register(
            "http_request_duration_seconds",
            "Time to the response head, by method and route",
            http.latency.clone(),
        );
        Arc::new(Self {
            registry: Mutex::new(registry),
            http,
        })
    }

    pub fn register(&self, name: &str, help: &str, metric: impl Metric) {
        self.registry
            .lock()
            .expect("metrics registry poisoned")
            .register(name, help, metric);
    }

    /// The OpenMetrics text exposition of every metric.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        let registry = self.registry.lock().expect("metrics registry poisoned");
        prometheus_client::encoding::text::encode(&mut out, &registry)
            .expect("writing to a String cannot fail");
        out
    }

    /// A tower layer counting requests and timing them on an axum router,
    /// labelled by route template (`/v1/products/{id}`); requests that match
    /// no route share the label `unmatched`, so scanners cannot grow the
    /// label set without bound.
    pub fn layer(&self) -> HttpMetricsLayer {
        HttpMetricsLayer {
            metrics: self.http.clone(),
            grpc: false,
        }
    }

    /// The same for a tonic server, labelled by gRPC method path
    /// (`/lab.catalog.v1.CatalogService/GetProduct`) and grpc-status code.
    /// A gRPC error travels in a response whose HTTP status is 200, so the
    /// HTTP status would hide every failure. tonic sends unary errors as
    /// "trailers-only" responses, with grpc-status in the head; a response
    /// whose head has none started out OK (a stream may still fail later).
    pub fn grpc_layer(&self) -> HttpMetricsLayer {
        HttpMetricsLayer {
            metrics: self.http.clone(),
            grpc: true,
        }
    }
}

/// The method as a label: one of the methods HTTP defines, or `other`. A
/// client may send any token as a method (`curl -X ZZMETH123`), and a label
/// taken as it comes would add a series, and its histogram buckets, per
/// request: /metrics would grow without bound.
fn method_label(method: &axum::http::Method) -> &'static str {
    use axum::http::Method;
    match *method {
        Method::GET => "GET",
        Method::HEAD => "HEAD",
        Method::POST => "POST",
        Method::PUT => "PUT",
        Method::PATCH => "PATCH",
        Method::DELETE => "DELETE",
        Method::OPTIONS => "OPTIONS",
        Method::CONNECT => "CONNECT",
        Method::TRACE => "TRACE",
        _ => "other",
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    method: String,
    route: String,
    /// The HTTP status, or for gRPC the grpc-status code (`0` is OK).
    status: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RouteLabels {
    method: String,
    route: String,
}

type LatencyFamily = Family<RouteLabels, Histogram, fn() -> Histogram>;

#[derive(Clone)]
struct HttpMetrics {
    requests: Family<RequestLabels, Counter>,
    latency: LatencyFamily,
}

impl Default for HttpMetrics {
    fn default() -> Self {
        fn histogram() -> Histogram {
            // 50 µs … ~1.6 s: loopback requests sit at the low end.
            Histogram::new(exponential_buckets(0.000_05, 2.0, 16))
        }
        Self {
            requests: Family::default(),
            latency: Family::new_with_constructor(histogram),
        }
    }
}

#[derive(Clone)]
pub struct HttpMetricsLayer {
    metrics: HttpMetrics,
    grpc: bool,
}

impl<S> tower::Layer<S> for HttpMetricsLayer {
    type Service = HttpMetricsService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        HttpMetricsService {
            inner,
            metrics: self.metrics.clone(),
            grpc: self.grpc,
        }
    }
}

#[derive(Clone)]
pub struct HttpMetricsService<S> {
    inner: S,
    metrics: HttpMetrics,
    grpc: bool,
}

impl<S, B, R> tower::Service<Request<B>> for HttpMetricsService<S>
where
    S: tower::Service<Request<B>, Response = Response<R>> + Clone + Send + 'static,
    S::Future: Send,
    B: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = BoxFuture<'static, Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        let route = match req.extensions().get::<MatchedPath>() {
            Some(path) => path.as_str().to_owned(),
            None if self.grpc => req.uri().path().to_owned(),
            None => "unmatched".to_owned(),
        };
        let grpc = self.grpc;
        let method = method_label(req.method()).to_owned();
        let metrics = self.metrics.clone();
        // The clone that was polled ready is the one that must be called.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        Box::pin(async move {
            let started = Instant::now();
            let response = inner.call(req).await?;
            let status = if grpc {
                let code = response
                    .headers()
                    .get("grpc-status")
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("0");
                code.to_owned()
            } else {
                response.status().as_str().to_owned()
            };
            // UNIMPLEMENTED: a path no service knows; do not give it a label of its own.
            let route = if grpc && status == "12" {
                "unmatched".to_owned()
            } else {
                route
            };
            let labels = RouteLabels { method, route };
            metrics
                .latency
                .get_or_create(&labels)
                .observe(started.elapsed().as_secs_f64());
            metrics
                .requests
                .get_or_create(&RequestLabels {
                    method: labels.method,
                    route: labels.route,
                    status,
                })
                .inc();
            Ok(response)
        })
    }
}

#[cfg(test)]
mod tests {
    use axum::{Router, body::Body, http::Request, routing::get};
    use tower::ServiceExt;

    use super::Metrics;

    fn series(text: &str) -> usize {
        text.lines().filter(|l| !l.starts_with('#')).count()
    }

    /// Any label a client controls must come from a bounded set: a made-up
    /// HTTP method per request must not add a series per request.
    #[tokio::test]
    async fn a_thousand_made_up_methods_add_a_bounded_number_of_series() {
        let metrics = Metrics::new("test");
        let router = Router::new()
            .route("/healthz", get(|| async { "ok" }))
            .layer(metrics.layer());
        let one = |method: String| {
            let router = router.clone();
            async move {
                let request = Request::builder()
                    .method(method.as_str())
                    .uri("/healthz")
                    .body(Body::empty())
                    .unwrap();
                router.oneshot(request).await.unwrap();
            }
        };
        one("GET".into()).await;
        let before = series(&metrics.encode());
        for i in 0..1000 {
            one(format!("ZZMETH{i}")).await;
        }
        let after = series(&metrics.encode());
        assert!(
            after - before < 40,
            "{before} series before, {after} after a thousand made-up methods"
        );
    }
}
