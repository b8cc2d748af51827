//! Many views in one call (GetFeatureVectors) against the real stack:
//! typed and composite entity keys over both shards and every tier,
//! feature services, per-view degradation, routing of string keys, and bad
//! input. Every test holds `Env::exclusive`: one of them stops a shard, and
//! the others read the shards directly or expect every row served.

use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};
use strata_core::KeyValue;
use strata_proto::v1::{self, value::Kind};
use strata_shard_router::{shard_for, shard_for_key};
use strata_tests::wire::{keyed_row, ts, v};
use strata_tests::{Env, client, integration_tests, sample, scrape};
use tonic::Code;

integration_tests!(
    composite_keys_read_back_across_views_shards_and_tiers_in_one_call,
    a_feature_service_answers_exactly_its_features_in_its_order,
    a_view_whose_shard_is_down_degrades_alone,
    string_join_keys_route_and_store_as_bare_strings_and_typed_keys_have_typed_columns,
    bad_vector_requests_are_invalid_argument_naming_the_culprit,
    views_with_typed_join_keys_bulk_load_from_join_key_columns,
);

fn int(n: i64) -> v1::Value {
    v(Kind::Int64Value(n))
}

fn text(s: &str) -> v1::Value {
    v(Kind::StringValue(s.into()))
}

fn column(values: Vec<v1::Value>) -> v1::JoinKeyColumn {
    v1::JoinKeyColumn { values }
}

fn keyed(join_keys: Vec<(&str, v1::Value)>, features: Vec<(&str, v1::Value)>, seconds: i64) -> v1::WriteRow {
    keyed_row(join_keys, ts(seconds, 0), features)
}

fn vectors(features: &[&str], entities: Vec<(&str, Vec<v1::Value>)>) -> v1::GetFeatureVectorsRequest {
    v1::GetFeatureVectorsRequest {
        features: features.iter().map(|f| (*f).to_owned()).collect(),
        feature_service: String::new(),
        entities: entities.into_iter().map(|(k, values)| (k.to_owned(), column(values))).collect(),
        full_feature_names: false,
        grouped: false,
    }
}

/// The rows of a grouped answer, as an ungrouped answer carries them.
fn expand(answer: &v1::GetFeatureVectorsResponse, rows: usize) -> Result<Vec<v1::FeatureVector>> {
    let width = answer.feature_names.len();
    let mut vectors = vec![
        v1::FeatureVector {
            values: vec![v1::Value::default(); width],
            statuses: vec![0; width],
            event_time_micros: vec![0; width],
            sources: vec![0; width],
        };
        rows
    ];
    for group in &answer.groups {
        ensure!(
            group.row_keys.len() == rows,
            "group {}: {} row indices for {rows} rows",
            group.view,
            group.row_keys.len()
        );
        for (vector, &index) in vectors.iter_mut().zip(&group.row_keys) {
            let key = group.keys.get(index as usize).context("row index past the group's keys")?;
            for (i, &at) in group.features.iter().enumerate() {
                let at = at as usize;
                vector.values[at] = key.values[i].clone();
                vector.statuses[at] = key.statuses[i];
                vector.event_time_micros[at] = key.event_time_micros;
                vector.sources[at] = key.source;
            }
        }
    }
    Ok(vectors)
}

fn statuses(vector: &v1::FeatureVector) -> Vec<v1::FeatureStatus> {
    vector.statuses.iter().map(|&s| v1::FeatureStatus::try_from(s).unwrap_or(v1::FeatureStatus::Unspecified)).collect()
}

fn sources(vector: &v1::FeatureVector) -> Vec<v1::Source> {
    vector.sources.iter().map(|&s| v1::Source::try_from(s).unwrap_or(v1::Source::Unspecified)).collect()
}

/// The shard (of `shards`) of a key of the composite test entity.
fn pair_shard(registry: &strata_core::Registry, uid: i64, sku: &str, shards: u32) -> Result<u32> {
    let view = registry.get("mv_pair").context("mv_pair")?;
    let encoded = view.entity.encode([("uid", KeyValue::Int64(uid)), ("sku", KeyValue::String(sku))], 256)?;
    Ok(shard_for_key(&encoded, shards))
}

/// Writes users `uids` (age = uid, score = uid / 2) and, per user, pairs
/// with skus "a" and "b" (clicks = uid * 10 + 1 or 2; note null for "b").
async fn seed(
    c: &mut v1::feature_store_client::FeatureStoreClient<tonic::transport::Channel>,
    uids: &[i64],
) -> Result<()> {
    let users = uids
        .iter()
        .map(|&u| {
            keyed(
                vec![("uid", int(u))],
                vec![("age", int(u)), ("score", v(Kind::DoubleValue(u as f64 / 2.0)))],
                100 + u,
            )
        })
        .collect();
    let written = c.write_features(v1::WriteFeaturesRequest { feature_view: "mv_user".into(), rows: users }).await?;
    ensure!(written.get_ref().rows_written == uids.len() as u64, "{:?}", written.get_ref());
    let mut pairs = Vec::new();
    for &u in uids {
        pairs.push(keyed(
            vec![("sku", text("a")), ("uid", int(u))],
            vec![("clicks", int(u * 10 + 1)), ("note", text("seen"))],
            200 + u,
        ));
        pairs.push(keyed(vec![("uid", int(u)), ("sku", text("b"))], vec![("clicks", int(u * 10 + 2))], 200 + u));
    }
    let written = c.write_features(v1::WriteFeaturesRequest { feature_view: "mv_pair".into(), rows: pairs }).await?;
    ensure!(written.get_ref().rows_written == 2 * uids.len() as u64, "{:?}", written.get_ref());
    Ok(())
}

async fn composite_keys_read_back_across_views_shards_and_tiers_in_one_call(env: &'static Env) -> Result<()> {
    let _exclusive = env.exclusive().await;
    let server = env.server().await?;
    let mut c = client(&server).await?;
    let registry = env.registry()?;
    let uids: Vec<i64> = (1_000..1_040).collect();
    seed(&mut c, &uids).await?;
    let shards = env.shard_count() as u32;
    let on: Vec<u32> = uids.iter().map(|&u| pair_shard(&registry, u, "a", shards)).collect::<Result<_>>()?;
    ensure!((0..shards).all(|s| on.contains(&s)), "the pairs span every shard: {on:?}");

    // Tiers: users 1000-1009 read once before (then in L1), 1030-1039
    // evicted from Redis (then from PostgreSQL), the rest from Redis.
    let warm = vectors(
        &["mv_user:age", "mv_pair:clicks"],
        vec![("uid", uids[..10].iter().map(|&u| int(u)).collect()), ("sku", vec![text("a"); 10])],
    );
    c.get_feature_vectors(warm).await?;
    let l2 = server.tiers().l2();
    let cold_users: Vec<String> = uids[30..]
        .iter()
        .map(|&u| key_text(&registry, "mv_user", &[("uid", KeyValue::Int64(u))]))
        .collect::<Result<_>>()?;
    let cold_pairs: Vec<String> = uids[30..]
        .iter()
        .map(|&u| key_text(&registry, "mv_pair", &[("uid", KeyValue::Int64(u)), ("sku", KeyValue::String("a"))]))
        .collect::<Result<_>>()?;
    l2.evict("mv_user", &cold_users.iter().map(String::as_str).collect::<Vec<_>>()).await?;
    l2.evict("mv_pair", &cold_pairs.iter().map(String::as_str).collect::<Vec<_>>()).await?;

    // Every user with sku "a", then user 1000 with "b" (a null note) and
    // "zzz" (no such pair), and an unknown user: 43 rows, the features of
    // two views interleaved.
    let mut uid_column: Vec<v1::Value> = uids.iter().map(|&u| int(u)).collect();
    let mut sku_column = vec![text("a"); uids.len()];
    uid_column.extend([int(1_000), int(1_000), int(-5)]);
    sku_column.extend([text("b"), text("zzz"), text("a")]);
    let before = scrape(&server).await?;
    let lookups = |page: &str, tier: &str| {
        sample(page, "strata_cache_hits_total", &[("tier", tier), ("view", "mv_user")])
            + sample(page, "strata_cache_misses_total", &[("tier", tier), ("view", "mv_user")])
    };
    let request = vectors(
        &["mv_pair:note", "mv_user:age", "mv_pair:clicks", "mv_user:score"],
        vec![("uid", uid_column), ("sku", sku_column)],
    );
    let answer = c.get_feature_vectors(request.clone()).await?.into_inner();
    let after = scrape(&server).await?;
    ensure!(answer.feature_names == ["note", "age", "clicks", "score"], "{:?}", answer.feature_names);
    ensure!(answer.vectors.len() == 43, "one vector per entity row: {}", answer.vectors.len());
    // The user view is looked up once per distinct user (41), not per row.
    let user_lookups = lookups(&after, "l1") - lookups(&before, "l1");
    ensure!(user_lookups == 41.0, "mv_user had {user_lookups} L1 lookups for 41 distinct users in 43 rows");

    use v1::FeatureStatus::{EntityNotFound, NullValue, Present};
    for (i, &u) in uids.iter().enumerate() {
        let vector = &answer.vectors[i];
        let want = vec![text("seen"), int(u), int(u * 10 + 1), v(Kind::DoubleValue(u as f64 / 2.0))];
        ensure!(vector.values == want, "row {i} (user {u}): {:?}", vector.values);
        ensure!(statuses(vector) == [Present; 4], "row {i}: {:?}", statuses(vector));
        let times: Vec<i64> = vector.event_time_micros.iter().map(|t| t / 1_000_000).collect();
        ensure!(times == [200 + u, 100 + u, 200 + u, 100 + u], "row {i}: event times {times:?}");
        let tier = match i {
            0..10 => v1::Source::L1,
            30.. => v1::Source::L3,
            _ => v1::Source::L2,
        };
        ensure!(sources(vector) == [tier; 4], "row {i} (user {u}) came from {:?}, not {tier:?}", sources(vector));
    }
    let b = &answer.vectors[40];
    ensure!(statuses(b) == [NullValue, Present, Present, Present], "user 1000, sku b: {:?}", statuses(b));
    ensure!(b.values[2] == int(10_002), "{:?}", b.values);
    let none = &answer.vectors[41];
    ensure!(statuses(none) == [EntityNotFound, Present, EntityNotFound, Present], "no pair: {:?}", statuses(none));
    let unknown = &answer.vectors[42];
    ensure!(statuses(unknown) == [EntityNotFound; 4], "unknown user: {:?}", statuses(unknown));
    ensure!(unknown.event_time_micros.iter().all(|&t| t == 0), "no event time for what is not there");

    // Grouped, the same answer carries each view's distinct keys once (the
    // rows found now all from L1, as the first read filled it).
    let grouped = c.get_feature_vectors(v1::GetFeatureVectorsRequest { grouped: true, ..request }).await?.into_inner();
    ensure!(grouped.vectors.is_empty(), "a grouped answer has no per-row vectors");
    let shape: Vec<(&str, &[u32], usize)> =
        grouped.groups.iter().map(|g| (g.view.as_str(), g.features.as_slice(), g.keys.len())).collect();
    ensure!(shape == [("mv_pair", &[0, 2][..], 43), ("mv_user", &[1, 3][..], 41)], "groups: {shape:?}");
    let expanded = expand(&grouped, 43)?;
    for (i, (row, want)) in expanded.iter().zip(&answer.vectors).enumerate() {
        ensure!(row.values == want.values, "grouped row {i}: {:?} against {:?}", row.values, want.values);
        ensure!(row.statuses == want.statuses, "grouped row {i}: {:?}", statuses(row));
        ensure!(row.event_time_micros == want.event_time_micros, "grouped row {i}: event times");
        if i < 41 {
            ensure!(sources(row) == [v1::Source::L1; 4], "grouped row {i}: {:?}", sources(row));
        }
    }

    // Qualified names on request.
    let mut qualified =
        vectors(&["mv_user:age", "mv_sku:age"], vec![("uid", vec![int(1_000)]), ("sku", vec![text("a")])]);
    qualified.full_feature_names = true;
    let answer = c.get_feature_vectors(qualified).await?.into_inner();
    ensure!(answer.feature_names == ["mv_user__age", "mv_sku__age"], "{:?}", answer.feature_names);
    server.shutdown().await;
    Ok(())
}

fn key_text(registry: &strata_core::Registry, view: &str, values: &[(&str, KeyValue<'_>)]) -> Result<String> {
    let view = registry.get(view).context("view")?;
    let encoded = view.entity.encode(values.iter().copied(), 256)?;
    Ok(view.entity.key_text(&encoded))
}

async fn a_feature_service_answers_exactly_its_features_in_its_order(env: &'static Env) -> Result<()> {
    let _exclusive = env.exclusive().await;
    let server = env.server().await?;
    let mut c = client(&server).await?;
    seed(&mut c, &[2_000, 2_001]).await?;
    let mut request = vectors(&[], vec![("uid", vec![int(2_000), int(2_001)]), ("sku", vec![text("a"), text("b")])]);
    request.feature_service = "t_ranker".into();
    let answer = c.get_feature_vectors(request.clone()).await?.into_inner();
    ensure!(answer.feature_names == ["note", "clicks", "score"], "{:?}", answer.feature_names);
    ensure!(
        answer.vectors[0].values == [text("seen"), int(20_001), v(Kind::DoubleValue(1_000.0))],
        "{:?}",
        answer.vectors[0].values
    );
    ensure!(answer.vectors[1].values[1] == int(20_012), "{:?}", answer.vectors[1].values);
    request.full_feature_names = true;
    let answer = c.get_feature_vectors(request).await?.into_inner();
    ensure!(
        answer.feature_names == ["mv_pair__note", "mv_pair__clicks", "u__score"],
        "aliased: {:?}",
        answer.feature_names
    );

    // One user for several items: a one-value list applies to every row.
    let mut one_user = vectors(&[], vec![("uid", vec![int(2_000)]), ("sku", vec![text("a"), text("b"), text("zzz")])]);
    one_user.feature_service = "t_ranker".into();
    let answer = c.get_feature_vectors(one_user).await?.into_inner();
    let clicks: Vec<&v1::Value> = answer.vectors.iter().map(|vector| &vector.values[1]).collect();
    let scores: Vec<&v1::Value> = answer.vectors.iter().map(|vector| &vector.values[2]).collect();
    ensure!(
        clicks == [&int(20_001), &int(20_002), &v1::Value { kind: Some(Kind::NullValue(v1::Null {})) }],
        "{clicks:?}"
    );
    ensure!(scores == [&v(Kind::DoubleValue(1_000.0)); 3], "the user's score on every row: {scores:?}");

    // The registry lists entities and services.
    let registry = c.list_feature_views(v1::ListFeatureViewsRequest {}).await?.into_inner();
    let service = registry.feature_services.iter().find(|s| s.name == "t_ranker").context("t_ranker listed")?;
    ensure!(service.projections.len() == 2 && service.projections[1].alias == "u", "{service:?}");
    let pair = registry.entities.iter().find(|e| e.name == "t_pair").context("t_pair listed")?;
    let names: Vec<&str> = pair.join_keys.iter().map(|k| k.name.as_str()).collect();
    ensure!(names == ["sku", "uid"], "join keys in the byte order of their names: {names:?}");
    let view = registry.views.iter().find(|v| v.name == "mv_pair").context("mv_pair listed")?;
    ensure!(view.entity == "t_pair" && view.join_keys.len() == 2, "{view:?}");
    server.shutdown().await;
    Ok(())
}

async fn a_view_whose_shard_is_down_degrades_alone(env: &'static Env) -> Result<()> {
    let _exclusive = env.exclusive().await;
    let server = env.server().await?;
    let mut c = client(&server).await?;
    let registry = env.registry()?;
    let uids: Vec<i64> = (3_000..3_030).collect();
    seed(&mut c, &uids).await?;
    // The pairs are cached in Redis (by the writes); the users are not.
    let users: Vec<String> =
        uids.iter().map(|&u| key_text(&registry, "mv_user", &[("uid", KeyValue::Int64(u))])).collect::<Result<_>>()?;
    server.tiers().l2().evict("mv_user", &users.iter().map(String::as_str).collect::<Vec<_>>()).await?;
    let dead = 1;
    let shards = env.shard_count() as u32;
    let request = vectors(
        &["mv_user:age", "mv_pair:clicks"],
        vec![("uid", uids.iter().map(|&u| int(u)).collect()), ("sku", vec![text("a"); uids.len()])],
    );
    env.stop_shard(dead).await?;
    let outcome = async {
        // Reads fail against the stopped shard until its breaker opens.
        let started = tokio::time::Instant::now();
        while server.tiers().shards().available(dead) {
            if started.elapsed() > Duration::from_secs(20) {
                bail!("the breaker of the stopped shard did not open");
            }
            c.get_feature_vectors(request.clone()).await?;
        }
        Ok(c.get_feature_vectors(request.clone()).await?)
    }
    .await;
    env.start_shard(dead).await?;
    let answer = outcome?.into_inner();
    use v1::FeatureStatus::{Present, StaleValue, ValueUnavailable};
    for (i, &u) in uids.iter().enumerate() {
        let user_shard = shard_for_key(
            &registry.get("mv_user").context("mv_user")?.entity.encode([("uid", KeyValue::Int64(u))], 256)?,
            shards,
        );
        let pair_down = pair_shard(&registry, u, "a", shards)? == dead as u32;
        let want = [
            if user_shard == dead as u32 { ValueUnavailable } else { Present },
            if pair_down { StaleValue } else { Present },
        ];
        ensure!(
            statuses(&answer.vectors[i]) == want,
            "user {u} (user on shard {user_shard}, pair down: {pair_down}): {:?}",
            statuses(&answer.vectors[i])
        );
    }
    server.shutdown().await;
    Ok(())
}

async fn string_join_keys_route_and_store_as_bare_strings_and_typed_keys_have_typed_columns(
    env: &'static Env,
) -> Result<()> {
    let _exclusive = env.exclusive().await;
    let server = env.server().await?;
    let mut c = client(&server).await?;
    let skus: Vec<String> = (0..40).map(|i| format!("sku-{i}")).collect();
    let rows = skus.iter().map(|s| keyed(vec![("sku", text(s))], vec![("age", int(7))], 1)).collect();
    c.write_features(v1::WriteFeaturesRequest { feature_view: "mv_sku".into(), rows }).await?;
    // A view of one string join key stores its keys as bare strings on the
    // shard the rule for strings names: as every view did before entities.
    let shards = env.shard_count() as u32;
    let mut stored = 0;
    for shard in 0..shards {
        for key in env.keys_on_shard(shard as usize, "mv_sku").await? {
            ensure!(shard_for(&key, shards) == shard, "{key} is on shard {shard}");
            stored += usize::from(skus.contains(&key));
        }
    }
    ensure!(stored == skus.len(), "{stored} of {} keys stored under their own text", skus.len());
    // A composite key: typed columns, readable with plain SQL.
    seed(&mut c, &[4_000]).await?;
    let registry = env.registry()?;
    let shard = pair_shard(&registry, 4_000, "b", shards)?;
    let found = env
        .shard(shard as usize)
        .await?
        .query("SELECT uid, sku, clicks FROM strata.\"mv_pair\" WHERE uid = 4000 ORDER BY sku", &[])
        .await?;
    let found: Vec<(i64, String, i64)> = found.iter().map(|r| (r.get(0), r.get(1), r.get(2))).collect();
    ensure!(found.iter().any(|f| *f == (4_000, "b".to_owned(), 40_002)), "{found:?}");
    server.shutdown().await;
    Ok(())
}

async fn bad_vector_requests_are_invalid_argument_naming_the_culprit(env: &'static Env) -> Result<()> {
    let _exclusive = env.exclusive().await;
    let server = env.server().await?;
    let mut c = client(&server).await?;
    let ok = || vectors(&["mv_user:age", "mv_pair:clicks"], vec![("uid", vec![int(1)]), ("sku", vec![text("a")])]);
    let mut cases: Vec<(&str, v1::GetFeatureVectorsRequest, &str)> = vec![
        ("unknown view", vectors(&["nope:age"], vec![("uid", vec![int(1)])]), "unknown feature_view \"nope\""),
        ("unknown feature", vectors(&["mv_user:height"], vec![("uid", vec![int(1)])]), "has no feature \"height\""),
        (
            "not a reference",
            vectors(&["mv_user.age"], vec![("uid", vec![int(1)])]),
            "features[0] is \"mv_user.age\": want view:feature",
        ),
        (
            "missing join key",
            vectors(&["mv_pair:clicks"], vec![("uid", vec![int(1)])]),
            "view mv_pair needs join key sku (string)",
        ),
        (
            "wrong type",
            vectors(&["mv_user:age"], vec![("uid", vec![text("1")])]),
            "entities[\"uid\"][0] is string, the join key is int64",
        ),
        ("null key", vectors(&["mv_user:age"], vec![("uid", vec![v(Kind::NullValue(v1::Null {}))])]), "is null"),
        (
            "ragged",
            vectors(
                &["mv_pair:clicks"],
                vec![("uid", vec![int(1), int(2), int(3)]), ("sku", vec![text("a"), text("b")])],
            ),
            "every list must be as long, or hold one value for every row",
        ),
        ("no rows", vectors(&["mv_user:age"], vec![]), "entities is empty"),
        (
            "too many rows",
            vectors(&["mv_user:age"], vec![("uid", (0..1_001).map(int).collect())]),
            "1001 rows, over the limit of 1000",
        ),
        (
            "same name twice",
            vectors(&["mv_user:age", "mv_sku:age"], vec![("uid", vec![int(1)]), ("sku", vec![text("a")])]),
            "ask with full_feature_names",
        ),
        ("nothing asked", vectors(&[], vec![("uid", vec![int(1)])]), "give features"),
    ];
    let mut both = ok();
    both.feature_service = "t_ranker".into();
    cases.push(("both", both, "not both"));
    let mut unknown_service = vectors(&[], vec![("uid", vec![int(1)])]);
    unknown_service.feature_service = "nope".into();
    cases.push((
        "unknown service",
        unknown_service,
        "unknown feature_service \"nope\" (known: ranker_v1, t_ranker, fe_ranker)",
    ));
    for (what, request, says) in cases {
        match c.get_feature_vectors(request).await {
            Err(status) if status.code() == Code::InvalidArgument && status.message().contains(says) => {}
            other => bail!("{what}: want INVALID_ARGUMENT saying {says:?}, got {other:?}"),
        }
    }
    // A write by join keys checks them the same way, and writes nothing.
    let bad = keyed(vec![("uid", text("x"))], vec![("age", int(1))], 1);
    let good = keyed(vec![("uid", int(5_000))], vec![("age", int(1))], 1);
    match c.write_features(v1::WriteFeaturesRequest { feature_view: "mv_user".into(), rows: vec![good, bad] }).await {
        Err(status)
            if status.code() == Code::InvalidArgument
                && status.message().contains("join key uid is int64, not string") => {}
        other => bail!("a write with a wrongly typed join key: {other:?}"),
    }
    let read = c.get_feature_vectors(vectors(&["mv_user:age"], vec![("uid", vec![int(5_000)])])).await?.into_inner();
    ensure!(
        statuses(&read.vectors[0]) == [v1::FeatureStatus::EntityNotFound],
        "nothing of the refused write is stored"
    );
    // GetFeatures on a composite view takes only keys of its entity.
    match c.get_features(strata_tests::wire::get("mv_pair", &["user_1"], &[])).await {
        Err(status)
            if status.code() == Code::InvalidArgument && status.message().contains("not a key of entity t_pair") => {}
        other => bail!("GetFeatures with a bare string on a composite view: {other:?}"),
    }
    // The server still serves.
    c.get_feature_vectors(ok()).await?;
    server.shutdown().await;
    Ok(())
}

async fn views_with_typed_join_keys_bulk_load_from_join_key_columns(env: &'static Env) -> Result<()> {
    use strata_server::load::{Format, LoadOptions};
    let _exclusive = env.exclusive().await;
    let dir = tempfile::tempdir()?;
    let csv = dir.path().join("pairs.csv");
    // Join keys in any column order; a bad uid is rejected by its line.
    let mut body = String::from("sku,event_time,uid,clicks\n");
    for u in 6_000..6_050 {
        body.push_str(&format!("x,2026-01-01T00:00:00Z,{u},{}\n", u - 6_000));
    }
    body.push_str("x,2026-01-01T00:00:00Z,not-a-number,1\n");
    std::fs::write(&csv, body)?;
    let jsonl = dir.path().join("users.jsonl");
    std::fs::write(
        &jsonl,
        "{\"uid\": 6000, \"event_time\": 1767225600, \"age\": 33}\n{\"uid\": \"6001\", \"event_time\": 1767225600}\n",
    )?;
    let config = env.config()?.validate()?;
    let report = strata_server::load::run(&config, &LoadOptions::new("mv_pair", &csv, Format::Csv)).await?;
    ensure!(report.written == 50 && report.failed == 0, "{report:?}");
    ensure!(
        report.rejected.len() == 1 && report.rejected[0].line == 52 && report.rejected[0].reason.contains("uid"),
        "{:?}",
        report.rejected
    );
    let report = strata_server::load::run(&config, &LoadOptions::new("mv_user", &jsonl, Format::Jsonl)).await?;
    ensure!(report.written == 2 && report.rejected.is_empty(), "{report:?}");

    let server = env.server().await?;
    let mut c = client(&server).await?;
    let uids: Vec<i64> = (6_000..6_050).collect();
    let answer = c
        .get_feature_vectors(vectors(
            &["mv_pair:clicks", "mv_user:age"],
            vec![("uid", uids.iter().map(|&u| int(u)).collect()), ("sku", vec![text("x"); uids.len()])],
        ))
        .await?
        .into_inner();
    for (i, &u) in uids.iter().enumerate() {
        ensure!(answer.vectors[i].values[0] == int(u - 6_000), "pair {u}: {:?}", answer.vectors[i].values);
    }
    ensure!(answer.vectors[0].values[1] == int(33), "{:?}", answer.vectors[0].values);
    use v1::FeatureStatus::{EntityNotFound, NullValue, Present};
    ensure!(statuses(&answer.vectors[1]) == [Present, NullValue], "{:?}", statuses(&answer.vectors[1]));
    ensure!(statuses(&answer.vectors[2]) == [Present, EntityNotFound], "{:?}", statuses(&answer.vectors[2]));
    server.shutdown().await;
    Ok(())
}
