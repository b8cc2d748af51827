//! Feast's own SDK (feast 0.67.0, installed by `scripts/install-deps` into
//! `.feast-venv`) against Strata's Feast HTTP API on the real stack: reads
//! by feature list and by feature service that give what Feast's own Redis
//! online store gives for the same repo and data, materialization, writes
//! and pushes read back through Strata's own API, and bad input answered in
//! Feast's error shape with nothing stored.
//!
//! The Feast repo is `tests/feast/repo`; `tests/feast/sdk.py` runs the SDK
//! calls of a test in one Python process and prints their results.

use std::time::SystemTime;

use anyhow::{Context, Result, ensure};
use serde_json::{Value as Json, json};
use strata_core::KeyType;
use strata_proto::v1::{self, value::Kind};
use strata_server::config::FileConfig;
use strata_tests::feast::{FeastRepo, ago};
use strata_tests::wire::{ts, v};
use strata_tests::{Env, client, integration_tests, strata_binary};

integration_tests!(
    the_feast_sdk_reads_by_list_and_by_service_what_feasts_own_redis_store_returns,
    the_feast_sdk_writes_and_pushes_through_strata_and_strata_serves_them,
    bad_input_through_the_feast_api_gets_feasts_error_shape_and_stores_nothing,
    feasts_generated_grpc_stubs_read_write_and_push_through_both_feast_services,
);

fn ok(result: &Json, what: &str) -> Result<()> {
    ensure!(result.get("ok") == Some(&Json::Bool(true)), "{what}: {result}");
    Ok(())
}

/// Drivers 1-3 (3's row is older than the view's TTL, with a null name),
/// customers a and b, pairs (1, a) and (2, b). No empty lists: Feast 0.67's
/// remote client cannot type an empty list it reads back.
fn seed_files() -> Json {
    json!({
        "driver": {
            "driver_id": [1, 2, 3],
            "event_timestamp": [ago(3_600), ago(7_200), "2014-01-01T00:00:00"],
            "conv_rate": [0.5, 0.25, 0.1], "trips": [10, 20, 30], "name": ["ann", "bob", null],
            "active": [true, false, true], "raw": [null, null, null],
            "emb": [[0.1, 0.2], [1.5], [2.5, -1.0]], "ids": [[1, 2], [3], [4]],
            "rank": [1, -2, 3], "score": [0.1, 2.5, -1.0],
            "seen": ["2024-01-01T00:00:00", "1969-12-31T23:59:59", "2014-01-01T00:00:00"]
        },
        "customer": {
            "customer_id": ["a", "b"], "event_timestamp": [ago(3_600), ago(3_600)],
            "tier": ["gold", "silver"], "spend": [10.5, 3.25]
        },
        "pair": {
            "driver_id": [1, 2], "customer_id": ["a", "b"], "event_timestamp": [ago(3_600), ago(3_600)],
            "orders": [7, 8]
        }
    })
}

const ALL_FEATURES: [&str; 12] = [
    "fe_driver:conv_rate",
    "fe_driver:trips",
    "fe_driver:name",
    "fe_driver:active",
    "fe_driver:raw",
    "fe_driver:emb",
    "fe_driver:ids",
    "fe_driver:rank",
    "fe_driver:score",
    "fe_driver:seen",
    "fe_customer:tier",
    "fe_pair:orders",
];

async fn the_feast_sdk_reads_by_list_and_by_service_what_feasts_own_redis_store_returns(
    env: &'static Env,
) -> Result<()> {
    let server = env.server().await?;
    let feast_addr = server.feast_http_addr().context("the Feast API is served")?;
    let strata = FeastRepo::on_strata(feast_addr).await?;
    // Feast's own Redis online store, on the test stack's Redis Cluster.
    let redis = FeastRepo::on_redis(env.redis_nodes()).await?;
    imported_definitions_equal_strata_test_config(env, &strata).await?;
    let window =
        json!({"cmd": "materialize", "start": "2010-01-01T00:00:00+00:00", "end": format!("{}+00:00", ago(0))});
    let by_list = json!({
        "cmd": "read", "features": ALL_FEATURES,
        "entities": {"driver_id": [1, 2, 3, 99], "customer_id": ["a", "b", "a", "zzz"]}
    });
    let by_service = json!({
        "cmd": "read", "service": "fe_ranker", "full": true,
        "entities": {"driver_id": [1, 2], "customer_id": ["a", "a"]}
    });
    let unknown = json!({"cmd": "read", "features": ["nope:x"], "entities": {"driver_id": [1]}});
    let steps = json!([{"cmd": "seed", "files": seed_files()}, window, by_list, by_service, unknown]);
    let (ours, theirs) = tokio::try_join!(strata.run(steps.clone()), redis.run(steps))?;
    for (i, what) in [(0, "seed"), (1, "materialize")] {
        ok(&ours[i], &format!("{what} into Strata"))?;
        ok(&theirs[i], &format!("{what} into Feast's Redis store"))?;
    }

    // Value for value, missing keys and the row past its TTL included.
    for (i, what) in [(2, "by feature list"), (3, "by feature service")] {
        ensure!(
            ours[i]["dict"] == theirs[i]["dict"],
            "{what}: Strata answered {}\nFeast's Redis store {}",
            ours[i]["dict"],
            theirs[i]["dict"]
        );
    }
    let dict = &ours[2]["dict"];
    ensure!(dict["trips"] == json!([10, 20, 30, null]), "{dict}");
    ensure!(
        dict["emb"][0] == json!([0.10000000149011612, 0.20000000298023224]),
        "float32 widened as Feast does: {dict}"
    );
    ensure!(ours[3]["dict"]["fe_pair__orders"] == json!([7, null]), "{}", ours[3]["dict"]);
    // An int32 and a float32 keep their width: the float32 comes back as
    // Feast's own store gives it, widened from 32 bits; a timestamp in
    // Feast's Unix seconds.
    ensure!(dict["rank"] == json!([1, -2, 3, null]), "{dict}");
    ensure!(dict["score"][0] == json!(0.10000000149011612), "{dict}");
    ensure!(dict["seen"] == json!([1_704_067_200, -1, 1_388_534_400, null]), "{dict}");

    // Statuses: Strata's are what happened. (Feast's own store says PRESENT
    // for every cell here, missing rows and the expired one included.)
    let statuses = &ours[2]["statuses"];
    let want = json!({
        "driver_id": ["PRESENT", "PRESENT", "PRESENT", "PRESENT"],
        "conv_rate": ["PRESENT", "PRESENT", "OUTSIDE_MAX_AGE", "NOT_FOUND"],
        "raw": ["NULL_VALUE", "NULL_VALUE", "OUTSIDE_MAX_AGE", "NOT_FOUND"],
        "tier": ["PRESENT", "PRESENT", "PRESENT", "NOT_FOUND"],
        "orders": ["PRESENT", "PRESENT", "NOT_FOUND", "NOT_FOUND"],
    });
    for (name, want) in want.as_object().context("object")? {
        ensure!(statuses[name] == *want, "{name}: {} (want {want})", statuses[name]);
    }
    ensure!(
        ours[4]["error"] == "FeatureViewNotFoundException",
        "an unknown view raises Feast's own exception: {}",
        ours[4]
    );

    // The materialized rows are Strata's: its own API serves them.
    let mut c = client(&server).await?;
    let request = v1::GetFeatureVectorsRequest {
        features: vec!["fe_driver:trips".into(), "fe_pair:orders".into()],
        entities: [
            ("driver_id".to_owned(), v1::JoinKeyColumn { values: vec![v(Kind::Int64Value(1))] }),
            ("customer_id".to_owned(), v1::JoinKeyColumn { values: vec![v(Kind::StringValue("a".into()))] }),
        ]
        .into(),
        ..Default::default()
    };
    let answer = c.get_feature_vectors(request).await?.into_inner();
    ensure!(answer.vectors[0].values == [v(Kind::Int64Value(10)), v(Kind::Int64Value(7))], "{answer:?}");
    server.shutdown().await;
    Ok(())
}

/// `strata feast import` of the applied repo gives the definitions the test
/// config declares by hand for it (the `fe_*` views of TEST_VIEWS).
async fn imported_definitions_equal_strata_test_config(env: &'static Env, repo: &FeastRepo) -> Result<()> {
    let out = tokio::process::Command::new(strata_binary()?)
        .args(["feast", "import"])
        .arg(repo.path().join("data/registry.db"))
        .output()
        .await
        .context("strata feast import")?;
    ensure!(out.status.success(), "strata feast import failed: {}", String::from_utf8_lossy(&out.stderr));
    ensure!(out.stderr.is_empty(), "nothing left out: {}", String::from_utf8_lossy(&out.stderr));
    let imported = FileConfig::from_toml(&String::from_utf8(out.stdout)?)?;
    let ours = env.config()?;
    let join_keys = |file: &FileConfig, entity: &Option<String>| -> Result<Vec<(String, KeyType)>> {
        let name = entity.as_deref().context("a view with an entity")?;
        let entity = file.entities.iter().find(|e| e.name == name).context("its entity")?;
        let mut keys: Vec<(String, KeyType)> = entity.join_keys.iter().map(|k| (k.name.clone(), k.ty)).collect();
        keys.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(keys)
    };
    let mut names: Vec<&str> = imported.views.iter().map(|v| v.name.as_str()).collect();
    names.sort_unstable();
    ensure!(names == ["fe_customer", "fe_driver", "fe_pair"], "{names:?}");
    for view in &imported.views {
        let mine = ours.views.iter().find(|v| v.name == view.name).context("the view in TEST_VIEWS")?;
        ensure!(view.features == mine.features, "{}: {:?} against {:?}", view.name, view.features, mine.features);
        ensure!(view.max_age == mine.max_age, "{}: max_age {:?} against {:?}", view.name, view.max_age, mine.max_age);
        ensure!(view.push_sources == mine.push_sources, "{}: {:?}", view.name, view.push_sources);
        ensure!(join_keys(&imported, &view.entity)? == join_keys(&ours, &mine.entity)?, "{}: join keys", view.name);
    }
    let service = &imported.feature_services;
    let mine = ours.feature_services.iter().find(|s| s.name == "fe_ranker").context("fe_ranker")?;
    ensure!(service.len() == 1 && service[0].projections == mine.projections, "{service:?}");
    Ok(())
}

async fn the_feast_sdk_writes_and_pushes_through_strata_and_strata_serves_them(env: &'static Env) -> Result<()> {
    let server = env.server().await?;
    let strata = FeastRepo::on_strata(server.feast_http_addr().context("Feast API")?).await?;
    let driver = |id: i64, trips: i64, at: &str| {
        json!({
            "driver_id": [id], "event_timestamp": [at], "conv_rate": [0.75], "trips": [trips],
            "name": ["p"], "active": [true], "raw": [null], "emb": [[0.5]], "ids": [[9]],
            "rank": [id], "score": [0.75], "seen": ["2024-06-01T12:00:00"]
        })
    };
    let (now, earlier) = (ago(60), ago(600));
    let write_23 = |trips: i64, at: &str| {
        json!({"cmd": "post", "path": "/write-to-online-store", "body": {
            "feature_view_name": "fe_driver",
            "df": {"driver_id": [23], "trips": [trips], "event_timestamp": [at], "created": [null]},
            "allow_registry_cache": false
        }})
    };
    let steps = json!([
        {"cmd": "write", "view": "fe_customer", "rows": {
            "customer_id": ["w1", "w2"], "event_timestamp": [now, now], "tier": ["gold", "silver"], "spend": [1.0, 2.0]
        }},
        // The SDK's push resolves the push source in its own registry and
        // writes fe_driver through the remote store.
        {"cmd": "push", "source": "fe_driver_push", "rows": driver(21, 5, &now)},
        // /push itself, as a client without the SDK calls it; bytes in base64.
        {"cmd": "post", "path": "/push", "body": {
            "push_source_name": "fe_driver_push", "to": "online",
            "df": {"driver_id": [22], "trips": [6], "raw": ["AP8="], "event_timestamp": [now]}
        }},
        // The SDK retries writes: the same write twice is one write, and an
        // older one changes nothing.
        write_23(1, &now),
        write_23(1, &now),
        write_23(999, &earlier),
        {"cmd": "read", "features": ["fe_driver:trips", "fe_driver:raw", "fe_driver:name", "fe_customer:tier"],
         "entities": {"driver_id": [21, 22, 23], "customer_id": ["w1", "w2", "w1"]}},
        // Strata's rule that a one-value list applies to every row holds
        // here too, and the join-key column comes back whole.
        {"cmd": "post", "path": "/get-online-features", "body": {
            "features": ["fe_driver:trips", "fe_customer:tier"],
            "entities": {"driver_id": [21, 22, 23], "customer_id": ["w2"], "request_id": [1.5, "x", null]}
        }},
    ]);
    let results = strata.run(steps).await?;
    ok(&results[0], "write_to_online_store")?;
    ok(&results[1], "push")?;
    for (i, what) in [(2, "/push"), (3, "a write"), (4, "the same write again"), (5, "an older write")] {
        ensure!(results[i]["status"] == 200, "{what}: {}", results[i]);
    }
    let dict = &results[6]["dict"];
    ensure!(dict["trips"] == json!([5, 6, 1]), "{dict}");
    ensure!(dict["raw"] == json!([null, "AP8=", null]), "bytes come back in base64: {dict}");
    ensure!(dict["name"] == json!(["p", null, null]), "a feature left out of a write is null: {dict}");
    ensure!(dict["tier"] == json!(["gold", "silver", "gold"]), "{dict}");
    // (serde_json writes the entities in name order: customer_id first.) A
    // column no entity has is echoed and used by no view.
    let one_customer = &results[7]["body"];
    ensure!(one_customer["results"][0]["values"] == json!(["w2", "w2", "w2"]), "{one_customer}");
    ensure!(one_customer["results"][2]["values"] == json!([1.5, "x", null]), "{one_customer}");
    ensure!(one_customer["results"][4]["values"] == json!(["silver", "silver", "silver"]), "{one_customer}");

    // Strata's own API serves what the SDK wrote.
    let mut c = client(&server).await?;
    let ids: Vec<v1::Value> = [21, 22, 23].into_iter().map(|id| v(Kind::Int64Value(id))).collect();
    let request = v1::GetFeatureVectorsRequest {
        features: ["trips", "emb", "rank", "score", "seen"].iter().map(|f| format!("fe_driver:{f}")).collect(),
        entities: [("driver_id".to_owned(), v1::JoinKeyColumn { values: ids })].into(),
        ..Default::default()
    };
    let answer = c.get_feature_vectors(request).await?.into_inner();
    let trips: Vec<&v1::Value> = answer.vectors.iter().map(|row| &row.values[0]).collect();
    ensure!(trips == [&v(Kind::Int64Value(5)), &v(Kind::Int64Value(6)), &v(Kind::Int64Value(1))], "{trips:?}");
    let emb = &answer.vectors[0].values[1];
    ensure!(*emb == v(Kind::FloatListValue(v1::FloatList { values: vec![0.5] })), "{emb:?}");
    let typed = &answer.vectors[0].values[2..];
    ensure!(
        typed == [v(Kind::Int32Value(21)), v(Kind::FloatValue(0.75)), v(Kind::TimestampValue(ts(1_717_243_200, 0)))],
        "an int32, a float32 and a timestamp pushed by the SDK keep their types: {typed:?}"
    );
    server.shutdown().await;
    Ok(())
}

/// One HTTP/1.1 POST: the status and the body.
async fn post(addr: std::net::SocketAddr, path: &str, body: &[u8]) -> Result<(u16, String)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr).await?;
    let head = format!(
        "POST {path} HTTP/1.1\r\nhost: {addr}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).await?;
    // The server may answer (and close) before a refused body is sent whole.
    let _ = stream.write_all(body).await;
    let mut answer = Vec::new();
    stream.read_to_end(&mut answer).await?;
    let answer = String::from_utf8(answer)?;
    let (head, body) = answer.split_once("\r\n\r\n").context("an HTTP answer")?;
    let status = head.split(' ').nth(1).context("status")?.parse()?;
    Ok((status, body.to_owned()))
}

/// Feast's error body: a JSON string holding `{module, class, message}`.
fn feast_error(body: &str) -> Result<(String, String)> {
    let outer: Json = serde_json::from_str(body).with_context(|| format!("not JSON: {body}"))?;
    let inner: Json = serde_json::from_str(outer.as_str().with_context(|| format!("not a JSON string: {body}"))?)?;
    ensure!(inner["module"] == "feast.errors", "{inner}");
    Ok((inner["class"].as_str().context("class")?.to_owned(), inner["message"].as_str().context("message")?.to_owned()))
}

async fn bad_input_through_the_feast_api_gets_feasts_error_shape_and_stores_nothing(env: &'static Env) -> Result<()> {
    let server = env.server().await?;
    let addr = server.feast_http_addr().context("Feast API")?;
    let write = |df: Json| json!({"feature_view_name": "fe_driver", "df": df}).to_string();
    let at = ago(60);
    let long_name = "v".repeat(100_000);
    let cases: Vec<(&str, &str, String, u16, &str, &str)> = vec![
        (
            "unknown view",
            "/get-online-features",
            json!({"entities": {"driver_id": [1]}, "features": [format!("{long_name}:x")]}).to_string(),
            404,
            "FeatureViewNotFoundException",
            "unknown feature_view",
        ),
        (
            "unknown service",
            "/get-online-features",
            json!({"entities": {"driver_id": [1]}, "feature_service": "nope"}).to_string(),
            404,
            "FeatureServiceNotFoundException",
            "unknown feature_service \"nope\"",
        ),
        (
            "unknown feature",
            "/get-online-features",
            json!({"entities": {"driver_id": [1]}, "features": ["fe_driver:nope"]}).to_string(),
            422,
            "FeastError",
            "has no feature \"nope\"",
        ),
        (
            "a string for an int64 join key",
            "/get-online-features",
            json!({"entities": {"driver_id": ["x"]}, "features": ["fe_driver:trips"]}).to_string(),
            422,
            "FeastError",
            "entities[\"driver_id\"][0]",
        ),
        ("not JSON", "/get-online-features", "features=all".into(), 422, "FeastError", "not a valid request"),
        (
            "a column that is no feature",
            "/write-to-online-store",
            write(json!({"driver_id": [31, 32], "trips": [1, 2], "tripz": [1, 2], "event_timestamp": [at, at]})),
            422,
            "FeastError",
            "df has a column \"tripz\"",
        ),
        (
            "a value of the wrong type in the second row",
            "/write-to-online-store",
            write(json!({"driver_id": [31, 32], "trips": [1, "two"], "event_timestamp": [at, at]})),
            422,
            "FeastError",
            "df[\"trips\"][1]",
        ),
        (
            "columns of different lengths",
            "/write-to-online-store",
            write(json!({"driver_id": [31, 32], "trips": [1], "event_timestamp": [at, at]})),
            422,
            "FeastError",
            "every column must be as long",
        ),
        (
            "no event_timestamp",
            "/write-to-online-store",
            write(json!({"driver_id": [31], "trips": [1]})),
            422,
            "FeastError",
            "no event_timestamp",
        ),
        (
            "an unknown view",
            "/write-to-online-store",
            json!({"feature_view_name": "nope", "df": {"driver_id": [31]}}).to_string(),
            404,
            "FeatureViewNotFoundException",
            "unknown feature_view \"nope\"",
        ),
        (
            "a push to the offline store",
            "/push",
            json!({"push_source_name": "fe_driver_push", "to": "offline", "df": {"driver_id": [31], "trips": [1], "event_timestamp": [at]}}).to_string(),
            422,
            "FeastError",
            "takes pushes \"online\" only",
        ),
        (
            "an unknown push source",
            "/push",
            json!({"push_source_name": "nope", "df": {"driver_id": [31], "trips": [1], "event_timestamp": [at]}}).to_string(),
            422,
            "PushSourceNotFoundException",
            "Unable to find push source \"nope\"",
        ),
        (
            "materialize",
            "/materialize",
            json!({"start_ts": "2024-01-01T00:00:00", "end_ts": "2024-01-02T00:00:00"}).to_string(),
            501,
            "FeastError",
            "does not read Feast's offline store",
        ),
        (
            "a body over the request limit",
            "/write-to-online-store",
            write(json!({"driver_id": [31], "name": ["x".repeat(5 << 20)], "event_timestamp": [at]})),
            413,
            "FeastError",
            "limits.max_request_bytes",
        ),
    ];
    for (what, path, body, status, class, message) in &cases {
        let (got, answer) = post(addr, path, body.as_bytes()).await?;
        ensure!(got == *status, "{what}: HTTP {got} (want {status}): {}", &answer[..answer.len().min(300)]);
        let (got_class, got_message) = feast_error(&answer).with_context(|| what.to_string())?;
        ensure!(got_class == *class, "{what}: class {got_class} (want {class}): {got_message}");
        ensure!(got_message.contains(message), "{what}: {got_message:?} does not say {message:?}");
        ensure!(answer.len() < 2_000, "{what}: a {}-byte error echoes the input", answer.len());
    }

    // Nothing of the refused writes was stored, and the server still serves.
    let (status, answer) = post(
        addr,
        "/get-online-features",
        json!({"entities": {"driver_id": [31, 32]}, "features": ["fe_driver:trips"]}).to_string().as_bytes(),
    )
    .await?;
    ensure!(status == 200, "{status}: {answer}");
    let answer: Json = serde_json::from_str(&answer)?;
    ensure!(answer["results"][1]["statuses"] == json!(["NOT_FOUND", "NOT_FOUND"]), "{answer}");
    let health = get_status(addr, "/health").await?;
    ensure!(health == 200, "health answered {health}");
    server.shutdown().await;
    Ok(())
}

/// One HTTP/1.1 GET: the status.
async fn get_status(addr: std::net::SocketAddr, path: &str) -> Result<u16> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr).await?;
    stream.write_all(format!("GET {path} HTTP/1.1\r\nhost: {addr}\r\nconnection: close\r\n\r\n").as_bytes()).await?;
    let mut answer = Vec::new();
    stream.read_to_end(&mut answer).await?;
    let answer = String::from_utf8(answer)?;
    Ok(answer.split(' ').nth(1).context("status")?.parse()?)
}

async fn feasts_generated_grpc_stubs_read_write_and_push_through_both_feast_services(env: &'static Env) -> Result<()> {
    let server = env.server().await?;
    let strata = FeastRepo::on_strata(server.feast_http_addr().context("Feast API")?).await?;
    let now = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH)?.as_secs();
    let call =
        |service: &str, method: &str, request: Json| json!({"service": service, "method": method, "request": request});
    let read = |kind: Json, entities: Json| {
        let mut request = json!({"entities": entities});
        if let (Some(request), Some(kind)) = (request.as_object_mut(), kind.as_object()) {
            request.extend(kind.clone());
        }
        request
    };
    let ids = |ids: &[i64]| json!({"val": ids.iter().map(|i| json!({"int64_val": i.to_string()})).collect::<Vec<_>>()});
    let calls = vec![
        call("ServingService", "GetFeastServingInfo", json!({})),
        // A row as text, parsed by each column's type.
        call(
            "GrpcFeatureServer",
            "WriteToOnlineStore",
            json!({"feature_view_name": "fe_driver", "features": {
                "driver_id": "41", "trips": "12", "conv_rate": "0.5", "name": "g", "active": "true",
                "emb": "[0.5, 1.5]", "ids": "[1]", "rank": "-7", "score": "0.25", "seen": "1700000000",
                "event_timestamp": ago(60)
            }}),
        ),
        // A typed row through the push source.
        call(
            "GrpcFeatureServer",
            "Push",
            json!({"stream_feature_view": "fe_driver_push", "to": "online", "typed_features": {
                "driver_id": {"int64_val": "42"}, "trips": {"int32_val": 13}, "event_timestamp": {"unix_timestamp_val": now.to_string()}
            }}),
        ),
        // An int32 join key finds its int64 row.
        call(
            "ServingService",
            "GetOnlineFeatures",
            read(
                json!({"features": {"val": ["fe_driver:trips", "fe_driver:emb", "fe_driver:name"]}}),
                json!({"driver_id": {"val": [{"int64_val": "41"}, {"int32_val": 42}, {"int64_val": "99"}]}}),
            ),
        ),
        call(
            "GrpcFeatureServer",
            "GetOnlineFeatures",
            read(
                json!({"feature_service": "fe_ranker", "full_feature_names": true}),
                json!({"driver_id": ids(&[41]), "customer_id": {"val": [{"string_val": "a"}]}}),
            ),
        ),
        // Bad input: a type Strata does not have, a value that is not its
        // column's type, an unknown view, a push to the offline store.
        call(
            "ServingService",
            "GetOnlineFeatures",
            read(json!({"features": {"val": ["fe_driver:trips"]}}), json!({"driver_id": {"val": [{"map_val": {}}]}})),
        ),
        call(
            "GrpcFeatureServer",
            "WriteToOnlineStore",
            json!({"feature_view_name": "fe_driver", "features": {
                "driver_id": "43", "trips": "twelve", "event_timestamp": ago(60)
            }}),
        ),
        call(
            "GrpcFeatureServer",
            "WriteToOnlineStore",
            json!({"feature_view_name": "fe_driver", "typed_features": {
                "driver_id": {"int64_val": "43"}, "name": {"string_list_val": {"val": ["a"]}}, "event_timestamp": {"unix_timestamp_val": now.to_string()}
            }}),
        ),
        call(
            "GrpcFeatureServer",
            "WriteToOnlineStore",
            json!({"feature_view_name": "nope", "features": {"driver_id": "43"}}),
        ),
        call(
            "GrpcFeatureServer",
            "Push",
            json!({"stream_feature_view": "fe_driver_push", "to": "offline", "features": {
                "driver_id": "43", "trips": "1", "event_timestamp": ago(60)
            }}),
        ),
        call(
            "ServingService",
            "GetOnlineFeatures",
            read(json!({"features": {"val": ["fe_driver:trips"]}}), json!({"driver_id": ids(&[43])})),
        ),
        call(
            "GrpcFeatureServer",
            "GetOnlineFeatures",
            read(
                json!({"features": {"val": ["fe_driver:rank", "fe_driver:score", "fe_driver:seen"]}}),
                json!({"driver_id": ids(&[41])}),
            ),
        ),
    ];
    let addr = server.grpc_addr().to_string();
    let results = strata.run(json!([{"cmd": "grpc", "addr": addr, "calls": calls}])).await?;
    let answers = results[0].as_array().with_context(|| format!("{}", results[0]))?;
    let ok = |i: usize| -> Result<&Json> { answers[i].get("ok").with_context(|| format!("call {i}: {}", answers[i])) };
    ensure!(ok(0)?["version"].as_str().is_some_and(|v| v.starts_with("strata ")), "{}", answers[0]);
    ensure!(ok(1)?["status"] == true && ok(2)?["status"] == true, "{} {}", answers[1], answers[2]);

    let answer = ok(3)?;
    ensure!(answer["metadata"]["feature_names"]["val"] == json!(["driver_id", "trips", "emb", "name"]), "{answer}");
    let results = &answer["results"];
    ensure!(results[0]["values"][1] == json!({"int32_val": 42}), "join keys come back as given: {answer}");
    ensure!(
        results[1]["values"] == json!([{"int64_val": "12"}, {"int64_val": "13"}, {}]),
        "trips: {}",
        results[1]["values"]
    );
    ensure!(results[1]["statuses"] == json!(["PRESENT", "PRESENT", "NOT_FOUND"]), "{}", results[1]);
    ensure!(results[2]["values"][0] == json!({"float_list_val": {"val": [0.5, 1.5]}}), "{}", results[2]);
    ensure!(
        results[3]["statuses"] == json!(["PRESENT", "NULL_VALUE", "NOT_FOUND"]),
        "a push leaves name null: {}",
        results[3]
    );
    let seconds = results[1]["event_timestamps"][1].as_str().unwrap_or_default();
    ensure!(!seconds.starts_with("1970"), "the pushed row's event time: {seconds}");

    let answer = ok(4)?;
    ensure!(
        answer["metadata"]["feature_names"]["val"]
            == json!([
                "customer_id",
                "driver_id",
                "fe_driver__conv_rate",
                "fe_driver__trips",
                "fe_pair__orders",
                "fe_customer__tier"
            ]),
        "{answer}"
    );
    ensure!(answer["results"][3]["values"] == json!([{"int64_val": "12"}]), "{answer}");

    for (i, code, says) in [
        (5, "INVALID_ARGUMENT", "is map"),
        (6, "INVALID_ARGUMENT", "is not an int64"),
        (7, "INVALID_ARGUMENT", "string_list, which Strata does not store"),
        (8, "INVALID_ARGUMENT", "unknown feature_view \"nope\""),
        (9, "INVALID_ARGUMENT", "takes pushes \"online\" only"),
    ] {
        let details = answers[i]["details"].as_str().unwrap_or_default();
        ensure!(
            answers[i]["code"] == code && details.contains(says),
            "call {i}: {} (want {code}, {says:?})",
            answers[i]
        );
    }
    ensure!(
        ok(10)?["results"][1]["statuses"] == json!(["NOT_FOUND"]),
        "nothing of the refused writes: {}",
        answers[10]
    );
    let answer = ok(11)?;
    let typed: Vec<&Json> = (1..4).map(|c| &answer["results"][c]["values"][0]).collect();
    ensure!(
        typed == [&json!({"int32_val": -7}), &json!({"float_val": 0.25}), &json!({"unix_timestamp_val": "1700000000"})],
        "each type in its own field: {}",
        answers[11]
    );
    server.shutdown().await;
    Ok(())
}
