//! Generates the tonic/prost code and the descriptor set (for reflection)
//! from `proto/`, with protox: no system `protoc` needed.

use std::path::PathBuf;

use prost::Message as _;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let root = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR")?).join("../../proto");
    println!("cargo:rerun-if-changed={}", root.display());
    // Strata's API, Feast's serving APIs (served on the same port) and the
    // part of Feast's registry that `strata feast import` reads.
    let files = protox::compile(
        [
            "strata/v1/feature_store.proto",
            "feast/serving/ServingService.proto",
            "feast/serving/GrpcServer.proto",
            "feast/core/Registry.proto",
        ],
        [&root],
    )?;
    let out = PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(out.join("strata_descriptor.bin"), files.encode_to_vec())?;
    tonic_prost_build::configure().build_server(true).build_client(true).compile_fds(files)?;
    Ok(())
}
