//! `lab bench catalog`: the same operations over REST/HTTP1.1, REST/HTTP2 and
//! gRPC against one running catalog, over one connection and over many.
//!
//! A row is a *variant* (a transport over a number of connections) doing one
//! operation at one concurrency. What each variant isolates:
//! - `rest-h1`: JSON over HTTP/1.1. It cannot multiplex, so it always has
//!   one connection per request in flight (`conns` = concurrency).
//! - `rest-h2` and `grpc` over 1 connection: every request in flight shares
//!   one TCP stream, framed by one connection task at each end. This is what
//!   a default gRPC channel or HTTP/2 client does.
//! - `rest-h2` and `grpc` over n connections (`--connections n`, one per
//!   request in flight, or a fixed pool such as `--connections 4`): the same
//!   connection count as `rest-h1`, so the rows differ by protocol and
//!   encoding alone. Without these rows a REST-vs-gRPC table compares 32
//!   connections with one.
//! - `grpc-stream`: `all` read by `StreamProducts`, one response streamed,
//!   against `all` read page by page (1,000 per page) by the other variants.
//!
//! The operations: `ping` (`/healthz` or the gRPC health check: the
//! transport alone, no database, the floor of each transport in the same
//! run), `get` one product, `list100` and `list1000` (a page of 100 or 1,000:
//! encoding grows with the page, the database round trip does not), `all`
//! (the whole catalog), `create`.
//!
//! Fairness, because published REST-vs-gRPC numbers are often a client
//! set-up comparison in disguise:
//! - every client is built once per run and reused; a cell's workers share
//!   its connections round robin;
//! - every client decodes what it receives into products, as a real client
//!   would: the JSON clients parse, as protobuf's decoder must;
//! - TCP_NODELAY on every client, as on the servers;
//! - each cell has an unmeasured warm-up, and the order of the variants
//!   rotates from cell to cell;
//! - the same products, the same pages, the same create payload;
//! - run the release build (`cargo run --release -p lab -- bench catalog`).
//!
//! `body` is the mean size of what the client decoded (JSON text, or the
//! protobuf messages); `wire` is what one operation costs on the TCP
//! connection, both ways: headers, HTTP/2 and gRPC framing included. It comes
//! from a separate pass before the timed cells ([`wire_bytes`]), a few
//! operations through a relay that counts bytes, so the relay's extra hop
//! never enters a timing.
//!
//! The catalog is left as the bench found it: products made by `create`
//! (sku `BENCH-…`) are deleted as soon as its cells at one concurrency are
//! done, and any left by an interrupted run at the start, so every `list`
//! and `all` reads the same catalog, run after run.

use std::{
    collections::HashMap,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use anyhow::{Context, bail, ensure};
use clap::ValueEnum;
use futures::{StreamExt, TryStreamExt};
use lab_proto::catalog::v1::{self as pb, catalog_service_client::CatalogServiceClient};
use prost::Message;
use serde::{Deserialize, Serialize, de::DeserializeOwned};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{
        TcpListener, TcpStream,
        tcp::{OwnedReadHalf, OwnedWriteHalf},
    },
};
use tonic::transport::{Channel, Endpoint};

use super::{Load, Row, measure, progress};

#[derive(clap::Args, Debug)]
pub struct Args {
    /// The catalog's REST base URL.
    #[arg(long, default_value = "http://localhost:8080")]
    rest: String,
    /// The catalog's gRPC URL.
    #[arg(long, default_value = "http://localhost:50051")]
    grpc: String,
    /// Operations to measure.
    #[arg(long, value_enum, value_delimiter = ',',
          default_values = ["ping", "get", "list100", "list1000", "all", "create"])]
    ops: Vec<Op>,
    /// Transports to compare; the first is the baseline of the ratios.
    #[arg(long, value_enum, value_delimiter = ',',
          default_values = ["rest-h1", "rest-h2", "grpc", "grpc-stream"])]
    transports: Vec<Transport>,
    /// Connections for the HTTP/2 transports: a number, or `n` for one per
    /// request in flight (REST/HTTP1.1 always has one per request in flight).
    #[arg(long, value_parser = parse_conns, value_delimiter = ',', default_values = ["1", "n"])]
    connections: Vec<Conns>,
    /// Make sure at least this many products exist before measuring.
    #[arg(long, env = "LAB_BENCH_SEED", default_value_t = 5000)]
    seed: usize,
    #[command(flatten)]
    load: Load,
}

#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum Op {
    /// The transport alone: /healthz or the gRPC health check.
    Ping,
    /// Read one product by id.
    Get,
    /// Read a page of 100 products.
    #[value(name = "list100", alias = "list")]
    List100,
    /// Read a page of 1,000 products.
    #[value(name = "list1000")]
    List1000,
    /// Read the whole catalog: in pages of 1,000, or streamed by grpc-stream.
    All,
    /// Create a product.
    Create,
}

impl Op {
    fn name(self) -> &'static str {
        match self {
            Op::Ping => "ping",
            Op::Get => "get",
            Op::List100 => "list100",
            Op::List1000 => "list1000",
            Op::All => "all",
            Op::Create => "create",
        }
    }
}

#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum Transport {
    /// JSON over HTTP/1.1.
    RestH1,
    /// JSON over HTTP/2 (cleartext, prior knowledge).
    RestH2,
    /// Protobuf over HTTP/2, unary calls (`all` page by page).
    Grpc,
    /// gRPC's `StreamProducts`; measures `all` only.
    GrpcStream,
}

impl Transport {
    fn name(self) -> &'static str {
        match self {
            Transport::RestH1 => "rest-h1",
            Transport::RestH2 => "rest-h2",
            Transport::Grpc => "grpc",
            Transport::GrpcStream => "grpc-stream",
        }
    }

    fn serves(self, op: Op) -> bool {
        self != Transport::GrpcStream || op == Op::All
    }

    fn base(self, args: &Args) -> &str {
        match self {
            Transport::RestH1 | Transport::RestH2 => &args.rest,
            Transport::Grpc | Transport::GrpcStream => &args.grpc,
        }
    }
}

/// How many connections an HTTP/2 variant opens.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Conns {
    Fixed(usize),
    /// One per request in flight, as HTTP/1.1 has.
    PerRequest,
}

fn parse_conns(s: &str) -> Result<Conns, String> {
    match s {
        "n" => Ok(Conns::PerRequest),
        _ => match s.parse() {
            Ok(k) if k > 0 => Ok(Conns::Fixed(k)),
            _ => Err(format!(
                "`{s}`: a number of connections (1 or more), or `n` for one per request in flight"
            )),
        },
    }
}

impl Conns {
    /// The connections at `concurrency`: never more than there are
    /// requests in flight (an extra connection would sit idle).
    fn resolve(self, concurrency: usize) -> usize {
        match self {
            Conns::Fixed(k) => k.min(concurrency.max(1)),
            Conns::PerRequest => concurrency.max(1),
        }
    }
}

/// A transport over a number of connections.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Variant {
    transport: Transport,
    connections: usize,
    /// What `connections` was resolved from; names the variant in plots.
    conns: Conns,
}

impl Variant {
    fn label(self) -> String {
        match (self.transport, self.conns) {
            (Transport::RestH1, _) => "rest-h1".into(),
            (t, Conns::Fixed(k)) => format!("{} ×{k}", t.name()),
            (t, Conns::PerRequest) => format!("{} ×n", t.name()),
        }
    }
}

/// The variants measured for `op` at `concurrency`: each transport that
/// serves the operation, over each distinct number of connections.
fn variants(transports: &[Transport], conns: &[Conns], op: Op, concurrency: usize) -> Vec<Variant> {
    let mut out: Vec<Variant> = Vec::new();
    for &transport in transports.iter().filter(|t| t.serves(op)) {
        // HTTP/1.1 cannot multiplex: one connection per request in flight.
        let modes: &[Conns] = if transport == Transport::RestH1 {
            &[Conns::PerRequest]
        } else {
            conns
        };
        for &mode in modes {
            let connections = mode.resolve(concurrency);
            if !out
                .iter()
                .any(|v| v.transport == transport && v.connections == connections)
            {
                out.push(Variant {
                    transport,
                    connections,
                    conns: mode,
                });
            }
        }
    }
    out
}

/// One client over one connection (REST/HTTP1.1: over its own pool).
#[derive(Clone)]
enum Client {
    Rest(reqwest::Client, Arc<str>),
    Grpc(Box<GrpcClients>),
}

#[derive(Clone)]
struct GrpcClients {
    catalog: CatalogServiceClient<Channel>,
    health: tonic_health::pb::health_client::HealthClient<Channel>,
}

fn rest_client(http2: bool) -> anyhow::Result<reqwest::Client> {
    let builder = reqwest::Client::builder()
        .tcp_nodelay(true)
        .pool_max_idle_per_host(1024)
        .timeout(Duration::from_secs(60));
    let builder = if http2 {
        builder.http2_prior_knowledge()
    } else {
        builder.http1_only()
    };
    Ok(builder.build()?)
}

/// A client of `transport` at `base`, with a connection of its own.
async fn connect(transport: Transport, base: &str) -> anyhow::Result<Client> {
    Ok(match transport {
        Transport::RestH1 => Client::Rest(rest_client(false)?, base.into()),
        Transport::RestH2 => Client::Rest(rest_client(true)?, base.into()),
        Transport::Grpc | Transport::GrpcStream => {
            let channel = Endpoint::from_shared(base.to_owned())?
                .tcp_nodelay(true)
                .connect()
                .await
                .with_context(|| format!("catalog gRPC is not reachable at {base}"))?;
            Client::Grpc(Box::new(GrpcClients {
                catalog: CatalogServiceClient::new(channel.clone()),
                health: tonic_health::pb::health_client::HealthClient::new(channel),
            }))
        }
    })
}

/// A transport's clients, built once per run: as many as its largest
/// variant has connections (REST/HTTP1.1: one client and its pool).
struct Pool {
    transport: Transport,
    clients: Vec<Client>,
}

async fn pools(args: &Args) -> anyhow::Result<Vec<Pool>> {
    let mut pools = Vec::new();
    for &transport in &args.transports {
        if !args.ops.iter().any(|&op| transport.serves(op)) {
            continue;
        }
        let most = args
            .load
            .concurrency
            .iter()
            .flat_map(|&c| args.connections.iter().map(move |k| k.resolve(c)))
            .max()
            .unwrap_or(1);
        let size = if transport == Transport::RestH1 {
            1
        } else {
            most
        };
        let mut clients = Vec::with_capacity(size);
        for _ in 0..size {
            clients.push(connect(transport, transport.base(args)).await?);
        }
        pools.push(Pool { transport, clients });
    }
    Ok(pools)
}

/// What every request of a run shares.
#[derive(Clone)]
struct Shared {
    ids: Arc<[String]>,
    run_id: Arc<str>,
    payload: Arc<NewProduct>,
    /// One sequence for the whole run, warm-ups included, so skus never repeat.
    sku_seq: Arc<AtomicU64>,
}

impl Shared {
    /// One `op` by `worker` (its `n`th request); returns the bytes decoded.
    async fn call(
        &self,
        client: &Client,
        op: Op,
        stream: bool,
        worker: usize,
        n: u64,
    ) -> anyhow::Result<usize> {
        match op {
            Op::Ping => ping(client).await,
            Op::Get => get(client, &self.ids[(n as usize + worker) % self.ids.len()]).await,
            Op::List100 => Ok(list(client, 100, String::new()).await?.0),
            Op::List1000 => Ok(list(client, 1000, String::new()).await?.0),
            Op::All if stream => stream_all(client).await,
            Op::All => page_all(client).await,
            Op::Create => {
                let seq = self.sku_seq.fetch_add(1, Ordering::Relaxed);
                let sku = format!("{BENCH_SKU}{}-{seq}", self.run_id);
                create(client, &self.payload, sku).await
            }
        }
    }
}

/// The sku prefix of products made by `create`; the bench deletes them.
const BENCH_SKU: &str = "BENCH-";

/// One measured cell, with the columns only this bench has.
#[derive(Serialize)]
struct Measured {
    #[serde(flatten)]
    row: Row,
    transport: &'static str,
    connections: usize,
    /// Bytes on the TCP connection per operation, both ways.
    wire_bytes: f64,
}

pub async fn run(args: Args) -> anyhow::Result<()> {
    ensure!(!args.transports.is_empty(), "--transports is empty");
    let ids: Arc<[String]> = prepare(&args).await?.into();
    let run_id = uuid::Uuid::now_v7().simple().to_string().to_uppercase();
    let shared = Shared {
        ids,
        run_id: run_id[run_id.len() - 8..].into(),
        payload: Arc::new(NewProduct::template()),
        sku_seq: Arc::new(AtomicU64::new(0)),
    };
    let pools = pools(&args).await?;
    eprintln!("counting bytes on the wire…");
    let wire = wire_pass(&args, &shared).await?;
    let mut rows = measure_cells(&args, &pools, &shared, &wire).await?;
    drop(pools);

    let position = |t: &str| args.transports.iter().position(|x| x.name() == t);
    rows.sort_by_key(|m| {
        let op = args.ops.iter().position(|o| o.name() == m.row.op);
        (op, m.row.concurrency, position(m.transport), m.connections)
    });
    if args.load.json {
        println!("{}", serde_json::to_string_pretty(&rows)?);
    } else {
        println!(
            "catalog: {} products (`all` reads every one); conns: TCP connections in use",
            shared.ids.len()
        );
        print_table(&rows, args.transports[0].name());
    }
    if let Some(path) = &args.load.plot {
        let plain: Vec<Row> = rows.iter().map(|m| m.row.clone()).collect();
        crate::plot::latency_by_concurrency(
            path,
            "catalog: latency by transport and connections",
            &plain,
        )?;
        eprintln!("plot written to {}", path.display());
    }
    Ok(())
}

/// Every cell: each operation, at each concurrency, by each variant.
async fn measure_cells(
    args: &Args,
    pools: &[Pool],
    shared: &Shared,
    wire: &HashMap<(Transport, Op), f64>,
) -> anyhow::Result<Vec<Measured>> {
    let groups: Vec<(Op, usize, Vec<Variant>)> = args
        .ops
        .iter()
        .flat_map(|&op| {
            args.load
                .concurrency
                .iter()
                .map(move |&c| (op, c, variants(&args.transports, &args.connections, op, c)))
        })
        .collect();
    let bar = progress(groups.iter().map(|g| g.2.len() as u64).sum());
    let mut rows = Vec::new();
    for (turn, (op, concurrency, mut cells)) in groups.into_iter().enumerate() {
        // Rotate who goes first, so no variant always measures a machine
        // still busy with the previous cell.
        let len = cells.len().max(1);
        cells.rotate_left(turn % len);
        for variant in cells {
            let label = variant.label();
            bar.set_message(format!("{label} {} c={concurrency}", op.name()));
            let pool = pools
                .iter()
                .find(|p| p.transport == variant.transport)
                .context("no clients for a transport")?;
            // REST/HTTP1.1's one client opens a connection per request in flight.
            let used = if variant.transport == Transport::RestH1 {
                1
            } else {
                variant.connections
            };
            let clients: Arc<[Client]> = pool.clients[..used].into();
            let (shared, stream) = (shared.clone(), variant.transport == Transport::GrpcStream);
            let row = measure(
                &args.load,
                concurrency,
                &label,
                op.name(),
                move |worker, n| {
                    let (clients, shared) = (clients.clone(), shared.clone());
                    async move {
                        let client = &clients[worker % clients.len()];
                        shared.call(client, op, stream, worker, n).await
                    }
                },
            )
            .await?;
            rows.push(Measured {
                row,
                transport: variant.transport.name(),
                connections: variant.connections,
                wire_bytes: wire.get(&(variant.transport, op)).copied().unwrap_or(0.0),
            });
            bar.inc(1);
        }
        if op == Op::Create {
            // What `create` made would otherwise be read by the next cells.
            bar.set_message("deleting what create made");
            tidy(args).await?;
        }
    }
    bar.finish_and_clear();
    Ok(rows)
}

/// How many operations the wire pass runs per transport and operation; a
/// new connection's set-up (HTTP/2 preface and settings) is spread over them.
const WIRE_SAMPLE: u64 = 20;

/// Bytes on the wire per operation, for every transport and operation.
async fn wire_pass(args: &Args, shared: &Shared) -> anyhow::Result<HashMap<(Transport, Op), f64>> {
    let mut wire = HashMap::new();
    for &op in &args.ops {
        for &transport in args.transports.iter().filter(|t| t.serves(op)) {
            wire.insert(
                (transport, op),
                wire_bytes(args, transport, op, shared).await?,
            );
        }
        if op == Op::Create {
            tidy(args).await?;
        }
    }
    Ok(wire)
}

/// [`WIRE_SAMPLE`] operations, one after another over one new connection
/// through a [`Relay`]; what the relay carried, both ways, per operation.
async fn wire_bytes(
    args: &Args,
    transport: Transport,
    op: Op,
    shared: &Shared,
) -> anyhow::Result<f64> {
    let relay = Relay::start(transport.base(args)).await?;
    let client = connect(transport, &relay.url).await?;
    let stream = transport == Transport::GrpcStream;
    for n in 0..WIRE_SAMPLE {
        shared.call(&client, op, stream, 0, n).await?;
    }
    Ok(relay.bytes.load(Ordering::Relaxed) as f64 / WIRE_SAMPLE as f64)
}

/// A TCP relay on 127.0.0.1 in front of the catalog that counts the bytes
/// it carries, both ways. Every byte a response needs has passed it by the
/// time the client has the response, so the count is read right after.
struct Relay {
    url: String,
    bytes: Arc<AtomicU64>,
    accept: tokio::task::JoinHandle<()>,
}

impl Relay {
    async fn start(base: &str) -> anyhow::Result<Self> {
        let target = url::Url::parse(base).with_context(|| format!("bad URL {base}"))?;
        let target = format!(
            "{}:{}",
            target.host_str().context("URL without a host")?,
            target
                .port_or_known_default()
                .context("URL without a port")?
        );
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let url = format!("http://{}", listener.local_addr()?);
        let bytes = Arc::new(AtomicU64::new(0));
        let counter = bytes.clone();
        let accept = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let (target, bytes) = (target.clone(), counter.clone());
                tokio::spawn(async move {
                    let Ok(server) = TcpStream::connect(&target).await else {
                        return;
                    };
                    let _ = (client.set_nodelay(true), server.set_nodelay(true));
                    let (client_read, client_write) = client.into_split();
                    let (server_read, server_write) = server.into_split();
                    tokio::join!(
                        pump(client_read, server_write, &bytes),
                        pump(server_read, client_write, &bytes)
                    );
                });
            }
        });
        Ok(Self { url, bytes, accept })
    }
}

impl Drop for Relay {
    /// Stops accepting; open connections end when their client closes.
    fn drop(&mut self) {
        self.accept.abort();
    }
}

async fn pump(mut from: OwnedReadHalf, mut to: OwnedWriteHalf, bytes: &AtomicU64) {
    let mut buf = vec![0u8; 64 * 1024];
    while let Ok(n @ 1..) = from.read(&mut buf).await {
        bytes.fetch_add(n as u64, Ordering::Relaxed);
        if to.write_all(&buf[..n]).await.is_err() {
            break;
        }
    }
    let _ = to.shutdown().await;
}

/// Prints the rows, each with its ratios to the `baseline` transport's
/// first row of the same operation and concurrency.
fn print_table(rows: &[Measured], baseline: &str) {
    println!(
        "{:<11} {:<8} {:>4} {:>5} {:>8} {:>9} {:>9} {:>9} {:>9} {:>6} {:>7} {:>6}",
        "variant",
        "op",
        "conc",
        "conns",
        "req/s",
        "p50",
        "p99",
        "body",
        "wire",
        "errors",
        "req/s ×",
        "p50 ×"
    );
    for m in rows {
        let r = &m.row;
        let base = rows.iter().find(|b| {
            b.transport == baseline && b.row.op == r.op && b.row.concurrency == r.concurrency
        });
        let (rps_ratio, p50_ratio) = match base {
            Some(b) => (
                super::ratio(r.requests_per_sec, b.row.requests_per_sec),
                super::ratio(r.p50_us as f64, b.row.p50_us as f64),
            ),
            None => ("-".into(), "-".into()),
        };
        println!(
            "{:<11} {:<8} {:>4} {:>5} {:>8.0} {:>9} {:>9} {:>9} {:>9} {:>6} {:>7} {:>6}",
            m.transport,
            r.op,
            r.concurrency,
            m.connections,
            r.requests_per_sec,
            super::micros(r.p50_us),
            super::micros(r.p99_us),
            size(r.mean_response_bytes),
            size(m.wire_bytes),
            r.errors,
            rps_ratio,
            p50_ratio,
        );
    }
}

fn size(bytes: f64) -> String {
    match bytes {
        b if b < 10_000.0 => format!("{b:.0}"),
        b if b < 1_000_000.0 => format!("{:.1} kB", b / 1e3),
        b => format!("{:.2} MB", b / 1e6),
    }
}

/// A product as REST sends it: every field, decoded as a client would.
#[derive(Deserialize)]
#[expect(dead_code, reason = "decoded for the cost of decoding, not read")]
struct ProductJson {
    id: String,
    sku: String,
    name: String,
    description: String,
    price_cents: i64,
    currency: String,
    tags: Vec<String>,
    created_at: String,
    updated_at: String,
}

#[derive(Deserialize)]
struct PageJson<P> {
    products: Vec<P>,
    next_page_token: Option<String>,
}

/// Just what the set-up needs of a listed product.
#[derive(Deserialize)]
struct Listed {
    id: String,
    sku: String,
}

#[derive(serde::Serialize, Clone)]
struct NewProduct {
    sku: String,
    name: String,
    description: String,
    price_cents: i64,
    currency: String,
    tags: Vec<String>,
}

impl NewProduct {
    fn template() -> Self {
        Self {
            sku: String::new(),
            name: "Bench product".into(),
            description:
                "A product created by lab bench catalog; the same payload on every transport."
                    .into(),
            price_cents: 1999,
            currency: "EUR".into(),
            tags: vec!["bench".into(), "catalog".into()],
        }
    }
}

/// Deletes what earlier runs left, creates products until there are
/// `--seed`, and returns every product's id.
async fn prepare(args: &Args) -> anyhow::Result<Vec<String>> {
    let http = rest_client(false)?;
    let (mut ids, leftovers) = survey(&http, &args.rest).await?;
    if !leftovers.is_empty() {
        eprintln!(
            "deleting {} products an earlier run created…",
            leftovers.len()
        );
        remove(&http, &args.rest, leftovers).await?;
    }
    let missing = args.seed.saturating_sub(ids.len());
    if missing > 0 {
        eprintln!("seeding {missing} products…");
        let template = NewProduct::template();
        let prefix = uuid::Uuid::now_v7().simple().to_string().to_uppercase();
        let prefix = &prefix[prefix.len() - 8..];
        let created: Vec<String> = futures::stream::iter(0..missing)
            .map(|i| {
                let mut product = template.clone();
                product.sku = format!("SEED-{prefix}-{i}");
                let request = http
                    .post(format!("{}/v1/products", args.rest))
                    .json(&product);
                async move { anyhow::Ok(rest_json::<Listed>(request).await?.0.id) }
            })
            .buffer_unordered(16)
            .try_collect()
            .await?;
        ids.extend(created);
    }
    if ids.is_empty() {
        bail!("no products to read; run with --seed 1 or more");
    }
    Ok(ids)
}

/// Deletes the products `create` made.
async fn tidy(args: &Args) -> anyhow::Result<()> {
    let http = rest_client(false)?;
    let (_, ours) = survey(&http, &args.rest).await?;
    remove(&http, &args.rest, ours).await
}

/// Every product's id: the catalog's, and the bench's own (`BENCH-…`).
async fn survey(http: &reqwest::Client, base: &str) -> anyhow::Result<(Vec<String>, Vec<String>)> {
    let (mut ids, mut ours) = (Vec::new(), Vec::new());
    let mut token = String::new();
    loop {
        let request = http
            .get(format!("{base}/v1/products"))
            .query(&[("page_size", "1000"), ("page_token", &token)]);
        let page: PageJson<Listed> = rest_json(request)
            .await
            .with_context(|| {
                format!(
                    "catalog REST is not reachable at {base}; start it with `cargo run -p lab -- up`"
                )
            })?
            .0;
        for p in page.products {
            if p.sku.starts_with(BENCH_SKU) {
                ours.push(p.id);
            } else {
                ids.push(p.id);
            }
        }
        match page.next_page_token {
            Some(t) => token = t,
            None => return Ok((ids, ours)),
        }
    }
}

async fn remove(http: &reqwest::Client, base: &str, ids: Vec<String>) -> anyhow::Result<()> {
    if ids.is_empty() {
        return Ok(());
    }
    futures::stream::iter(ids)
        .map(|id| async move {
            let response = http
                .delete(format!("{base}/v1/products/{id}"))
                .send()
                .await?;
            if response.status() != reqwest::StatusCode::NOT_FOUND {
                response.error_for_status()?;
            }
            anyhow::Ok(())
        })
        .buffer_unordered(32)
        .try_collect::<()>()
        .await
}

/// Sends a REST request and decodes its JSON body; returns it and its size.
async fn rest_json<T: DeserializeOwned>(
    request: reqwest::RequestBuilder,
) -> anyhow::Result<(T, usize)> {
    let body = request.send().await?.error_for_status()?.bytes().await?;
    Ok((serde_json::from_slice(&body)?, body.len()))
}

async fn ping(client: &Client) -> anyhow::Result<usize> {
    match client {
        Client::Rest(http, base) => {
            let response = http.get(format!("{base}/healthz")).send().await?;
            Ok(response.error_for_status()?.bytes().await?.len())
        }
        Client::Grpc(grpc) => {
            let reply = grpc
                .health
                .clone()
                .check(tonic_health::pb::HealthCheckRequest {
                    service: String::new(),
                })
                .await?
                .into_inner();
            Ok(reply.encoded_len())
        }
    }
}

async fn get(client: &Client, id: &str) -> anyhow::Result<usize> {
    match client {
        Client::Rest(http, base) => {
            let request = http.get(format!("{base}/v1/products/{id}"));
            Ok(rest_json::<ProductJson>(request).await?.1)
        }
        Client::Grpc(grpc) => {
            let product = grpc
                .catalog
                .clone()
                .get_product(pb::GetProductRequest { id: id.to_owned() })
                .await?
                .into_inner();
            Ok(product.encoded_len())
        }
    }
}

/// One page of `size` after `token`; returns its size and the next token
/// (empty on the last page).
async fn list(client: &Client, size: u32, token: String) -> anyhow::Result<(usize, String)> {
    match client {
        Client::Rest(http, base) => {
            let request = http
                .get(format!("{base}/v1/products"))
                .query(&[("page_size", size.to_string()), ("page_token", token)]);
            let (page, bytes) = rest_json::<PageJson<ProductJson>>(request).await?;
            Ok((bytes, page.next_page_token.unwrap_or_default()))
        }
        Client::Grpc(grpc) => {
            let page = grpc
                .catalog
                .clone()
                .list_products(pb::ListProductsRequest {
                    page_size: Some(size),
                    page_token: token,
                })
                .await?
                .into_inner();
            Ok((page.encoded_len(), page.next_page_token))
        }
    }
}

/// The whole catalog, page by page.
async fn page_all(client: &Client) -> anyhow::Result<usize> {
    let (mut total, mut token) = list(client, 1000, String::new()).await?;
    while !token.is_empty() {
        let (bytes, next) = list(client, 1000, token).await?;
        total += bytes;
        token = next;
    }
    Ok(total)
}

/// The whole catalog in one `StreamProducts` call.
async fn stream_all(client: &Client) -> anyhow::Result<usize> {
    let Client::Grpc(grpc) = client else {
        bail!("only gRPC streams");
    };
    let mut stream = grpc
        .catalog
        .clone()
        .stream_products(pb::StreamProductsRequest {})
        .await?
        .into_inner();
    let mut total = 0;
    while let Some(product) = stream.message().await? {
        total += product.encoded_len();
    }
    Ok(total)
}

async fn create(client: &Client, template: &NewProduct, sku: String) -> anyhow::Result<usize> {
    match client {
        Client::Rest(http, base) => {
            let mut product = template.clone();
            product.sku = sku;
            let request = http.post(format!("{base}/v1/products")).json(&product);
            Ok(rest_json::<ProductJson>(request).await?.1)
        }
        Client::Grpc(grpc) => {
            let product = grpc
                .catalog
                .clone()
                .create_product(pb::CreateProductRequest {
                    sku,
                    name: template.name.clone(),
                    description: template.description.clone(),
                    price_cents: Some(template.price_cents),
                    currency: template.currency.clone(),
                    tags: template.tags.clone(),
                })
                .await?
                .into_inner();
            Ok(product.encoded_len())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ALL: [Transport; 4] = [
        Transport::RestH1,
        Transport::RestH2,
        Transport::Grpc,
        Transport::GrpcStream,
    ];

    fn shown(variants: &[Variant]) -> Vec<(&'static str, usize)> {
        variants
            .iter()
            .map(|v| (v.transport.name(), v.connections))
            .collect()
    }

    #[test]
    fn http1_has_a_connection_per_request_and_http2_one_and_n() {
        let conns = [Conns::Fixed(1), Conns::PerRequest];
        assert_eq!(
            shown(&variants(&ALL, &conns, Op::Get, 32)),
            [
                ("rest-h1", 32),
                ("rest-h2", 1),
                ("rest-h2", 32),
                ("grpc", 1),
                ("grpc", 32)
            ]
        );
    }

    #[test]
    fn at_concurrency_one_the_connection_counts_coincide_and_run_once() {
        let conns = [Conns::Fixed(1), Conns::PerRequest, Conns::Fixed(4)];
        assert_eq!(
            shown(&variants(&ALL, &conns, Op::List100, 1)),
            [("rest-h1", 1), ("rest-h2", 1), ("grpc", 1)]
        );
    }

    #[test]
    fn only_the_whole_catalog_is_streamed() {
        let conns = [Conns::Fixed(4)];
        assert_eq!(
            shown(&variants(&ALL, &conns, Op::All, 16)),
            [
                ("rest-h1", 16),
                ("rest-h2", 4),
                ("grpc", 4),
                ("grpc-stream", 4)
            ]
        );
        assert!(variants(&[Transport::GrpcStream], &conns, Op::Get, 16).is_empty());
    }

    #[test]
    fn connections_are_a_number_or_n() {
        assert_eq!(parse_conns("n"), Ok(Conns::PerRequest));
        assert_eq!(parse_conns("4"), Ok(Conns::Fixed(4)));
        assert!(parse_conns("0").is_err());
        assert!(parse_conns("many").is_err());
        assert_eq!(Conns::Fixed(4).resolve(2), 2);
    }

    #[test]
    fn sizes_read_at_a_glance() {
        assert_eq!(size(336.0), "336");
        assert_eq!(size(33_647.0), "33.6 kB");
        assert_eq!(size(3_364_700.0), "3.36 MB");
    }
}
