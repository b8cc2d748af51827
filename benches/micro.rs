//! Micro-benchmarks (criterion) of the per-key work on the read path: an L1
//! lookup, encoding and decoding a cache entry, and routing a key to its
//! shard. `cargo bench -p strata-benches --bench micro`.

use std::hint::black_box;
use std::sync::Arc;
use std::time::Duration;

use criterion::{Criterion, criterion_group, criterion_main};
use strata_benches::ten_feature_row;
use strata_cache_tiers::{Cached, L1Cache};
use strata_core::{Content, FeatureSpec, FeatureType, FeatureViewSpec, Lifetime, Registry, decode_entry, encode_entry};

fn registry() -> Registry {
    let features = (0..10)
        .map(|f| FeatureSpec {
            name: format!("f{f}"),
            ty: if f < 5 { FeatureType::Int64 } else { FeatureType::Double },
        })
        .collect();
    Registry::new(vec![FeatureViewSpec::new("bench", features)]).expect("a valid view")
}

fn benches(c: &mut Criterion) {
    let registry = registry();
    let view = registry.get("bench").expect("the view").clone();
    let keys: Vec<String> = (0..10_000).map(|i| format!("user:{i:08}")).collect();
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("a runtime");

    let l1 = L1Cache::new(256 << 20);
    let life = Lifetime::fixed(Duration::from_secs(3_600));
    runtime.block_on(l1.insert_many(
        &view,
        l1.stamp(),
        keys.iter().enumerate().map(|(i, k)| (k.clone(), Cached::Found(Arc::new(ten_feature_row(i))), life)),
    ));
    for n in [1usize, 100] {
        let batch: Vec<&str> = keys.iter().step_by(keys.len() / n).take(n).map(String::as_str).collect();
        c.bench_function(&format!("l1 get_many, {n} hits"), |b| {
            b.iter(|| runtime.block_on(l1.get_many(black_box(&view), black_box(&batch))))
        });
    }

    let r = ten_feature_row(7);
    let bytes = encode_entry(view.fingerprint, 0, Content::Found(&r), r.event_time);
    c.bench_function("encode a 10-feature entry", |b| {
        b.iter(|| encode_entry(black_box(view.fingerprint), 0, Content::Found(black_box(&r)), r.event_time))
    });
    c.bench_function("decode a 10-feature entry", |b| {
        b.iter(|| decode_entry(black_box(view.fingerprint), black_box(&bytes)))
    });

    c.bench_function("route 100 keys over 2 shards", |b| {
        b.iter(|| keys[..100].iter().map(|k| strata_shard_router::shard_for(black_box(k), 2)).sum::<u32>())
    });
}

criterion_group!(micro, benches);
criterion_main!(micro);
