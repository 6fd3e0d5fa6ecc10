//! The `storage-service` binary: configuration from the environment, then [`storage::run`].
//! `storage-service print-sql` prints every SQL statement the service sends, for checking
//! them on a current ClickHouse (scripts/chdb-check).
#![forbid(unsafe_code)]

fn main() -> std::process::ExitCode {
    if std::env::args().nth(1).as_deref() == Some("print-sql") {
        print!("{}", storage::statements_for_check());
        return std::process::ExitCode::SUCCESS;
    }
    trackmesh_shared::server::main("storage-service", storage::Config::from_env, storage::run)
}
