//! # otarig-hil
//!
//! The HIL runner: one scenario on one board over its serial port, real or virtual, judged by
//! the same checker as the simulator.
//!
//! For each scenario: the embedded broker and the firmware server start on an address the
//! board can reach; the board is flashed with espflash (partition table, the scenario's
//! starting firmware in its slot, otadata erased); it is provisioned over its console (Wi-Fi,
//! broker and server URLs, device id); then the runner plays the scenario's timeline (releases
//! announced over MQTT, commands and payloads, server faults, power cuts at a download
//! progress point) and records what the board's console says. The records feed
//! [`otarig_scenario::expect::judge`] exactly as a simulated run's do.
//!
//! Real time, with one liberty: when the board has been quiet for [`HilOptions::idle_skip`] and
//! the next step is further away, the runner takes it at once (a release 10 minutes after the
//! last one finds the board in the same idle state sooner). Scenario knobs only a simulator
//! can honour are skipped with a message, never silently: cuts at a given flash operation,
//! forced installs, and checks of otadata states or bootloader decisions the console does not
//! show.
//!
//! Built on `otarig-serial` (flashing, reset, power), the scenario engine, the server and the
//! fleet's embedded broker. Nothing below it may depend on it; only the CLI does.

pub mod bench;
mod console;
mod flashing;
mod observed;
mod play;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use otarig_agent::console::HostCommand;
use std::net::SocketAddr;

use otarig_fleet::broker::{BrokerEndpoint, EmbeddedBroker, Login};
use otarig_scenario::runner::{prepare, prepare_with, Prepared, Run};
use otarig_scenario::scenario::{Check, FaultKind, Scenario, ServerFault, Transport};
use otarig_serial::flasher::Target;
use otarig_serial::reset::ResetMethod;
use otarig_server::release_store::ReleaseStore;
use otarig_server::server::{CountedFault, Limits, Server};

use console::Console;
pub use flashing::firmware_file;

/// How to reach the board and its bench.
#[derive(Clone, Debug)]
pub struct HilOptions {
    pub port: String,
    pub target: Target,
    pub reset: ResetMethod,
    /// The address the board reaches the broker and server on (printed). 127.0.0.1 for the
    /// virtual board; the bench PC's LAN address for a real one.
    pub host: std::net::IpAddr,
    pub wifi_ssid: String,
    pub wifi_password: String,
    /// Longest wait for any one thing the board should do.
    pub step_timeout: Duration,
    /// The run ends once the timeline is played and the board has been quiet this long.
    pub quiet: Duration,
    pub idle_skip: Duration,
    /// Where each scenario's whole console is saved (NAME.console.log).
    pub log_dir: Option<PathBuf>,
    /// Show espflash progress bars.
    pub progress: bool,
    /// A real board's firmware builds (`just fw-build` output): `bootloader.bin` and one
    /// `VERSION[-VARIANT].bin` per scenario firmware (see [`firmware_file`]).
    pub firmware_dir: Option<PathBuf>,
}

/// What a HIL run produced.
pub struct HilRun {
    pub run: Run,
    /// Scenario parts skipped because only the simulator can do them.
    pub skipped: Vec<String>,
    pub console: Vec<String>,
}

const DEVICE: u32 = 0;

/// A scenario that only the simulator can play; the runner reports it skipped, with why.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct SimOnly(pub String);

/// Checks a console cannot support (otadata states, bootloader rejections): sim-only.
fn sim_only_check(c: &Check) -> bool {
    matches!(c, Check::UpdateSlotState(_) | Check::BootloaderRejected(_))
}

/// Run one scenario on the board: start the broker and server where the board reaches them,
/// flash it, provision it, play the timeline and record what its console says.
pub async fn run_scenario(scenario: &Scenario, opts: &HilOptions) -> anyhow::Result<HilRun> {
    let started = Instant::now();
    let (s, skipped) = one_board(scenario);
    let prep = match (opts.target, &opts.firmware_dir) {
        (Target::Virtual, _) => prepare(&s)?,
        (Target::Hardware, Some(dir)) => prepare_with(&s, &|fw| firmware_file(dir, fw))?,
        (Target::Hardware, None) => bail!(
            "a real board runs the firmware built for it: set firmware-dir in the bench file (the output of `just fw-build`)"
        ),
    };
    let (faults, cut_at) = bench_faults(&s, &prep)?;
    let services = Services::start(opts.host, &s, &prep, faults, opts).await?;
    tracing::info!(broker = %services.broker.url(), server = %services.server.url(), "bench services for {}", s.name);
    flashing::flash_starting_state(&s, &prep, services.nvs.as_deref(), opts).await?;
    let mut con = Console::open(&opts.port)?;
    let t0 = Instant::now();
    // A factory NVS image provisions the board (for TLS, or the chunked protocol's key);
    // else its console does.
    if services.nvs.is_none() {
        provision(&mut con, &s, &services, opts).await?;
    }
    let played = play::play(t0, &s, &prep, &services, &mut con, cut_at, opts).await;
    let fetched = services.server.faults.served(&s.device_id(DEVICE));
    services.server.shutdown().await;
    let (seen, cuts, end_ms) = played?;
    save_console(&s, &con, opts)?;
    tracing::info!(
        "{} done in {:.1} s",
        s.name,
        started.elapsed().as_secs_f64()
    );
    let report = seen.report(&s.device_id(DEVICE), fetched, cuts);
    Ok(HilRun {
        run: Run {
            scenario: s,
            records: seen.records,
            devices: vec![report],
            end_ms,
            served_bytes: fetched,
        },
        skipped,
        console: std::mem::take(&mut con.log),
    })
}

/// The scenario with one board and without the checks a console cannot support, and what was
/// left out.
fn one_board(scenario: &Scenario) -> (Scenario, Vec<String>) {
    let mut s = scenario.clone();
    s.set_devices(1);
    let mut skipped = Vec::new();
    for e in &mut s.expects {
        e.checks.retain(|c| {
            let keep = !sim_only_check(c);
            if !keep {
                skipped.push(format!("{}: check {} (simulator only: the console does not show otadata states or bootloader rejections)", e.at, c.key()));
            }
            keep
        });
    }
    (s, skipped)
}

/// The server faults for the board, and the download progress (percent) at which a power cut
/// lands; a fault only the simulator can realise is [`SimOnly`].
fn bench_faults(s: &Scenario, prep: &Prepared) -> anyhow::Result<(Vec<CountedFault>, Option<u32>)> {
    if s.wall.set_at_ms > 0 {
        return Err(SimOnly(
            "clock-set-after holds a board's clock back; on a bench SNTP sets it: simulator only"
                .into(),
        )
        .into());
    }
    let mut faults = s.server_faults_for(DEVICE);
    let first_size = s
        .releases
        .first()
        .map_or(0, |r| prep.images[&r.firmware].len() as u64);
    let mut cut_at = None;
    for f in &s.faults {
        match &f.kind {
            FaultKind::PowerLoss(pl) if pl.progress.is_some() && !pl.sim_only() => {
                cut_at = pl.progress;
                // Pace the download so the cut lands near its point: about ten seconds.
                let rate = (first_size / 10).max(16 * 1024) as u32;
                faults.push((ServerFault::Throttle(rate), None));
            }
            FaultKind::PowerLoss(pl) => {
                return Err(SimOnly(format!(
                    "a power cut in phase {:?}{} needs the simulator (a bench cuts power at a download progress point)",
                    pl.phase,
                    pl.op.map(|n| format!(", operation {n}")).unwrap_or_default()
                ))
                .into())
            }
            FaultKind::ForceInstall { .. } => {
                return Err(SimOnly(
                    "force-install writes a slot behind the agent: simulator only".into(),
                )
                .into())
            }
            FaultKind::Flood { .. } => {
                return Err(SimOnly(
                    "broker flooding runs in the wire fleet (`otarig fleet`): simulator only"
                        .into(),
                )
                .into())
            }
            FaultKind::Freeze { .. } => {
                return Err(SimOnly(
                    "a frozen mirror's answer goes stale on the scenario's calendar, and a bench run skips idle time: simulator only".into(),
                )
                .into())
            }
            FaultKind::Outage { .. } => {
                return Err(SimOnly(
                    "an outage takes a board's network down at a boot: simulator only".into(),
                )
                .into())
            }
            _ => {}
        }
    }
    Ok((faults, cut_at))
}

/// The broker and firmware server of one scenario, on an address the board can reach.
struct Services {
    broker: BenchBroker,
    store: Arc<ReleaseStore>,
    server: Server,
    /// With `transport = "tls"`: the board's factory NVS image (its provisioning and identity),
    /// flashed instead of console provisioning.
    nvs: Option<Vec<u8>>,
    /// Holds the store's (and the PKI's) files until the run ends.
    _dir: tempfile::TempDir,
}

/// The bench's broker: the embedded rumqttd, or over TLS Mosquitto with mutual TLS and the
/// per-device ACL (rumqttd cannot keep a board to its own topics).
enum BenchBroker {
    Embedded(EmbeddedBroker),
    Mosquitto(otarig_fleet::mosquitto::Mosquitto, BrokerEndpoint),
}

impl BenchBroker {
    fn endpoint(&self) -> BrokerEndpoint {
        match self {
            BenchBroker::Embedded(b) => b.endpoint(),
            BenchBroker::Mosquitto(_, e) => e.clone(),
        }
    }

    fn url(&self) -> String {
        match self {
            BenchBroker::Embedded(b) => b.url(),
            BenchBroker::Mosquitto(m, _) => m.url(),
        }
    }
}

/// A bench run over mutual TLS: its PKI (root, intermediate, a certificate for `host`, the
/// board's and the operator's), the HTTPS server, Mosquitto, and the board's NVS image.
struct TlsBench {
    server: Server,
    broker: BenchBroker,
    nvs: Vec<u8>,
}

impl TlsBench {
    async fn start(
        host: std::net::IpAddr,
        s: &Scenario,
        prep: &Prepared,
        store: Arc<ReleaseStore>,
        dir: &std::path::Path,
        opts: (&str, &str),
    ) -> anyhow::Result<TlsBench> {
        use otarig_fleet::fleet::{BoardIdentity, ServerFace};
        use otarig_fleet::mosquitto::{Mosquitto, MutualTls, OPERATOR_CN};
        use otarig_server::tls::{device_client, server_config_with, Client, ClientAuth};
        let pki = otarig_server::pki::Pki::init(dir, true, 30)?;
        let mut names = vec![
            host.to_string(),
            "127.0.0.1".to_string(),
            "localhost".to_string(),
        ];
        names.dedup();
        // The broker's certificate is good; a server-side `tls` fault breaks the firmware
        // server's face, as in the wire fleet.
        pki.write_server(&pki.server(&names, 30)?)?;
        let face = ServerFace::for_fault(s.tls_fault_for(DEVICE), names);
        let leaf = pki.server(&face.names, face.days)?;
        let id = s.device_id(DEVICE);
        // The board's identity, broken where a board-side `tls` fault says, as in the wire
        // fleet (a revocation also writes the CRL the server and Mosquitto load).
        let stranger = BoardIdentity::stranger(dir)?;
        let board = BoardIdentity::issue(&pki, &stranger, &id, s.tls_fault_for(DEVICE))?;
        let auth = ClientAuth {
            ca_pem: pki.client_ca_pem(),
            crl_pem: board.crl.clone(),
        };
        let tls = server_config_with(
            face.versions,
            &pki.chain_pem(&leaf),
            &leaf.key_pem,
            Some(&auth),
        )?;
        let server =
            Server::start_tls(store, SocketAddr::new(host, 0), Limits::default(), tls).await?;
        let files = MutualTls::of_pki(dir);
        let channels = [(
            id.clone(),
            s.device_type.clone(),
            s.channel_for(DEVICE).to_string(),
        )];
        let m =
            tokio::task::spawn_blocking(move || Mosquitto::start_tls_on(host, &files, &channels))
                .await??;
        let operator_tls = device_client(&pki, OPERATOR_CN, 30, Client::Host)?;
        let endpoint = BrokerEndpoint {
            host: host.to_string(),
            port: m.port,
            login: Login::Certificates {
                devices: Arc::default(),
                operator: operator_tls,
            },
        };
        let (ssid, password) = opts;
        let nvs = factory_nvs(
            s,
            prep,
            &[
                ("device", id.as_str()),
                ("broker", m.url().as_str()),
                ("server", server.url().as_str()),
                ("channel", s.channel_for(DEVICE)),
                ("ssid", ssid),
                ("password", password),
                ("ca_cert", board.ca_pem.as_str()),
                ("device_crt", board.cert_pem.as_str()),
                ("device_key", board.key_pem.as_str()),
            ],
        )?;
        Ok(TlsBench {
            server,
            broker: BenchBroker::Mosquitto(m, endpoint),
            nvs,
        })
    }
}

/// The board's factory NVS image (namespace `otarig`, as `otarig pki nvs` writes it):
/// `entries` (device, network, identity), then the keys a factory puts beside them: the
/// fixture image keys when a release is encrypted, and the board's own chunk key (derived
/// from the fleet key) when the scenario fetches by chunks.
fn factory_nvs(s: &Scenario, prep: &Prepared, entries: &[(&str, &str)]) -> anyhow::Result<Vec<u8>> {
    let nvs_part = prep
        .proto
        .table()
        .find("nvs")
        .context("this scenario provisions the board with a factory NVS image (transport = \"tls\" or download = \"chunked\"): the partition table needs an `nvs` partition")?;
    let mut w = otarig_esp32s3::nvs::NvsWriter::new(nvs_part.size as usize)?;
    w.namespace("otarig")?;
    for (k, v) in entries {
        w.string(k, v)?;
    }
    if s.releases.iter().any(|r| r.encrypt.is_some()) {
        let keys = otarig_server::keys::fixture_dir();
        let read = |f: &str| {
            std::fs::read_to_string(keys.join(f))
                .with_context(|| format!("reading the image key fixtures/keys/{f}"))
        };
        w.string("image_aes", read("aes-256-image.hex")?.trim())?;
        w.string("image_rsa", &read("rsa-3072-image.pem")?)?;
    }
    if let otarig_agent::FetchMode::Chunked(key) = prep.fetch_mode(&s.device_id(DEVICE)) {
        w.string("chunk_key", &key.to_hex())?;
    }
    Ok(w.finish())
}

impl Services {
    async fn start(
        host: std::net::IpAddr,
        s: &Scenario,
        prep: &Prepared,
        faults: Vec<CountedFault>,
        opts: &HilOptions,
    ) -> anyhow::Result<Services> {
        let dir = tempfile::tempdir()?;
        let store = Arc::new(ReleaseStore::open(dir.path())?);
        prep.stage_into(&store)?;
        let (server, broker, nvs) = if s.transport == Transport::Tls {
            let wifi = (opts.wifi_ssid.as_str(), opts.wifi_password.as_str());
            let pki = dir.path().join("pki");
            let t = TlsBench::start(host, s, prep, store.clone(), &pki, wifi).await?;
            (t.server, t.broker, Some(t.nvs))
        } else {
            let broker =
                tokio::task::spawn_blocking(move || EmbeddedBroker::start_on(host, 8)).await??;
            let server = Server::start(store.clone(), SocketAddr::new(host, 0)).await?;
            let broker = BenchBroker::Embedded(broker);
            // The chunk key travels in a factory NVS image, never over the console.
            let nvs = match prep.fleet_key {
                Some(_) => {
                    let id = s.device_id(DEVICE);
                    let url = broker.endpoint().url_for(&id);
                    let entries = [
                        ("device", id.as_str()),
                        ("broker", url.as_str()),
                        ("server", &server.url()),
                        ("channel", s.channel_for(DEVICE)),
                        ("ssid", opts.wifi_ssid.as_str()),
                        ("password", opts.wifi_password.as_str()),
                    ];
                    Some(factory_nvs(s, prep, &entries)?)
                }
                None => None,
            };
            (server, broker, nvs)
        };
        if let Some(key) = &prep.fleet_key {
            server.chunks.enable(key);
        }
        // A bench board's clock is real time (SNTP): timestamps on the system clock.
        server.timestamps.sign_with(s.trust.signer()?, None);
        if !faults.is_empty() {
            server.faults.set(&s.device_id(DEVICE), faults);
        }
        Ok(Services {
            broker,
            store,
            server,
            nvs,
            _dir: dir,
        })
    }

    /// The broker URL board `device` is provisioned with: its own credentials in it.
    fn broker_url(&self, device: &str) -> String {
        self.broker.endpoint().url_for(device)
    }
}

/// Provision the board over its console and wait for it to say so. What it says before that
/// (its first, unprovisioned boot) is not the scenario's: the simulated boards start
/// provisioned.
async fn provision(
    con: &mut Console,
    s: &Scenario,
    services: &Services,
    opts: &HilOptions,
) -> anyhow::Result<()> {
    con.send(&HostCommand::Provision {
        device: s.device_id(DEVICE),
        broker: services.broker_url(&s.device_id(DEVICE)),
        server: services.server.url(),
        channel: Some(s.channel_for(DEVICE).to_string()),
        wifi_ssid: opts.wifi_ssid.clone(),
        wifi_password: opts.wifi_password.clone(),
    })?;
    let deadline = Instant::now() + opts.step_timeout;
    loop {
        match tokio::time::timeout_at(deadline.into(), con.lines.recv()).await {
            Ok(Some(l)) => {
                let done = l.contains("\"kind\":\"provisioned\"");
                con.log.push(l);
                if done {
                    return Ok(());
                }
            }
            _ => bail!(
                "{} did not confirm provisioning within {:?}; last console lines:\n    {}",
                opts.port,
                opts.step_timeout,
                con.tail()
            ),
        }
    }
}

/// Save the scenario's whole console as NAME.console.log in the log directory.
fn save_console(s: &Scenario, con: &Console, opts: &HilOptions) -> anyhow::Result<()> {
    let Some(dir) = &opts.log_dir else {
        return Ok(());
    };
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let stem = s
        .path
        .file_stem()
        .and_then(|x| x.to_str())
        .unwrap_or("scenario");
    let path = dir.join(format!("{stem}.console.log"));
    let text: String = con.log.iter().map(|l| format!("{l}\n")).collect();
    std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `scenarios/NAME` as a bench runs it: one board, and its images.
    fn on_a_bench(name: &str) -> anyhow::Result<(Scenario, Prepared)> {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../scenarios")
            .join(name);
        let (s, _) = one_board(&Scenario::load(&path)?);
        let prep = prepare(&s)?;
        Ok((s, prep))
    }

    /// `GET /healthz` from the bench's firmware server for `scenario`, by the board its NVS
    /// image provisions.
    async fn board_asks_bench_server(scenario: &str) -> anyhow::Result<u16> {
        let (s, prep) = on_a_bench(scenario)?;
        let dir = tempfile::tempdir()?;
        let store = Arc::new(ReleaseStore::open(&dir.path().join("store"))?);
        let host = "127.0.0.1".parse()?;
        let bench =
            TlsBench::start(host, &s, &prep, store, &dir.path().join("pki"), ("", "")).await?;
        let values = otarig_esp32s3::nvs::read(&bench.nvs);
        let get = |k: &str| match values.get(&("otarig".to_string(), k.to_string())) {
            Some(otarig_esp32s3::nvs::NvsValue::Str(v)) => Ok(v.clone()),
            other => Err(anyhow::anyhow!("{k} in the NVS image: {other:?}")),
        };
        use otarig_server::tls::{client_config, Client};
        let board = client_config(
            Client::Board,
            &get("ca_cert")?,
            Some((&get("device_crt")?, &get("device_key")?)),
        )?;
        let url = format!("{}/healthz", bench.server.url());
        let http = otarig_fleet::board_http::BoardHttp::with_tls(board);
        Ok(http.get(&url, None).await?.status().as_u16())
    }

    /// A board-side fault is realised in the board's NVS image: for `wrong-ca` (device 0 of
    /// `tls-broken-trust.toml`, the one a bench runs) the board trusts another otarig PKI's
    /// root and refuses the runner's server. It ran without its fault before.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_bench_board_carries_the_scenarios_board_side_fault() {
        let e = board_asks_bench_server("attacks/tls-broken-trust.toml")
            .await
            .expect_err("a board trusting another root was served");
        // The words the simulator reports for `tls = "wrong-ca"` (TlsFault::detail).
        assert!(format!("{e:#}").contains("BadSignature"), "{e:#}");
    }

    /// A server-side `tls` fault is realised on a bench as in the wire fleet: for
    /// `server-tls13-only` the runner's firmware server speaks TLS 1.3 alone, so the board its
    /// NVS image provisions (TLS 1.2, as a stock build) is refused with a protocol_version
    /// alert, where a run without the fault serves it. (The whole scenario on the virtual
    /// board takes four minutes of real backoff before the release is given up.)
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_bench_server_wears_the_scenarios_server_side_fault() {
        let good = board_asks_bench_server("tls-update.toml").await.unwrap();
        assert_eq!(good, 200);
        let e = board_asks_bench_server("tls-server-tls13-only.toml")
            .await
            .expect_err("a stock board was served");
        assert!(format!("{e:#}").contains("ProtocolVersion"), "{e:#}");
    }
}
