//! The bulk loader's Jsonl reader: never a panic, whatever the file holds;
//! every row it accepts is whole, typed, within the limits, and keyed by a
//! valid key.
#![no_main]

#[path = "common.rs"]
mod common;

use libfuzzer_sys::fuzz_target;
use strata_server::load::{Format, parse};

fuzz_target!(|data: &[u8]| {
    let limits = common::limits();
    let view = common::view();
    let _ = parse(Format::Jsonl, data, view, &limits, &mut |_line, parsed| {
        if let Ok((key, row)) = parsed {
            common::check_key(&key, &limits);
            common::check_row(view, &row, &limits);
        }
        Ok(())
    });
});
