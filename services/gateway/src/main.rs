//! The `gateway` binary: configuration from the environment, then [`gateway::run`].
#![forbid(unsafe_code)]

fn main() -> std::process::ExitCode {
    trackmesh_shared::server::main("gateway", gateway::Config::from_env, gateway::run)
}
