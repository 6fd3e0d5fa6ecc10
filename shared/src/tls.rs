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
    let identity = Identity::from_pem(read("TLS_CERT", cert)?, read("TLS_KEY", key)?);
    let mut tls = ServerTlsConfig::new().identity(identity);
    if let Some(ca) = &config.tls_ca {
        tls = tls.client_ca_root(Certificate::from_pem(read("TLS_CA", ca)?));
    }
    Ok(Some(tls))
}

/// The client side, when TLS is configured: trust `TLS_CA`, present our certificate (mTLS).
pub fn client_tls(config: &CommonConfig) -> anyhow::Result<Option<ClientTlsConfig>> {
    if config.tls_ca.is_none() && config.tls_cert.is_none() {
        return Ok(None);
    }
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
    Ok(Some(client))
}

/// An endpoint for `addr` (`host:port` or URL): https when TLS is configured, else http.
pub fn client_endpoint(addr: &str, config: &CommonConfig) -> anyhow::Result<Endpoint> {
    let host_port = addr.split_once("://").map_or(addr, |(_, rest)| rest);
    let tls = client_tls(config)?;
    let scheme = if tls.is_some() { "https" } else { "http" };
    let mut endpoint = Endpoint::from_shared(format!("{scheme}://{host_port}"))?;
    if let Some(tls) = tls {
        endpoint = endpoint.tls_config(tls)?;
    }
    Ok(endpoint)
}
