//! Compiles the trackmesh protos with protoc from `$PROTOC`, else from `protoc-bin-vendored`.

use std::{env, path::PathBuf};

const PROTOS: &[&str] = &[
    "trackmesh/v1/common.proto",
    "trackmesh/v1/refinement.proto",
    "trackmesh/v1/learning.proto",
    "trackmesh/v1/storage.proto",
    "trackmesh/v1/gateway.proto",
];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protoc = match env::var_os("PROTOC") {
        Some(path) => PathBuf::from(path),
        None => protoc_bin_vendored::protoc_bin_path()?,
    };
    let mut config = prost_build::Config::new();
    config.protoc_executable(protoc);
    let out = PathBuf::from(env::var("OUT_DIR")?);
    tonic_prost_build::configure()
        .file_descriptor_set_path(out.join("trackmesh_descriptor.bin"))
        .compile_with_config(config, PROTOS, &["."])?;
    println!("cargo:rerun-if-env-changed=PROTOC");
    for proto in PROTOS {
        println!("cargo:rerun-if-changed={proto}");
    }
    Ok(())
}
