//! `otarig serve`: the firmware server over a release store directory.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use otarig_server::release_store::ReleaseStore;
use otarig_server::server::{Limits, Server};

#[derive(clap::Args)]
pub struct Args {
    #[arg(long)]
    store: PathBuf,
    #[arg(long, default_value = "127.0.0.1:8080")]
    listen: std::net::SocketAddr,
    /// Seconds a client has to send a request head (also the idle time allowed between two
    /// requests on one connection).
    #[arg(long, default_value_t = 10)]
    header_timeout: u64,
    /// Connections open at once; keep it below the process's open-files limit (ulimit -n).
    #[arg(long, default_value_t = 16_384)]
    max_connections: usize,
    /// MiB of acks.jsonl past which acks are refused (507) until it is rotated.
    #[arg(long, default_value_t = 64)]
    ack_quota_mib: u64,
    /// Requests one connection may make per second (bursts of twice that); more get 429.
    #[arg(long, default_value_t = 1_000)]
    requests_per_second: u32,
    /// Sign a timestamp into every answer with this key (KEY.pem in --keys-dir): boards that
    /// require one refuse a frozen or stripped answer. Keep it on this host only.
    #[arg(long)]
    timestamp_key: Option<String>,
    #[arg(long, default_value_os_t = otarig_server::keys::fixture_dir())]
    keys_dir: PathBuf,
    /// How long each timestamp is valid.
    #[arg(long, default_value = "10m")]
    timestamp_valid_for: String,
    /// Serve HTTPS with this certificate chain (PEM, leaf first: `otarig pki server` writes
    /// server/server_chain.pem) and --tls-key.
    #[arg(long, requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    #[arg(long, requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// Require a client certificate from this CA bundle (PEM: the root, and the intermediate
    /// a device does not send; `otarig pki` writes DIR/client_ca.pem); an ack is then accepted
    /// only for the device its certificate names (CN).
    #[arg(long, requires = "tls_cert")]
    client_ca: Option<PathBuf>,
    /// Refuse client certificates on this CRL (`otarig pki revoke` writes crl.pem).
    #[arg(long, requires = "client_ca")]
    crl: Option<PathBuf>,
    /// Answer the chunked protocol (`/ota/check`, `/ota/chunk`, `/ota/verify`,
    /// `/ota/complete`, `/ota/status`) with this fleet key (`otarig keys gen NAME --alg psk`).
    #[arg(long)]
    chunk_psk: Option<PathBuf>,
}

impl Args {
    /// The TLS configuration the flags describe, if any.
    fn tls(&self) -> anyhow::Result<Option<Arc<rustls::ServerConfig>>> {
        let (Some(cert), Some(key)) = (&self.tls_cert, &self.tls_key) else {
            return Ok(None);
        };
        let read = |p: &PathBuf| {
            std::fs::read_to_string(p).map_err(|e| anyhow::anyhow!("reading {}: {e}", p.display()))
        };
        let auth = match &self.client_ca {
            Some(ca) => Some(otarig_server::tls::ClientAuth {
                ca_pem: read(ca)?,
                crl_pem: self.crl.as_ref().map(read).transpose()?,
            }),
            None => None,
        };
        otarig_server::tls::server_config(&read(cert)?, &read(key)?, auth.as_ref()).map(Some)
    }
}

pub fn run(a: Args) -> anyhow::Result<ExitCode> {
    let store = Arc::new(ReleaseStore::open(&a.store)?);
    let rt = tokio::runtime::Runtime::new()?;
    rt.block_on(async move {
        let limits = Limits {
            header_read: std::time::Duration::from_secs(a.header_timeout.max(1)),
            max_connections: a.max_connections.max(1),
            ack_log_bytes: a.ack_quota_mib.saturating_mul(1 << 20),
            requests_per_second: a.requests_per_second.max(1),
            ..Limits::default()
        };
        let server = match a.tls()? {
            Some(tls) => Server::start_tls(store.clone(), a.listen, limits, tls).await?,
            None => Server::start_with(store.clone(), a.listen, limits).await?,
        };
        if let Some(path) = &a.chunk_psk {
            server
                .chunks
                .enable(&otarig_server::chunked::load_fleet_key(path)?);
        }
        if let Some(id) = &a.timestamp_key {
            let valid_for = otarig_scenario::scenario::parse_duration(&a.timestamp_valid_for)
                .map_err(anyhow::Error::msg)?;
            let key = otarig_server::keys::NamedKey::load(&a.keys_dir, id)?;
            server.timestamps.sign_with(
                otarig_server::statements::TimestampSigner {
                    key,
                    valid_for_s: (valid_for / 1000).max(1),
                },
                None,
            );
        }
        println!(
            "serving {} on {}{} (Ctrl-C stops)",
            store.root().display(),
            server.url(),
            if a.chunk_psk.is_some() {
                ", with the chunked protocol at /ota/*"
            } else {
                ""
            }
        );
        tokio::signal::ctrl_c().await?;
        server.shutdown().await;
        Ok(ExitCode::SUCCESS)
    })
}
