//! GetFeatures validation: any bytes a client sends, decoded as the server
//! decodes them, then validated. Never a panic; an accepted read names a
//! known view, valid keys and distinct known features.
#![no_main]

#[path = "common.rs"]
mod common;

use libfuzzer_sys::fuzz_target;
use prost::Message;
use strata_proto::v1;

fuzz_target!(|data: &[u8]| {
    let Ok(request) = v1::GetFeaturesRequest::decode(data) else { return };
    let limits = common::limits();
    if let Ok(read) = strata_proto::read_request(request, common::registry(), &limits) {
        assert!(!read.keys.is_empty() && read.keys.len() <= limits.max_keys_per_request);
        for key in &read.keys {
            common::check_key(key, &limits);
        }
        let mut columns = read.columns.clone();
        columns.sort_unstable();
        columns.dedup();
        assert_eq!(columns.len(), read.columns.len());
        assert!(read.columns.iter().all(|&c| c < read.view.features.len()));
    }
});
