//! The `storage-service` binary: configuration from the environment, then [`storage::run`].
//! `storage-service print-sql` prints every SQL statement the service sends, for checking
//! them on a current ClickHouse (scripts/chdb-check).
#![forbid(unsafe_code)]

fn main() -> std::process::ExitCode {
    if std::env::args().nth(1).as_deref() == Some("print-sql") {
        use std::io::Write as _;
        let printed = std::io::stdout().write_all(storage::statements_for_check().as_bytes());
        return if printed.is_ok() {
            std::process::ExitCode::SUCCESS
        } else {
            std::process::ExitCode::FAILURE
        };
    }
    trackmesh_shared::server::main("storage-service", storage::Config::from_env, storage::run)
}
