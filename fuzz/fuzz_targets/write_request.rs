//! WriteFeatures validation: never a panic; every accepted row is whole,
//! typed, within the limits, and its key is valid.
#![no_main]

#[path = "common.rs"]
mod common;

use libfuzzer_sys::fuzz_target;
use prost::Message;
use strata_proto::v1;

fuzz_target!(|data: &[u8]| {
    let Ok(request) = v1::WriteFeaturesRequest::decode(data) else { return };
    let rows = request.rows.len();
    let limits = common::limits();
    if let Ok(write) = strata_proto::write_request(request, common::registry(), &limits) {
        assert!(rows <= limits.max_rows_per_write);
        assert_eq!(write.requested.len(), rows);
        for (key, row) in &write.rows {
            common::check_key(key, &limits);
            common::check_row(&write.view, row, &limits);
            assert!(strata_proto::check_not_future(row.event_time, &limits).is_ok());
        }
        assert!(write.requested.iter().all(|&(at, _)| at < write.rows.len()));
    }
});
