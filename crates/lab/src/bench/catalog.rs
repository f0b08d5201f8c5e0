//! `lab bench catalog`: the same operations over REST/HTTP1.1, REST/HTTP2 and
//! gRPC against one running catalog.
//!
//! Fairness, because published REST-vs-gRPC numbers are often a client
//! set-up comparison in disguise:
//! - every client is built once per run and reused: REST/HTTP1.1 keeps a pool of
//!   keep-alive connections (one per in-flight request, as HTTP/1.1 needs),
//!   REST/HTTP2 and gRPC each multiplex over one connection;
//! - TCP_NODELAY on every client, as on the servers;
//! - each cell has an unmeasured warm-up;
//! - the same products, the same page, the same create payload;
//! - run the release build (`cargo run --release -p lab -- bench catalog`).
//!
//! The `ping` operation (`GET /healthz`, `grpc.health.v1.Health/Check`) does
//! no database work: it is the floor of each transport in the same run.

use std::{
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use anyhow::{Context, bail, ensure};
use clap::ValueEnum;
use lab_proto::catalog::v1::{self as pb, catalog_service_client::CatalogServiceClient};
use prost::Message;
use serde::Deserialize;
use tonic::transport::{Channel, Endpoint};

use super::{Load, measure, plot, print_table, progress};

#[derive(clap::Args, Debug)]
pub struct Args {
    /// The catalog's REST base URL.
    #[arg(long, default_value = "http://localhost:8080")]
    rest: String,
    /// The catalog's gRPC URL.
    #[arg(long, default_value = "http://localhost:50051")]
    grpc: String,
    /// Operations to measure.
    #[arg(long, value_enum, value_delimiter = ',', default_values = ["ping", "get", "list", "create"])]
    ops: Vec<Op>,
    /// Transports to compare; the first is the baseline of the ratios.
    #[arg(long, value_enum, value_delimiter = ',', default_values = ["rest-h1", "rest-h2", "grpc"])]
    transports: Vec<Transport>,
    /// Make sure at least this many products exist before measuring.
    #[arg(long, env = "LAB_BENCH_SEED", default_value_t = 1000)]
    seed: usize,
    #[command(flatten)]
    load: Load,
}

#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
enum Op {
    /// The transport alone: /healthz or the gRPC health check.
    Ping,
    /// Read one product by id.
    Get,
    /// Read a page of 100 products.
    List,
    /// Create a product.
    Create,
}

#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
enum Transport {
    RestH1,
    RestH2,
    Grpc,
}

impl Transport {
    fn name(self) -> &'static str {
        match self {
            Transport::RestH1 => "rest-h1",
            Transport::RestH2 => "rest-h2",
            Transport::Grpc => "grpc",
        }
    }
}

impl Op {
    fn name(self) -> &'static str {
        match self {
            Op::Ping => "ping",
            Op::Get => "get",
            Op::List => "list100",
            Op::Create => "create",
        }
    }
}

/// One client per transport, built once and shared by every worker.
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
        .timeout(Duration::from_secs(30));
    let builder = if http2 {
        builder.http2_prior_knowledge()
    } else {
        builder.http1_only()
    };
    Ok(builder.build()?)
}

async fn client(transport: Transport, args: &Args) -> anyhow::Result<Client> {
    Ok(match transport {
        Transport::RestH1 => Client::Rest(rest_client(false)?, args.rest.as_str().into()),
        Transport::RestH2 => Client::Rest(rest_client(true)?, args.rest.as_str().into()),
        Transport::Grpc => {
            let channel = Endpoint::from_shared(args.grpc.clone())?
                .tcp_nodelay(true)
                .connect()
                .await
                .with_context(|| format!("catalog gRPC is not reachable at {}", args.grpc))?;
            Client::Grpc(Box::new(GrpcClients {
                catalog: CatalogServiceClient::new(channel.clone()),
                health: tonic_health::pb::health_client::HealthClient::new(channel),
            }))
        }
    })
}

pub async fn run(args: Args) -> anyhow::Result<()> {
    ensure!(!args.transports.is_empty(), "--transports is empty");
    let ids: Arc<[String]> = seed(&args).await?.into();
    let run_id = uuid::Uuid::now_v7().simple().to_string().to_uppercase();
    let run_id: Arc<str> = run_id[run_id.len() - 8..].into();
    let payload = Arc::new(NewProduct::template());
    // One sequence for the whole run, warm-ups included, so skus never repeat.
    let sku_seq = Arc::new(AtomicU64::new(0));

    let cells = (args.ops.len() * args.transports.len() * args.load.concurrency.len()) as u64;
    let bar = progress(cells);
    let mut rows = Vec::new();
    let mut clients = Vec::new();
    for &transport in &args.transports {
        clients.push((transport, client(transport, &args).await?));
    }
    for &op in &args.ops {
        for &concurrency in &args.load.concurrency {
            // Rotate who goes first, so no transport always measures a
            // machine still busy with the previous cell.
            clients.rotate_left(1);
            for (transport, client) in &clients {
                let (transport, client) = (*transport, client.clone());
                bar.set_message(format!(
                    "{} {} c={concurrency}",
                    transport.name(),
                    op.name()
                ));
                let (ids, run_id, payload, sku_seq) = (
                    ids.clone(),
                    run_id.clone(),
                    payload.clone(),
                    sku_seq.clone(),
                );
                let tag = transport.name();
                let row = measure(&args.load, concurrency, tag, op.name(), move |worker, n| {
                    let (client, ids, run_id, payload) =
                        (client.clone(), ids.clone(), run_id.clone(), payload.clone());
                    let seq = sku_seq.fetch_add(1, Ordering::Relaxed);
                    async move {
                        match op {
                            Op::Ping => ping(&client).await,
                            Op::Get => get(&client, &ids[(n as usize + worker) % ids.len()]).await,
                            Op::List => list(&client).await,
                            Op::Create => {
                                let sku = format!("BENCH-{run_id}-{seq}");
                                create(&client, &payload, sku).await
                            }
                        }
                    }
                })
                .await?;
                rows.push(row);
                bar.inc(1);
            }
        }
    }
    bar.finish_and_clear();
    let position = |name: &str| args.transports.iter().position(|t| t.name() == name);
    rows.sort_by_key(|r| {
        let op = args.ops.iter().position(|o| o.name() == r.op);
        (op, r.concurrency, position(&r.variant))
    });

    if args.load.json {
        println!("{}", serde_json::to_string_pretty(&rows)?);
    } else {
        print_table(&rows, args.transports[0].name());
    }
    if let Some(path) = &args.load.plot {
        plot(path, "catalog: latency by transport", &rows)?;
        eprintln!("plot written to {}", path.display());
    }
    Ok(())
}

#[derive(Deserialize)]
struct Listed {
    products: Vec<Listed1>,
    next_page_token: Option<String>,
}

#[derive(Deserialize)]
struct Listed1 {
    id: String,
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

/// Returns the ids of at least `--seed` products, creating the missing ones.
async fn seed(args: &Args) -> anyhow::Result<Vec<String>> {
    let http = rest_client(false)?;
    let mut ids = Vec::new();
    let mut token: Option<String> = None;
    while ids.len() < args.seed {
        let mut request = http
            .get(format!("{}/v1/products", args.rest))
            .query(&[("page_size", "1000")]);
        if let Some(t) = &token {
            request = request.query(&[("page_token", t)]);
        }
        let page: Listed = request
            .send()
            .await
            .with_context(|| {
                format!(
                    "catalog REST is not reachable at {}; start it with `cargo run -p lab -- up`",
                    args.rest
                )
            })?
            .error_for_status()?
            .json()
            .await?;
        ids.extend(page.products.into_iter().map(|p| p.id));
        token = page.next_page_token;
        if token.is_none() {
            break;
        }
    }
    let missing = args.seed.saturating_sub(ids.len());
    if missing > 0 {
        eprintln!("seeding {missing} products…");
        let template = NewProduct::template();
        let prefix = uuid::Uuid::now_v7().simple().to_string().to_uppercase();
        for i in 0..missing {
            let mut product = template.clone();
            product.sku = format!("SEED-{}-{i}", &prefix[prefix.len() - 8..]);
            let created: Listed1 = http
                .post(format!("{}/v1/products", args.rest))
                .json(&product)
                .send()
                .await?
                .error_for_status()?
                .json()
                .await?;
            ids.push(created.id);
        }
    }
    if ids.is_empty() {
        bail!("no products to read; run with --seed 1 or more");
    }
    Ok(ids)
}

async fn rest_call(request: reqwest::RequestBuilder) -> anyhow::Result<usize> {
    let response = request.send().await?.error_for_status()?;
    Ok(response.bytes().await?.len())
}

async fn ping(client: &Client) -> anyhow::Result<usize> {
    match client {
        Client::Rest(http, base) => rest_call(http.get(format!("{base}/healthz"))).await,
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
        Client::Rest(http, base) => rest_call(http.get(format!("{base}/v1/products/{id}"))).await,
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

async fn list(client: &Client) -> anyhow::Result<usize> {
    match client {
        Client::Rest(http, base) => {
            rest_call(
                http.get(format!("{base}/v1/products"))
                    .query(&[("page_size", "100")]),
            )
            .await
        }
        Client::Grpc(grpc) => {
            let page = grpc
                .catalog
                .clone()
                .list_products(pb::ListProductsRequest {
                    page_size: Some(100),
                    page_token: String::new(),
                })
                .await?
                .into_inner();
            Ok(page.encoded_len())
        }
    }
}

async fn create(client: &Client, template: &NewProduct, sku: String) -> anyhow::Result<usize> {
    match client {
        Client::Rest(http, base) => {
            let mut product = template.clone();
            product.sku = sku;
            rest_call(http.post(format!("{base}/v1/products")).json(&product)).await
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
