//! DeleteFeatures validation: never a panic; accepted keys are valid and
//! distinct, and every requested key points at one of them.
#![no_main]

#[path = "common.rs"]
mod common;

use libfuzzer_sys::fuzz_target;
use prost::Message;
use strata_proto::v1;

fuzz_target!(|data: &[u8]| {
    let Ok(request) = v1::DeleteFeaturesRequest::decode(data) else { return };
    let asked = request.entity_keys.len();
    let limits = common::limits();
    if let Ok(delete) = strata_proto::delete_request(request, common::registry(), &limits) {
        assert_eq!(delete.requested.len(), asked);
        let mut keys = delete.keys.clone();
        keys.sort();
        keys.dedup();
        assert_eq!(keys.len(), delete.keys.len());
        for key in &delete.keys {
            common::check_key(key, &limits);
        }
        assert!(delete.requested.iter().all(|&at| at < delete.keys.len()));
        assert!(strata_proto::check_not_future(delete.at, &limits).is_ok());
    }
});
