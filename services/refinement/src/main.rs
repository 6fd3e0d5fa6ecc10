//! The `refinement-api` binary: configuration from the environment, then [`refinement::run`].
#![forbid(unsafe_code)]

fn main() -> std::process::ExitCode {
    trackmesh_shared::server::main(
        "refinement-api",
        refinement::Config::from_env,
        refinement::run,
    )
}
