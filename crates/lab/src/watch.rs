//! `lab watch <lab>`: a lab's key counters as a live table, one row per
//! second. Counters show as per-second rates (what changed since the last
//! row), levels (a backlog, a lag, connections) as they are, so a learner
//! sees a stampede, a backlog draining or a slow client being cut while it
//! happens, without reading raw `/metrics`.
//!
//! It reads only what the lab already publishes (`/metrics`, and `/stats`
//! where a lab has one), so what it shows is what a dashboard would show.

use std::{collections::BTreeMap, time::Duration};

use anyhow::{Context, bail};
use clap::Args;
use serde_json::Value;

use crate::{
    labs::{Lab, LabSettings},
    plot::Panel,
};
use Kind::{Level, Rate};
use Read::{Json, Metric};

#[derive(Args)]
pub struct Watch {
    /// The lab to watch.
    #[arg(value_enum)]
    lab: Lab,
    /// Time between rows.
    #[arg(long, default_value = "1s", value_parser = humantime::parse_duration)]
    every: Duration,
    /// Stop after this many rows (runs until Ctrl-C when absent).
    #[arg(long, env = "LAB_WATCH_ROWS")]
    rows: Option<u64>,
    /// When it stops, draw every column over time into this SVG file.
    #[arg(long)]
    plot: Option<std::path::PathBuf>,
    #[command(flatten)]
    labs: LabSettings,
}

/// Where a column's number comes from.
enum Read {
    /// A field of a JSON document, by JSON pointer (`/cache/hits`).
    Json(&'static str),
    /// The sum of a metric's samples over every label set.
    Metric(&'static str),
}

/// A counter is shown as its rate, a level as it is.
#[derive(Clone, Copy, PartialEq)]
enum Kind {
    Rate,
    Level,
}

struct Column {
    header: &'static str,
    url: String,
    read: Read,
    kind: Kind,
}

/// One column as each lab's function below writes it: header, which of
/// the lab's listeners, path, what to read there, rate or level.
type Spec = (&'static str, usize, &'static str, Read, Kind);

fn columns(lab: Lab, settings: &LabSettings) -> Vec<Column> {
    let (addrs, specs) = match lab {
        Lab::Catalog => catalog(settings),
        Lab::Caching => caching(settings),
        Lab::Outbox => outbox(settings),
        Lab::Chat => chat(settings),
        Lab::Telemetry => telemetry(settings),
    };
    specs
        .into_iter()
        .map(|(header, listener, path, read, kind)| Column {
            header,
            url: format!(
                "http://{}{path}",
                addrs[listener].replace("0.0.0.0", "127.0.0.1")
            ),
            read,
            kind,
        })
        .collect()
}

/// The catalog lab's columns.
fn catalog(settings: &LabSettings) -> (Vec<&String>, Vec<Spec>) {
    (
        vec![&settings.catalog.http_addr],
        vec![(
            "requests/s",
            0,
            "/metrics",
            Metric("catalog_http_requests"),
            Rate,
        )],
    )
}

/// The caching lab's columns.
fn caching(settings: &LabSettings) -> (Vec<&String>, Vec<Spec>) {
    (
        vec![&settings.caching.http_addr],
        vec![
            ("hits/s", 0, "/stats", Json("/cache/hits"), Rate),
            ("misses/s", 0, "/stats", Json("/cache/misses"), Rate),
            ("bypass/s", 0, "/stats", Json("/cache/bypasses"), Rate),
            ("pg reads/s", 0, "/stats", Json("/postgres/reads"), Rate),
            (
                "flushed/s",
                0,
                "/stats",
                Json("/write_behind/flushed_views"),
                Rate,
            ),
            ("pending", 0, "/stats", Json("/write_behind/pending"), Level),
            ("lag ms", 0, "/stats", Json("/write_behind/lag_ms"), Level),
        ],
    )
}

/// The outbox lab's columns.
fn outbox(settings: &LabSettings) -> (Vec<&String>, Vec<Spec>) {
    (
        vec![
            &settings.outbox.http_addr,
            &settings.outbox.relay_addr,
            &settings.outbox.consumer_addr,
        ],
        vec![
            (
                "orders/s",
                0,
                "/metrics",
                Metric("outbox_api_orders_committed"),
                Rate,
            ),
            ("pending", 0, "/outbox/stats", Json("/pending"), Level),
            (
                "published/s",
                1,
                "/metrics",
                Metric("outbox_relay_published"),
                Rate,
            ),
            ("handled/s", 2, "/stats", Json("/handled"), Rate),
            ("dup/s", 2, "/stats", Json("/duplicates_suppressed"), Rate),
            ("dead/s", 2, "/stats", Json("/dead_lettered"), Rate),
        ],
    )
}

/// The chat lab's columns.
fn chat(settings: &LabSettings) -> (Vec<&String>, Vec<Spec>) {
    (
        vec![&settings.chat.http_addr],
        vec![
            (
                "connections",
                0,
                "/metrics",
                Metric("chat_connections"),
                Level,
            ),
            ("said/s", 0, "/metrics", Metric("chat_messages_said"), Rate),
            (
                "delivered/s",
                0,
                "/metrics",
                Metric("chat_deliveries"),
                Rate,
            ),
            (
                "slow cut/s",
                0,
                "/metrics",
                Metric("chat_slow_disconnects"),
                Rate,
            ),
            (
                "rejected/s",
                0,
                "/metrics",
                Metric("chat_frames_rejected"),
                Rate,
            ),
        ],
    )
}

/// The telemetry lab's columns.
fn telemetry(settings: &LabSettings) -> (Vec<&String>, Vec<Spec>) {
    (
        vec![&settings.telemetry.http_addr],
        vec![
            (
                "received/s",
                0,
                "/metrics",
                Metric("telemetry_messages_received"),
                Rate,
            ),
            (
                "stored/s",
                0,
                "/metrics",
                Metric("telemetry_readings_stored"),
                Rate,
            ),
            ("dup/s", 0, "/metrics", Metric("telemetry_duplicates"), Rate),
            (
                "rejected/s",
                0,
                "/metrics",
                Metric("telemetry_rejected"),
                Rate,
            ),
            ("inbox", 0, "/metrics", Metric("telemetry_inbox"), Level),
        ],
    )
}

pub async fn run(watch: Watch) -> anyhow::Result<()> {
    let columns = columns(watch.lab, &watch.labs);
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(2))
        .build()?;
    let header: Vec<String> = columns
        .iter()
        .map(|c| format!("{:>12}", c.header))
        .collect();
    println!("{:<8} {}", "time", header.join(" "));
    let mut before = read_all(&client, &columns).await?;
    let unknown: Vec<&str> = columns
        .iter()
        .zip(&before)
        .filter(|(_, value)| value.is_none())
        .map(|(column, _)| column.header)
        .collect();
    if !unknown.is_empty() {
        bail!(
            "the {} lab does not publish {unknown:?}: is it an older build than this `lab`?",
            watch.lab.name()
        );
    }
    let mut ticker = tokio::time::interval(watch.every);
    ticker.tick().await;
    let started = tokio::time::Instant::now();
    let mut history: Vec<Vec<(f64, f64)>> = vec![Vec::new(); columns.len()];
    let mut rows = 0;
    while watch.rows.is_none_or(|limit| rows < limit) {
        tokio::select! {
            _ = ticker.tick() => {}
            _ = tokio::signal::ctrl_c() => break,
        }
        // A lab stopped or killed mid-watch (an exercise does that) is a
        // row that says so, not the end of the watch and of its plot.
        let now = match read_all(&client, &columns).await {
            Ok(now) => now,
            Err(err) => {
                println!("{} {err:#}", chrono::Local::now().format("%H:%M:%S"));
                vec![None; columns.len()]
            }
        };
        let values = row(&columns, &before, &now, watch.every);
        if now.iter().any(Option::is_some) {
            println!("{}", format_row(&values));
        }
        let t = started.elapsed().as_secs_f64();
        for (points, value) in history.iter_mut().zip(values) {
            points.extend(value.map(|v| (t, v)));
        }
        before = now;
        rows += 1;
    }
    if let Some(path) = &watch.plot {
        let panels: Vec<Panel> = columns
            .iter()
            .zip(history)
            .map(|(column, points)| Panel {
                title: column.header.to_owned(),
                unit: match column.kind {
                    Kind::Rate => "per second".to_owned(),
                    Kind::Level => column.header.to_owned(),
                },
                lines: vec![(column.header.to_owned(), points)],
            })
            .collect();
        let title = format!("lab watch {}", watch.lab.name());
        crate::plot::over_time(path, &title, &panels)?;
        eprintln!("plot written to {}", path.display());
    }
    Ok(())
}

/// One row: each column's rate (per second over `every`) or level.
fn row(
    columns: &[Column],
    before: &[Option<f64>],
    now: &[Option<f64>],
    every: Duration,
) -> Vec<Option<f64>> {
    columns
        .iter()
        .zip(before.iter().zip(now))
        .map(|(column, pair)| match (column.kind, pair) {
            (Kind::Level, (_, Some(now))) => Some(*now),
            (Kind::Rate, (Some(before), Some(now))) => {
                Some((now - before).max(0.0) / every.as_secs_f64())
            }
            _ => None,
        })
        .collect()
}

/// The row as printed: the time, then each value right-aligned.
fn format_row(values: &[Option<f64>]) -> String {
    let cells: Vec<String> = values
        .iter()
        .map(|value| value.map_or_else(|| format!("{:>12}", "-"), |v| format!("{v:>12.0}")))
        .collect();
    format!(
        "{} {}",
        chrono::Local::now().format("%H:%M:%S"),
        cells.join(" ")
    )
}

/// Every column's current value, fetching each URL once. A lab that does
/// not answer is an error that says how to start it.
async fn read_all(
    client: &reqwest::Client,
    columns: &[Column],
) -> anyhow::Result<Vec<Option<f64>>> {
    let mut bodies: BTreeMap<&str, String> = BTreeMap::new();
    for column in columns {
        if !bodies.contains_key(column.url.as_str()) {
            let body = fetch(client, &column.url).await?;
            bodies.insert(&column.url, body);
        }
    }
    Ok(columns
        .iter()
        .map(|column| value(&bodies[column.url.as_str()], &column.read))
        .collect())
}

async fn fetch(client: &reqwest::Client, url: &str) -> anyhow::Result<String> {
    let response = client
        .get(url)
        .send()
        .await
        .with_context(|| format!("{url} does not answer: is the lab running (`lab up`)?"))?;
    Ok(response.error_for_status()?.text().await?)
}

fn value(body: &str, read: &Read) -> Option<f64> {
    match read {
        Read::Json(pointer) => {
            let doc: Value = serde_json::from_str(body).ok()?;
            doc.pointer(pointer)?.as_f64()
        }
        Read::Metric(name) => metric_sum(body, name),
    }
}

/// The sum of the samples of `name` (a counter's `_total` included), over
/// every label set; `None` only when the body is not Prometheus text.
fn metric_sum(body: &str, name: &str) -> Option<f64> {
    let lines = body.lines().map(|line| Ok(line.to_owned()));
    let scrape = prometheus_parse::Scrape::parse(lines).ok()?;
    let total = format!("{name}_total");
    let samples: Vec<f64> = scrape
        .samples
        .iter()
        .filter(|s| s.metric == name || s.metric == total)
        .filter_map(|s| match s.value {
            prometheus_parse::Value::Counter(v)
            | prometheus_parse::Value::Gauge(v)
            | prometheus_parse::Value::Untyped(v) => Some(v),
            _ => None,
        })
        .collect();
    // A labelled family is left out of `/metrics` until its first event:
    // absent means nothing counted yet.
    Some(samples.iter().sum())
}

#[cfg(test)]
mod tests {
    use super::*;

    const METRICS: &str = "\
# HELP chat_deliveries Frames delivered.
# TYPE chat_deliveries counter
chat_deliveries_total{room=\"a\"} 3
chat_deliveries_total{room=\"b\"} 4
# TYPE chat_connections gauge
chat_connections 7
# EOF
";

    #[test]
    fn a_metric_sums_its_label_sets_and_an_absent_family_is_zero() {
        assert_eq!(metric_sum(METRICS, "chat_deliveries"), Some(7.0));
        assert_eq!(metric_sum(METRICS, "chat_connections"), Some(7.0));
        assert_eq!(metric_sum(METRICS, "chat_messages_said"), Some(0.0));
    }

    #[test]
    fn a_rate_is_the_change_per_second_and_a_level_is_shown_as_is() {
        let columns = [
            Column {
                header: "a",
                url: String::new(),
                read: Read::Json("/a"),
                kind: Kind::Rate,
            },
            Column {
                header: "b",
                url: String::new(),
                read: Read::Json("/b"),
                kind: Kind::Level,
            },
            Column {
                header: "c",
                url: String::new(),
                read: Read::Json("/c"),
                kind: Kind::Rate,
            },
        ];
        let line = format_row(&row(
            &columns,
            &[Some(10.0), Some(1.0), None],
            &[Some(30.0), Some(5.0), Some(2.0)],
            Duration::from_secs(2),
        ));
        let cells: Vec<&str> = line.split_whitespace().skip(1).collect();
        assert_eq!(cells, ["10", "5", "-"]);
    }
}
