//! ClickHouse: schema migrations, batched inserts and the queries behind the Storage API.

use crate::config::StorageConfig;

#[derive(Clone)]
pub struct Db {
    client: clickhouse::Client,
}

impl Db {
    pub fn new(config: &StorageConfig) -> Self {
        let mut client = clickhouse::Client::default()
            .with_url(config.clickhouse_url())
            .with_user(&config.clickhouse_user)
            // The crate's schema validation needs servers newer than Debian's 18.16.
            .with_validation(false);
        if let Some(password) = &config.clickhouse_password {
            client = client.with_password(password);
        }
        Self { client }
    }

    /// For readiness: `Err` says what is wrong.
    pub async fn ping(&self) -> Result<(), String> {
        self.client
            .query("SELECT 1")
            .fetch_one::<u8>()
            .await
            .map(drop)
            .map_err(|err| format!("clickhouse: {err}"))
    }
}
