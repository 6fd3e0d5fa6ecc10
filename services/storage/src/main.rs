//! The `storage-service` binary: configuration from the environment, then [`storage::run`].
#![forbid(unsafe_code)]

fn main() -> std::process::ExitCode {
    trackmesh_shared::server::main("storage-service", storage::Config::from_env, storage::run)
}
