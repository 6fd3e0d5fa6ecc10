//! Optional TLS / mTLS from `TLS_CERT`, `TLS_KEY` and `TLS_CA` (PEM files), for servers and
//! for the clients between services. Plaintext when unset.

use anyhow::Context as _;
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity, ServerTlsConfig};

use crate::config::CommonConfig;

fn read(var: &str, path: &str) -> anyhow::Result<Vec<u8>> {
    std::fs::read(path).with_context(|| format!("reading {var}={path}"))
}

/// The server side: our certificate, and with a CA, client certificates required (mTLS).
pub fn server_config(config: &CommonConfig) -> anyhow::Result<Option<ServerTlsConfig>> {
    let (Some(cert), Some(key)) = (&config.tls_cert, &config.tls_key) else {
        return Ok(None);
    };
    let mut tls = ServerTlsConfig::new().identity(Identity::from_pem(
        read("TLS_CERT", cert)?,
        read("TLS_KEY", key)?,
    ));
    if let Some(ca) = &config.tls_ca {
        tls = tls.client_ca_root(Certificate::from_pem(read("TLS_CA", ca)?));
    }
    Ok(Some(tls))
}

/// An endpoint for `addr` (`host:port` or URL): https trusting `TLS_CA` and presenting our
/// certificate when TLS is configured, plain http otherwise.
pub fn client_endpoint(addr: &str, config: &CommonConfig) -> anyhow::Result<Endpoint> {
    let tls = config.tls_ca.is_some() || config.tls_cert.is_some();
    let host_port = addr.split_once("://").map_or(addr, |(_, rest)| rest);
    let scheme = if tls { "https" } else { "http" };
    let mut endpoint = Endpoint::from_shared(format!("{scheme}://{host_port}"))?;
    if tls {
        let mut client = ClientTlsConfig::new();
        if let Some(ca) = &config.tls_ca {
            client = client.ca_certificate(Certificate::from_pem(read("TLS_CA", ca)?));
        }
        if let (Some(cert), Some(key)) = (&config.tls_cert, &config.tls_key) {
            client = client.identity(Identity::from_pem(
                read("TLS_CERT", cert)?,
                read("TLS_KEY", key)?,
            ));
        }
        endpoint = endpoint.tls_config(client)?;
    }
    Ok(endpoint)
}
