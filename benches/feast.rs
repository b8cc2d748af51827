//! `strata-feast-bench`: Feast's own online serving against Strata's Feast
//! APIs, the same requests through the same load generator in one run.
//!
//! Starts the local stack, a Strata server with the `fe_*` views of the
//! tests (`TEST_VIEWS`), and two copies of the Feast repo of the tests
//! (`tests/feast/repo`) with the pinned Feast SDK (`.feast-venv`, installed
//! by `scripts/install-deps`): one on Strata (the `remote` online store),
//! one on Feast's own Redis online store on the stack's Redis Cluster. Then:
//!
//! 1. Writes the same generated rows (`--entities` drivers, customers and
//!    pairs) as Parquet into both and materializes each with Feast's engine,
//!    one after the other: rows a second into Strata (through
//!    `/write-to-online-store`) and into Feast's Redis store.
//! 2. Starts Feast's HTTP server (`feast serve`, its defaults: one worker)
//!    and its gRPC server (`feast listen`) on the Redis repo, and checks that
//!    both answer the values Strata's Feast APIs answer.
//! 3. For 1 and 100 entity rows of 10 features over three views (`fe_driver`
//!    7, `fe_customer` 2, `fe_pair` 1): Strata's own API (GetFeatureVectors,
//!    the same features and entities), then Feast's and Strata's HTTP
//!    `/get-online-features`, then Feast's and Strata's gRPC
//!    `GrpcFeatureServer/GetOnlineFeatures`.
//!
//! `cargo run --release -p strata-benches --bin strata-feast-bench -- --help`.
//! Prints a table and writes `target/bench-feast.json`.

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};
use bytes::Bytes;
use clap::Parser;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client as HttpClient;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use rand::Rng;
use serde_json::{Value as Json, json};
use strata_benches::Bench;
use strata_benches::loadgen::{self, Failure, Mode, Report, Sample};
use strata_proto::feast::grpc_feature_server_client::GrpcFeatureServerClient;
use strata_proto::feast::serving::{FeatureList, GetOnlineFeaturesRequest, get_online_features_request};
use strata_proto::feast::types::{RepeatedValue, Value as FeastValue, value::Val};
use strata_proto::v1;
use strata_proto::v1::feature_store_client::FeatureStoreClient;
use strata_tests::feast::{FeastRepo, ago, feast_cli};
use tonic::transport::Channel;

#[derive(Parser, Debug)]
#[command(name = "strata-feast-bench", about = "Feast's own online serving against Strata's Feast APIs, same run")]
struct Args {
    /// Drivers, customers and pairs written and materialized into both.
    #[arg(long, default_value_t = 10_000)]
    entities: usize,
    /// Measured seconds per run.
    #[arg(long, default_value_t = 5.0)]
    secs: f64,
    /// Unmeasured seconds before each run.
    #[arg(long, default_value_t = 1.0)]
    warmup: f64,
    /// Calls in flight (closed loop).
    #[arg(long, default_value_t = 8)]
    concurrency: usize,
    /// Where the JSON report goes.
    #[arg(long, default_value = "target/bench-feast.json")]
    json: PathBuf,
}

/// The request's 10 features: `fe_driver` 7, `fe_customer` 2, `fe_pair` 1.
const FEATURES: [&str; 10] = [
    "fe_driver:conv_rate",
    "fe_driver:trips",
    "fe_driver:name",
    "fe_driver:active",
    "fe_driver:emb",
    "fe_driver:ids",
    "fe_driver:rank",
    "fe_customer:tier",
    "fe_customer:spend",
    "fe_pair:orders",
];

/// Distinct requests of each size, cycled through by the callers.
const REQUESTS: usize = 64;

/// One request's entity rows: driver `i`, customer `ci` (so pair (i, ci)).
fn entity_rows(entities: usize, rows: usize) -> Vec<i64> {
    let mut rng = rand::rng();
    (0..rows).map(|_| rng.random_range(1..=entities as i64)).collect()
}

fn http_body(ids: &[i64]) -> Bytes {
    let customers: Vec<String> = ids.iter().map(|i| format!("c{i}")).collect();
    let body = json!({"features": FEATURES, "entities": {"driver_id": ids, "customer_id": customers}});
    Bytes::from(body.to_string())
}

fn grpc_request(ids: &[i64]) -> GetOnlineFeaturesRequest {
    let column = |val: &dyn Fn(i64) -> Val| RepeatedValue {
        val: ids.iter().map(|&i| FeastValue { val: Some(val(i)) }).collect(),
    };
    GetOnlineFeaturesRequest {
        kind: Some(get_online_features_request::Kind::Features(FeatureList {
            val: FEATURES.iter().map(|f| (*f).to_owned()).collect(),
        })),
        entities: [
            ("driver_id".to_owned(), column(&Val::Int64Val)),
            ("customer_id".to_owned(), column(&|i| Val::StringVal(format!("c{i}")))),
        ]
        .into(),
        ..Default::default()
    }
}

fn vectors_request(ids: &[i64]) -> v1::GetFeatureVectorsRequest {
    let value = |kind| v1::Value { kind: Some(kind) };
    let drivers = ids.iter().map(|&i| value(v1::value::Kind::Int64Value(i))).collect();
    let customers = ids.iter().map(|i| value(v1::value::Kind::StringValue(format!("c{i}")))).collect();
    v1::GetFeatureVectorsRequest {
        features: FEATURES.iter().map(|f| (*f).to_owned()).collect(),
        entities: [
            ("driver_id".to_owned(), v1::JoinKeyColumn { values: drivers }),
            ("customer_id".to_owned(), v1::JoinKeyColumn { values: customers }),
        ]
        .into(),
        ..Default::default()
    }
}

/// A port free now, on loopback.
fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

type Http = HttpClient<HttpConnector, Full<Bytes>>;

fn http_client() -> Http {
    HttpClient::builder(TokioExecutor::new()).build_http()
}

async fn post(client: &Http, url: &str, body: Bytes) -> Result<(u16, Bytes)> {
    let request = http::Request::post(url).header("content-type", "application/json").body(Full::new(body))?;
    let response = client.request(request).await?;
    let status = response.status().as_u16();
    Ok((status, response.into_body().collect().await?.to_bytes()))
}

/// A Feast server (`feast serve` or `feast listen`), stopped when dropped.
struct FeastServer {
    child: tokio::process::Child,
}

impl FeastServer {
    fn start(repo: &FeastRepo, args: &[&str]) -> Result<FeastServer> {
        let child = tokio::process::Command::new(feast_cli()?)
            .arg("-c")
            .arg(repo.path())
            .args(args)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .context("starting a Feast server")?;
        Ok(FeastServer { child })
    }

    /// Waits (up to two minutes: importing feast takes seconds) until
    /// `ready` succeeds, failing at once if the server exits.
    async fn wait<F, Fut>(&mut self, what: &str, ready: F) -> Result<()>
    where
        F: Fn() -> Fut,
        Fut: std::future::Future<Output = bool>,
    {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
        loop {
            if let Some(status) = self.child.try_wait()? {
                bail!("{what} exited: {status}");
            }
            if ready().await {
                return Ok(());
            }
            ensure!(tokio::time::Instant::now() < deadline, "{what} did not answer within two minutes");
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }
}

/// The values of a Feast answer by output name, for comparing two servers'
/// answers to one request. Statuses are left out (Feast's own server says
/// PRESENT for rows it did not find), and so is the order of the columns
/// (Feast's own server does not keep the request's).
fn json_values(body: &[u8]) -> Result<Json> {
    let answer: Json = serde_json::from_slice(body).context("a JSON answer")?;
    let names = answer["metadata"]["feature_names"].as_array().with_context(|| format!("no names in {answer}"))?;
    let results = answer["results"].as_array().with_context(|| format!("no results in {answer}"))?;
    ensure!(names.len() == results.len(), "{} names for {} columns", names.len(), results.len());
    let by_name =
        names.iter().zip(results).map(|(name, r)| (name.as_str().unwrap_or("").to_owned(), r["values"].clone()));
    Ok(Json::Object(by_name.collect()))
}

struct Setup {
    mode: Mode,
    warmup: Duration,
    duration: Duration,
}

impl Setup {
    async fn http(&self, name: &str, url: String, bodies: Arc<Vec<Bytes>>, rows: usize) -> Report {
        let client = http_client();
        loadgen::run(name, self.mode, self.warmup, self.duration, move |i| {
            let (client, url, body) = (client.clone(), url.clone(), bodies[i as usize % bodies.len()].clone());
            async move {
                match post(&client, &url, body).await {
                    Ok((200, _)) => Ok(Sample { keys: rows as u64, sources: [0; 4] }),
                    _ => Err(Failure::Error),
                }
            }
        })
        .await
    }

    async fn feast_grpc(
        &self,
        name: &str,
        addr: SocketAddr,
        requests: Arc<Vec<GetOnlineFeaturesRequest>>,
        rows: usize,
    ) -> Result<Report> {
        let clients = Arc::new(self.channels(addr).await?);
        Ok(loadgen::run(name, self.mode, self.warmup, self.duration, move |i| {
            let mut client = GrpcFeatureServerClient::new(clients[i as usize % clients.len()].clone());
            let request = requests[i as usize % requests.len()].clone();
            async move {
                match client.get_online_features(request).await {
                    Ok(_) => Ok(Sample { keys: rows as u64, sources: [0; 4] }),
                    Err(_) => Err(Failure::Error),
                }
            }
        })
        .await)
    }

    async fn vectors(
        &self,
        name: &str,
        addr: SocketAddr,
        requests: Arc<Vec<v1::GetFeatureVectorsRequest>>,
        rows: usize,
    ) -> Result<Report> {
        let clients = Arc::new(self.channels(addr).await?);
        Ok(loadgen::run(name, self.mode, self.warmup, self.duration, move |i| {
            let mut client = FeatureStoreClient::new(clients[i as usize % clients.len()].clone());
            let request = requests[i as usize % requests.len()].clone();
            async move {
                match client.get_feature_vectors(request).await {
                    Ok(_) => Ok(Sample { keys: rows as u64, sources: [0; 4] }),
                    Err(status) if status.code() == tonic::Code::ResourceExhausted => Err(Failure::Shed),
                    Err(_) => Err(Failure::Error),
                }
            }
        })
        .await)
    }

    /// One channel (HTTP/2 connection) per caller.
    async fn channels(&self, addr: SocketAddr) -> Result<Vec<Channel>> {
        let callers = match self.mode {
            Mode::Closed { callers } => callers,
            Mode::Open { .. } => 8,
        };
        let mut channels = Vec::with_capacity(callers);
        for _ in 0..callers {
            channels.push(Channel::from_shared(format!("http://{addr}"))?.connect().await?);
        }
        Ok(channels)
    }
}

/// The figures of one request size.
struct Size {
    rows: usize,
    own: Report,
    feast_http: Report,
    strata_http: Report,
    feast_grpc: Report,
    strata_grpc: Report,
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    ensure!(args.entities >= 100, "--entities must be at least 100");
    eprintln!("starting the local stack ...");
    let bench = Bench::start().await?;
    let server = bench
        .server(strata_tests::TEST_VIEWS, |file| {
            file.hot_keys.sample_rate = 0.0;
            file.server.max_in_flight = 100_000;
        })
        .await?;
    let grpc_addr = server.grpc_addr();
    let feast_http = server.feast_http_addr().context("Strata's Feast HTTP API is served")?;

    eprintln!("applying the Feast repo twice (on Strata, on Feast's Redis store) ...");
    let on_strata = FeastRepo::on_strata(feast_http).await?;
    let on_redis = FeastRepo::on_redis(&bench.stack.redis_nodes()).await?;

    // The same generated rows into both, materialized one after the other.
    let synth = json!({"cmd": "synth", "n": args.entities, "at": ago(3_600)});
    let window =
        json!({"cmd": "materialize", "start": "2010-01-01T00:00:00+00:00", "end": format!("{}+00:00", ago(0))});
    let mut materialized = Vec::new();
    for (what, repo) in [("Strata", &on_strata), ("Feast's Redis store", &on_redis)] {
        eprintln!("materializing {} rows into {what} ...", 3 * args.entities);
        let results = repo.run(json!([synth, window])).await?;
        for result in &results {
            ensure!(result["ok"] == Json::Bool(true), "into {what}: {result}");
        }
        let seconds = results[1]["seconds"].as_f64().context("the materialization's seconds")?;
        materialized.push((what, seconds));
    }

    eprintln!("starting Feast's HTTP and gRPC servers ...");
    let feast_http_port = free_port()?;
    let mut feast_serve = FeastServer::start(
        &on_redis,
        &["serve", "-h", "127.0.0.1", "-p", &feast_http_port.to_string(), "--no-access-log"],
    )?;
    let feast_grpc: SocketAddr = format!("127.0.0.1:{}", free_port()?).parse()?;
    let mut feast_listen = FeastServer::start(&on_redis, &["listen", "-a", &feast_grpc.to_string()])?;
    let client = http_client();
    let health = format!("http://127.0.0.1:{feast_http_port}/health");
    feast_serve
        .wait("feast serve", || async {
            let request = http::Request::get(health.as_str()).body(Full::new(Bytes::new()));
            match request {
                Ok(request) => client.request(request).await.is_ok_and(|r| r.status().is_success()),
                Err(_) => false,
            }
        })
        .await?;
    let probe = grpc_request(&[1]);
    feast_listen
        .wait("feast listen", || async {
            match Channel::from_shared(format!("http://{feast_grpc}")) {
                Ok(endpoint) => match endpoint.connect().await {
                    Ok(channel) => {
                        GrpcFeatureServerClient::new(channel).get_online_features(probe.clone()).await.is_ok()
                    }
                    Err(_) => false,
                },
                Err(_) => false,
            }
        })
        .await?;

    let feast_url = format!("http://127.0.0.1:{feast_http_port}/get-online-features");
    let strata_url = format!("http://{feast_http}/get-online-features");
    let setup = Setup {
        mode: Mode::Closed { callers: args.concurrency },
        warmup: Duration::from_secs_f64(args.warmup),
        duration: Duration::from_secs_f64(args.secs),
    };
    let mut sizes = Vec::new();
    for rows in [1, 100] {
        let ids: Vec<Vec<i64>> = (0..REQUESTS).map(|_| entity_rows(args.entities, rows)).collect();
        let bodies: Arc<Vec<Bytes>> = Arc::new(ids.iter().map(|ids| http_body(ids)).collect());
        let grpc: Arc<Vec<_>> = Arc::new(ids.iter().map(|ids| grpc_request(ids)).collect());
        let vectors: Arc<Vec<_>> = Arc::new(ids.iter().map(|ids| vectors_request(ids)).collect());

        // Both answer the same values, or the comparison means nothing.
        for body in bodies.iter().take(4) {
            let (feast_status, feast_body) = post(&client, &feast_url, body.clone()).await?;
            let (strata_status, strata_body) = post(&client, &strata_url, body.clone()).await?;
            ensure!(
                feast_status == 200 && strata_status == 200,
                "HTTP {feast_status} from Feast, {strata_status} from Strata"
            );
            let (ours, theirs) = (json_values(&strata_body)?, json_values(&feast_body)?);
            ensure!(ours == theirs, "different answers over HTTP: Strata {ours}, Feast {theirs}");
        }
        for request in grpc.iter().take(4) {
            let mut feast = GrpcFeatureServerClient::connect(format!("http://{feast_grpc}")).await?;
            let mut strata = GrpcFeatureServerClient::connect(format!("http://{grpc_addr}")).await?;
            let theirs = feast.get_online_features(request.clone()).await?.into_inner();
            let ours = strata.get_online_features(request.clone()).await?.into_inner();
            let values = |r: &strata_proto::feast::serving::GetOnlineFeaturesResponse| {
                let names = r.metadata.as_ref().and_then(|m| m.feature_names.as_ref()).map(|n| n.val.clone());
                let mut columns: Vec<_> =
                    names.unwrap_or_default().into_iter().zip(r.results.iter().map(|v| v.values.clone())).collect();
                columns.sort_by(|a, b| a.0.cmp(&b.0));
                columns
            };
            ensure!(values(&ours) == values(&theirs), "different answers over gRPC");
        }

        let own = setup.vectors(&format!("strata-vectors-{rows}"), grpc_addr, vectors, rows).await?;
        let feast_http = setup.http(&format!("feast-http-{rows}"), feast_url.clone(), bodies.clone(), rows).await;
        let strata_http = setup.http(&format!("strata-http-{rows}"), strata_url.clone(), bodies, rows).await;
        let feast_grpc = setup.feast_grpc(&format!("feast-grpc-{rows}"), feast_grpc, grpc.clone(), rows).await?;
        let strata_grpc = setup.feast_grpc(&format!("strata-grpc-{rows}"), grpc_addr, grpc, rows).await?;
        sizes.push(Size { rows, own, feast_http, strata_http, feast_grpc, strata_grpc });
    }
    drop((feast_serve, feast_listen));

    print_table(&sizes, &materialized, 3 * args.entities, args.concurrency);
    let json = json!({
        "machine": { "cores": std::thread::available_parallelism().map_or(0, |n| n.get()), "shared": "Strata, Feast, the load generator, Redis and PostgreSQL on one machine" },
        "mode": setup.mode.label(),
        "materialization": materialized.iter().map(|(what, seconds)| json!({
            "into": what, "rows": 3 * args.entities, "seconds": seconds, "rows_per_sec": (3 * args.entities) as f64 / seconds,
        })).collect::<Vec<_>>(),
        "serving": sizes.iter().map(|s| json!({
            "entity_rows": s.rows, "features": FEATURES.len(),
            "strata_vectors": s.own.json(), "feast_http": s.feast_http.json(), "strata_http": s.strata_http.json(),
            "feast_grpc": s.feast_grpc.json(), "strata_grpc": s.strata_grpc.json(),
            "http_throughput_vs_feast": ratio(&s.strata_http, &s.feast_http),
            "grpc_throughput_vs_feast": ratio(&s.strata_grpc, &s.feast_grpc),
            "http_p99_vs_own_api": s.strata_http.ms(0.99) / s.own.ms(0.99),
            "grpc_p99_vs_own_api": s.strata_grpc.ms(0.99) / s.own.ms(0.99),
        })).collect::<Vec<_>>(),
    });
    if let Some(dir) = args.json.parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(&args.json, serde_json::to_string_pretty(&json)? + "\n")?;
    eprintln!("wrote {}", args.json.display());
    server.shutdown().await;
    bench.stop().await;
    Ok(())
}

fn ratio(a: &Report, b: &Report) -> f64 {
    a.calls_per_sec() / b.calls_per_sec().max(1e-9)
}

fn print_table(sizes: &[Size], materialized: &[(&str, f64)], rows: usize, concurrency: usize) {
    println!("\nFeast's servers against Strata's Feast APIs, closed loop, {concurrency} in flight, same run\n");
    println!("| request | run | calls/s | p50 ms | p99 ms | p999 ms | errors | against |");
    println!("|---|---|---|---|---|---|---|---|");
    for s in sizes {
        let request = format!("{} × {}", s.rows, FEATURES.len());
        let line = |r: &Report, against: String| {
            println!(
                "| {request} | {} | {:.0} | {:.3} | {:.3} | {:.3} | {} | {against} |",
                r.name,
                r.calls_per_sec(),
                r.ms(0.5),
                r.ms(0.99),
                r.ms(0.999),
                r.errors + r.shed
            );
        };
        line(&s.own, "Strata's own API (baseline)".into());
        line(&s.feast_http, "baseline".into());
        line(
            &s.strata_http,
            format!(
                "{:.1}× Feast's throughput; p99 {:.2}× the own API's",
                ratio(&s.strata_http, &s.feast_http),
                s.strata_http.ms(0.99) / s.own.ms(0.99)
            ),
        );
        line(&s.feast_grpc, "baseline".into());
        line(
            &s.strata_grpc,
            format!(
                "{:.1}× Feast's throughput; p99 {:.2}× the own API's",
                ratio(&s.strata_grpc, &s.feast_grpc),
                s.strata_grpc.ms(0.99) / s.own.ms(0.99)
            ),
        );
    }
    println!("\nMaterialization of {rows} rows (Feast's engine, from Parquet):\n");
    for (what, seconds) in materialized {
        println!("- into {what}: {seconds:.1} s, {:.0} rows/s", rows as f64 / seconds);
    }
    if let [(_, strata), (_, redis)] = materialized {
        println!("- Strata against Feast's Redis store: {:.2}×", redis / strata);
    }
}
