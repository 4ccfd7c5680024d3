//! Scenario files (`scenarios/*.toml`): the contract shared by `cargo test`, the fleet, the
//! power-loss explorer and the HIL runner.
//!
//! Parsing happens in two steps: serde reads the TOML into the raw `*Def` types (unknown keys
//! are errors), then [`Scenario::load`] resolves names, units and references into a checked
//! [`Scenario`]. Every error carries `file:line:column` of the value at fault and says what
//! would be accepted. The format is documented in the README ("Scenario format").

mod file;
mod parse;
mod selector;
mod units;

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

use otarig_esp32s3::appimage::{BootBehaviour, NetworkBehaviour, SelfTest};
use otarig_esp32s3::board::Phase;
use otarig_esp32s3::partition::PartitionTable;

pub use file::TamperDef;
pub use otarig_server::server::ServerFault;
pub use selector::Selector;
pub use units::{parse_duration, parse_rate};

/// A scenario error: where, what, and (in the message) what to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScenarioError {
    pub file: PathBuf,
    pub line: usize,
    pub column: usize,
    pub message: String,
}

impl fmt::Display for ScenarioError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}:{}:{}: {}",
            self.file.display(),
            self.line,
            self.column,
            self.message
        )
    }
}

impl std::error::Error for ScenarioError {}

#[derive(Clone, Debug, PartialEq)]
pub struct Firmware {
    pub id: String,
    pub version: String,
    pub secure_version: u32,
    pub size: u32,
    pub self_test: SelfTest,
    pub boot: BootBehaviour,
    pub network: NetworkBehaviour,
    pub chip_id: u16,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Release {
    pub firmware: String,
    pub at_ms: u64,
    pub signed_by: String,
    pub device_type: String,
    /// Where it is published.
    pub channel: String,
    /// What the manifest says (usually `channel`).
    pub signed_channel: String,
    pub sequence: u64,
    pub expires_in_ms: i64,
    pub tamper: Option<TamperDef>,
    /// Firmware ids this release offers delta patches from.
    pub delta_from: Vec<String>,
    /// Staged rollout; `None`: every board of the channel at once.
    pub rollout: Option<otarig_server::rollout::RolloutPlan>,
    /// The image travels encrypted.
    pub encrypt: Option<EncryptDef>,
    /// Announced over MQTT when published (else boards find it by polling).
    pub announce: bool,
}

/// How a release's image is encrypted: the scheme and the fixture key file (in
/// `fixtures/keys`, without extension) it is encrypted for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EncryptDef {
    pub scheme: otarig_agent::cipher::Scheme,
    pub key: String,
}

impl EncryptDef {
    /// The key every simulated board holds for `scheme` (fixtures/keys).
    pub const fn default_key(scheme: otarig_agent::cipher::Scheme) -> &'static str {
        match scheme {
            otarig_agent::cipher::Scheme::Aes256Cbc => "aes-256-image",
            otarig_agent::cipher::Scheme::EspEncryptedImg => "rsa-3072-image",
        }
    }

    /// The key file: NAME.hex (AES) or NAME.pem (RSA).
    pub fn key_path(&self, dir: &std::path::Path) -> std::path::PathBuf {
        let ext = match self.scheme {
            otarig_agent::cipher::Scheme::Aes256Cbc => "hex",
            otarig_agent::cipher::Scheme::EspEncryptedImg => "pem",
        };
        dir.join(format!("{}.{ext}", self.key))
    }
}

/// Where a power cut lands. `op` (within a phase) and `flash_op` are simulator-only.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PowerLoss {
    pub phase: Phase,
    pub progress: Option<u32>,
    pub op: Option<u64>,
    pub flash_op: Option<u64>,
    pub off_for_ms: u64,
}

impl PowerLoss {
    /// True when only a simulated board can realise this cut exactly.
    pub fn sim_only(&self) -> bool {
        self.flash_op.is_some() || self.op.is_some_and(|n| n > 0)
    }
}

#[derive(Clone, Debug, PartialEq)]
pub enum FaultKind {
    PowerLoss(PowerLoss),
    ForceInstall {
        firmware: String,
        at_ms: u64,
    },
    /// A signed command, sent `repeat` times with the same id.
    Command(CommandFault),
    /// Raw bytes on a board's `cmd` topic or the `release` topic.
    Payload {
        topic: PayloadTopic,
        text: String,
        at_ms: u64,
    },
    /// The firmware server misbehaves on this board's blob requests (`times` of them, or all).
    Server {
        fault: ServerFault,
        times: Option<u32>,
    },
    /// The board's network is down for `for_ms` from the first boot of firmware `version`.
    Outage {
        version: String,
        for_ms: u64,
    },
    /// Clients without credentials (half of them with a guessed password) flood the MQTT
    /// broker from `at_ms` on. Only the wire fleet has a broker to flood; the in-process run
    /// has none, so there it changes nothing.
    Flood {
        at_ms: u64,
        connections: u32,
        target: FloodTarget,
    },
    /// From `at_ms` on, the server answers the boards' polls with the answer it gave then,
    /// word for word: a mirror frozen in time (TUF's indefinite freeze).
    Freeze {
        at_ms: u64,
    },
    /// Trust is broken for these boards from the start ([`TlsFault`]): their TLS handshakes
    /// with the server and the broker fail, so they never come online.
    Tls(TlsFault),
}

/// How boards reach the firmware server on the wire.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Transport {
    #[default]
    Plain,
    /// HTTPS with the run's own PKI: the server proves itself with a certificate for
    /// 127.0.0.1 from a fresh root CA (through an intermediate), each board with a device
    /// certificate (CN = its id), and acks count only for the device a certificate names.
    Tls,
}

/// How boards fetch the bytes of a release.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Download {
    /// HTTP range requests (`GET /blobs/<sha256>`).
    #[default]
    Ranges,
    /// The chunked protocol (`/ota/check`, `/ota/chunk`, …): every 1 KiB chunk tagged with
    /// HMAC-SHA256 under the board's key, derived from the fleet key in
    /// `fixtures/keys/fleet-chunk.psk`.
    Chunked,
}

/// How trust breaks on a `transport = "tls"` run.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum TlsFault {
    /// The board's firmware embeds another root CA: it refuses the server and the broker.
    WrongCa,
    /// The board presents a certificate from another CA: the server and broker refuse it.
    ForeignCertificate,
    /// The board's certificate is on the CRL: the server and broker refuse it.
    RevokedCertificate,
    /// The firmware server's certificate has expired (every board at once); the broker's is
    /// good, so boards hear of releases but cannot fetch them.
    ExpiredServerCertificate,
    /// The firmware server's certificate names another host (every board at once).
    HostnameMismatch,
    /// The firmware server speaks TLS 1.3 only (every board at once): a hardening that locks
    /// out stock ESP-IDF boards, whose mbedTLS offers 1.2 alone
    /// (`CONFIG_MBEDTLS_SSL_PROTO_TLS1_3` is off by default).
    ServerTls13Only,
}

impl TlsFault {
    /// Whether it breaks the firmware server's certificate, so every board at once (the
    /// others break the board's side: it reaches neither server nor broker).
    pub fn server_side(self) -> bool {
        matches!(
            self,
            TlsFault::ExpiredServerCertificate
                | TlsFault::HostnameMismatch
                | TlsFault::ServerTls13Only
        )
    }

    /// Its name in a scenario file (`tls = "..."`).
    pub fn name(self) -> &'static str {
        match self {
            TlsFault::WrongCa => "wrong-ca",
            TlsFault::ForeignCertificate => "foreign-certificate",
            TlsFault::RevokedCertificate => "revoked-certificate",
            TlsFault::ExpiredServerCertificate => "expired-server-certificate",
            TlsFault::HostnameMismatch => "hostname-mismatch",
            TlsFault::ServerTls13Only => "server-tls13-only",
        }
    }

    /// What the board's TLS stack says, as the simulator reports it: the beginning of rustls's
    /// words on the wire, which go on with the run's times and names.
    pub fn detail(self) -> &'static str {
        match self {
            // The other root has the same name (another otarig PKI, as a staging CA is), so
            // the chain is found and its signature fails: what the wire fleet's boards report.
            TlsFault::WrongCa => "invalid peer certificate: BadSignature",
            TlsFault::ForeignCertificate => "received fatal alert: UnknownCA",
            TlsFault::RevokedCertificate => "received fatal alert: CertificateRevoked",
            TlsFault::ExpiredServerCertificate => "invalid peer certificate: certificate expired",
            TlsFault::HostnameMismatch => {
                "invalid peer certificate: certificate not valid for name"
            }
            TlsFault::ServerTls13Only => "received fatal alert: ProtocolVersion",
        }
    }
}

/// How the boards decide which keys and statements to believe ([`otarig_agent::trust`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Trust {
    /// Key ids (fixtures/keys) compiled into the firmware as root keys.
    pub root_keys: Vec<String>,
    /// Key ids that sign timestamps until a key set names others; the server signs with the
    /// first.
    pub timestamp_keys: Vec<String>,
    pub require_timestamp: bool,
    pub timestamp_valid_for_ms: u64,
}

/// A signed statement the server starts to serve at `at_ms`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Statement {
    pub at_ms: u64,
    /// Key id in fixtures/keys.
    pub signed_by: String,
    pub kind: StatementKind,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StatementKind {
    /// A key set (signed by a root key).
    KeySet {
        version: u32,
        release: Vec<String>,
        timestamp: Vec<String>,
        sequence_base: Option<u64>,
    },
    /// The fleet device type's revocation list (signed by a release key).
    Revocations { serial: u64, sequences: Vec<u64> },
}

impl Statement {
    /// The signed envelope.
    pub fn sign(&self, device_type: &str) -> anyhow::Result<Vec<u8>> {
        use otarig_server::keys::{fixture_dir, NamedKey};
        let dir = fixture_dir();
        let key = NamedKey::load(&dir, &self.signed_by)?;
        let load = |ids: &[String]| -> anyhow::Result<Vec<NamedKey>> {
            ids.iter().map(|id| NamedKey::load(&dir, id)).collect()
        };
        match &self.kind {
            StatementKind::KeySet {
                version,
                release,
                timestamp,
                sequence_base,
            } => otarig_server::statements::key_set(
                &key,
                *version,
                &load(release)?,
                &load(timestamp)?,
                *sequence_base,
            ),
            StatementKind::Revocations { serial, sequences } => {
                otarig_server::statements::revocation_list(
                    &key,
                    &otarig_agent::trust::RevocationsBody {
                        device_type: device_type.to_string(),
                        serial: *serial,
                        sequences: sequences.clone(),
                        images: Vec::new(),
                    },
                )
            }
        }
    }
}

impl Trust {
    /// The server's timestamp signer.
    pub fn signer(&self) -> anyhow::Result<otarig_server::statements::TimestampSigner> {
        let id = self.timestamp_keys.first().map_or("", String::as_str);
        Ok(otarig_server::statements::TimestampSigner {
            key: otarig_server::keys::NamedKey::load(&otarig_server::keys::fixture_dir(), id)?,
            valid_for_s: self.timestamp_valid_for_ms / 1000,
        })
    }

    /// The public halves the firmware embeds: (root keys, timestamp keys).
    pub fn firmware_keys(
        &self,
    ) -> anyhow::Result<(Vec<otarig_agent::TrustedKey>, Vec<otarig_agent::TrustedKey>)> {
        use otarig_server::keys::{fixture_dir, NamedKey};
        let load = |ids: &[String]| -> anyhow::Result<Vec<otarig_agent::TrustedKey>> {
            ids.iter()
                .map(|id| NamedKey::load(&fixture_dir(), id)?.trusted())
                .collect()
        };
        Ok((load(&self.root_keys)?, load(&self.timestamp_keys)?))
    }
}

/// What a `flood` fault hammers.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum FloodTarget {
    /// The MQTT broker: clients without (or with guessed) credentials.
    Broker,
    /// The firmware server: silent connections and acks under ever new device ids.
    Server,
}

/// The key that signs the fleet's commands unless a scenario says otherwise.
pub const OPERATOR_KEY: &str = "ed25519-test";

/// A command the server sends to the selected boards at `at_ms`, `repeat` times with the same
/// id (a duplicated or replayed command).
#[derive(Clone, Debug, PartialEq)]
pub struct CommandFault {
    pub cmd: otarig_agent::protocol::CommandKind,
    pub at_ms: u64,
    pub repeat: u32,
    /// Key id in fixtures/keys.
    pub signed_by: String,
    /// Addressed to this device id instead of each target's own.
    pub device: Option<String>,
    /// Published retained (redelivered at every subscription, flagged retained).
    pub retained: bool,
    /// Expiry after `at_ms` (negative: already expired).
    pub expires_in_ms: i64,
}

impl CommandFault {
    /// The payloads for boards `device_ids`, from fault number `n` (the signing key is read
    /// once for all of them).
    pub fn payloads<'a>(
        &self,
        n: usize,
        device_ids: impl IntoIterator<Item = &'a str>,
    ) -> anyhow::Result<Vec<Vec<u8>>> {
        let key = otarig_server::keys::NamedKey::load(
            &otarig_server::keys::fixture_dir(),
            &self.signed_by,
        )?;
        let issued_ms = crate::runner::EPOCH_MS + self.at_ms;
        let sign = |id: &str| {
            let device = self.device.as_deref().unwrap_or(id);
            let issued = (issued_ms, n as u64);
            signed_command(&key, device, self.cmd, issued, self.expires_in_ms)
        };
        Ok(device_ids.into_iter().map(sign).collect())
    }
}

/// A command as the server signs it, sent at wall time `issued.0` (ms) from source `issued.1`
/// (a fault number; [`ROLLOUT_SOURCE`] for rollouts): its id is the send time in microseconds
/// plus the source, so ids grow with time and two sources never share one.
pub fn signed_command(
    key: &otarig_server::keys::NamedKey,
    device: &str,
    cmd: otarig_agent::protocol::CommandKind,
    issued: (u64, u64),
    expires_in_ms: i64,
) -> Vec<u8> {
    let (issued_ms, source) = issued;
    let body = otarig_agent::protocol::CommandBody {
        device: device.to_string(),
        id: issued_ms.saturating_mul(1000).saturating_add(source % 1000),
        cmd: cmd.name().to_string(),
        expires_at: (issued_ms as i64).saturating_add(expires_in_ms).max(0) as u64 / 1000,
    };
    key.sign_command(&body).into_bytes()
}

/// The id source of a rollout's `update-now` commands.
pub const ROLLOUT_SOURCE: u64 = 999;

/// A network outage that begins at the first boot of an image with `version`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Outage {
    pub version: String,
    pub for_ms: u64,
    pub begun: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PayloadTopic {
    Cmd,
    Release,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Fault {
    pub devices: Selector,
    pub kind: FaultKind,
}

/// One expectation block: every key is a check applied to every selected board.
#[derive(Clone, Debug, PartialEq)]
pub struct Expect {
    pub devices: Selector,
    pub checks: Vec<Check>,
    /// `file:line` of the `[[expect]]` block, for failure messages.
    pub at: String,
}

/// One check; see the README for what each one means.
#[derive(Clone, Debug, PartialEq)]
pub enum Check {
    Version(String),
    RunningState(String),
    UpdateSlotState(Vec<String>),
    Acks(u32),
    AckOutcome(String),
    Refused(String),
    BootloaderRejected(String),
    RolledBack(bool),
    MaxFetchRatio(f64),
    Resumed(bool),
    PowerCuts(u32),
    BootPartitionSet(u32),
    ReportedFailure(String),
    Delta(String),
    BadMessages(u32),
    Boots(u32),
    Reports(u32),
    FetchRetries(u32),
    /// The first download took at least this long (from its start to the image's hash check):
    /// proves a throttle really paced the bytes.
    MinDownloadMs(u64),
    /// The first download started no earlier than this (ms of virtual time): a polling board
    /// did not hear of the release before its poll.
    DownloadStartsAfterMs(u64),
    /// The newest key set version the board adopted (0: never adopted one).
    KeysAdopted(u32),
}

impl Check {
    pub fn key(&self) -> &'static str {
        match self {
            Check::Version(_) => "version",
            Check::RunningState(_) => "running-state",
            Check::UpdateSlotState(_) => "update-slot-state",
            Check::Acks(_) => "acks",
            Check::AckOutcome(_) => "ack-outcome",
            Check::Refused(_) => "refused",
            Check::BootloaderRejected(_) => "bootloader-rejected",
            Check::RolledBack(_) => "rolled-back",
            Check::MaxFetchRatio(_) => "max-fetch-ratio",
            Check::Resumed(_) => "resumed",
            Check::PowerCuts(_) => "power-cuts",
            Check::BootPartitionSet(_) => "boot-partition-set",
            Check::ReportedFailure(_) => "reported-failure",
            Check::Delta(_) => "delta",
            Check::BadMessages(_) => "bad-messages",
            Check::Boots(_) => "boots",
            Check::Reports(_) => "reports",
            Check::FetchRetries(_) => "fetch-retries",
            Check::MinDownloadMs(_) => "min-download-time",
            Check::DownloadStartsAfterMs(_) => "download-starts-after",
            Check::KeysAdopted(_) => "keys-adopted",
        }
    }
}

/// A moment of a scenario's timeline that a runner acts on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Step {
    /// `releases[k]` is published.
    Release(usize),
    /// `faults[n]` (a command, a payload or a forced install) happens.
    Fault(usize),
    /// `statements[n]` starts being served.
    Statement(usize),
}

/// A board's wall clock. Until `set_at_ms` (virtual time) it is not set and reads the time
/// since the run started, counted from 1970, as an ESP32's does before SNTP has run
/// (`gettimeofday` after power-on); from then on it reads the scenario's calendar time.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct WallClock {
    /// 0: set throughout.
    pub set_at_ms: u64,
}

impl WallClock {
    /// What the clock reads (ms since 1970) at virtual time `t`.
    pub fn read(self, t: u64) -> u64 {
        if t < self.set_at_ms {
            t
        } else {
            crate::runner::EPOCH_MS + t
        }
    }

    /// The virtual time of a wall-clock time the agent asked for ([`WallClock::read`]'s
    /// inverse; a time on the unset clock is already virtual).
    pub fn virtual_time(self, wall: u64) -> u64 {
        wall.checked_sub(crate::runner::EPOCH_MS).unwrap_or(wall)
    }
}

/// A loaded, checked scenario.
#[derive(Clone, Debug)]
pub struct Scenario {
    pub path: PathBuf,
    pub name: String,
    pub description: String,
    pub seed: u64,
    pub duration_ms: u64,
    pub devices: u32,
    pub device_type: String,
    /// The channel boards follow unless `channel_of` puts them on another.
    pub channel: String,
    pub channel_of: Vec<(String, Selector)>,
    pub table: PartitionTable,
    pub start_firmware: String,
    pub anti_rollback: bool,
    /// When the boards' wall clocks get set (`clock-set-after`).
    pub wall: WallClock,
    pub efuse_secure_version: u32,
    pub trusted_keys: Vec<String>,
    pub trust: Trust,
    /// Plain or TLS on the wire (the in-process runner has no sockets).
    pub transport: Transport,
    /// HTTP ranges or the chunked protocol.
    pub download: Download,
    /// How much faster than real time the `::wire` twin runs (`wire-speedup`).
    pub wire_speedup: Option<f64>,
    /// Key sets and revocation lists published during the run.
    pub statements: Vec<Statement>,
    pub poll_interval_ms: u64,
    pub confirm_timeout_ms: u64,
    /// Bytes per HTTP range request (default 16 KiB).
    pub range_size: u32,
    pub firmware: BTreeMap<String, Firmware>,
    pub releases: Vec<Release>,
    pub faults: Vec<Fault>,
    pub expects: Vec<Expect>,
    /// Power-loss outcomes this scenario knowingly exposes (see [`KNOWN_HAZARDS`]): the
    /// explorer still finds and prints them, with reproductions, but does not fail on them.
    pub plr_known_hazards: Vec<String>,
}

/// The otadata states a slot-state check may name (`none`: no otadata entry for the slot).
pub const SLOT_STATES: [&str; 7] = [
    "new",
    "pending-verify",
    "valid",
    "invalid",
    "aborted",
    "undefined",
    "none",
];

/// Hazards a scenario may acknowledge with `plr-known-hazards`.
pub const KNOWN_HAZARDS: [&str; 1] = [
    // An image that crashes before any code of the app runs, plus a power cut while the
    // bootloader rewrites its otadata entry in place: the torn entry can come back valid but
    // UNDEFINED, and the bootloader then starts the crashing image forever. Only the
    // bootloader could prevent it.
    "crash-loop",
];

/// Subdirectories of a scenario directory that hold more scenarios (`attacks/`: one file per
/// attack of the README's attack table).
pub const SUBDIRS: &[&str] = &["attacks"];

/// Every scenario file of a scenario directory: `dir/*.toml`, then each of [`SUBDIRS`]'s,
/// each group sorted.
pub fn files_in(dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    let list = |d: &Path| -> std::io::Result<Vec<PathBuf>> {
        let mut v: Vec<PathBuf> = std::fs::read_dir(d)?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "toml"))
            .collect();
        v.sort();
        Ok(v)
    };
    let mut files = list(dir)?;
    for sub in SUBDIRS {
        let d = dir.join(sub);
        if d.is_dir() {
            files.extend(list(&d)?);
        }
    }
    Ok(files)
}

impl Scenario {
    /// Run with `n` boards instead of the file's count; percentage selectors follow.
    pub fn set_devices(&mut self, n: u32) {
        self.devices = n;
        for f in &mut self.faults {
            f.devices.resolve(n);
        }
        for e in &mut self.expects {
            e.devices.resolve(n);
        }
        for (_, sel) in &mut self.channel_of {
            sel.resolve(n);
        }
    }

    /// Releases and timed faults, in time order (releases first at equal times): what the
    /// wire fleet and the HIL runner play.
    pub fn timeline(&self) -> Vec<(u64, Step)> {
        let mut t: Vec<(u64, Step)> = self
            .releases
            .iter()
            .enumerate()
            .map(|(k, r)| (r.at_ms, Step::Release(k)))
            .collect();
        for (n, f) in self.faults.iter().enumerate() {
            match f.kind {
                FaultKind::Command(CommandFault { at_ms, .. })
                | FaultKind::Payload { at_ms, .. }
                | FaultKind::ForceInstall { at_ms, .. }
                | FaultKind::Flood { at_ms, .. }
                | FaultKind::Freeze { at_ms } => t.push((at_ms, Step::Fault(n))),
                FaultKind::PowerLoss(_)
                | FaultKind::Server { .. }
                | FaultKind::Outage { .. }
                | FaultKind::Tls(_) => {}
            }
        }
        for (n, st) in self.statements.iter().enumerate() {
            t.push((st.at_ms, Step::Statement(n)));
        }
        t.sort_by_key(|(at, _)| *at);
        t
    }

    /// The id board `i` uses on MQTT and HTTP.
    pub fn device_id(&self, i: u32) -> String {
        format!("{}-{i:05}", self.device_type)
    }

    /// How the server misbehaves towards board `i`: each fault with how many requests it hits.
    pub fn server_faults_for(&self, i: u32) -> Vec<(ServerFault, Option<u32>)> {
        self.faults
            .iter()
            .filter(|f| f.devices.contains(i))
            .filter_map(|f| match f.kind {
                FaultKind::Server { fault, times } => Some((fault, times)),
                _ => None,
            })
            .collect()
    }

    /// The TLS fault breaking board `i`'s connections, if any.
    pub fn tls_fault_for(&self, i: u32) -> Option<TlsFault> {
        self.faults.iter().find_map(|f| match f.kind {
            FaultKind::Tls(t) if f.devices.contains(i) => Some(t),
            _ => None,
        })
    }

    /// The network outages planned for board `i`, none begun.
    pub fn outages_for(&self, i: u32) -> Vec<Outage> {
        self.faults
            .iter()
            .filter(|f| f.devices.contains(i))
            .filter_map(|f| match &f.kind {
                FaultKind::Outage { version, for_ms } => Some(Outage {
                    version: version.clone(),
                    for_ms: *for_ms,
                    begun: false,
                }),
                _ => None,
            })
            .collect()
    }

    /// Whether the latest release on `channel` at virtual time `t` was announced: when a new
    /// key set or revocation list renews the retained announcements, an unannounced release
    /// stays unannounced.
    pub fn latest_is_announced(&self, channel: &str, t: u64) -> bool {
        self.releases
            .iter()
            .filter(|r| r.channel == channel && r.at_ms <= t)
            .max_by_key(|r| (r.at_ms, r.sequence))
            .is_none_or(|r| r.announce)
    }

    /// The channels whose retained announcement a new key set or revocation list renews at
    /// virtual time `t`: those whose latest release was announced.
    pub fn renewed_channels(&self, t: u64) -> Vec<String> {
        let mut channels = self.channels();
        channels.retain(|ch| self.latest_is_announced(ch, t));
        channels
    }

    /// Every channel some board follows.
    pub fn channels(&self) -> Vec<String> {
        let mut v: Vec<String> = std::iter::once(self.channel.clone())
            .chain(self.channel_of.iter().map(|(c, _)| c.clone()))
            .collect();
        v.sort();
        v.dedup();
        v
    }

    pub fn channel_for(&self, i: u32) -> &str {
        self.channel_of
            .iter()
            .find(|(_, sel)| sel.contains(i))
            .map_or(self.channel.as_str(), |(c, _)| c.as_str())
    }

    /// Read and check a scenario file.
    pub fn load(path: &Path) -> Result<Scenario, ScenarioError> {
        let text = std::fs::read_to_string(path).map_err(|e| ScenarioError {
            file: path.to_path_buf(),
            line: 0,
            column: 0,
            message: format!("cannot read the scenario: {e}"),
        })?;
        Self::parse(path, &text)
    }

    /// Check a scenario given as text; `path` names it in errors and anchors relative paths.
    pub fn parse(path: &Path, text: &str) -> Result<Scenario, ScenarioError> {
        parse::parse(path, text)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const OK: &str = r#"
[scenario]
name = "t"
[fleet]
devices = 2
device-type = "dt"
firmware = "v1"
[firmware.v1]
version = "1.0.0"
size = "64KiB"
[[expect]]
version = "1.0.0"
"#;

    #[test]
    fn a_tls_fault_is_named_as_files_spell_it() {
        #[derive(serde::Deserialize)]
        struct F {
            tls: TlsFault,
        }
        let names = "wrong-ca foreign-certificate revoked-certificate \
                     expired-server-certificate hostname-mismatch server-tls13-only";
        for name in names.split_whitespace() {
            let parsed: F = toml::from_str(&format!("tls = \"{name}\"")).unwrap();
            assert_eq!(parsed.tls.name(), name);
        }
    }

    #[test]
    fn a_good_file_loads() {
        let s = Scenario::parse(Path::new("t.toml"), OK).unwrap();
        assert_eq!(s.devices, 2);
        assert_eq!(s.firmware["v1"].size, 65536);
    }

    #[test]
    fn an_unknown_firmware_reference_points_at_its_line_and_column() {
        let text = OK.replace("firmware = \"v1\"", "firmware = \"v9\"");
        let e = Scenario::parse(Path::new("t.toml"), &text).unwrap_err();
        assert_eq!((e.line, e.column), (7, 12), "{e}");
        assert!(e.message.contains("no firmware 'v9'"), "{e}");
    }

    #[test]
    fn a_server_side_tls_fault_for_some_boards_only_is_refused_by_name() {
        let text = OK.replace(
            "firmware = \"v1\"",
            "firmware = \"v1\"\ntransport = \"tls\"",
        ) + "[[fault]]\ndevices = \"0..1\"\ntls = \"server-tls13-only\"\n";
        let e = Scenario::parse(Path::new("t.toml"), &text).unwrap_err();
        assert_eq!(e.line, 16, "{e}");
        assert!(
            e.message
                .contains("tls = \"server-tls13-only\" breaks the firmware server"),
            "{e}"
        );
        assert!(e.message.contains("leave out `devices`"), "{e}");
    }

    #[test]
    fn a_typo_in_a_key_is_an_error_not_a_silent_default() {
        let text = OK.replace("device-type", "device_typo");
        let e = Scenario::parse(Path::new("t.toml"), &text).unwrap_err();
        assert_eq!(e.line, 6, "{e}");
        assert!(e.message.contains("device_typo"), "{e}");
    }

    #[test]
    fn secure_versions_past_the_16_bit_efuse_field_are_refused_where_written() {
        let text = OK.replace(
            "version = \"1.0.0\"\nsize",
            "version = \"1.0.0\"\nsecure-version = 17\nsize",
        );
        let e = Scenario::parse(Path::new("t.toml"), &text).unwrap_err();
        assert_eq!(e.line, 10, "{e}");
        assert!(e.message.contains("16 bits"), "{e}");
        let text = OK.replace(
            "firmware = \"v1\"",
            "firmware = \"v1\"\nefuse-secure-version = 17",
        );
        let e = Scenario::parse(Path::new("t.toml"), &text).unwrap_err();
        assert_eq!(e.line, 8, "{e}");
        let text = OK.replace(
            "firmware = \"v1\"",
            "firmware = \"v1\"\nefuse-secure-version = 16",
        );
        assert_eq!(
            Scenario::parse(Path::new("t.toml"), &text)
                .unwrap()
                .efuse_secure_version,
            16
        );
    }

    #[test]
    fn throttle_rates() {
        let v = |s: &str| toml::Value::String(s.into());
        assert_eq!(parse_rate(&v("32 KiB/s")), Ok(32 * 1024));
        assert_eq!(parse_rate(&v("1.5MB/s")), Ok(1_500_000));
        assert_eq!(parse_rate(&v("800 B/s")), Ok(800));
        assert_eq!(parse_rate(&toml::Value::Integer(4096)), Ok(4096));
        for bad in ["32 KiB", "fast/s", "3 GiB/s", "0 B/s"] {
            assert!(parse_rate(&v(bad)).is_err(), "{bad}");
        }
        assert!(parse_rate(&toml::Value::Integer(-5)).is_err());
    }

    #[test]
    fn bad_units_are_explained() {
        let e =
            Scenario::parse(Path::new("t.toml"), &OK.replace("64KiB", "64 parsecs")).unwrap_err();
        assert!(e.message.contains("unit must be"), "{e}");
        assert_eq!(parse_duration("5m"), Ok(300_000));
        assert!(parse_duration("5 fortnights").is_err());
    }

    /// Values that overflowed (a panic with overflow checks on) are errors that say the bound.
    #[test]
    fn the_largest_values_are_errors_not_overflows() {
        let e = Scenario::parse(
            Path::new("t.toml"),
            &OK.replace("\"64KiB\"", "\"18446744073709551615MiB\""),
        )
        .unwrap_err();
        assert!(e.message.contains("is too large"), "{e}");
        assert_eq!(parse_duration("36500d"), Ok(units::MAX_DURATION_MS));
        let e = parse_duration("36501d").unwrap_err();
        assert!(e.contains("longer than 100 years"), "{e}");
        assert!(parse_duration("213503982334d").is_err());
        let long = OK.replace(
            "firmware = \"v1\"\n",
            "firmware = \"v1\"\nconfirm-timeout = \"36501d\"\n",
        );
        let e = Scenario::parse(Path::new("t.toml"), &long).unwrap_err();
        assert_eq!(e.line, 8, "{e}");
    }

    #[test]
    fn chunked_download_keys_are_checked_where_written() {
        let chunked = OK.replace(
            "firmware = \"v1\"\n",
            "firmware = \"v1\"\ndownload = \"chunked\"\n",
        );
        let s = Scenario::parse(Path::new("t.toml"), &chunked).unwrap();
        assert_eq!(s.download, Download::Chunked);
        let fault = "[[fault]]\nserver = { chunk = \"reorder\", times = 2 }\n";
        let s = Scenario::parse(Path::new("t.toml"), &format!("{chunked}{fault}")).unwrap();
        assert_eq!(s.faults.len(), 1);
        // A chunk fault on boards that fetch by ranges would never bite: refused.
        let e = Scenario::parse(Path::new("t.toml"), &format!("{OK}{fault}")).unwrap_err();
        assert_eq!(e.line, 14, "{e}");
        assert!(e.message.contains("download = \"chunked\""), "{e}");
        let bad = fault.replace("reorder", "shuffle");
        let e = Scenario::parse(Path::new("t.toml"), &format!("{chunked}{bad}")).unwrap_err();
        assert!(
            e.message.contains("reorder, other-session or other-device"),
            "{e}"
        );
        let fast = OK.replace(
            "firmware = \"v1\"\n",
            "firmware = \"v1\"\nwire-speedup = 0.5\n",
        );
        let e = Scenario::parse(Path::new("t.toml"), &fast).unwrap_err();
        assert_eq!(
            (e.line, e.message.contains("between 1 and 100000")),
            (8, true),
            "{e}"
        );
    }

    #[test]
    fn selectors() {
        let mut s = Selector::parse("0..3, 7").unwrap();
        s.resolve(10);
        assert!(s.contains(2) && s.contains(7) && !s.contains(3));
        assert!(Selector::parse("3..3").is_err());
        let mut p = Selector::parse("0%..10%").unwrap();
        p.resolve(20);
        assert!(p.contains(1) && !p.contains(2));
        p.resolve(1000);
        assert!(p.contains(99) && !p.contains(100));
    }
}
