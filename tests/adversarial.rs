//! Hostile and careless clients against the real stack: every case gets a
//! clear status naming what is wrong, nothing wrong is stored, and the
//! server goes on serving afterwards.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use futures::StreamExt as _;

use anyhow::{Context, Result, bail, ensure};
use fred::prelude::{KeysInterface as _, ListInterface as _};
use strata_core::{Content, EventTime, Row, Value};
use strata_proto::v1::{self, value::Kind};
use strata_server::RunningServer;
use strata_tests::wire::{get, row, source, status, ts, v, write};
use strata_tests::{Env, client, integration_tests, sample, scrape};
use tonic::Code;

integration_tests!(
    concurrent_writers_of_the_same_keys_in_opposite_orders_never_deadlock,
    clients_cannot_choose_redis_slots_and_no_name_reaches_another_namespace,
    oversized_values_and_answers_are_refused_naming_the_limit_and_nothing_is_stored,
    event_times_far_in_the_future_are_refused,
    malformed_and_oversized_requests_are_client_errors_not_server_errors,
    long_names_are_echoed_as_a_short_prefix,
    corrupt_and_foreign_redis_entries_are_misses_and_never_open_the_breaker,
    connections_over_the_limit_are_refused_and_the_others_served,
    a_flood_of_writes_with_tiny_deadlines_does_not_crowd_out_genuine_repairs,
    stalled_streams_are_capped_per_connection_and_ended_at_the_request_timeout,
);

/// A GetFeaturesRequest whose keys are bytes: the same wire format, but
/// free to carry invalid UTF-8.
#[derive(Clone, PartialEq, prost::Message)]
struct RawGet {
    #[prost(string, tag = "1")]
    feature_view: String,
    #[prost(bytes = "vec", repeated, tag = "2")]
    entity_keys: Vec<Vec<u8>>,
}

async fn raw_get(server: &RunningServer, request: RawGet) -> Result<tonic::Status> {
    let channel = tonic::transport::Endpoint::new(format!("http://{}", server.grpc_addr()))?.connect().await?;
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready().await?;
    let codec = tonic_prost::ProstCodec::<RawGet, v1::GetFeaturesResponse>::default();
    let path = tonic::codegen::http::uri::PathAndQuery::from_static("/strata.v1.FeatureStore/GetFeatures");
    match grpc.unary(tonic::Request::new(request), path, codec).await {
        Ok(_) => bail!("a malformed request was answered"),
        Err(status) => Ok(status),
    }
}

/// The status of a call that must be refused.
fn refused<T: std::fmt::Debug>(result: Result<T, tonic::Status>) -> Result<tonic::Status> {
    match result {
        Ok(answer) => bail!("the call was answered: {answer:?}"),
        Err(status) => Ok(status),
    }
}

/// The server still answers a plain read correctly.
async fn still_serves(server: &RunningServer, view: &str) -> Result<()> {
    let mut c = client(server).await?;
    c.write_features(write(view, vec![row("alive", ts(1_700_000_000, 0), n(1))])).await?;
    let rows = c.get_features(get(view, &["alive"], &["n"])).await?.into_inner().rows;
    ensure!(rows.len() == 1 && status(&rows[0]) == v1::RowStatus::Found, "the server no longer serves: {rows:?}");
    Ok(())
}

fn code_count(page: &str, method: &str, code: &str) -> f64 {
    sample(page, "strata_grpc_requests_total", &[("method", method), ("code", code)])
}

fn n(value: i64) -> Vec<(&'static str, v1::Value)> {
    vec![("n", v(Kind::Int64Value(value)))]
}

fn outcome(result: &v1::RowResult) -> v1::WriteOutcome {
    v1::WriteOutcome::try_from(result.outcome).unwrap_or(v1::WriteOutcome::Unspecified)
}

/// 200 keys that all carry the hash tag `{abc}` land in many slots, on
/// every primary; an entry and its lease share a slot; and entries of a
/// view whose key is another view's name do not touch that view's hot-key
/// set (nor anything else of Strata's).
async fn clients_cannot_choose_redis_slots_and_no_name_reaches_another_namespace(env: &'static Env) -> Result<()> {
    let server = env.server_with(|c| c.hot_keys.sample_rate = 1.0).await?;
    let l2 = server.tiers().l2();
    let keys: Vec<String> = (0..200).map(|i| format!("{{abc}}{i}")).collect();
    let rows = keys.iter().map(|k| row(k, ts(1_700_000_000, 0), n(7))).collect();
    let answer = client(&server).await?.write_features(write("hostile", rows)).await?.into_inner();
    ensure!(answer.rows_written == 200, "{answer:?}");
    let slots: Vec<u16> = keys.iter().map(|k| fred::util::redis_keyslot(l2.key_of("hostile", k).as_bytes())).collect();
    let distinct: HashSet<u16> = slots.iter().copied().collect();
    ensure!(distinct.len() > 150, "200 keys tagged {{abc}} landed in only {} slots", distinct.len());
    // The harness's cluster gives each of its 3 primaries a third of the slots.
    for (low, high) in [(0, 5460), (5461, 10922), (10923, 16383)] {
        let on = slots.iter().filter(|s| (low..=high).contains(*s)).count();
        ensure!(on > 30, "only {on} of 200 keys on the primary of slots {low}-{high}");
    }
    for k in &keys {
        let entry = fred::util::redis_keyslot(l2.key_of("hostile", k).as_bytes());
        let lease = fred::util::redis_keyslot(l2.lease_key_of("hostile", k).as_bytes());
        ensure!(entry == lease, "{k}: entry in slot {entry}, lease in {lease}");
    }
    let stored: Option<Vec<u8>> = l2.client().get(l2.key_of("hostile", &keys[0])).await?;
    ensure!(stored.is_some(), "the write left its entry under Strata's key");

    // Reads of `hostile` are counted in its hot-key set; then view `hot`
    // gets an entity named `hostile` (once `<prefix>hot:hostile`, the set).
    let c = &mut client(&server).await?;
    let refs: Vec<&str> = keys.iter().map(String::as_str).collect();
    c.get_features(get("hostile", &refs, &["n"])).await?;
    wait_for_top_keys(&server, "hostile").await?;
    c.write_features(write("hot", vec![row("hostile", ts(1_700_000_000, 0), n(3))])).await?;
    let read = c.get_features(get("hot", &["hostile"], &["n"])).await?.into_inner().rows;
    ensure!(read[0].values[0].kind == Some(Kind::Int64Value(3)), "{read:?}");
    let top = l2.top_keys("hostile", 500).await?;
    ensure!(top.len() == 200, "the hot-key set of view hostile still holds its 200 keys: {}", top.len());
    server.shutdown().await;
    Ok(())
}

/// Sampled reads are recorded in the background: waits until they are.
async fn wait_for_top_keys(server: &RunningServer, view: &str) -> Result<()> {
    for _ in 0..200 {
        if server.tiers().l2().top_keys(view, 1).await?.len() == 1 {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    bail!("reads of {view} were never sampled")
}

/// A 3.9 MB value is refused (INVALID_ARGUMENT, naming the limit) and not
/// stored; a read whose answer would be about a gigabyte is refused
/// (RESOURCE_EXHAUSTED) before it is built.
async fn oversized_values_and_answers_are_refused_naming_the_limit_and_nothing_is_stored(
    env: &'static Env,
) -> Result<()> {
    let server = env.server().await?;
    let mut c = client(&server).await?.max_encoding_message_size(64 << 20).max_decoding_message_size(64 << 20);
    let huge = "x".repeat(3_900_000);
    let rows = vec![
        row("big:ok", ts(1_700_000_000, 0), n(1)),
        row("big:huge", ts(1_700_000_000, 0), vec![("s", v(Kind::StringValue(huge)))]),
    ];
    let error = refused(c.write_features(write("hostile", rows)).await)?;
    ensure!(error.code() == Code::InvalidArgument, "{error:?}");
    ensure!(
        error.message().contains("rows[1].features[\"s\"]") && error.message().contains("limits.max_value_bytes"),
        "{}",
        error.message()
    );
    ensure!(error.message().len() < 300, "the message is short: {} bytes", error.message().len());
    let rows = c.get_features(get("hostile", &["big:ok", "big:huge"], &["s"])).await?.into_inner().rows;
    ensure!(rows.iter().all(|r| status(r) == v1::RowStatus::NotFound), "nothing of the request was stored: {rows:?}");

    // A value under the limit, asked for 1,000 times in one call.
    let large = vec![0.5f32; 200_000];
    let rows = vec![row(
        "big:emb",
        ts(1_700_000_000, 0),
        vec![("emb", v(Kind::FloatListValue(v1::FloatList { values: large })))],
    )];
    ensure!(c.write_features(write("hostile", rows)).await?.into_inner().rows_written == 1);
    let keys = vec!["big:emb"; 1_000];
    let error = refused(c.get_features(get("hostile", &keys, &["emb"])).await)?;
    ensure!(error.code() == Code::ResourceExhausted, "{error:?}");
    ensure!(error.message().contains("limits.max_response_bytes"), "{}", error.message());
    // Asked once, it is answered whole.
    let rows = c.get_features(get("hostile", &["big:emb"], &["emb"])).await?.into_inner().rows;
    ensure!(matches!(&rows[0].values[0].kind, Some(Kind::FloatListValue(l)) if l.values.len() == 200_000));
    still_serves(&server, "hostile").await?;
    server.shutdown().await;
    Ok(())
}

/// A write dated 9999-12-31 would make every real write of its key
/// SKIPPED_OLDER forever: refused, and a real write afterwards lands.
async fn event_times_far_in_the_future_are_refused(env: &'static Env) -> Result<()> {
    let server = env.server().await?;
    let mut c = client(&server).await?;
    let year_9999 = ts(253_402_214_400, 0);
    let error = refused(c.write_features(write("hostile", vec![row("future", year_9999, n(1))])).await)?;
    ensure!(error.code() == Code::InvalidArgument, "{error:?}");
    ensure!(error.message().contains("limits.max_future_event_time"), "{}", error.message());
    let delete = v1::DeleteFeaturesRequest {
        feature_view: "hostile".into(),
        entity_keys: vec!["future".into()],
        event_time: Some(year_9999),
    };
    ensure!(refused(c.delete_features(delete).await)?.code() == Code::InvalidArgument);
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?.as_secs() as i64;
    let answer = c.write_features(write("hostile", vec![row("future", ts(now, 0), n(2))])).await?.into_inner();
    ensure!(answer.rows_written == 1, "a write at the real time lands: {answer:?}");
    server.shutdown().await;
    Ok(())
}

/// A key that is not UTF-8 is INVALID_ARGUMENT and a 5 MB request
/// RESOURCE_EXHAUSTED (tonic's own answers are INTERNAL and OUT_OF_RANGE);
/// neither counts as a server error, and the server goes on serving.
async fn malformed_and_oversized_requests_are_client_errors_not_server_errors(env: &'static Env) -> Result<()> {
    let server = env.server().await?;
    let status =
        raw_get(&server, RawGet { feature_view: "hostile".into(), entity_keys: vec![vec![0xff, 0xfe, b'k']] }).await?;
    ensure!(status.code() == Code::InvalidArgument, "{status:?}");
    ensure!(status.message().contains("UTF-8"), "{}", status.message());

    let keys: Vec<Vec<u8>> = (0..5_000).map(|i| format!("{i:0>1000}").into_bytes()).collect();
    let status = raw_get(&server, RawGet { feature_view: "hostile".into(), entity_keys: keys }).await?;
    ensure!(status.code() == Code::ResourceExhausted, "{status:?}");
    ensure!(status.message().contains("limits.max_request_bytes"), "{}", status.message());
    ensure!(status.message().len() < 200);

    let page = scrape(&server).await?;
    ensure!(code_count(&page, "GetFeatures", "INVALID_ARGUMENT") >= 1.0, "counted as the client's error");
    ensure!(code_count(&page, "GetFeatures", "RESOURCE_EXHAUSTED") >= 1.0);
    for code in ["INTERNAL", "OUT_OF_RANGE", "UNKNOWN"] {
        ensure!(code_count(&page, "GetFeatures", code) == 0.0, "counted as {code}");
    }
    still_serves(&server, "hostile").await?;
    server.shutdown().await;
    Ok(())
}

/// A 1 MB view name (or feature name) is not sent back whole.
async fn long_names_are_echoed_as_a_short_prefix(env: &'static Env) -> Result<()> {
    let server = env.server().await?;
    let mut c = client(&server).await?;
    let long = "v".repeat(1 << 20);
    let error = refused(c.get_features(get(&long, &["k"], &[])).await)?;
    ensure!(error.code() == Code::InvalidArgument, "{error:?}");
    ensure!(error.message().len() < 1_000, "{} bytes echoed", error.message().len());
    ensure!(error.message().contains("1048576 bytes"), "{}", error.message());
    let error = refused(c.get_features(get("hostile", &["k"], &[&long])).await)?;
    ensure!(error.code() == Code::InvalidArgument && error.message().len() < 1_000, "{} bytes", error.message().len());
    server.shutdown().await;
    Ok(())
}

/// An entry with the view's fingerprint but the wrong number of values,
/// and a value of another Redis type at an entry's key, read as misses (the
/// row comes from PostgreSQL), never panic, and do not open the breaker;
/// the fill then replaces them.
async fn corrupt_and_foreign_redis_entries_are_misses_and_never_open_the_breaker(env: &'static Env) -> Result<()> {
    // A patient Redis client: on a busy machine, with other tests running,
    // genuine timeouts must not be what opens this server's breaker.
    let server = env
        .server_with(|c| {
            c.l1.max_bytes = 0;
            c.redis.command_timeout = Duration::from_secs(5);
        })
        .await?;
    let mut c = client(&server).await?;
    let rows = vec![row("corrupt:1", ts(1_700_000_000, 0), n(11)), row("corrupt:2", ts(1_700_000_000, 0), n(12))];
    c.write_features(write("hostile", rows)).await?;
    let registry = env.registry()?;
    let view = registry.get("hostile").context("view")?;
    let l2 = server.tiers().l2();
    // One value for a view of three features, at a newer version.
    let short = Row { event_time: EventTime(1_800_000_000_000_000), values: vec![Value::Int64(-1)] };
    let far = i64::MAX / 2;
    let bytes = strata_core::encode_entry(view.fingerprint, far, Content::Found(&short), short.event_time);
    let () = l2.client().set(l2.key_of("hostile", "corrupt:1"), bytes, None, None, false).await?;
    let () = l2.client().del(l2.key_of("hostile", "corrupt:2")).await?;
    let _: i64 = l2.client().rpush(l2.key_of("hostile", "corrupt:2"), "foreign").await?;

    for _ in 0..20 {
        let rows = c.get_features(get("hostile", &["corrupt:1", "corrupt:2"], &["n"])).await?.into_inner().rows;
        ensure!(rows[0].values[0].kind == Some(Kind::Int64Value(11)), "{rows:?}");
        ensure!(rows[1].values[0].kind == Some(Kind::Int64Value(12)), "{rows:?}");
        ensure!(rows.iter().all(|r| status(r) == v1::RowStatus::Found), "{rows:?}");
        // This server's own breaker (the metric is shared by every server
        // of the test process).
        ensure!(l2.breaker().is_closed(), "the redis breaker opened over foreign entries");
    }
    let page = scrape(&server).await?;
    ensure!(sample(&page, "strata_l2_undecodable_total", &[("view", "hostile")]) >= 1.0);
    // The foreign list was replaced by the fill: the next read is an L2 hit.
    server.tiers().settle().await;
    let rows = c.get_features(get("hostile", &["corrupt:2"], &["n"])).await?.into_inner().rows;
    ensure!(source(&rows[0]) == v1::Source::L2, "{rows:?}");
    server.shutdown().await;
    Ok(())
}

/// With `server.max_connections = 2`, a third connection is closed at once
/// while the first two are served.
async fn connections_over_the_limit_are_refused_and_the_others_served(env: &'static Env) -> Result<()> {
    let server = env.server_with(|c| c.server.max_connections = 2).await?;
    let endpoint = tonic::transport::Endpoint::new(format!("http://{}", server.grpc_addr()))?;
    let first = v1::feature_store_client::FeatureStoreClient::new(endpoint.connect().await?);
    let second = v1::feature_store_client::FeatureStoreClient::new(endpoint.connect().await?);
    for mut c in [first.clone(), second.clone()] {
        c.list_feature_views(v1::ListFeatureViewsRequest {}).await?;
    }
    let third = endpoint.clone().timeout(Duration::from_secs(5));
    let refused = match third.connect().await {
        Err(_) => true,
        Ok(channel) => {
            let mut c = v1::feature_store_client::FeatureStoreClient::new(channel);
            c.list_feature_views(v1::ListFeatureViewsRequest {}).await.is_err()
        }
    };
    ensure!(refused, "a third connection was served");
    let page = scrape(&server).await?;
    ensure!(sample(&page, "strata_connections_refused_total", &[]) >= 1.0);
    for mut c in [first, second] {
        c.list_feature_views(v1::ListFeatureViewsRequest {}).await?;
    }
    server.shutdown().await;
    Ok(())
}

/// 1,100 writes whose deadline runs out before their shard answers each
/// queue a repair (the commit might still land); a write whose cache step
/// then fails is still repaired, not dropped for a full queue.
async fn a_flood_of_writes_with_tiny_deadlines_does_not_crowd_out_genuine_repairs(env: &'static Env) -> Result<()> {
    let server = env.server().await?;
    let c = client(&server).await?;
    let flood = futures::stream::iter(0..1_100).map(|i| {
        let mut c = c.clone();
        async move {
            let mut request =
                tonic::Request::new(write("hostile", vec![row(&format!("flood:{i}"), ts(1_700_000_000, 0), n(i))]));
            request.set_timeout(Duration::from_micros(1));
            // FAILED rows or a refused call: either way nothing waits.
            let _ = c.write_features(request).await;
        }
    });
    flood.for_each_concurrent(32, |call| call).await;
    let page = scrape(&server).await?;
    let queued = sample(&page, "strata_cache_repairs_total", &[("view", "hostile"), ("outcome", "queued")]);
    ensure!(queued > 0.0, "the flood queued no repairs: its deadlines were not tiny enough");

    server.tiers().fail_next_cache_steps(1);
    let answer = client(&server)
        .await?
        .write_features(write("contended", vec![row("genuine", ts(1_700_000_000, 0), n(1))]))
        .await?;
    ensure!(answer.into_inner().rows_written == 1);
    for _ in 0..400 {
        let page = scrape(&server).await?;
        let outcome = |o| sample(&page, "strata_cache_repairs_total", &[("view", "contended"), ("outcome", o)]);
        ensure!(outcome("dropped") == 0.0, "the genuine repair was dropped");
        if outcome("repaired") == 1.0 {
            server.shutdown().await;
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    bail!("the genuine repair did not happen within 10 s")
}

/// 32 concurrent writes (and deletes) of the same 200 keys, half in
/// ascending and half in descending key order: PostgreSQL would deadlock
/// if row locks were taken in request order. Every row is written or
/// skipped as older, none fails, and what is stored is the newest write.
async fn concurrent_writers_of_the_same_keys_in_opposite_orders_never_deadlock(env: &'static Env) -> Result<()> {
    const KEYS: usize = 200;
    const WRITERS: i64 = 32;
    let server = env.server().await?;
    let keys: Vec<String> = (0..KEYS).map(|i| format!("contended:{i:03}")).collect();
    let c = client(&server).await?;
    let writers = (0..WRITERS).map(|w| {
        let mut c = c.clone();
        let mut order = keys.clone();
        if w % 2 == 1 {
            order.reverse();
        }
        async move {
            // Each writer its own event time, so exactly one wins per key.
            let rows = order.iter().map(|k| row(k, ts(1_000 + w, 0), n(w))).collect();
            let answer = c.write_features(write("contended", rows)).await?.into_inner();
            let deleted = if w % 8 == 3 {
                // Some deletes too, at an older time than every write: each
                // is skipped or overwritten, and must not deadlock either.
                let request = v1::DeleteFeaturesRequest {
                    feature_view: "contended".into(),
                    entity_keys: order.clone(),
                    event_time: Some(ts(999, 0)),
                };
                Some(c.delete_features(request).await?.into_inner())
            } else {
                None
            };
            anyhow::Ok((answer, deleted))
        }
    });
    let answers = futures::future::try_join_all(writers).await?;
    let mut failed: Vec<String> = Vec::new();
    for (answer, deleted) in &answers {
        for result in answer.results.iter().chain(deleted.iter().flat_map(|d| &d.results)) {
            if outcome(result) == v1::WriteOutcome::Failed {
                failed.push(result.error.clone());
            }
        }
    }
    ensure!(failed.is_empty(), "{} rows failed, e.g. {:?}", failed.len(), failed.first());
    let written: u64 = answers.iter().map(|(a, _)| a.rows_written).sum();
    ensure!(written >= KEYS as u64, "every key written at least once: {written}");

    // The newest write of each key is what every tier now answers.
    let refs: Vec<&str> = keys.iter().map(String::as_str).collect();
    let rows = client(&server).await?.get_features(get("contended", &refs, &["n"])).await?.into_inner().rows;
    let values: HashMap<&str, Option<&Kind>> =
        rows.iter().map(|r| (r.entity_key.as_str(), r.values.first().and_then(|v| v.kind.as_ref()))).collect();
    for key in &refs {
        let got = values.get(key).copied().flatten().context("no answer")?;
        ensure!(got == &Kind::Int64Value(WRITERS - 1), "{key}: {got:?}");
    }
    ensure!(rows.iter().all(|r| status(r) == v1::RowStatus::Found));
    server.shutdown().await;
    Ok(())
}

/// Streams that send half a request and then nothing (a slowloris over
/// HTTP/2): the server advertises its per-connection stream cap, ends each
/// stalled stream at `server.request_timeout` with an error status, and
/// serves other clients meanwhile.
async fn stalled_streams_are_capped_per_connection_and_ended_at_the_request_timeout(env: &'static Env) -> Result<()> {
    const STREAMS: usize = 8;
    let server = env
        .server_with(|c| {
            c.server.max_concurrent_streams = STREAMS as u32;
            c.server.default_deadline = Duration::from_millis(500);
            c.server.max_deadline = Duration::from_millis(500);
            c.server.request_timeout = Duration::from_secs(1);
        })
        .await?;
    let tcp = tokio::net::TcpStream::connect(server.grpc_addr()).await?;
    let (h2, connection) = h2::client::handshake(tcp).await?;
    tokio::spawn(connection);
    let mut h2 = h2.ready().await?;
    // The server's SETTINGS arrive just after the handshake.
    let advertised = tokio::time::timeout(Duration::from_secs(10), async {
        while h2.current_max_send_streams() != STREAMS {
            tokio::task::yield_now().await;
        }
    })
    .await;
    ensure!(advertised.is_ok(), "the server advertised {} streams, not {STREAMS}", h2.current_max_send_streams());

    let started = tokio::time::Instant::now();
    let mut responses = Vec::new();
    for _ in 0..STREAMS {
        let request = http::Request::post(format!("http://{}/strata.v1.FeatureStore/GetFeatures", server.grpc_addr()))
            .header("content-type", "application/grpc")
            .header("te", "trailers")
            .body(())?;
        h2 = h2.ready().await?;
        let (response, mut body) = h2.send_request(request, false)?;
        // A frame header announcing 100 bytes, and then nothing.
        body.send_data(bytes::Bytes::from_static(&[0, 0, 0, 0, 100]), false)?;
        responses.push((response, body));
    }

    // Served meanwhile, on another connection.
    let mut c = client(&server).await?;
    let answer = c.get_features(get("hostile", &["stall:1"], &[])).await?.into_inner();
    ensure!(answer.rows.len() == 1, "another client is served while the streams stall");

    for (response, _body) in responses {
        let response = tokio::time::timeout(Duration::from_secs(20), response)
            .await
            .context("a stalled stream was never ended")??;
        let code = match response.headers().get("grpc-status") {
            Some(code) => code.to_str()?.to_owned(),
            None => {
                let mut body = response.into_body();
                let trailers = tokio::time::timeout(Duration::from_secs(20), body.trailers()).await??;
                let code = trailers.as_ref().and_then(|t| t.get("grpc-status")).context("no grpc-status")?;
                code.to_str()?.to_owned()
            }
        };
        ensure!(code != "0", "a stalled stream was answered OK");
    }
    let elapsed = started.elapsed();
    ensure!(elapsed >= Duration::from_millis(900), "stalled streams were ended after {elapsed:?}, before the timeout");
    server.shutdown().await;
    Ok(())
}
