//! What a fleet run needs before its boards start: the firmware server (embedded, or an
//! external one checked for the scenario's blobs) and the broker's address.

use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use otarig_scenario::runner;
use otarig_scenario::scenario::{FaultKind, Scenario, TlsFault, Transport};
use otarig_server::release_store::ReleaseStore;
use otarig_server::server::{Limits, Server};

use super::FleetOptions;
use crate::board_http::BoardHttp;
use crate::broker::{BrokerEndpoint, EmbeddedBroker};

/// The firmware server boards talk to: the embedded one (with its store, for the timeline to
/// publish into), or an external one by URL.
pub(super) struct FirmwareServer {
    pub(super) url: String,
    pub(super) local: Option<(Server, Arc<ReleaseStore>)>,
    /// Each board's HTTPS configuration, by index, when the scenario runs over TLS.
    pub(super) board_tls: Vec<Arc<rustls::ClientConfig>>,
}

impl FirmwareServer {
    pub(super) async fn start(
        s: &Scenario,
        prep: &runner::Prepared,
        opts: &FleetOptions,
        dir: &std::path::Path,
        pki: Option<&RunPki>,
    ) -> anyhow::Result<FirmwareServer> {
        if let Some(url) = &opts.server {
            if s.transport == Transport::Tls && pki.is_none() {
                bail!("{}: transport = \"tls\" makes its PKI per run for the embedded firmware server; run without --server", s.path.display());
            }
            let board_tls = pki.map(|p| p.boards.clone()).unwrap_or_default();
            if board_tls.is_empty() {
                check_external_server(s, prep, url).await?;
            }
            return Ok(FirmwareServer {
                url: url.trim_end_matches('/').to_string(),
                local: None,
                board_tls,
            });
        }
        let store = Arc::new(ReleaseStore::open(dir)?);
        prep.stage_into(&store)?;
        let addr = "127.0.0.1:0".parse()?;
        let (server, board_tls) = match pki {
            None => (Server::start(store.clone(), addr).await?, Vec::new()),
            Some(pki) => {
                let tls = pki
                    .server_tls
                    .clone()
                    .context("this PKI serves no HTTPS from here (a benchmark shard's)")?;
                let server = Server::start_tls(store.clone(), addr, Limits::default(), tls);
                (server.await?, pki.boards.clone())
            }
        };
        server.faults.set_speedup(opts.speedup.max(1.0));
        if let Some(key) = &prep.fleet_key {
            server.chunks.enable(key);
        }
        for i in 0..s.devices {
            let faults = s.server_faults_for(i);
            if !faults.is_empty() {
                server.faults.set(&s.device_id(i), faults);
            }
        }
        Ok(FirmwareServer {
            url: server.url(),
            local: Some((server, store)),
            board_tls,
        })
    }
}

/// The PKI of one run over TLS: made in a temporary directory, a root CA and an
/// intermediate that issues a certificate for 127.0.0.1 (the firmware server and the broker),
/// one device certificate per board (CN = its id) and the operator's.
pub(super) struct RunPki {
    /// HTTPS, client certificates required (None in a benchmark shard: its parent serves).
    pub(super) server_tls: Option<Arc<rustls::ServerConfig>>,
    /// Each board's TLS configuration (the root, its certificate), by index.
    pub(super) boards: Vec<Arc<rustls::ClientConfig>>,
    pub(super) operator: Arc<rustls::ClientConfig>,
    /// The files Mosquitto reads.
    pub(super) mosquitto: crate::mosquitto::MutualTls,
}

impl RunPki {
    /// This process's share of a PKI made by the scale benchmark (`dir`, from `otarig pki
    /// init` and `pki server`): a certificate for each of its boards, and the operator's.
    /// Other shards' boards get the operator's configuration, never used here.
    pub(super) fn issued_by(
        s: &Scenario,
        dir: &std::path::Path,
        shard: Option<super::Shard>,
    ) -> anyhow::Result<RunPki> {
        use otarig_server::tls::{device_client, Client};
        let pki = otarig_server::pki::Pki::open(dir)?;
        let operator = device_client(&pki, crate::mosquitto::OPERATOR_CN, 30, Client::Host)?;
        let boards = (0..s.devices)
            .map(|i| match shard {
                Some(sh) if !sh.holds(i) => Ok(operator.clone()),
                _ => device_client(&pki, &s.device_id(i), 30, Client::Board),
            })
            .collect::<anyhow::Result<_>>()?;
        Ok(RunPki {
            server_tls: None,
            boards,
            operator,
            mosquitto: crate::mosquitto::MutualTls::of_pki(dir),
        })
    }

    /// The run's PKI, with trust broken where the scenario's `tls` faults say.
    pub(super) fn make(s: &Scenario, dir: &std::path::Path) -> anyhow::Result<RunPki> {
        use otarig_server::tls::{client_config, server_config_with, Client, ClientAuth};
        let pki = otarig_server::pki::Pki::init(dir, true, 30)?;
        let stranger = BoardIdentity::stranger(dir)?;
        let server_side =
            (0..s.devices).find_map(|i| s.tls_fault_for(i).filter(|f| f.server_side()));
        let face = ServerFace::for_fault(server_side, vec!["127.0.0.1".into(), "localhost".into()]);
        // The broker's certificate is always good: a server-side fault breaks the firmware
        // server's (and the operator must reach the broker anyway).
        let leaf = pki.server(&face.names, face.days)?;
        pki.write_server(&pki.server(&["127.0.0.1".into(), "localhost".into()], 30)?)?;
        let mut crl = None;
        let mut client = |id: &str, who: Client, fault: Option<TlsFault>| -> anyhow::Result<_> {
            let b = BoardIdentity::issue(&pki, &stranger, id, fault)?;
            if b.crl.is_some() {
                crl = b.crl.clone(); // the newest lists every revocation
            }
            client_config(who, &b.ca_pem, Some((&b.cert_pem, &b.key_pem)))
        };
        let boards = (0..s.devices)
            .map(|i| client(&s.device_id(i), Client::Board, s.tls_fault_for(i)))
            .collect::<anyhow::Result<_>>()?;
        let operator = client(crate::mosquitto::OPERATOR_CN, Client::Host, None)?;
        let auth = ClientAuth {
            ca_pem: pki.client_ca_pem(),
            crl_pem: crl.clone(),
        };
        Ok(RunPki {
            server_tls: Some(server_config_with(
                face.versions,
                &pki.chain_pem(&leaf),
                &leaf.key_pem,
                Some(&auth),
            )?),
            boards,
            operator,
            // With the CRL when a board's certificate was revoked.
            mosquitto: crate::mosquitto::MutualTls::of_pki(dir),
        })
    }
}

impl FirmwareServer {
    /// Freeze the embedded server's answers to the boards of fault `n` as they are now.
    pub(super) fn freeze(&self, s: &Scenario, n: usize) -> anyhow::Result<()> {
        let (server, store) = self.local.as_ref().with_context(|| {
            format!(
                "{}: a frozen mirror is played by the embedded firmware server; run without --server",
                s.path.display()
            )
        })?;
        let (signer, now_s) = server.timestamps.now();
        let statements = store.statements(&s.device_type)?;
        let f = &s.faults[n];
        for i in (0..s.devices).filter(|i| f.devices.contains(*i)) {
            let answer = match store.latest(&s.device_type, s.channel_for(i))? {
                Some(m) => Some(statements.borrow().answer(&m, signer.as_deref(), now_s)?),
                None => None,
            };
            server.offers.freeze(&s.device_id(i), answer);
        }
        Ok(())
    }
}

/// The broker: the external one (credentials from its URL, if any), or an embedded rumqttd
/// started with room for two connections per board, which admits only its own clients.
/// Over TLS it is Mosquitto with mutual TLS and the per-device ACL (started from `PATH`,
/// returned so it lives as long as the run): the embedded rumqttd cannot keep a board to its
/// own topics ([`crate::mosquitto`]).
pub(super) async fn broker_address(
    s: &Scenario,
    opts: &FleetOptions,
    pki: Option<&RunPki>,
) -> anyhow::Result<(BrokerEndpoint, Option<crate::mosquitto::Mosquitto>)> {
    if let (Some(pki), Some(b)) = (pki, &opts.broker) {
        // The benchmark's shards: a Mosquitto with mutual TLS started by the parent.
        let devices = (0..s.devices)
            .map(|i| (s.device_id(i), pki.boards[i as usize].clone()))
            .collect();
        let endpoint = BrokerEndpoint {
            login: crate::broker::Login::Certificates {
                devices: Arc::new(devices),
                operator: pki.operator.clone(),
            },
            ..b.clone()
        };
        return Ok((endpoint, None));
    }
    if let Some(pki) = pki {
        let tls = pki.mosquitto.clone();
        let channels: Vec<(String, String, String)> = (0..s.devices)
            .map(|i| {
                (
                    s.device_id(i),
                    s.device_type.clone(),
                    s.channel_for(i).to_string(),
                )
            })
            .collect();
        let m = tokio::task::spawn_blocking(move || {
            crate::mosquitto::Mosquitto::start_tls(&tls, &channels)
        })
        .await??;
        let devices = (0..s.devices)
            .map(|i| (s.device_id(i), pki.boards[i as usize].clone()))
            .collect();
        let endpoint = BrokerEndpoint {
            host: "127.0.0.1".into(),
            port: m.port,
            login: crate::broker::Login::Certificates {
                devices: Arc::new(devices),
                operator: pki.operator.clone(),
            },
        };
        return Ok((endpoint, Some(m)));
    }
    match &opts.broker {
        Some(b) => Ok((b.clone(), None)),
        None => {
            let devices = s.devices as usize;
            let b =
                tokio::task::spawn_blocking(move || EmbeddedBroker::start(devices * 2)).await??;
            Ok((b.endpoint(), None))
        }
    }
}

/// Before boards use an external firmware server: refuse what only the embedded server can
/// do, and check the server holds every blob the scenario's releases need.
pub(super) async fn check_external_server(
    s: &Scenario,
    prep: &runner::Prepared,
    url: &str,
) -> anyhow::Result<()> {
    let file = s.path.display();
    if s.releases.iter().any(|r| r.rollout.is_some()) {
        bail!("{file}: staged rollouts are driven by the embedded firmware server; run without --server");
    }
    if s.faults
        .iter()
        .any(|f| matches!(f.kind, FaultKind::Server { .. }))
    {
        bail!("{file}: server faults are injected by the embedded firmware server; run without --server");
    }
    let http = BoardHttp::new();
    for (sha, _) in prep.store.blobs() {
        let blob = format!("{}/blobs/{}", url.trim_end_matches('/'), hex::encode(sha));
        let r = tokio::time::timeout(Duration::from_secs(10), http.get(&blob, Some((0, 0))))
            .await
            .map_err(|_| anyhow::anyhow!("no answer within 10 s"))
            .and_then(|r| r)
            .with_context(|| format!("the firmware server at {url} does not answer (is `otarig serve --store DIR` running there?)"))?;
        if !r.status().is_success() {
            bail!(
                "the firmware server at {url} answers {} for {blob}: stage the scenario's releases first with `otarig release stage {file} --store DIR` on the server's store",
                r.status()
            );
        }
    }
    if prep.fleet_key.is_some() {
        let status = format!("{}/ota/status", url.trim_end_matches('/'));
        let answered = tokio::time::timeout(Duration::from_secs(10), http.get(&status, None)).await;
        if !matches!(answered, Ok(Ok(ref r)) if r.status().is_success()) {
            bail!(
                "{file} fetches by the chunked protocol, and the firmware server at {url} does not answer it: start it with `otarig serve --chunk-psk fixtures/keys/{}`",
                otarig_server::chunked::FIXTURE_FLEET_KEY
            );
        }
    }
    Ok(())
}

static TLS13_ONLY: [&rustls::SupportedProtocolVersion; 1] = [&rustls::version::TLS13];

/// How the firmware server presents itself on a TLS run: its certificate's names and
/// validity and the TLS versions it speaks, broken where a server-side `tls` fault says. The
/// wire fleet and the HIL runner build the server from it; the broker keeps a good face.
pub struct ServerFace {
    pub names: Vec<String>,
    /// Days the certificate is valid (0: already expired).
    pub days: u32,
    pub versions: &'static [&'static rustls::SupportedProtocolVersion],
}

impl ServerFace {
    /// The face for `fault` (a server-side one; others leave it good), normally `names`.
    pub fn for_fault(fault: Option<TlsFault>, names: Vec<String>) -> ServerFace {
        let good = ServerFace {
            names,
            days: 30,
            versions: rustls::DEFAULT_VERSIONS,
        };
        match fault {
            Some(TlsFault::HostnameMismatch) => ServerFace {
                names: vec!["firmware.example".into()],
                ..good
            },
            Some(TlsFault::ExpiredServerCertificate) => ServerFace { days: 0, ..good },
            Some(TlsFault::ServerTls13Only) => ServerFace {
                versions: &TLS13_ONLY,
                ..good
            },
            _ => good,
        }
    }
}

/// What a board is provisioned with on a TLS run: the root it trusts, the certificate it
/// presents (alone: the broker and server hold the intermediate) and its key, broken where a
/// board-side `tls` fault says. The wire fleet builds its boards from it, the HIL runner the
/// bench board's NVS image.
pub struct BoardIdentity {
    pub ca_pem: String,
    pub cert_pem: String,
    pub key_pem: String,
    /// The run's CRL, signed anew when this board's certificate was revoked.
    pub crl: Option<String>,
}

impl BoardIdentity {
    /// Another CA, in `dir/stranger`, for boards that trust it or carry its certificates.
    pub fn stranger(dir: &std::path::Path) -> anyhow::Result<otarig_server::pki::Pki> {
        otarig_server::pki::Pki::init(&dir.join("stranger"), false, 30)
    }

    /// Device `id`'s identity from `pki` (from `stranger` for `foreign-certificate`; trusting
    /// `stranger`'s root for `wrong-ca`; revoked on `pki`'s CRL for `revoked-certificate`).
    pub fn issue(
        pki: &otarig_server::pki::Pki,
        stranger: &otarig_server::pki::Pki,
        id: &str,
        fault: Option<TlsFault>,
    ) -> anyhow::Result<BoardIdentity> {
        let issuer = match fault {
            Some(TlsFault::ForeignCertificate) => stranger,
            _ => pki,
        };
        let d = issuer.device(id, 30)?;
        let crl = match fault {
            Some(TlsFault::RevokedCertificate) => Some(pki.revoke(&d.serial, id)?),
            _ => None,
        };
        let ca = match fault {
            Some(TlsFault::WrongCa) => stranger,
            _ => pki,
        };
        Ok(BoardIdentity {
            ca_pem: ca.root_pem().to_string(),
            cert_pem: d.cert_pem,
            key_pem: d.key_pem,
            crl,
        })
    }
}
