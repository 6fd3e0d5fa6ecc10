//! The `learning-api` binary: configuration from the environment, then [`learning::run`].
#![forbid(unsafe_code)]

fn main() -> std::process::ExitCode {
    trackmesh_shared::server::main("learning-api", learning::Config::from_env, learning::run)
}
