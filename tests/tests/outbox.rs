//! The outbox lab: a dual write loses events, the outbox loses none.
//!
//! Run one: `cargo test -p workshop --test outbox <name>`.
//! Each test gets a fresh database from `#[sqlx::test]` and its own exchange
//! and queues on the shared RabbitMQ; broker outages go through a proxy the
//! test cuts, and crashes are tasks aborted mid-flight.

use std::{collections::HashMap, time::Duration};

use futures::{StreamExt, future::join_all, stream};
use lab_core::proxy::Proxy;
use lapin::{
    BasicProperties,
    options::{
        BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, QueueBindOptions,
        QueueDeclareOptions,
    },
    types::FieldTable,
};
use reqwest::{Client, StatusCode};
use serde_json::{Value, json};
use sqlx::PgPool;
use uuid::Uuid;
use workshop::{OutboxTopology, Service, amqp_channel, amqp_url, closed_port, count, eventually};

fn order_body(customer: &str) -> Value {
    json!({"customer_id": customer, "items": [
        {"sku": "KB-1", "quantity": 2, "price_cents": 4999},
        {"sku": "MOUSE-7", "quantity": 1, "price_cents": 1999}
    ]})
}

async fn create_order(api: &Service, path: &str, body: &Value) -> (StatusCode, Value) {
    let response = Client::new()
        .post(api.url(path))
        .json(body)
        .send()
        .await
        .unwrap();
    (response.status(), response.json().await.unwrap())
}

async fn new_order(api: &Service, customer: &str) -> Uuid {
    let (status, body) = create_order(api, "/orders", &order_body(customer)).await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    body["id"].as_str().unwrap().parse().unwrap()
}

async fn wait_for_count(pool: &PgPool, sql: &'static str, want: i64, limit: Duration) {
    eventually(&format!("{sql} = {want}"), limit, || async {
        (count(pool, sql).await == want).then_some(())
    })
    .await;
}

/// Starts a consumer and waits until its queue exists (before that,
/// published events have nowhere to go).
async fn start_consumer(pool: &PgPool, amqp_url: &str, topology: &OutboxTopology) -> Service {
    let consumer = Service::consumer(pool.clone(), amqp_url, &topology.settings).await;
    eventually(
        "the consumer to connect",
        Duration::from_secs(10),
        || async {
            consumer.get_json("/stats").await["broker_connected"]
                .as_bool()
                .unwrap_or(false)
                .then_some(())
        },
    )
    .await;
    consumer
}

async fn relay_status(relay: &Service) -> Value {
    relay.get_json("/status").await
}

const NOTIFICATIONS: &str = "SELECT count(*) FROM notifications";
const PENDING: &str = "SELECT count(*) FROM outbox WHERE published_at IS NULL";

#[sqlx::test(migrator = "lab_core::postgres::MIGRATOR")]
async fn an_order_and_its_event_commit_together_or_not_at_all(pool: PgPool) {
    let topology = OutboxTopology::new();
    let api = Service::api(pool.clone(), &amqp_url(), &topology.settings).await;

    // A failure injected after the order row is written: the outbox insert
    // that follows it in the same transaction fails.
    sqlx::raw_sql(
        "CREATE FUNCTION refuse() RETURNS trigger LANGUAGE plpgsql AS \
           $$ BEGIN RAISE EXCEPTION 'outbox write refused by the test'; END $$; \
         CREATE TRIGGER refuse BEFORE INSERT ON outbox FOR EACH ROW EXECUTE FUNCTION refuse();",
    )
    .execute(&pool)
    .await
    .unwrap();
    let (status, body) = create_order(&api, "/orders", &order_body("c-1")).await;
    assert_eq!(status, StatusCode::INTERNAL_SERVER_ERROR, "{body}");
    assert_eq!(body["error"]["code"], "internal");
    assert_eq!(
        count(&pool, "SELECT count(*) FROM orders").await,
        0,
        "the order was rolled back with its event"
    );
    assert_eq!(count(&pool, "SELECT count(*) FROM outbox").await, 0);

    sqlx::raw_sql("DROP TRIGGER refuse ON outbox")
        .execute(&pool)
        .await
        .unwrap();
    let id = new_order(&api, "c-1").await;
    let (orders, events): (i64, i64) = sqlx::query_as(
        "SELECT (SELECT count(*) FROM orders WHERE id = $1), \
                (SELECT count(*) FROM outbox WHERE aggregate_id = $1 AND event_type = 'order.created')",
    )
    .bind(id)
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!((orders, events), (1, 1));
    api.stop().await.unwrap();
}

/// A queue of the test's own bound to every event on the exchange: it sees
/// exactly what the relay sends.
async fn probe_queue(channel: &lapin::Channel, exchange: &str) -> lapin::types::ShortString {
    outbox::events::declare_exchange(channel, exchange)
        .await
        .unwrap();
    let probe = channel
        .queue_declare(
            "".into(),
            QueueDeclareOptions {
                exclusive: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap();
    channel
        .queue_bind(
            probe.name().clone(),
            exchange.into(),
            "#".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    probe.name().clone()
}

/// Creates `n` orders and cancels each, all side by side.
async fn create_and_cancel(api: &Service, n: usize) -> Vec<Uuid> {
    join_all((0..n).map(|i| async move {
        let id = new_order(api, &format!("c-{i}")).await;
        let response = Client::new()
            .post(api.url(&format!("/orders/{id}/cancel")))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        id
    }))
    .await
}

/// Reads `n` events from `queue`, each with its event id as message id and
/// its type as routing key: (type, event id) by order, in arrival order.
async fn receive_events(
    channel: &lapin::Channel,
    queue: lapin::types::ShortString,
    n: usize,
) -> HashMap<Uuid, Vec<(String, Uuid)>> {
    let mut consumer = channel
        .basic_consume(
            queue,
            "".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    let mut seen: HashMap<Uuid, Vec<(String, Uuid)>> = HashMap::new();
    for _ in 0..n {
        let delivery = tokio::time::timeout(Duration::from_secs(10), consumer.next())
            .await
            .unwrap_or_else(|_| panic!("{n} events within 10 s"))
            .unwrap()
            .unwrap();
        let event: Value = serde_json::from_slice(&delivery.data).unwrap();
        assert_eq!(
            delivery.properties.message_id().as_ref().unwrap().as_str(),
            event["event_id"].as_str().unwrap(),
            "message_id is the event id"
        );
        assert_eq!(
            delivery.routing_key.as_str(),
            event["event_type"].as_str().unwrap()
        );
        let aggregate: Uuid = event["aggregate_id"].as_str().unwrap().parse().unwrap();
        seen.entry(aggregate).or_default().push((
            event["event_type"].as_str().unwrap().to_owned(),
            event["event_id"].as_str().unwrap().parse().unwrap(),
        ));
        delivery.ack(BasicAckOptions::default()).await.unwrap();
    }
    seen
}

#[sqlx::test(migrator = "lab_core::postgres::MIGRATOR")]
async fn the_relay_publishes_each_orders_events_in_id_order(pool: PgPool) {
    let topology = OutboxTopology::new();
    let amqp = amqp_url();
    let channel = amqp_channel().await;
    let probe = probe_queue(&channel, &topology.settings.exchange).await;
    let api = Service::api(pool.clone(), &amqp, &topology.settings).await;
    let relay = Service::relay(pool.clone(), &amqp, &topology.settings).await;

    // Twenty orders created and cancelled side by side, while the relay runs.
    let ids = create_and_cancel(&api, 20).await;

    let seen = receive_events(&channel, probe, 40).await;
    for id in ids {
        let events = &seen[&id];
        let types: Vec<&str> = events.iter().map(|(t, _)| t.as_str()).collect();
        assert_eq!(types, ["order.created", "order.cancelled"], "order {id}");
        let outbox_order: Vec<Uuid> =
            sqlx::query_scalar("SELECT event_id FROM outbox WHERE aggregate_id = $1 ORDER BY id")
                .bind(id)
                .fetch_all(&pool)
                .await
                .unwrap();
        let published: Vec<Uuid> = events.iter().map(|(_, e)| *e).collect();
        assert_eq!(published, outbox_order, "order {id}: published in id order");
    }
    wait_for_count(&pool, PENDING, 0, Duration::from_secs(5)).await;
    relay.stop().await.unwrap();
    api.stop().await.unwrap();
}

#[sqlx::test(migrator = "lab_core::postgres::MIGRATOR")]
async fn a_relay_killed_between_publish_and_mark_is_redelivered_and_suppressed(pool: PgPool) {
    let topology = OutboxTopology::new();
    let amqp = amqp_url();
    let api = Service::api(pool.clone(), &amqp, &topology.settings).await;
    for i in 0..3 {
        new_order(&api, &format!("c-{i}")).await;
    }
    let consumer = start_consumer(&pool, &amqp, &topology).await;

    // SHARE mode lets the relay SELECT … FOR UPDATE its batch but blocks its
    // UPDATE … SET published_at: it publishes, gets confirms, then hangs
    // before marking anything.
    let mut blocker = pool.begin().await.unwrap();
    sqlx::query("LOCK TABLE outbox IN SHARE MODE")
        .execute(&mut *blocker)
        .await
        .unwrap();
    let first = Service::relay(pool.clone(), &amqp, &topology.settings).await;
    wait_for_count(&pool, NOTIFICATIONS, 3, Duration::from_secs(10)).await;
    assert_eq!(
        count(&pool, PENDING).await,
        3,
        "published, confirmed, not yet marked"
    );

    first.kill();
    blocker.commit().await.unwrap();
    let second = Service::relay(pool.clone(), &amqp, &topology.settings).await;
    wait_for_count(&pool, PENDING, 0, Duration::from_secs(10)).await;
    eventually(
        "three suppressed duplicates",
        Duration::from_secs(10),
        || async {
            (consumer.get_json("/stats").await["duplicates_suppressed"] == 3).then_some(())
        },
    )
    .await;
    assert_eq!(
        count(&pool, NOTIFICATIONS).await,
        3,
        "one notification per event"
    );
    assert_eq!(
        count(&pool, "SELECT count(*) FROM processed_events").await,
        3
    );
    second.stop().await.unwrap();
    consumer.stop().await.unwrap();
    api.stop().await.unwrap();
}

#[sqlx::test(migrator = "lab_core::postgres::MIGRATOR")]
async fn a_broker_outage_mid_stream_of_5000_events_ends_with_each_handled_once(pool: PgPool) {
    const EVENTS: i64 = 5000;
    let topology = OutboxTopology::new();
    let amqp = amqp_url();
    let proxy = Proxy::start(&lab_core::amqp::where_is(&amqp))
        .await
        .unwrap();
    let via_proxy = proxy.url("amqp");
    // Orders go straight to Postgres; relay and consumer reach RabbitMQ through the proxy.
    let api = Service::api(pool.clone(), &amqp, &topology.settings).await;
    let consumer = start_consumer(&pool, &via_proxy, &topology).await;
    let relay = Service::relay(pool.clone(), &via_proxy, &topology.settings).await;

    let producer = {
        let base = api.url("");
        tokio::spawn(async move {
            let http = Client::new();
            stream::iter(0..EVENTS)
                .for_each_concurrent(16, |i| {
                    let (http, base) = (http.clone(), base.clone());
                    async move {
                        let response = http
                            .post(format!("{base}/orders"))
                            .json(&order_body(&format!("c-{}", i % 100)))
                            .send()
                            .await
                            .unwrap();
                        assert_eq!(response.status(), StatusCode::CREATED);
                    }
                })
                .await;
        })
    };
    eventually(
        "a quarter of the events handled",
        Duration::from_secs(60),
        || async { (count(&pool, NOTIFICATIONS).await >= EVENTS / 4).then_some(()) },
    )
    .await;
    proxy.cut();
    eventually(
        "the relay to see the outage",
        Duration::from_secs(5),
        || async { (relay_status(&relay).await["broker_connected"] == false).then_some(()) },
    )
    .await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let during_outage = count(&pool, NOTIFICATIONS).await;
    proxy.restore();
    producer.await.unwrap();

    wait_for_count(&pool, NOTIFICATIONS, EVENTS, Duration::from_secs(120)).await;
    assert!(during_outage < EVENTS, "the outage began mid-stream");
    assert_eq!(count(&pool, "SELECT count(*) FROM orders").await, EVENTS);
    assert_eq!(
        count(&pool, "SELECT count(*) FROM processed_events").await,
        EVENTS
    );
    assert_eq!(
        count(&pool, "SELECT count(DISTINCT order_id) FROM notifications").await,
        EVENTS
    );
    wait_for_count(&pool, PENDING, 0, Duration::from_secs(10)).await;
    relay.stop().await.unwrap();
    consumer.stop().await.unwrap();
    api.stop().await.unwrap();
}

#[sqlx::test(migrator = "lab_core::postgres::MIGRATOR")]
async fn two_relays_one_publishes_and_the_standby_takes_over_when_it_dies(pool: PgPool) {
    let topology = OutboxTopology::new();
    let amqp = amqp_url();
    let api = Service::api(pool.clone(), &amqp, &topology.settings).await;
    let consumer = start_consumer(&pool, &amqp, &topology).await;
    let first = Service::relay(pool.clone(), &amqp, &topology.settings).await;
    eventually(
        "the first relay to lead",
        Duration::from_secs(10),
        || async { (relay_status(&first).await["leader"] == true).then_some(()) },
    )
    .await;
    let second = Service::relay(pool.clone(), &amqp, &topology.settings).await;

    for i in 0..100 {
        new_order(&api, &format!("c-{i}")).await;
    }
    wait_for_count(&pool, NOTIFICATIONS, 100, Duration::from_secs(20)).await;
    let (a, b) = (relay_status(&first).await, relay_status(&second).await);
    assert_eq!(
        (a["leader"].clone(), b["leader"].clone()),
        (json!(true), json!(false))
    );
    assert_eq!(
        (a["published"].clone(), b["published"].clone()),
        (json!(100), json!(0))
    );

    first.kill();
    eventually(
        "the standby to take the lead",
        Duration::from_secs(10),
        || async { (relay_status(&second).await["leader"] == true).then_some(()) },
    )
    .await;
    for i in 100..200 {
        new_order(&api, &format!("c-{i}")).await;
    }
    wait_for_count(&pool, NOTIFICATIONS, 200, Duration::from_secs(20)).await;
    wait_for_count(&pool, PENDING, 0, Duration::from_secs(10)).await;
    assert!(relay_status(&second).await["published"].as_u64().unwrap() >= 100);
    assert_eq!(
        count(&pool, "SELECT count(DISTINCT order_id) FROM notifications").await,
        200
    );
    second.stop().await.unwrap();
    consumer.stop().await.unwrap();
    api.stop().await.unwrap();
}

#[sqlx::test(migrator = "lab_core::postgres::MIGRATOR")]
async fn a_poison_message_goes_to_the_dead_letter_queue_and_later_ones_still_flow(pool: PgPool) {
    let topology = OutboxTopology::new();
    let amqp = amqp_url();
    let consumer = start_consumer(&pool, &amqp, &topology).await;
    let channel = amqp_channel().await;
    let exchange = topology.settings.exchange.as_str();
    let unknown = json!({"event_id": Uuid::now_v7(), "event_type": "order.shipped",
        "aggregate_id": Uuid::now_v7(), "occurred_at": "2026-11-23T10:00:00Z", "data": {}});
    for (key, body) in [
        ("order.created", b"{not json".to_vec()),
        ("order.shipped", serde_json::to_vec(&unknown).unwrap()),
    ] {
        channel
            .basic_publish(
                exchange.into(),
                key.into(),
                BasicPublishOptions::default(),
                &body,
                BasicProperties::default(),
            )
            .await
            .unwrap();
    }

    let api = Service::api(pool.clone(), &amqp, &topology.settings).await;
    let relay = Service::relay(pool.clone(), &amqp, &topology.settings).await;
    let id = new_order(&api, "c-after-the-poison").await;
    let notes = eventually(
        "the later order's notification",
        Duration::from_secs(10),
        || async {
            let notes = consumer
                .get_json(&format!("/notifications?order_id={id}"))
                .await;
            (notes.as_array().unwrap().len() == 1).then_some(notes)
        },
    )
    .await;
    assert_eq!(notes[0]["event_type"], "order.created");

    let dlq = outbox::events::dead_letter_queue(&topology.settings.queue);
    let dead = eventually("two dead letters", Duration::from_secs(10), || async {
        let queue = channel
            .queue_declare(
                dlq.as_str().into(),
                QueueDeclareOptions {
                    passive: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await
            .unwrap();
        (queue.message_count() == 2).then_some(queue.message_count())
    })
    .await;
    assert_eq!(dead, 2);
    let stats = consumer.get_json("/stats").await;
    assert_eq!(
        (stats["dead_lettered"].clone(), stats["handled"].clone()),
        (json!(2), json!(1))
    );
    relay.stop().await.unwrap();
    consumer.stop().await.unwrap();
    api.stop().await.unwrap();
}

#[sqlx::test(migrator = "lab_core::postgres::MIGRATOR")]
async fn the_same_idempotency_key_twice_creates_one_order(pool: PgPool) {
    let topology = OutboxTopology::new();
    let api = Service::api(pool.clone(), &amqp_url(), &topology.settings).await;
    let http = Client::new();
    let post = |key: &'static str, body: Value| {
        http.post(api.url("/orders"))
            .header("Idempotency-Key", key)
            .json(&body)
            .send()
    };

    let first = post("retry-1", order_body("c-1")).await.unwrap();
    assert_eq!(first.status(), StatusCode::CREATED);
    assert!(first.headers().get("idempotent-replayed").is_none());
    let first: Value = first.json().await.unwrap();
    let again = post("retry-1", order_body("c-1")).await.unwrap();
    assert_eq!(again.status(), StatusCode::CREATED);
    assert_eq!(again.headers()["idempotent-replayed"], "true");
    assert_eq!(
        again.json::<Value>().await.unwrap(),
        first,
        "the first response, replayed"
    );

    let other = post("retry-1", order_body("someone-else")).await.unwrap();
    assert_eq!(other.status(), StatusCode::CONFLICT);

    // Ten at once with one key: the unique index lets one through.
    let racing = join_all((0..10).map(|_| post("retry-2", order_body("c-2")))).await;
    let ids: std::collections::HashSet<String> = join_all(racing.into_iter().map(|r| async {
        let r = r.unwrap();
        assert_eq!(r.status(), StatusCode::CREATED);
        r.json::<Value>().await.unwrap()["id"]
            .as_str()
            .unwrap()
            .to_owned()
    }))
    .await
    .into_iter()
    .collect();
    assert_eq!(ids.len(), 1, "{ids:?}");
    assert_eq!(count(&pool, "SELECT count(*) FROM orders").await, 2);
    assert_eq!(
        count(&pool, "SELECT count(*) FROM outbox").await,
        2,
        "one event per order"
    );
    api.stop().await.unwrap();
}

#[sqlx::test(migrator = "lab_core::postgres::MIGRATOR")]
async fn chaos_dual_write_loses_events_the_outbox_loses_none(pool: PgPool) {
    let topology = OutboxTopology::new();
    let scenario = outbox::chaos::Scenario {
        orders: 600,
        rate: 200.0,
        cuts: 2,
        outage: Duration::from_millis(700),
        settle_timeout: Duration::from_secs(60),
    };
    let report = outbox::chaos::run(
        pool,
        &amqp_url(),
        topology.settings.clone(),
        scenario,
        |_| {},
    )
    .await
    .unwrap();
    let (dual, outbox) = (report.path("dual-write"), report.path("outbox"));
    assert_eq!(report.failed_requests, 0);
    assert_eq!((dual.committed, outbox.committed), (300, 300));
    assert!(
        dual.lost > 0,
        "the dual write lost nothing under two cuts: {report:?}"
    );
    assert_eq!(outbox.lost, 0, "{report:?}");
    assert_eq!(outbox.delivered, 300);
}

#[sqlx::test(migrator = "lab_core::postgres::MIGRATOR")]
async fn bad_orders_get_the_documented_errors(pool: PgPool) {
    let topology = OutboxTopology::new();
    let api = Service::api(pool.clone(), &amqp_url(), &topology.settings).await;
    let item = |quantity: i64| json!({"sku": "A", "quantity": quantity, "price_cents": 100});
    let cases = [
        ("/orders", json!({"customer_id": "c", "items": []}), "items"),
        (
            "/orders",
            json!({"customer_id": "c", "items": [item(0)]}),
            "quantity",
        ),
        (
            "/orders",
            json!({"customer_id": "c", "items": [item(-3)]}),
            "quantity",
        ),
        (
            "/orders",
            json!({"customer_id": "", "items": [item(1)]}),
            "customer_id",
        ),
        (
            "/orders",
            json!({"customer_id": "c", "items": [item(1)], "coupon": "X"}),
            "coupon",
        ),
        (
            "/orders",
            json!({"customer_id": "c", "items": [{"sku": "A", "quantity": 1}]}),
            "price_cents",
        ),
        (
            "/orders?delivery=carrier-pigeon",
            order_body("c"),
            "delivery",
        ),
        // Postgres cannot store NUL in text or jsonb: refused up front, not a 500.
        (
            "/orders",
            json!({"customer_id": "a\u{0}b", "items": [item(1)]}),
            "customer_id",
        ),
        (
            "/orders",
            json!({"customer_id": "c", "items": [{"sku": "A\u{0}", "quantity": 1, "price_cents": 1}]}),
            "items[].sku",
        ),
    ];
    // Every case is refused with 422, naming what is wrong.
    for (path, body, names) in cases {
        let (got, error) = create_order(&api, path, &body).await;
        assert_eq!(got, StatusCode::UNPROCESSABLE_ENTITY, "{body}: {error}");
        let message = error["error"]["message"].as_str().unwrap();
        assert!(message.contains(names), "{body}: {message}");
    }
    let http = Client::new();
    let malformed = http
        .post(api.url("/orders"))
        .header("content-type", "application/json")
        .body("{\"customer_id\":")
        .send()
        .await
        .unwrap();
    assert_eq!(malformed.status(), StatusCode::BAD_REQUEST);
    let huge = json!({"customer_id": "c", "items": [{"sku": "x".repeat(70_000), "quantity": 1, "price_cents": 1}]});
    let (status, error) = create_order(&api, "/orders", &huge).await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE, "{error}");
    assert_eq!(count(&pool, "SELECT count(*) FROM orders").await, 0);
    api.stop().await.unwrap();
}

#[sqlx::test(migrator = "lab_core::postgres::MIGRATOR")]
async fn cancel_records_its_event_and_refuses_twice(pool: PgPool) {
    let topology = OutboxTopology::new();
    let amqp = amqp_url();
    let api = Service::api(pool.clone(), &amqp, &topology.settings).await;
    let consumer = start_consumer(&pool, &amqp, &topology).await;
    let relay = Service::relay(pool.clone(), &amqp, &topology.settings).await;
    let id = new_order(&api, "c-1").await;
    let http = Client::new();
    let cancel = || http.post(api.url(&format!("/orders/{id}/cancel"))).send();
    let first = cancel().await.unwrap();
    assert_eq!(first.status(), StatusCode::OK);
    assert_eq!(first.json::<Value>().await.unwrap()["status"], "cancelled");
    assert_eq!(cancel().await.unwrap().status(), StatusCode::CONFLICT);
    let missing = http
        .post(api.url(&format!("/orders/{}/cancel", Uuid::now_v7())))
        .send()
        .await
        .unwrap();
    assert_eq!(missing.status(), StatusCode::NOT_FOUND);
    assert_eq!(
        api.get_json(&format!("/orders/{id}")).await["status"],
        "cancelled"
    );

    let notes = eventually("both notifications", Duration::from_secs(10), || async {
        let notes = consumer
            .get_json(&format!("/notifications?order_id={id}"))
            .await;
        (notes.as_array().unwrap().len() == 2).then_some(notes)
    })
    .await;
    assert_eq!(notes[0]["event_type"], "order.created");
    assert_eq!(notes[1]["event_type"], "order.cancelled");
    let stats = eventually("the outbox drained", Duration::from_secs(5), || async {
        let stats = api.get_json("/outbox/stats").await;
        (stats["pending"] == 0).then_some(stats)
    })
    .await;
    assert_eq!(stats["published"], 2);
    assert_eq!(stats["by_type"]["order.cancelled"]["published"], 1);
    relay.stop().await.unwrap();
    consumer.stop().await.unwrap();
    api.stop().await.unwrap();
}

#[sqlx::test(migrator = "lab_core::postgres::MIGRATOR")]
async fn readyz_names_rabbitmq_when_the_broker_is_unreachable(pool: PgPool) {
    let topology = OutboxTopology::new();
    let nowhere = format!("amqp://guest:secret@127.0.0.1:{}/%2f", closed_port().await);
    let relay = Service::relay(pool.clone(), &nowhere, &topology.settings).await;
    let response = reqwest::get(relay.url("/readyz")).await.unwrap();
    assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
    let body: Value = response.json().await.unwrap();
    let rabbit = body["checks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "rabbitmq")
        .unwrap()
        .clone();
    assert_eq!(rabbit["ok"], false);
    let message = rabbit["error"].as_str().unwrap();
    assert!(
        message.contains("RabbitMQ is not reachable at 127.0.0.1:"),
        "{message}"
    );
    assert!(!message.contains("secret"), "{message}");
    // Orders still commit: the outbox path does not need the broker.
    let api = Service::api(pool.clone(), &nowhere, &topology.settings).await;
    new_order(&api, "c-1").await;
    assert_eq!(count(&pool, PENDING).await, 1);
    relay.stop().await.unwrap();
    api.stop().await.unwrap();
}

#[sqlx::test(migrator = "lab_core::postgres::MIGRATOR")]
async fn an_idle_relay_notices_a_lost_broker_and_reconnects(pool: PgPool) {
    let topology = OutboxTopology::new();
    let proxy = Proxy::start(&lab_core::amqp::where_is(&amqp_url()))
        .await
        .unwrap();
    let relay = Service::relay(pool.clone(), &proxy.url("amqp"), &topology.settings).await;
    let connected = || async { relay_status(&relay).await["broker_connected"].clone() };
    eventually("the relay to connect", Duration::from_secs(10), || async {
        (connected().await == true).then_some(())
    })
    .await;
    // Nothing to publish: only listening to the connection can tell.
    proxy.cut();
    eventually(
        "the idle relay to see the outage",
        Duration::from_secs(5),
        || async { (connected().await == false).then_some(()) },
    )
    .await;
    proxy.restore();
    eventually(
        "the relay to reconnect",
        Duration::from_secs(15),
        || async { (connected().await == true).then_some(()) },
    )
    .await;
    relay.stop().await.unwrap();
}

#[sqlx::test(migrator = "lab_core::postgres::MIGRATOR")]
async fn a_relay_batch_size_below_one_is_refused_at_start(pool: PgPool) {
    // A batch of 0 would select nothing forever: the relay would spin
    // without publishing. It must not start.
    let topology = OutboxTopology::new();
    let settings = outbox::Settings {
        relay_batch_size: 0,
        ..topology.settings.clone()
    };
    let serve = |listener| outbox::relay::serve(listener, pool, amqp_url(), settings, stopped());
    refused_at_start("the relay", serve, "RELAY_BATCH_SIZE").await;
}

/// A token nobody cancels: the part under test is to stop by itself.
fn stopped() -> tokio_util::sync::CancellationToken {
    tokio_util::sync::CancellationToken::new()
}

/// Starts a part of the lab on a free port and expects it to refuse at
/// once, with an error that names `variable`.
async fn refused_at_start<F, Fut>(part: &str, start: F, variable: &str)
where
    F: FnOnce(tokio::net::TcpListener) -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<()>>,
{
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let started = tokio::time::timeout(Duration::from_secs(10), start(listener))
        .await
        .unwrap_or_else(|_| panic!("{part} must refuse at once, not run"));
    let err = started.expect_err("a setting out of range must be refused");
    assert!(format!("{err:#}").contains(variable), "{part}: {err:#}");
}

/// Settings for relays that fail over quickly: a two-second lease.
fn short_lease(topology: &OutboxTopology) -> outbox::Settings {
    outbox::Settings {
        relay_lease_ttl_ms: 2000,
        ..topology.settings.clone()
    }
}

/// Starts a relay and waits until it says it leads.
async fn leading_relay(pool: PgPool, amqp: &str, settings: &outbox::Settings) -> Service {
    let relay = Service::relay(pool, amqp, settings).await;
    eventually("the relay to lead", Duration::from_secs(10), || async {
        (relay_status(&relay).await["leader"] == true).then_some(())
    })
    .await;
    relay
}

/// Places an order and waits for the consumer's notification of it.
async fn an_order_gets_through(api: &Service, consumer: &Service, limit: Duration) {
    let id = new_order(api, "c-after").await;
    eventually("an order placed now to be handled", limit, || async {
        let notes = consumer
            .get_json(&format!("/notifications?order_id={id}"))
            .await;
        (notes.as_array().unwrap().len() == 1).then_some(())
    })
    .await;
}

// The lease: a standby takes over RELAY_LEASE_TTL_MS + RELAY_LEASE_RETRY_MS
// (here 2.2 s) after the leader's session last spoke, and a leader that
// cannot reach Postgres steps down after half the TTL. The polls allow 15 s
// for a loaded machine; without the lease, Postgres keeps a silent session,
// and its lock, until TCP gives up on it (about two hours by default).
const FAILOVER_LIMIT: Duration = Duration::from_secs(15);

/// Two relays sharing a short lease, the first leading through `proxy` to
/// Postgres, the second a standby on a direct connection.
async fn relays_behind(
    pool: &PgPool,
    proxy: &Proxy,
    settings: &outbox::Settings,
) -> (Service, Service) {
    let amqp = amqp_url();
    let through = workshop::outbox::pool_through(pool, proxy);
    let first = leading_relay(through, &amqp, settings).await;
    let second = Service::relay(pool.clone(), &amqp, settings).await;
    (first, second)
}

#[sqlx::test(migrator = "lab_core::postgres::MIGRATOR")]
async fn a_standby_leads_within_the_lease_when_the_leaders_link_goes_silent(pool: PgPool) {
    let topology = OutboxTopology::new();
    let settings = short_lease(&topology);
    let amqp = amqp_url();
    let proxy = Proxy::start(&workshop::outbox::postgres_addr(&pool))
        .await
        .unwrap();
    let api = Service::api(pool.clone(), &amqp, &settings).await;
    let consumer = start_consumer(&pool, &amqp, &topology).await;
    let (first, second) = relays_behind(&pool, &proxy, &settings).await;

    // Packets vanish and nobody is told: the proxy keeps both ends of each
    // open connection and passes nothing, as a dropped NAT entry or a pulled
    // cable would (`hold`, never released, is a silence that keeps the
    // sockets open; new connections still pass).
    proxy.hold();
    eventually("the silent leader to step down", FAILOVER_LIMIT, || async {
        (relay_status(&first).await["leader"] == false).then_some(())
    })
    .await;
    // Then its host dies. Postgres still hears nothing (the proxy holds even
    // the goodbye): the session, and the lock, stay until someone ends them.
    first.kill();
    eventually("the standby to lead", FAILOVER_LIMIT, || async {
        (relay_status(&second).await["leader"] == true).then_some(())
    })
    .await;
    an_order_gets_through(&api, &consumer, FAILOVER_LIMIT).await;
    second.stop().await.unwrap();
    consumer.stop().await.unwrap();
    api.stop().await.unwrap();
}

#[sqlx::test(migrator = "lab_core::postgres::MIGRATOR")]
async fn a_leader_cut_off_by_silence_steps_down_and_delivery_resumes(pool: PgPool) {
    let topology = OutboxTopology::new();
    let settings = short_lease(&topology);
    let amqp = amqp_url();
    let proxy = Proxy::start(&workshop::outbox::postgres_addr(&pool))
        .await
        .unwrap();
    let api = Service::api(pool.clone(), &amqp, &settings).await;
    let consumer = start_consumer(&pool, &amqp, &topology).await;
    let (first, second) = relays_behind(&pool, &proxy, &settings).await;

    // A partition the leader survives: its open sessions go silent, new
    // ones pass, so either relay may lead next. What matters is that one
    // does, on a live session, and events flow.
    proxy.hold();
    eventually("the silent leader to step down", FAILOVER_LIMIT, || async {
        (relay_status(&first).await["leader"] == false).then_some(())
    })
    .await;
    an_order_gets_through(&api, &consumer, FAILOVER_LIMIT).await;
    eventually("exactly one leader", FAILOVER_LIMIT, || async {
        let (a, b) = (relay_status(&first).await, relay_status(&second).await);
        let leaders = [a, b].iter().filter(|s| s["leader"] == true).count();
        (leaders == 1).then_some(())
    })
    .await;
    first.stop().await.unwrap();
    second.stop().await.unwrap();
    consumer.stop().await.unwrap();
    api.stop().await.unwrap();
}

/// Waits for both of an order's notifications and returns their event types
/// in the order the consumer applied them.
async fn applied_in_order(consumer: &Service, id: Uuid) -> Vec<String> {
    let notes = eventually("both notifications", Duration::from_secs(30), || async {
        let notes = consumer
            .get_json(&format!("/notifications?order_id={id}"))
            .await;
        (notes.as_array().unwrap().len() == 2).then_some(notes)
    })
    .await;
    let types = notes.as_array().unwrap().iter();
    types
        .map(|n| n["event_type"].as_str().unwrap().to_owned())
        .collect()
}

/// Routes `key` from the relay's exchange to the consumer's.
async fn route(channel: &lapin::Channel, from: &str, to: &str, key: &str) {
    channel
        .exchange_bind(
            to.into(),
            from.into(),
            key.into(),
            lapin::options::ExchangeBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
}

#[sqlx::test(migrator = "lab_core::postgres::MIGRATOR")]
async fn an_event_the_broker_returns_is_still_applied_before_its_successor(pool: PgPool) {
    // The relay publishes to an exchange of its own, and only what the test
    // routes across reaches the consumer's: one event type can be made
    // unroutable while the next one of the same order gets through.
    let (relay_side, consumer_side) = (OutboxTopology::new(), OutboxTopology::new());
    let (from, to) = (
        relay_side.settings.exchange.as_str(),
        consumer_side.settings.exchange.as_str(),
    );
    let amqp = amqp_url();
    let channel = amqp_channel().await;
    outbox::events::declare_exchange(&channel, from)
        .await
        .unwrap();
    let probe = probe_queue(&channel, to).await;
    route(&channel, from, to, "order.cancelled").await;
    let consumer = start_consumer(&pool, &amqp, &consumer_side).await;
    let api = Service::api(pool.clone(), &amqp, &consumer_side.settings).await;
    let id = create_and_cancel(&api, 1).await[0];

    // One batch: order.created comes back unroutable, order.cancelled is
    // confirmed and delivered. The relay marks neither and tries again.
    let relay = Service::relay(pool.clone(), &amqp, &relay_side.settings).await;
    let seen = receive_events(&channel, probe, 1).await;
    assert_eq!(
        seen[&id][0].0, "order.cancelled",
        "the successor went first"
    );
    route(&channel, from, to, "order.created").await;

    let applied = applied_in_order(&consumer, id).await;
    assert_eq!(applied, ["order.created", "order.cancelled"]);
    wait_for_count(&pool, PENDING, 0, Duration::from_secs(20)).await;
    relay.stop().await.unwrap();
    consumer.stop().await.unwrap();
    api.stop().await.unwrap();
    channel
        .exchange_delete(from.into(), Default::default())
        .await
        .unwrap();
}

#[sqlx::test(migrator = "lab_core::postgres::MIGRATOR")]
async fn a_failed_creation_is_applied_before_its_prefetched_cancellation(pool: PgPool) {
    let topology = OutboxTopology::new();
    let amqp = amqp_url();
    // The consumer's first attempt at an order.created fails (a sequence is
    // not rolled back with the transaction, so only the first one fails).
    sqlx::raw_sql(
        "CREATE SEQUENCE created_attempts; \
         CREATE FUNCTION fail_first_created() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN \
           IF NEW.event_type = 'order.created' AND nextval('created_attempts') = 1 THEN \
             RAISE EXCEPTION 'first attempt refused by the test'; \
           END IF; RETURN NEW; END $$; \
         CREATE TRIGGER fail_first_created BEFORE INSERT ON notifications \
           FOR EACH ROW EXECUTE FUNCTION fail_first_created();",
    )
    .execute(&pool)
    .await
    .unwrap();
    // Both events wait in the queue before the consumer starts, so it takes
    // them in one prefetch: the cancellation is already in hand when the
    // creation fails and is requeued.
    start_consumer(&pool, &amqp, &topology)
        .await
        .stop()
        .await
        .unwrap();
    let api = Service::api(pool.clone(), &amqp, &topology.settings).await;
    let id = create_and_cancel(&api, 1).await[0];
    let relay = Service::relay(pool.clone(), &amqp, &topology.settings).await;
    wait_for_count(&pool, PENDING, 0, Duration::from_secs(10)).await;
    let consumer = start_consumer(&pool, &amqp, &topology).await;

    let applied = applied_in_order(&consumer, id).await;
    assert_eq!(applied, ["order.created", "order.cancelled"]);
    assert_eq!(consumer.get_json("/stats").await["requeued"], 1);
    relay.stop().await.unwrap();
    consumer.stop().await.unwrap();
    api.stop().await.unwrap();
}

/// The backend holding the relay's leader lock in this test's database.
async fn leader_backend(pool: &PgPool) -> Option<i32> {
    sqlx::query_scalar(
        "SELECT pid FROM pg_locks WHERE locktype = 'advisory' AND granted \
         AND database = (SELECT oid FROM pg_database WHERE datname = current_database())",
    )
    .fetch_optional(pool)
    .await
    .unwrap()
}

/// A blip (the leader's Postgres session ended) costs the short first wait
/// every time, however many blips came before: the backoff starts over once
/// the relay leads again, instead of staying at its cap for good.
#[sqlx::test(migrator = "lab_core::postgres::MIGRATOR")]
async fn after_each_postgres_blip_the_relay_waits_the_short_first_wait(pool: PgPool) {
    let topology = OutboxTopology::new();
    let relay = Service::relay(pool.clone(), &amqp_url(), &topology.settings).await;
    let mut last_pid = None;
    for blip in 0..5 {
        let pid = eventually("the relay to lead", Duration::from_secs(30), || async {
            let leads = relay_status(&relay).await["leader"] == true;
            let pid = leader_backend(&pool).await;
            (leads && pid.is_some() && pid != last_pid).then_some(pid)
        })
        .await;
        sqlx::query("SELECT pg_terminate_backend($1)")
            .bind(pid)
            .execute(&pool)
            .await
            .unwrap();
        last_pid = pid;
        eventually("the relay to notice", Duration::from_secs(30), || async {
            let status = relay_status(&relay).await;
            (status["retries"].as_u64() > Some(blip)).then_some(())
        })
        .await;
    }
    let status = relay_status(&relay).await;
    let wait = status["last_retry_delay_ms"].as_u64().unwrap();
    // The first wait of the schedule is 100-200 ms (100 ms and its jitter);
    // without the reset the fifth would be 1.6-3.2 s.
    assert!(wait <= 200, "the fifth blip waited {wait} ms: {status}");
    relay.stop().await.unwrap();
}

/// One order, one timestamp: the answer to POST, its idempotent replay, the
/// event and GET all carry what Postgres stored (microseconds), not the
/// nanoseconds the process had in hand.
#[sqlx::test(migrator = "lab_core::postgres::MIGRATOR")]
async fn an_orders_timestamps_are_the_same_in_every_answer_and_its_event(pool: PgPool) {
    let topology = OutboxTopology::new();
    let api = Service::api(pool.clone(), &amqp_url(), &topology.settings).await;
    let http = Client::new();
    let post = || {
        http.post(api.url("/orders"))
            .header("idempotency-key", "ts-1")
            .json(&order_body("ts"))
            .send()
    };
    let created: Value = post().await.unwrap().json().await.unwrap();
    let replayed: Value = post().await.unwrap().json().await.unwrap();
    let id = created["id"].as_str().unwrap();
    let read = api.get_json(&format!("/orders/{id}")).await;
    let event: Value =
        sqlx::query_scalar("SELECT payload FROM outbox WHERE aggregate_id = $1::uuid")
            .bind(id)
            .fetch_one(&pool)
            .await
            .unwrap();
    let stamp = &read["created_at"];
    for (what, value) in [
        ("POST", &created["created_at"]),
        ("replay", &replayed["created_at"]),
        ("event", &event["data"]["created_at"]),
    ] {
        assert_eq!(
            value, stamp,
            "{what} says {value}, GET says {stamp}; event {event}"
        );
    }
    api.stop().await.unwrap();
}

/// The Idempotency-Key header says what it accepts, and means it.
#[sqlx::test(migrator = "lab_core::postgres::MIGRATOR")]
async fn an_idempotency_key_with_spaces_or_given_twice_is_refused(pool: PgPool) {
    let topology = OutboxTopology::new();
    let api = Service::api(pool.clone(), &amqp_url(), &topology.settings).await;
    let http = Client::new();
    let with_spaces = http
        .post(api.url("/orders"))
        .header("idempotency-key", "two words")
        .json(&order_body("k"))
        .send()
        .await
        .unwrap();
    assert_eq!(with_spaces.status(), StatusCode::UNPROCESSABLE_ENTITY);
    let twice = http
        .post(api.url("/orders"))
        .header("idempotency-key", "one")
        .header("idempotency-key", "two")
        .json(&order_body("k"))
        .send()
        .await
        .unwrap();
    assert_eq!(twice.status(), StatusCode::UNPROCESSABLE_ENTITY);
    let body: Value = twice.json().await.unwrap();
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("Idempotency-Key"),
        "{body}"
    );
    assert_eq!(count(&pool, "SELECT count(*) FROM orders").await, 0);
    api.stop().await.unwrap();
}

/// Settings under which the relay would not look for events for minutes by
/// itself (its poll, and the lease heartbeat that caps it, are that long):
/// only a NOTIFY wakes it.
fn woken_only_by_notify(topology: &OutboxTopology, notify: outbox::Notify) -> outbox::Settings {
    outbox::Settings {
        notify,
        relay_poll_interval_ms: 600_000,
        relay_lease_ttl_ms: 2_400_000,
        ..topology.settings.clone()
    }
}

/// Starts a relay after placing a first order, and waits until the relay
/// has published it: its first round is over, so an order placed from now
/// on is found only when something wakes the relay (its first `SELECT` can
/// no longer pick it up, as it could while the relay was merely leading).
async fn relay_past_first_round(
    pool: &PgPool,
    amqp: &str,
    settings: &outbox::Settings,
    api: &Service,
) -> Service {
    new_order(api, "c-first-round").await;
    let relay = Service::relay(pool.clone(), amqp, settings).await;
    eventually(
        "the relay's first round to publish the first order",
        Duration::from_secs(10),
        || async { (relay_status(&relay).await["batches"].as_u64() >= Some(1)).then_some(()) },
    )
    .await;
    relay
}

/// The NOTIFYs on `outbox` that reached `listener`, waiting a little for
/// late ones.
async fn notifies_heard(listener: &mut sqlx::postgres::PgListener) -> usize {
    let mut heard = 0;
    while let Ok(notification) =
        tokio::time::timeout(Duration::from_millis(500), listener.recv()).await
    {
        notification.unwrap();
        heard += 1;
    }
    heard
}

/// Whether the relay has published `order`'s events.
async fn published(pool: &PgPool, order: Uuid) -> bool {
    sqlx::query_scalar(
        "SELECT bool_and(published_at IS NOT NULL) FROM outbox WHERE aggregate_id = $1",
    )
    .bind(order)
    .fetch_one(pool)
    .await
    .unwrap()
}

/// With a relay that would not poll for ten minutes, an order placed after
/// its first round reaches the consumer only if one NOTIFY (from the API
/// after its commit, or from the trigger inside it, never both) wakes the
/// relay; with `OUTBOX_NOTIFY=off`, it waits.
#[sqlx::test(migrator = "lab_core::postgres::MIGRATOR")]
async fn a_commit_wakes_the_relay_by_the_apis_notify_or_the_triggers(pool: PgPool) {
    use outbox::Notify;
    let topology = OutboxTopology::new();
    let amqp = amqp_url();
    let consumer = start_consumer(&pool, &amqp, &topology).await;
    for notify in [Notify::On, Notify::Trigger, Notify::Off] {
        let settings = woken_only_by_notify(&topology, notify);
        let api = Service::api(pool.clone(), &amqp, &settings).await;
        let relay = relay_past_first_round(&pool, &amqp, &settings, &api).await;
        let mut listener = sqlx::postgres::PgListener::connect_with(&pool)
            .await
            .unwrap();
        listener.listen("outbox").await.unwrap();
        let id = new_order(&api, "c-woken").await;
        if notify == Notify::Off {
            tokio::time::sleep(Duration::from_secs(3)).await;
            assert!(
                !published(&pool, id).await,
                "{notify:?}: published within 3 s with no NOTIFY: something woke the relay"
            );
        } else {
            eventually(
                &format!("{notify:?}: the order to be handled"),
                Duration::from_secs(10),
                || async {
                    let notes = consumer
                        .get_json(&format!("/notifications?order_id={id}"))
                        .await;
                    (notes.as_array().unwrap().len() == 1).then_some(())
                },
            )
            .await;
        }
        let want = usize::from(notify != Notify::Off);
        assert_eq!(
            notifies_heard(&mut listener).await,
            want,
            "{notify:?}: NOTIFYs sent for one commit"
        );
        api.stop().await.unwrap();
        relay.stop().await.unwrap();
    }
    consumer.stop().await.unwrap();
}

/// A topology whose consumer has one lane of batches of up to 64, so that
/// events queued together share a transaction; its queue is declared (a
/// consumer started and stopped), so events wait in it until one runs.
async fn one_lane_of_batches(pool: &PgPool, amqp: &str) -> OutboxTopology {
    let mut topology = OutboxTopology::new();
    topology.settings.consumer_lanes = 1;
    topology.settings.consumer_batch_size = 64;
    start_consumer(pool, amqp, &topology)
        .await
        .stop()
        .await
        .unwrap();
    topology
}

#[sqlx::test(migrator = "lab_core::postgres::MIGRATOR")]
async fn an_event_failing_in_a_batch_is_requeued_alone_and_the_rest_commit(pool: PgPool) {
    const ORDERS: i64 = 40;
    let amqp = amqp_url();
    let topology = one_lane_of_batches(&pool, &amqp).await;
    let api = Service::api(pool.clone(), &amqp, &topology.settings).await;
    let relay = Service::relay(pool.clone(), &amqp, &topology.settings).await;
    let mut ids = Vec::new();
    for i in 0..ORDERS {
        ids.push(new_order(&api, &format!("c-{i}")).await);
    }
    wait_for_count(&pool, PENDING, 0, Duration::from_secs(20)).await;
    // The first attempt at one order's notification fails (a sequence is
    // not rolled back with its transaction, so only the first), and says
    // how many orders its transaction held.
    sqlx::raw_sql(
        "CREATE TABLE fail_once (order_id uuid PRIMARY KEY); \
         CREATE SEQUENCE failed_attempts; \
         CREATE SEQUENCE culprit_batch; \
         CREATE FUNCTION fail_once() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN \
           IF NEW.order_id IN (SELECT order_id FROM fail_once) \
              AND nextval('failed_attempts') = 1 THEN \
             PERFORM setval('culprit_batch', (SELECT count(*) FROM order_progress \
               WHERE xmin = pg_current_xact_id()::xid)); \
             RAISE EXCEPTION 'first attempt refused by the test'; \
           END IF; RETURN NEW; END $$; \
         CREATE TRIGGER fail_once BEFORE INSERT ON notifications \
           FOR EACH ROW EXECUTE FUNCTION fail_once();",
    )
    .execute(&pool)
    .await
    .unwrap();
    sqlx::query("INSERT INTO fail_once VALUES ($1)")
        .bind(ids[ids.len() / 2])
        .execute(&pool)
        .await
        .unwrap();

    let consumer = start_consumer(&pool, &amqp, &topology).await;
    wait_for_count(&pool, NOTIFICATIONS, ORDERS, Duration::from_secs(20)).await;
    // The counters move once the broker has been told, just after the commit.
    let stats = eventually(
        "the consumer to count them all",
        Duration::from_secs(10),
        || async {
            let stats = consumer.get_json("/stats").await;
            (stats["handled"] == ORDERS).then_some(stats)
        },
    )
    .await;
    assert_eq!(
        (stats["handled"].clone(), stats["requeued"].clone()),
        (json!(ORDERS), json!(1)),
        "only the failing event went back to the queue: {stats}"
    );
    assert_eq!(
        stats["duplicates_suppressed"], 0,
        "its neighbours were not applied twice: {stats}"
    );
    assert_eq!(
        count(&pool, "SELECT count(*) FROM processed_events").await,
        ORDERS
    );
    assert_batch_shared(&pool).await;
    relay.stop().await.unwrap();
    consumer.stop().await.unwrap();
    api.stop().await.unwrap();
}

/// The orders in the transaction where the culprit failed, as the test's
/// trigger recorded them (in `culprit_batch`, which no rollback undoes):
/// more than its own, or the test proved nothing about batches.
async fn assert_batch_shared(pool: &PgPool) {
    let orders = count(pool, "SELECT last_value FROM culprit_batch").await;
    assert!(
        orders > 1,
        "the failing event was alone in its transaction ({orders} order): no neighbours to spare"
    );
}

/// An order's event as the relay would publish it.
fn order_event(order: Uuid, event_type: &str, sequence: i64) -> outbox::events::Event {
    let data = json!({"id": order, "customer_id": "c-direct", "total_cents": 100,
        "items": [{"sku": "KB-1", "quantity": 1, "price_cents": 100}], "delivery": "outbox"});
    outbox::events::Event::new(event_type, order, sequence, data)
}

/// Publishes `event` to `exchange` with the relay's properties.
async fn publish_event(channel: &lapin::Channel, exchange: &str, event: &outbox::events::Event) {
    let body = serde_json::to_vec(event).unwrap();
    let (id, kind, order) = (event.event_id, &event.event_type, event.aggregate_id);
    outbox::events::publish(channel, exchange, id, kind, order, &body, false)
        .await
        .unwrap();
}

/// `order`'s notifications and parked events.
async fn order_state(pool: &PgPool, order: Uuid) -> (i64, i64) {
    sqlx::query_as(
        "SELECT (SELECT count(*) FROM notifications WHERE order_id = $1), \
                (SELECT count(*) FROM parked_events WHERE order_id = $1)",
    )
    .bind(order)
    .fetch_one(pool)
    .await
    .unwrap()
}

/// Two consumers on one order: P waits for the order's progress row while
/// Q holds it and parks the order's second event. When Q commits, P applies
/// the first event and must see the parked second one (which committed
/// after P's statement began) and apply it too, or it waits forever.
#[sqlx::test(migrator = "lab_core::postgres::MIGRATOR")]
async fn an_event_parked_while_its_predecessor_waits_for_the_lock_is_released(pool: PgPool) {
    let topology = OutboxTopology::new();
    let consumer = start_consumer(&pool, &amqp_url(), &topology).await;
    let order = Uuid::now_v7();
    let first = order_event(order, outbox::events::ORDER_CREATED, 1);
    let second = order_event(order, outbox::events::ORDER_CANCELLED, 2);
    sqlx::query("INSERT INTO order_progress (order_id, applied) VALUES ($1, 0)")
        .bind(order)
        .execute(&pool)
        .await
        .unwrap();
    // Q, the other consumer: it holds the order's row.
    let mut q = pool.begin().await.unwrap();
    sqlx::query("SELECT FROM order_progress WHERE order_id = $1 FOR UPDATE")
        .bind(order)
        .execute(&mut *q)
        .await
        .unwrap();
    let channel = amqp_channel().await;
    publish_event(&channel, &topology.settings.exchange, &first).await;
    eventually(
        "the consumer to wait for the order's row",
        Duration::from_secs(10),
        || async {
            let waiting = count(
                &pool,
                "SELECT count(*) FROM pg_stat_activity \
                 WHERE datname = current_database() AND wait_event_type = 'Lock'",
            )
            .await;
            (waiting == 1).then_some(())
        },
    )
    .await;
    // Q parks the second event, as a consumer does when it comes first.
    sqlx::query(
        "INSERT INTO parked_events (event_id, order_id, sequence, envelope) \
         VALUES ($1, $2, $3, $4)",
    )
    .bind(second.event_id)
    .bind(order)
    .bind(second.sequence)
    .bind(sqlx::types::Json(&second))
    .execute(&mut *q)
    .await
    .unwrap();
    q.commit().await.unwrap();

    let state = eventually(
        "the first event to be applied",
        Duration::from_secs(10),
        || async {
            let state = order_state(&pool, order).await;
            (state.0 >= 1).then_some(state)
        },
    )
    .await;
    assert_eq!(
        state,
        (2, 0),
        "(notifications, parked events): the parked successor was released with its predecessor"
    );
    consumer.stop().await.unwrap();
}

/// Messages waiting in the dead-letter queue of `queue`.
async fn dead_letters(channel: &lapin::Channel, queue: &str) -> u32 {
    let dlq = outbox::events::dead_letter_queue(queue);
    let passive = QueueDeclareOptions {
        passive: true,
        ..Default::default()
    };
    channel
        .queue_declare(dlq.as_str().into(), passive, FieldTable::default())
        .await
        .unwrap()
        .message_count()
}

/// A batch whose commit fails (a deferred constraint, checked at COMMIT,
/// refuses one order's notification) goes again one event per transaction:
/// only the culprit burns its delivery attempts and is dead-lettered; its
/// neighbours are applied once each.
#[sqlx::test(migrator = "lab_core::postgres::MIGRATOR")]
async fn an_event_failing_at_commit_costs_its_own_attempts_not_its_neighbours(pool: PgPool) {
    const ORDERS: usize = 12;
    let amqp = amqp_url();
    let topology = one_lane_of_batches(&pool, &amqp).await;
    sqlx::raw_sql(
        "CREATE TABLE culprit (order_id uuid PRIMARY KEY); \
         CREATE SEQUENCE culprit_batch; \
         CREATE FUNCTION refuse_culprit() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN \
           IF NEW.order_id IN (SELECT order_id FROM culprit) THEN \
             PERFORM setval('culprit_batch', greatest(c.last_value, ( \
               SELECT count(*) FROM order_progress WHERE xmin = pg_current_xact_id()::xid))) \
               FROM culprit_batch c; \
             RAISE EXCEPTION 'refused at commit by the test'; \
           END IF; RETURN NULL; END $$; \
         CREATE CONSTRAINT TRIGGER refuse_culprit AFTER INSERT ON notifications \
           DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION refuse_culprit();",
    )
    .execute(&pool)
    .await
    .unwrap();
    let orders: Vec<Uuid> = (0..ORDERS).map(|_| Uuid::now_v7()).collect();
    let culprit = orders[ORDERS / 2];
    sqlx::query("INSERT INTO culprit VALUES ($1)")
        .bind(culprit)
        .execute(&pool)
        .await
        .unwrap();
    let channel = amqp_channel().await;
    for &order in &orders {
        let event = order_event(order, outbox::events::ORDER_CREATED, 1);
        publish_event(&channel, &topology.settings.exchange, &event).await;
    }

    let consumer = start_consumer(&pool, &amqp, &topology).await;
    let queue = topology.settings.queue.as_str();
    // Every event ends applied or dead-lettered.
    let (applied, dead) = eventually("every event to settle", Duration::from_secs(30), || async {
        let applied = count(&pool, "SELECT count(DISTINCT order_id) FROM notifications").await;
        let dead = dead_letters(&channel, queue).await;
        (applied + i64::from(dead) == ORDERS as i64).then_some((applied, dead))
    })
    .await;
    assert_eq!(
        (applied, dead),
        (ORDERS as i64 - 1, 1),
        "(orders applied, events dead-lettered): only the culprit may be dead-lettered"
    );
    let (culprit_notes, _) = order_state(&pool, culprit).await;
    assert_eq!(culprit_notes, 0);
    assert_eq!(count(&pool, NOTIFICATIONS).await, ORDERS as i64 - 1);
    assert_eq!(
        consumer.get_json("/stats").await["duplicates_suppressed"],
        0
    );
    assert_batch_shared(&pool).await;
    consumer.stop().await.unwrap();
}

/// A NOTIFY whose connection broke (Postgres restarted, the session was
/// ended) is sent again at once on a new one: the commit it announces does
/// not wait for the relay's poll (ten minutes here).
#[sqlx::test(migrator = "lab_core::postgres::MIGRATOR")]
async fn a_notify_whose_connection_broke_is_sent_again_at_once(pool: PgPool) {
    let topology = OutboxTopology::new();
    let amqp = amqp_url();
    let settings = woken_only_by_notify(&topology, outbox::Notify::On);
    let consumer = start_consumer(&pool, &amqp, &topology).await;
    let api = Service::api(pool.clone(), &amqp, &settings).await;
    let relay = relay_past_first_round(&pool, &amqp, &settings, &api).await;
    // The API's NOTIFY connection is open and has notified.
    an_order_gets_through(&api, &consumer, Duration::from_secs(10)).await;
    let ended = count(
        &pool,
        "SELECT count(*) FROM (SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
           WHERE datname = current_database() AND query LIKE '%pg_notify(%' \
             AND pid <> pg_backend_pid()) ended",
    )
    .await;
    assert_eq!(ended, 1, "one session sends the API's NOTIFYs");
    an_order_gets_through(&api, &consumer, Duration::from_secs(5)).await;
    relay.stop().await.unwrap();
    api.stop().await.unwrap();
    consumer.stop().await.unwrap();
}

/// A prefetch of 0 means "unlimited" to RabbitMQ, and the lanes could not
/// be built: the consumer must refuse it, not panic.
#[sqlx::test(migrator = "lab_core::postgres::MIGRATOR")]
async fn a_consumer_prefetch_below_one_is_refused_at_start(pool: PgPool) {
    let topology = OutboxTopology::new();
    let settings = outbox::Settings {
        consumer_prefetch: 0,
        ..topology.settings.clone()
    };
    let serve = |listener| outbox::consumer::serve(listener, pool, amqp_url(), settings, stopped());
    refused_at_start("the consumer", serve, "CONSUMER_PREFETCH").await;
}

/// The stage stamped at the consumer's commit ("consumed") means applied:
/// an event that is parked is stamped when the commit that releases it
/// applies it, and a redelivery of an applied event is not stamped again.
#[sqlx::test(migrator = "lab_core::postgres::MIGRATOR")]
async fn the_consumed_stage_is_stamped_when_an_event_is_applied(pool: PgPool) {
    use outbox::stages::{Probe, Stage};
    let topology = OutboxTopology::new();
    let metrics = lab_core::metrics::Metrics::new("test_consumer");
    let (probe, mut stamps) = Probe::channel();
    let consumer = outbox::consumer::Consumer::new(
        pool.clone(),
        amqp_url(),
        topology.settings.clone(),
        &metrics,
    )
    .with_probe(probe);
    let stats = consumer.stats();
    let shutdown = tokio_util::sync::CancellationToken::new();
    let running = tokio::spawn(consumer.run(shutdown.clone()));
    let settled = |what: &'static str, done: fn(&outbox::consumer::StatsBody) -> bool| {
        let stats = stats.clone();
        async move {
            eventually(what, Duration::from_secs(10), || async {
                done(&stats.body()).then_some(())
            })
            .await
        }
    };
    settled("the consumer to connect", |s| s.broker_connected).await;
    let order = Uuid::now_v7();
    let first = order_event(order, outbox::events::ORDER_CREATED, 1);
    let second = order_event(order, outbox::events::ORDER_CANCELLED, 2);
    let channel = amqp_channel().await;
    let exchange = topology.settings.exchange.as_str();
    publish_event(&channel, exchange, &second).await;
    settled("the second event to be parked", |s| s.parked == 1).await;
    publish_event(&channel, exchange, &first).await;
    settled("both to be applied", |s| s.handled == 2).await;
    publish_event(&channel, exchange, &first).await;
    settled("the redelivery to be dropped", |s| {
        s.duplicates_suppressed == 1
    })
    .await;
    shutdown.cancel();
    running.await.unwrap().unwrap();

    let mut consumed = Vec::new();
    while let Ok(stamp) = stamps.try_recv() {
        if stamp.stage == Stage::Committed {
            consumed.extend(stamp.event_ids);
        }
    }
    assert_eq!(
        consumed,
        [first.event_id, second.event_id],
        "events stamped consumed, in order (first {}, second {})",
        first.event_id,
        second.event_id
    );
}
