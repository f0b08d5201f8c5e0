//! The orders API: where the change and its event are written together.
//!
//! `POST /orders` inserts the order and an `order.created` row into the
//! `outbox` table in one transaction, so either both exist or neither does.
//! Nothing talks to RabbitMQ here: the relay does that later, and a broker
//! outage cannot fail an order or lose its event.
//!
//! Each change also bumps the order's `version` under the order's row lock,
//! and its event carries that version as its `sequence`: the number the
//! consumer uses to apply one order's events in order, however the broker
//! delivers them.
//!
//! **Waking the relay.** With `OUTBOX_NOTIFY=on` (the default) the API
//! sends `NOTIFY outbox` itself, *after* its commits, from a task of its
//! own: one NOTIFY for however many orders committed while the previous one
//! was on its way. The obvious place, a trigger on the outbox insert
//! (`OUTBOX_NOTIFY=trigger`, kept to be measured), puts the NOTIFY inside
//! the business transaction, and Postgres serializes notifying commits: a
//! transaction that has notified holds a server-wide lock (every database
//! on it) from just before its commit until its commit record is on disk,
//! so concurrent orders flush the WAL one after another instead of sharing
//! a flush (group commit). `lab bench outbox` shows what that costs at 16 clients.
//! The NOTIFY goes on a connection of the API's own, whose session does
//! not wait for the disk at commit (`synchronous_commit = off`: the NOTIFY
//! transaction would hold that lock through a WAL flush). When it fails
//! (its connection broke: Postgres restarted, the session was ended), it is
//! sent once more at once on a new connection (both tries within 2 s).
//! The price of notifying after commit: an API that dies between its commit
//! and its NOTIFY leaves the relay to find the event at its next poll, which
//! is what a NOTIFY lost any other way (it is not durable) costs too.
//! Also rejected: a short poll and no NOTIFY: it wakes the relay promptly
//! only by querying all the time, and still adds half an interval to every
//! event.
//!
//! `?delivery=dual-write` is the naive alternative, kept to be watched
//! failing: commit the order, then publish straight to the broker. When the
//! publish fails (broker down, connection cut, confirm never arriving) the
//! order stays committed and its event is simply gone. The handler still
//! answers 201, as code that treats publishing as an afterthought does.

use std::sync::Arc;

use axum::{
    Router,
    extract::State,
    http::{HeaderMap, StatusCode},
    response::{IntoResponse, Response},
    routing::{get, post},
};
use chrono::{DateTime, SubsecRound, Utc};
use lab_core::{Json, Path, Query, metrics::Metrics, openapi::ErrorBody};
use lapin::{Channel, Connection, options::ConfirmSelectOptions};
use prometheus_client::metrics::{counter::Counter, family::Family};
use serde::{Deserialize, Serialize};
use sqlx::{PgConnection, PgPool, types::Json as Jsonb};
use tokio::{net::TcpListener, sync::mpsc};
use tokio_util::sync::CancellationToken;
use utoipa::{IntoParams, OpenApi, ToSchema};
use uuid::Uuid;

use crate::{
    Error, Notify, Result, Settings,
    events::{self, Event, ORDER_CANCELLED, ORDER_CREATED},
    invalid, pg_error,
};

/// How an order's events leave the service.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default, ToSchema)]
#[serde(rename_all = "kebab-case")]
pub enum Delivery {
    /// Event row in the same transaction; the relay publishes it.
    #[default]
    Outbox,
    /// Commit, then publish directly: the naive path.
    DualWrite,
}

impl Delivery {
    pub fn as_str(self) -> &'static str {
        match self {
            Delivery::Outbox => "outbox",
            Delivery::DualWrite => "dual-write",
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewOrder {
    /// 1–64 characters (surrounding blanks are trimmed).
    #[schema(min_length = 1, max_length = 64)]
    pub customer_id: String,
    /// 1–100 items.
    #[schema(min_items = 1, max_items = 100)]
    pub items: Vec<Item>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Item {
    #[schema(min_length = 1, max_length = 64)]
    pub sku: String,
    #[schema(minimum = 1, maximum = 10000)]
    pub quantity: i64,
    #[schema(minimum = 0, maximum = 100000000)]
    pub price_cents: i64,
}

#[derive(Debug, Clone, Serialize, Deserialize, sqlx::FromRow, ToSchema)]
pub struct Order {
    pub id: Uuid,
    pub customer_id: String,
    #[sqlx(json)]
    pub items: Vec<Item>,
    pub total_cents: i64,
    pub status: String,
    pub delivery: String,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

const MAX_ITEMS: usize = 100;
const MAX_QUANTITY: i64 = 10_000;
const MAX_PRICE_CENTS: i64 = 100_000_000;

/// Checks every rule and returns the order total.
pub fn validate(order: &NewOrder) -> Result<i64> {
    let customer = order.customer_id.trim();
    if customer.is_empty() || customer.chars().count() > 64 {
        return Err(invalid("customer_id", "must be 1 to 64 characters"));
    }
    // Postgres stores neither in text nor in jsonb a NUL character: refuse
    // it here, naming the field, rather than fail in SQL with a 500.
    if customer.contains('\0') {
        return Err(invalid("customer_id", "must not contain NUL characters"));
    }
    if order.items.is_empty() {
        return Err(invalid("items", "an order needs at least one item"));
    }
    if order.items.len() > MAX_ITEMS {
        return Err(invalid("items", format!("at most {MAX_ITEMS} items")));
    }
    let mut total: i64 = 0;
    for item in &order.items {
        if item.sku.trim().is_empty() || item.sku.chars().count() > 64 {
            return Err(invalid("items[].sku", "must be 1 to 64 characters"));
        }
        if item.sku.contains('\0') {
            return Err(invalid("items[].sku", "must not contain NUL characters"));
        }
        if !(1..=MAX_QUANTITY).contains(&item.quantity) {
            return Err(invalid(
                "items[].quantity",
                format!("must be between 1 and {MAX_QUANTITY}"),
            ));
        }
        if !(0..=MAX_PRICE_CENTS).contains(&item.price_cents) {
            return Err(invalid(
                "items[].price_cents",
                format!("must be between 0 and {MAX_PRICE_CENTS}"),
            ));
        }
        // Bounded above, so this cannot overflow: 100 × 10^4 × 10^8.
        total += item.quantity * item.price_cents;
    }
    Ok(total)
}

/// The orders side: a pool, and a broker connection for the naive path only.
#[derive(Clone)]
pub struct Orders {
    pool: PgPool,
    dual_writer: Arc<DualWriter>,
    counters: Counters,
    /// Set when the API, not a trigger, tells the relay about commits.
    nudge: Option<Nudge>,
}

#[derive(Clone, Default)]
struct Counters {
    /// Orders committed, by delivery path.
    committed: Family<PathLabel, Counter>,
    /// Dual-write publishes that failed after their order had committed.
    lost: Family<PathLabel, Counter>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, prometheus_client::encoding::EncodeLabelSet)]
struct PathLabel {
    delivery: &'static str,
}

impl Orders {
    /// Orders on `pool`, waking the relay as `settings.notify` says, and
    /// publishing the dual-write path's events to `settings.exchange`.
    pub fn new(pool: PgPool, amqp_url: String, settings: &Settings, metrics: &Metrics) -> Self {
        let counters = Counters::default();
        metrics.register(
            "orders_committed",
            "Orders committed, by delivery path",
            counters.committed.clone(),
        );
        metrics.register(
            "dual_write_publish_failures",
            "Events lost by the dual-write path: order committed, publish failed",
            counters.lost.clone(),
        );
        let pool = pool_for_writes(&pool, settings.notify);
        let nudge = (settings.notify == Notify::On).then(|| Nudge::spawn(pool.clone()));
        Self {
            pool,
            dual_writer: Arc::new(DualWriter::new(amqp_url, settings.exchange.clone())),
            counters,
            nudge,
        }
    }

    /// Tells the relay (without waiting) that an event committed.
    fn committed_an_event(&self) {
        if let Some(nudge) = &self.nudge {
            nudge.after_commit();
        }
    }

    /// Creates an order and its `order.created` event. With an idempotency
    /// key, a repeat of the same request returns the first order (and
    /// `true`) instead of creating another.
    pub async fn create(
        &self,
        new: NewOrder,
        delivery: Delivery,
        idempotency_key: Option<&str>,
    ) -> Result<(Order, bool)> {
        let total_cents = validate(&new)?;
        // Postgres keeps microseconds: the answer, its replay and the event
        // carry the time as stored, not the nanoseconds the clock gave.
        let now = Utc::now().trunc_subsecs(6);
        let order = Order {
            id: Uuid::now_v7(),
            customer_id: new.customer_id.trim().to_owned(),
            items: new.items.clone(),
            total_cents,
            status: "created".into(),
            delivery: delivery.as_str().into(),
            created_at: now,
            updated_at: now,
        };
        // An order's first version: the insert below takes the column's default, 1.
        let event = Event::new(ORDER_CREATED, order.id, 1, to_json(&order));
        let pg = |err| pg_error(&self.pool, err);

        let mut tx = self.pool.begin().await.map_err(pg)?;
        sqlx::query(
            "INSERT INTO orders (id, customer_id, items, total_cents, status, delivery, created_at, updated_at) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $7)",
        )
        .bind(order.id)
        .bind(&order.customer_id)
        .bind(Jsonb(&order.items))
        .bind(order.total_cents)
        .bind(&order.status)
        .bind(&order.delivery)
        .bind(now)
        .execute(&mut *tx)
        .await
        .map_err(pg)?;
        if delivery == Delivery::Outbox {
            insert_event(&mut tx, &event).await.map_err(pg)?;
        }
        if let Some(key) = idempotency_key {
            let request = serde_json::json!({"delivery": delivery, "order": new});
            // A concurrent request with the same key waits here until the
            // first one commits (or rolls back): the unique index decides.
            let stored = sqlx::query(
                "INSERT INTO idempotency_keys (key, request, order_id, response) \
                 VALUES ($1, $2, $3, $4) ON CONFLICT (key) DO NOTHING",
            )
            .bind(key)
            .bind(&request)
            .bind(order.id)
            .bind(to_json(&order))
            .execute(&mut *tx)
            .await
            .map_err(pg)?;
            if stored.rows_affected() == 0 {
                tx.rollback().await.map_err(pg)?;
                return self.replay(key, &request).await.map(|order| (order, true));
            }
        }
        tx.commit().await.map_err(pg)?;
        if delivery == Delivery::Outbox {
            self.committed_an_event();
        }
        self.counters
            .committed
            .get_or_create(&PathLabel {
                delivery: delivery.as_str(),
            })
            .inc();

        if delivery == Delivery::DualWrite {
            self.publish_directly(&event).await;
        }
        Ok((order, false))
    }

    /// The first response for `key`, if this request is the same request.
    async fn replay(&self, key: &str, request: &serde_json::Value) -> Result<Order> {
        let (stored_request, response): (serde_json::Value, Jsonb<Order>) =
            sqlx::query_as("SELECT request, response FROM idempotency_keys WHERE key = $1")
                .bind(key)
                .fetch_one(&self.pool)
                .await
                .map_err(|err| pg_error(&self.pool, err))?;
        if &stored_request != request {
            return Err(Error::Conflict(format!(
                "Idempotency-Key {key:?} was already used for a different request"
            )));
        }
        Ok(response.0)
    }

    /// Cancels a created order and records `order.cancelled` the same way
    /// the order's events have been travelling.
    pub async fn cancel(&self, id: Uuid) -> Result<Order> {
        let pg = |err| pg_error(&self.pool, err);
        let mut tx = self.pool.begin().await.map_err(pg)?;
        // The row lock makes this change, and the version it gives the
        // event, the only one in flight for this order.
        let current: Option<(String, i64)> =
            sqlx::query_as("SELECT status, version FROM orders WHERE id = $1 FOR UPDATE")
                .bind(id)
                .fetch_optional(&mut *tx)
                .await
                .map_err(pg)?;
        let version = match current {
            None => return Err(Error::NotFound(format!("no order {id}"))),
            Some((status, _)) if status == "cancelled" => {
                return Err(Error::Conflict(format!("order {id} is already cancelled")));
            }
            Some((_, version)) => version + 1,
        };
        let order: Order = sqlx::query_as(
            "UPDATE orders SET status = 'cancelled', version = $2, updated_at = now() \
             WHERE id = $1 RETURNING *",
        )
        .bind(id)
        .bind(version)
        .fetch_one(&mut *tx)
        .await
        .map_err(pg)?;
        let event = Event::new(ORDER_CANCELLED, order.id, version, to_json(&order));
        let dual_write = order.delivery == Delivery::DualWrite.as_str();
        if !dual_write {
            insert_event(&mut tx, &event).await.map_err(pg)?;
        }
        tx.commit().await.map_err(pg)?;
        if dual_write {
            self.publish_directly(&event).await;
        } else {
            self.committed_an_event();
        }
        Ok(order)
    }

    pub async fn get(&self, id: Uuid) -> Result<Order> {
        sqlx::query_as("SELECT * FROM orders WHERE id = $1")
            .bind(id)
            .fetch_optional(&self.pool)
            .await
            .map_err(|err| pg_error(&self.pool, err))?
            .ok_or_else(|| Error::NotFound(format!("no order {id}")))
    }

    /// The naive second write. A failure is logged and counted, and that is
    /// all: the order is committed, the event is lost.
    async fn publish_directly(&self, event: &Event) {
        if let Err(err) = self.dual_writer.publish(event).await {
            self.counters
                .lost
                .get_or_create(&PathLabel {
                    delivery: Delivery::DualWrite.as_str(),
                })
                .inc();
            tracing::warn!(
                order.id = %event.aggregate_id,
                event.id = %event.event_id,
                "dual write: order committed but its {} event was not published: {err}",
                event.event_type
            );
        }
    }
}

fn to_json(value: &impl Serialize) -> serde_json::Value {
    serde_json::to_value(value).expect("orders serialize to JSON")
}

async fn insert_event(tx: &mut sqlx::PgConnection, event: &Event) -> sqlx::Result<()> {
    sqlx::query(
        "INSERT INTO outbox (event_id, aggregate_id, event_type, payload) VALUES ($1, $2, $3, $4)",
    )
    .bind(event.event_id)
    .bind(event.aggregate_id)
    .bind(&event.event_type)
    .bind(to_json(event))
    .execute(tx)
    .await?;
    Ok(())
}

/// The dual-write path's broker connection: opened on first use, dropped on
/// the first failure, opened again by the next request.
struct DualWriter {
    amqp_url: String,
    exchange: String,
    link: tokio::sync::Mutex<Option<(Connection, Channel)>>,
}

impl DualWriter {
    fn new(amqp_url: String, exchange: String) -> Self {
        Self {
            amqp_url,
            exchange,
            link: tokio::sync::Mutex::new(None),
        }
    }

    async fn channel(&self) -> Result<Channel, String> {
        let mut link = self.link.lock().await;
        if let Some((connection, channel)) = link.as_ref()
            && connection.status().connected()
            && channel.status().connected()
        {
            return Ok(channel.clone());
        }
        use lab_core::amqp::bounded;
        let connection = lab_core::amqp::connect(&self.amqp_url, "outbox-api-dual-write").await?;
        let channel = bounded(connection.create_channel()).await?;
        bounded(channel.confirm_select(ConfirmSelectOptions::default())).await?;
        bounded(events::declare_exchange(&channel, &self.exchange)).await?;
        *link = Some((connection, channel.clone()));
        Ok(channel)
    }

    /// Publishes and waits for the broker's confirm: even done this
    /// carefully, a failure here comes after the commit, too late to undo it.
    async fn publish(&self, event: &Event) -> Result<(), String> {
        let channel = self.channel().await?;
        let body = serde_json::to_vec(event).expect("events serialize");
        let confirm = async {
            events::publish(
                &channel,
                &self.exchange,
                event.event_id,
                &event.event_type,
                event.aggregate_id,
                &body,
                false,
            )
            .await?
            .await
        };
        let outcome = tokio::time::timeout(lab_core::amqp::CONNECT_TIMEOUT, confirm).await;
        let failure = match outcome {
            Ok(Ok(confirmation)) if confirmation.is_ack() => return Ok(()),
            Ok(Ok(_)) => "the broker refused the message (nack)".to_owned(),
            Ok(Err(err)) => err.to_string(),
            Err(_) => "no publisher confirm within 3 s".to_owned(),
        };
        *self.link.lock().await = None;
        Err(failure)
    }
}

#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
struct CreateParams {
    /// `outbox` (the default: the event commits with the order) or
    /// `dual-write` (commit, then publish: the naive path that loses events).
    #[serde(default)]
    delivery: Delivery,
}

const IDEMPOTENCY_KEY: &str = "idempotency-key";

/// The `Idempotency-Key` header: 1 to 255 visible ASCII characters, given
/// once. Two keys on one request would leave it unclear which request this
/// is a retry of, so that is refused rather than one silently chosen.
fn idempotency_key(headers: &HeaderMap) -> Result<Option<&str>> {
    let mut values = headers.get_all(IDEMPOTENCY_KEY).iter();
    let Some(value) = values.next() else {
        return Ok(None);
    };
    if values.next().is_some() {
        return Err(invalid("Idempotency-Key", "must be given once"));
    }
    let visible = |key: &str| key.bytes().all(|b| b.is_ascii_graphic());
    match value.to_str() {
        Ok(key) if (1..=255).contains(&key.len()) && visible(key) => Ok(Some(key)),
        _ => Err(invalid(
            "Idempotency-Key",
            "must be 1 to 255 visible ASCII characters",
        )),
    }
}

/// Place an order; its `order.created` event goes out by the chosen path.
#[utoipa::path(
    post, path = "/orders", request_body = NewOrder,
    params(
        CreateParams,
        ("Idempotency-Key" = Option<String>, Header, description = "1–255 visible ASCII characters; a retry with the same key returns the first order"),
    ),
    responses(
        (status = 201, description = "Created (or, with `Idempotent-Replayed: true`, the order this key created before)", body = Order),
        (status = 400, body = ErrorBody), (status = 409, body = ErrorBody),
        (status = 413, body = ErrorBody), (status = 415, body = ErrorBody),
        (status = 422, body = ErrorBody),
        (status = 503, description = "Postgres is down", body = ErrorBody),
    )
)]
async fn create(
    State(app): State<Api>,
    Query(params): Query<CreateParams>,
    headers: HeaderMap,
    Json(new): Json<NewOrder>,
) -> Result<Response> {
    let key = idempotency_key(&headers)?;
    let (order, replayed) = app.orders.create(new, params.delivery, key).await?;
    let mut response = (StatusCode::CREATED, Json(order)).into_response();
    if replayed {
        response
            .headers_mut()
            .insert("idempotent-replayed", "true".parse().expect("valid header"));
    }
    Ok(response)
}

/// Cancel an order; its `order.cancelled` event goes out by the outbox.
#[utoipa::path(
    post, path = "/orders/{id}/cancel",
    params(("id" = Uuid, Path, description = "Order id")),
    responses(
        (status = 200, body = Order), (status = 404, body = ErrorBody),
        (status = 409, description = "Cancelled already", body = ErrorBody),
        (status = 422, body = ErrorBody),
        (status = 503, description = "Postgres is down", body = ErrorBody),
    )
)]
async fn cancel(State(app): State<Api>, Path(id): Path<Uuid>) -> Result<Json<Order>> {
    Ok(Json(app.orders.cancel(id).await?))
}

/// Read an order.
#[utoipa::path(
    get, path = "/orders/{id}",
    params(("id" = Uuid, Path, description = "Order id")),
    responses(
        (status = 200, body = Order), (status = 404, body = ErrorBody),
        (status = 422, body = ErrorBody),
        (status = 503, description = "Postgres is down", body = ErrorBody),
    )
)]
async fn get_order(State(app): State<Api>, Path(id): Path<Uuid>) -> Result<Json<Order>> {
    Ok(Json(app.orders.get(id).await?))
}

/// `GET /outbox/stats`: what the relay still has to do.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct OutboxStats {
    pub pending: i64,
    pub published: i64,
    pub oldest_pending_age_secs: Option<f64>,
    pub by_type: std::collections::BTreeMap<String, TypeStats>,
}

#[derive(Debug, Default, Serialize, Deserialize, ToSchema)]
pub struct TypeStats {
    pub pending: i64,
    pub published: i64,
}

pub async fn outbox_stats(pool: &PgPool) -> sqlx::Result<OutboxStats> {
    let rows: Vec<(String, i64, i64, Option<f64>)> = sqlx::query_as(
        "SELECT event_type, \
                count(*) FILTER (WHERE published_at IS NULL), \
                count(*) FILTER (WHERE published_at IS NOT NULL), \
                extract(epoch FROM now() - min(created_at) FILTER (WHERE published_at IS NULL))::float8 \
         FROM outbox GROUP BY event_type",
    )
    .fetch_all(pool)
    .await?;
    let mut stats = OutboxStats {
        pending: 0,
        published: 0,
        oldest_pending_age_secs: None,
        by_type: Default::default(),
    };
    for (event_type, pending, published, age) in rows {
        stats.pending += pending;
        stats.published += published;
        stats.oldest_pending_age_secs = match (stats.oldest_pending_age_secs, age) {
            (Some(a), Some(b)) => Some(a.max(b)),
            (a, b) => a.or(b),
        };
        stats
            .by_type
            .insert(event_type, TypeStats { pending, published });
    }
    Ok(stats)
}

/// Outbox rows pending and published, by event type.
#[utoipa::path(
    get, path = "/outbox/stats",
    responses(
        (status = 200, body = OutboxStats),
        (status = 503, description = "Postgres is down", body = ErrorBody),
    )
)]
async fn stats(State(app): State<Api>) -> Result<Json<OutboxStats>> {
    let pool = &app.orders.pool;
    Ok(Json(
        outbox_stats(pool).await.map_err(|e| pg_error(pool, e))?,
    ))
}

#[derive(Clone)]
struct Api {
    orders: Orders,
}

/// The orders API, as served at `GET /openapi.json`.
#[derive(OpenApi)]
#[openapi(
    info(
        title = "System Design Lab: outbox (orders API)",
        description = "Orders whose events reach RabbitMQ through a transactional outbox, or (?delivery=dual-write) through the naive dual write that loses them."
    ),
    paths(create, get_order, cancel, stats),
    components(schemas(Delivery, ErrorBody, lab_core::openapi::ErrorDetail))
)]
pub struct ApiDoc;

pub fn routes(orders: Orders) -> Router {
    let routes = Router::new()
        .route("/orders", post(create))
        .route("/orders/{id}", get(get_order))
        .route("/orders/{id}/cancel", post(cancel))
        .route("/outbox/stats", get(stats))
        .with_state(Api { orders });
    lab_core::openapi::with_docs(routes, ApiDoc::openapi())
}

/// Serves the orders API on a listener the caller bound (tests bind port 0).
pub async fn serve(
    listener: TcpListener,
    pool: PgPool,
    amqp_url: String,
    settings: Settings,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let metrics = Metrics::new("outbox_api");
    let orders = Orders::new(pool, amqp_url, &settings, &metrics);
    // Readiness asks on the orders' own pool: one pool of connections for
    // the API, not a second beside it.
    let ready = lab_core::postgres::dependency(orders.pool.clone());
    let router = lab_core::http::service_router(routes(orders), vec![ready], metrics);
    lab_core::http::serve(listener, router, shutdown).await?;
    Ok(())
}

/// Unless the outbox's trigger is to NOTIFY (`OUTBOX_NOTIFY=trigger`), the
/// API's connections tell it not to (a session setting the trigger reads):
/// a pool of their own, which [`serve`] uses for readiness too.
fn pool_for_writes(pool: &PgPool, notify: Notify) -> PgPool {
    match notify {
        Notify::Trigger => pool.clone(),
        Notify::On | Notify::Off => {
            let options = (*pool.connect_options())
                .clone()
                .options([("outbox.notify", "off")]);
            lab_core::postgres::pool(options)
        }
    }
}

/// Wakes the relay after commits: one `NOTIFY outbox` at a time, and one
/// more for whatever committed while it was on its way.
#[derive(Clone)]
struct Nudge(mpsc::Sender<()>);

impl Nudge {
    /// Starts the task that sends the NOTIFYs; it ends with the last
    /// `Orders` clone.
    fn spawn(pool: PgPool) -> Self {
        let (tx, mut rx) = mpsc::channel(1);
        tokio::spawn(async move {
            // A connection of its own: a NOTIFY never waits behind the API's
            // transactions for one.
            let mut connection = None;
            while rx.recv().await.is_some() {
                let sent = tokio::time::timeout(NUDGE_TIMEOUT, notify(&pool, &mut connection));
                if let Err(err) = sent.await.unwrap_or(Err(sqlx::Error::PoolTimedOut)) {
                    // Twice failed, or timed out: the relay's poll finds
                    // what this would have announced.
                    tracing::warn!(%err, "NOTIFY outbox not sent");
                    connection = None;
                }
            }
        });
        Self(tx)
    }

    /// A NOTIFY is already waiting to go: it covers this commit too.
    fn after_commit(&self) {
        let _ = self.0.try_send(());
    }
}

/// How long one NOTIFY may take, its second try included, before its
/// connection is given up.
const NUDGE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(2);

/// Sends the NOTIFY on the open connection, and if that fails (Postgres
/// restarted, or the session was ended), once more at once on a new one:
/// otherwise the commits it announces would wait for the relay's poll, as
/// nothing else may commit to send the next NOTIFY.
async fn notify(pool: &PgPool, connection: &mut Option<PgConnection>) -> sqlx::Result<()> {
    if let Some(open) = connection {
        match send_notify(open).await {
            Ok(()) => return Ok(()),
            Err(err) => {
                tracing::debug!(%err, "NOTIFY outbox failed; again on a new connection");
                *connection = None;
            }
        }
    }
    let mut fresh = pool.acquire().await?.detach();
    // A NOTIFY transaction holds Postgres's notify lock until its commit is
    // flushed: this one need not wait for the disk (a lost NOTIFY costs a
    // poll, and so does a Postgres crash), and so blocks no other committer.
    sqlx::query("SET synchronous_commit = off")
        .execute(&mut fresh)
        .await?;
    send_notify(connection.insert(fresh)).await
}

async fn send_notify(connection: &mut PgConnection) -> sqlx::Result<()> {
    sqlx::query("SELECT pg_notify('outbox', '')")
        .execute(connection)
        .await
        .map(drop)
}
