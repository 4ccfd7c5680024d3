//! Scenario files (`scenarios/*.toml`): the contract shared by `cargo test`, the fleet, the
//! power-loss explorer and the HIL runner.
//!
//! Parsing happens in two steps: serde reads the TOML into the raw `*Def` types (unknown keys
//! are errors), then [`Scenario::load`] resolves names, units and references into a checked
//! [`Scenario`]. Every error carries `file:line:column` of the value at fault and says what
//! would be accepted. The format is documented in the README ("Scenario format").

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use serde_spanned::Spanned;

use otarig_esp32s3::appimage::{BootBehaviour, NetworkBehaviour, SelfTest};
use otarig_esp32s3::board::Phase;
use otarig_esp32s3::partition::PartitionTable;
pub use otarig_server::server::ServerFault;

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

// ---- raw TOML ------------------------------------------------------------------------------

#[derive(Deserialize, Debug)]
#[serde(deny_unknown_fields)]
struct FileDef {
    scenario: MetaDef,
    fleet: FleetDef,
    firmware: BTreeMap<String, FirmwareDef>,
    #[serde(default)]
    release: Vec<ReleaseDef>,
    #[serde(default)]
    fault: Vec<FaultDef>,
    #[serde(default)]
    expect: Vec<Spanned<ExpectDef>>,
}

#[derive(Deserialize, Debug)]
#[serde(deny_unknown_fields)]
struct MetaDef {
    name: String,
    #[serde(default)]
    description: String,
    #[serde(default)]
    seed: u64,
    #[serde(default)]
    duration: Option<Spanned<String>>,
    #[serde(default, rename = "plr-known-hazards")]
    plr_known_hazards: Vec<Spanned<String>>,
}

#[derive(Deserialize, Debug)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct FleetDef {
    devices: Spanned<u32>,
    device_type: String,
    #[serde(default)]
    channel: Option<String>,
    /// Boards on other channels than `channel`: `{ beta = "0..5" }`.
    #[serde(default)]
    channels: Option<BTreeMap<String, Spanned<String>>>,
    #[serde(default)]
    partition_table: Option<Spanned<String>>,
    firmware: Spanned<String>,
    #[serde(default)]
    anti_rollback: bool,
    #[serde(default)]
    efuse_secure_version: u32,
    #[serde(default)]
    trusted_keys: Option<Vec<Spanned<String>>>,
    #[serde(default)]
    poll_interval: Option<Spanned<String>>,
    #[serde(default)]
    confirm_timeout: Option<Spanned<String>>,
    /// Bytes a board asks for in one HTTP range request (the agent's `chunk_size`).
    #[serde(default)]
    range_size: Option<Spanned<SizeDef>>,
}

#[derive(Deserialize, Debug, Clone)]
#[serde(untagged)]
enum SizeDef {
    Bytes(u64),
    Text(String),
}

#[derive(Deserialize, Debug)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct FirmwareDef {
    version: String,
    #[serde(default)]
    secure_version: u32,
    size: Spanned<SizeDef>,
    #[serde(default)]
    self_test: SelfTest,
    #[serde(default)]
    boot: BootBehaviour,
    #[serde(default)]
    network: NetworkBehaviour,
    #[serde(default)]
    chip_id: Option<u16>,
}

#[derive(Deserialize, Debug)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct ReleaseDef {
    firmware: Spanned<String>,
    #[serde(default)]
    at: Option<Spanned<String>>,
    #[serde(default)]
    signed_by: Option<Spanned<String>>,
    #[serde(default)]
    device_type: Option<String>,
    #[serde(default)]
    channel: Option<String>,
    #[serde(default)]
    sequence: Option<u64>,
    #[serde(default)]
    expires_in: Option<Spanned<String>>,
    #[serde(default)]
    tamper: Option<Spanned<TamperDef>>,
    #[serde(default)]
    delta_from: Option<Vec<Spanned<String>>>,
    #[serde(default)]
    rollout: Option<Spanned<RolloutDef>>,
}

#[derive(Deserialize, Debug)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct RolloutDef {
    waves: Vec<u32>,
    interval: String,
    #[serde(default = "default_halt")]
    halt_failure_rate: u32,
}

fn default_halt() -> u32 {
    100
}

#[derive(Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub enum TamperDef {
    /// The server holds only the first N bytes of the image (the manifest is right).
    Truncate(u32),
    /// The manifest was signed over an image cut to N bytes (hash and size match the cut
    /// image, which then fails `esp_ota_end`'s validation).
    TruncateSigned(u32),
    /// The server flips one byte at this offset (the manifest is right).
    CorruptByte(u32),
    /// The server flips one byte at this offset of every delta patch (the manifest is right).
    CorruptPatch(u32),
}

#[derive(Deserialize, Debug)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct FaultDef {
    #[serde(default)]
    devices: Option<Spanned<String>>,
    #[serde(default)]
    power_loss: Option<Spanned<PowerLossDef>>,
    #[serde(default)]
    force_install: Option<Spanned<ForceDef>>,
    #[serde(default)]
    command: Option<Spanned<CommandDef>>,
    #[serde(default)]
    payload: Option<Spanned<PayloadDef>>,
    #[serde(default)]
    server: Option<Spanned<ServerFaultDef>>,
}

#[derive(Deserialize, Debug)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct ServerFaultDef {
    #[serde(default)]
    drop_after: Option<String>,
    #[serde(default)]
    no_range: bool,
    #[serde(default)]
    status: Option<u16>,
    #[serde(default)]
    stall: bool,
    /// Bytes per second, as a number or a string with a unit ("32 KiB/s", "1 MB/s").
    #[serde(default)]
    throttle: Option<toml::Value>,
    #[serde(default)]
    times: Option<u32>,
}

#[derive(Deserialize, Debug)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct CommandDef {
    cmd: String,
    at: String,
    #[serde(default)]
    repeat: Option<u32>,
}

#[derive(Deserialize, Debug)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct PayloadDef {
    topic: String,
    text: String,
    at: String,
}

#[derive(Deserialize, Debug)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct PowerLossDef {
    phase: Phase,
    #[serde(default)]
    progress: Option<u32>,
    #[serde(default)]
    op: Option<u64>,
    #[serde(default)]
    flash_op: Option<u64>,
    #[serde(default)]
    off_for: Option<String>,
}

#[derive(Deserialize, Debug)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct ForceDef {
    firmware: String,
    at: String,
}

#[derive(Deserialize, Debug, Clone, PartialEq)]
#[serde(untagged)]
enum OneOrMany {
    One(String),
    Many(Vec<String>),
}

#[derive(Deserialize, Debug, Clone, PartialEq)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct ExpectDef {
    #[serde(default)]
    devices: Option<String>,
    #[serde(default)]
    version: Option<String>,
    #[serde(default)]
    running_state: Option<String>,
    #[serde(default)]
    update_slot_state: Option<OneOrMany>,
    #[serde(default)]
    acks: Option<u32>,
    #[serde(default)]
    ack_outcome: Option<String>,
    #[serde(default)]
    refused: Option<String>,
    #[serde(default)]
    bootloader_rejected: Option<String>,
    #[serde(default)]
    rolled_back: Option<bool>,
    #[serde(default)]
    max_fetch_ratio: Option<f64>,
    #[serde(default)]
    resumed: Option<bool>,
    #[serde(default)]
    power_cuts: Option<u32>,
    #[serde(default)]
    boot_partition_set: Option<u32>,
    #[serde(default)]
    reported_failure: Option<String>,
    #[serde(default)]
    delta: Option<String>,
    #[serde(default)]
    bad_messages: Option<u32>,
    #[serde(default)]
    boots: Option<u32>,
    #[serde(default)]
    reports: Option<u32>,
    #[serde(default)]
    fetch_retries: Option<u32>,
    #[serde(default)]
    min_download_time: Option<String>,
}

// ---- checked scenario ----------------------------------------------------------------------

/// One end of a board range: an index, or a percentage of the fleet (so a scenario's
/// selectors still mean the same with `--devices`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Bound {
    Index(u32),
    Percent(u32),
}

impl Bound {
    fn parse(s: &str, part: &str) -> Result<Bound, String> {
        let s = s.trim();
        match s.strip_suffix('%') {
            Some(p) => p
                .trim()
                .parse::<u32>()
                .ok()
                .filter(|p| *p <= 100)
                .map(Bound::Percent)
                .ok_or_else(|| format!("'{part}': '{s}' is not a percentage from 0% to 100%")),
            None => s
                .parse()
                .map(Bound::Index)
                .map_err(|_| format!("'{part}': '{s}' is not a board index or a percentage")),
        }
    }

    /// The index this bound stands for in a fleet of `n` boards (percentages round up, as
    /// rollout waves do).
    fn at(self, n: u32) -> u32 {
        match self {
            Bound::Index(i) => i,
            Bound::Percent(p) => (n as u64 * p as u64).div_ceil(100) as u32,
        }
    }
}

/// Which boards a fault or expectation applies to (indices 0..devices).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Selector {
    spec: Vec<(Bound, Bound)>,
    /// `spec` for the current fleet size.
    ranges: Vec<(u32, u32)>,
    pub text: String,
}

impl Selector {
    pub fn all() -> Selector {
        let spec = vec![(Bound::Index(0), Bound::Index(u32::MAX))];
        Selector {
            ranges: vec![(0, u32::MAX)],
            spec,
            text: "all".into(),
        }
    }

    /// `all`, `N`, `A..B` (B excluded), or a comma-separated list of those, where A and B are
    /// board indices or percentages of the fleet (`0%..10%`). Resolve before use.
    pub fn parse(text: &str) -> Result<Selector, String> {
        let mut spec = Vec::new();
        for part in text.split(',').map(str::trim) {
            if part == "all" {
                spec.push((Bound::Index(0), Bound::Index(u32::MAX)));
            } else if let Some((a, b)) = part.split_once("..") {
                let (a, b) = (Bound::parse(a, part)?, Bound::parse(b, part)?);
                let empty = match (a, b) {
                    (Bound::Index(x), Bound::Index(y)) | (Bound::Percent(x), Bound::Percent(y)) => {
                        x >= y
                    }
                    _ => false,
                };
                if empty {
                    return Err(format!("'{part}' selects no board (the end is excluded)"));
                }
                spec.push((a, b));
            } else {
                let n: u32 = part.parse().map_err(|_| {
                    format!("'{part}' is not `all`, a board index or a range `A..B`")
                })?;
                spec.push((Bound::Index(n), Bound::Index(n + 1)));
            }
        }
        Ok(Selector {
            spec,
            ranges: Vec::new(),
            text: text.to_string(),
        })
    }

    /// Fix the percentages for a fleet of `n` boards.
    pub fn resolve(&mut self, n: u32) {
        self.ranges = self.spec.iter().map(|(a, b)| (a.at(n), b.at(n))).collect();
    }

    pub fn contains(&self, i: u32) -> bool {
        self.ranges.iter().any(|(a, b)| i >= *a && i < *b)
    }

    fn max_index(&self) -> Option<u32> {
        self.spec
            .iter()
            .filter_map(|(_, b)| match b {
                Bound::Index(e) if *e != u32::MAX => Some(e - 1),
                _ => None,
            })
            .max()
    }
}

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
    pub channel: String,
    pub sequence: u64,
    pub expires_in_ms: i64,
    pub tamper: Option<TamperDef>,
    /// Firmware ids this release offers delta patches from.
    pub delta_from: Vec<String>,
    /// Staged rollout; `None`: every board of the channel at once.
    pub rollout: Option<otarig_server::rollout::RolloutPlan>,
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
    /// A command sent `repeat` times with the same id (a duplicated or replayed command).
    Command {
        cmd: otarig_agent::protocol::CommandKind,
        at_ms: u64,
        repeat: u32,
    },
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
}

/// A rate such as `32768`, `"32 KiB/s"`, `"1.5 MB/s"` or `"800 B/s"`, in bytes per second.
pub fn parse_rate(v: &toml::Value) -> Result<u32, String> {
    let bad = || {
        format!("throttle = {v} is not a rate: give bytes per second (32768) or a string like \"32 KiB/s\", \"1 MB/s\"")
    };
    let bps = match v {
        toml::Value::Integer(n) => *n as f64,
        toml::Value::String(s) => {
            let s = s.trim();
            let s = s.strip_suffix("/s").ok_or_else(bad)?.trim_end();
            let split = s
                .find(|c: char| !(c.is_ascii_digit() || c == '.'))
                .unwrap_or(s.len());
            let (num, unit) = s.split_at(split);
            let n: f64 = num.parse().map_err(|_| bad())?;
            let mult = match unit.trim() {
                "B" | "" => 1.0,
                "kB" | "KB" => 1e3,
                "KiB" => 1024.0,
                "MB" => 1e6,
                "MiB" => 1024.0 * 1024.0,
                _ => return Err(bad()),
            };
            n * mult
        }
        _ => return Err(bad()),
    };
    if !(1.0..=u32::MAX as f64).contains(&bps) {
        return Err(format!("throttle = {v} must be between 1 B/s and 4 GB/s"));
    }
    Ok(bps as u32)
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
    pub efuse_secure_version: u32,
    pub trusted_keys: Vec<String>,
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

/// Hazards a scenario may acknowledge with `plr-known-hazards`.
pub const KNOWN_HAZARDS: [&str; 1] = [
    // An image that crashes before any code of the app runs, plus a power cut while the
    // bootloader rewrites its otadata entry in place: the torn entry can come back valid but
    // UNDEFINED, and the bootloader then starts the crashing image forever. Only the
    // bootloader could prevent it.
    "crash-loop",
];

/// Parse `"250ms"`, `"10s"`, `"5m"`, `"2h"`, `"30d"` into milliseconds.
pub fn parse_duration(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: u64 = num
        .parse()
        .map_err(|_| format!("'{s}' is not a duration like 250ms, 10s, 5m, 2h or 30d"))?;
    let mult = match unit.trim() {
        "ms" => 1,
        "s" => 1_000,
        "m" => 60_000,
        "h" => 3_600_000,
        "d" => 86_400_000,
        _ => return Err(format!("'{s}': unit must be ms, s, m, h or d")),
    };
    n.checked_mul(mult)
        .ok_or_else(|| format!("'{s}' is too long"))
}

/// Parse `4096`, `"256KiB"`, `"1MiB"`, `"64KB"` (KB = 1000) into bytes.
fn parse_size(v: &SizeDef) -> Result<u64, String> {
    match v {
        SizeDef::Bytes(n) => Ok(*n),
        SizeDef::Text(s) => {
            let t = s.trim();
            let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
            let (num, unit) = t.split_at(split);
            let n: u64 = num
                .parse()
                .map_err(|_| format!("'{s}' is not a size like 4096, 256KiB or 1MiB"))?;
            let mult = match unit.trim() {
                "" | "B" => 1,
                "KiB" => 1024,
                "MiB" => 1024 * 1024,
                "KB" | "kB" => 1000,
                "MB" => 1_000_000,
                _ => return Err(format!("'{s}': unit must be B, KiB, MiB, KB or MB")),
            };
            Ok(n * mult)
        }
    }
}

struct Ctx<'a> {
    path: &'a Path,
    text: &'a str,
}

impl Ctx<'_> {
    fn at(&self, offset: usize, message: impl Into<String>) -> ScenarioError {
        let before = &self.text[..offset.min(self.text.len())];
        let line = before.matches('\n').count() + 1;
        let column = before.len() - before.rfind('\n').map(|i| i + 1).unwrap_or(0) + 1;
        ScenarioError {
            file: self.path.to_path_buf(),
            line,
            column,
            message: message.into(),
        }
    }

    fn span<T>(&self, s: &Spanned<T>, message: impl Into<String>) -> ScenarioError {
        self.at(s.span().start, message)
    }

    fn duration(&self, s: &Spanned<String>) -> Result<u64, ScenarioError> {
        parse_duration(s.get_ref()).map_err(|m| self.span(s, m))
    }
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
                FaultKind::Command { at_ms, .. }
                | FaultKind::Payload { at_ms, .. }
                | FaultKind::ForceInstall { at_ms, .. } => t.push((at_ms, Step::Fault(n))),
                FaultKind::PowerLoss(_) | FaultKind::Server { .. } => {}
            }
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

    /// The channel board `i` follows.
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
        let cx = Ctx { path, text };
        let raw: FileDef = toml::from_str(text).map_err(|e| {
            let offset = e.span().map(|s| s.start).unwrap_or(0);
            cx.at(offset, e.message().trim().to_string())
        })?;
        let fw_ids: Vec<&str> = raw.firmware.keys().map(String::as_str).collect();
        let known_fw = |s: &Spanned<String>| -> Result<String, ScenarioError> {
            if raw.firmware.contains_key(s.get_ref()) {
                Ok(s.get_ref().clone())
            } else {
                Err(cx.span(
                    s,
                    format!(
                        "no firmware '{}' in this file (defined: {}); add a [firmware.{}] table",
                        s.get_ref(),
                        fw_ids.join(", "),
                        s.get_ref()
                    ),
                ))
            }
        };
        let key_dir = otarig_server::keys::fixture_dir();
        let known_key = |s: &Spanned<String>| -> Result<String, ScenarioError> {
            let p = key_dir.join(format!("{}.pem", s.get_ref()));
            if p.is_file() {
                Ok(s.get_ref().clone())
            } else {
                Err(cx.span(
                    s,
                    format!(
                        "no key '{}' (looked for {}); keys are PEM files in fixtures/keys/",
                        s.get_ref(),
                        p.display()
                    ),
                ))
            }
        };

        let devices = *raw.fleet.devices.get_ref();
        if devices == 0 || devices > 100_000 {
            return Err(cx.span(&raw.fleet.devices, "devices must be between 1 and 100000"));
        }
        let table = match &raw.fleet.partition_table {
            None => PartitionTable::default_two_ota(),
            Some(s) if s.get_ref() == "default" => PartitionTable::default_two_ota(),
            Some(s) if s.get_ref() == "no-factory" => PartitionTable::no_factory(),
            Some(s) => {
                let csv = path.parent().unwrap_or(Path::new(".")).join(s.get_ref());
                let body = std::fs::read_to_string(&csv).map_err(|e| {
                    cx.span(s, format!(
                        "cannot read partition table {}: {e} (use \"default\", \"no-factory\" or a path relative to the scenario)",
                        csv.display()
                    ))
                })?;
                PartitionTable::from_csv(&csv.display().to_string(), &body)
                    .map_err(|e| cx.span(s, format!("partition table: {e}")))?
            }
        };
        if table
            .find(otarig_esp32s3::partition::AGENT_LABEL)
            .is_none_or(|p| p.size < 0x2000)
        {
            return Err(ScenarioError {
                file: path.to_path_buf(),
                line: 0,
                column: 0,
                message: "the partition table needs an `otarig` data partition of at least 0x2000 bytes for the agent's journal".into(),
            });
        }
        let smallest_slot = table.app_slots().iter().map(|s| s.size).min().unwrap_or(0);

        let mut firmware = BTreeMap::new();
        for (id, f) in &raw.firmware {
            let size = parse_size(f.size.get_ref()).map_err(|m| cx.span(&f.size, m))?;
            if size < otarig_esp32s3::appimage::MIN_SIZE as u64 || size > smallest_slot as u64 {
                return Err(cx.span(&f.size, format!(
                    "firmware '{id}' size {size} must be between {} and the smallest app slot ({smallest_slot} bytes)",
                    otarig_esp32s3::appimage::MIN_SIZE
                )));
            }
            firmware.insert(
                id.clone(),
                Firmware {
                    id: id.clone(),
                    version: f.version.clone(),
                    secure_version: f.secure_version,
                    size: size as u32,
                    self_test: f.self_test,
                    boot: f.boot,
                    network: f.network,
                    chip_id: f.chip_id.unwrap_or(otarig_agent::image::CHIP_ID_ESP32S3),
                },
            );
        }
        let start_firmware = known_fw(&raw.fleet.firmware)?;
        let trusted_keys = match &raw.fleet.trusted_keys {
            None => vec!["ed25519-test".to_string(), "rsa-test".to_string()],
            Some(list) => list.iter().map(known_key).collect::<Result<_, _>>()?,
        };
        let channel = raw.fleet.channel.clone().unwrap_or_else(|| "stable".into());

        let mut releases = Vec::new();
        for (i, r) in raw.release.iter().enumerate() {
            let expires_in_ms = match &r.expires_in {
                None => 30 * 86_400_000,
                Some(s) if s.get_ref().starts_with('-') => {
                    let d = parse_duration(&s.get_ref()[1..]).map_err(|m| cx.span(s, m))?;
                    -(d as i64)
                }
                Some(s) => cx.duration(s)? as i64,
            };
            if let Some(t) = &r.tamper {
                let fw = &firmware[known_fw(&r.firmware)?.as_str()];
                let (TamperDef::Truncate(n)
                | TamperDef::TruncateSigned(n)
                | TamperDef::CorruptByte(n)
                | TamperDef::CorruptPatch(n)) = *t.get_ref();
                if matches!(t.get_ref(), TamperDef::CorruptPatch(_))
                    && r.delta_from.as_ref().is_none_or(|v| v.is_empty())
                {
                    return Err(cx.span(
                        t,
                        "corrupt-patch needs `delta-from`: this release has no patch to corrupt",
                    ));
                }
                if n as u64 >= fw.size as u64 {
                    return Err(cx.span(
                        t,
                        format!(
                            "tamper offset {n} is past the end of firmware '{}' ({} bytes)",
                            fw.id, fw.size
                        ),
                    ));
                }
            }
            let rollout = match &r.rollout {
                None => None,
                Some(ro) => {
                    let d = ro.get_ref();
                    if d.waves.is_empty()
                        || d.waves.windows(2).any(|w| w[0] >= w[1])
                        || d.waves.iter().any(|w| *w == 0 || *w > 100)
                    {
                        return Err(cx.span(ro, "waves are increasing percentages between 1 and 100, e.g. [10, 50, 100]"));
                    }
                    if d.halt_failure_rate > 100 {
                        return Err(cx.span(ro, "halt-failure-rate is a percentage, 0 to 100"));
                    }
                    Some(otarig_server::rollout::RolloutPlan {
                        waves: d.waves.clone(),
                        interval_ms: parse_duration(&d.interval).map_err(|m| cx.span(ro, m))?,
                        halt_failure_rate: d.halt_failure_rate,
                    })
                }
            };
            releases.push(Release {
                firmware: known_fw(&r.firmware)?,
                at_ms: r
                    .at
                    .as_ref()
                    .map(|s| cx.duration(s))
                    .transpose()?
                    .unwrap_or(0),
                signed_by: match &r.signed_by {
                    Some(s) => known_key(s)?,
                    None => "ed25519-test".into(),
                },
                device_type: r
                    .device_type
                    .clone()
                    .unwrap_or_else(|| raw.fleet.device_type.clone()),
                channel: r.channel.clone().unwrap_or_else(|| channel.clone()),
                sequence: r.sequence.unwrap_or(i as u64 + 1),
                expires_in_ms,
                tamper: r.tamper.as_ref().map(|t| *t.get_ref()),
                rollout,
                delta_from: r
                    .delta_from
                    .iter()
                    .flatten()
                    .map(known_fw)
                    .collect::<Result<_, _>>()?,
            });
        }

        let selector = |s: &Option<Spanned<String>>| -> Result<Selector, ScenarioError> {
            match s {
                None => Ok(Selector::all()),
                Some(s) => {
                    let mut sel = Selector::parse(s.get_ref()).map_err(|m| cx.span(s, m))?;
                    sel.resolve(devices);
                    if sel.max_index().is_some_and(|m| m >= devices) {
                        return Err(cx.span(
                            s,
                            format!(
                                "selects board {} but the fleet has {devices} (0..{devices})",
                                sel.max_index().unwrap_or(0)
                            ),
                        ));
                    }
                    Ok(sel)
                }
            }
        };
        let mut faults = Vec::new();
        for f in &raw.fault {
            let devices = selector(&f.devices)?;
            let given = [
                f.power_loss.is_some(),
                f.force_install.is_some(),
                f.command.is_some(),
                f.payload.is_some(),
                f.server.is_some(),
            ];
            if given.iter().filter(|g| **g).count() != 1 {
                return Err(ScenarioError {
                    file: path.to_path_buf(),
                    line: 0,
                    column: 0,
                    message: "each [[fault]] needs exactly one of `power-loss`, `force-install`, `command`, `payload` or `server`".into(),
                });
            }
            if let Some(sv) = &f.server {
                let d = sv.get_ref();
                let mut kinds = Vec::new();
                if let Some(p) = &d.drop_after {
                    let pct = p
                        .strip_suffix('%')
                        .and_then(|x| x.trim().parse::<u32>().ok())
                        .filter(|p| *p > 0 && *p < 100);
                    let pct = pct.ok_or_else(|| {
                        cx.span(
                            sv,
                            format!("drop-after = '{p}' must be a percentage between 1% and 99%"),
                        )
                    })?;
                    kinds.push(ServerFault::DropAfterPercent(pct));
                }
                if d.no_range {
                    kinds.push(ServerFault::NoRange);
                }
                if let Some(st) = d.status {
                    if !(400..=599).contains(&st) {
                        return Err(cx.span(
                            sv,
                            format!("status {st} is not an HTTP error status (400-599)"),
                        ));
                    }
                    kinds.push(ServerFault::Status(st));
                }
                if d.stall {
                    kinds.push(ServerFault::Stall);
                }
                if let Some(rate) = &d.throttle {
                    kinds.push(ServerFault::Throttle(
                        parse_rate(rate).map_err(|e| cx.span(sv, e))?,
                    ));
                }
                if kinds.len() != 1 {
                    return Err(cx.span(
                        sv,
                        "a server fault is exactly one of drop-after, no-range, status, stall or throttle (give two [[fault]] tables to combine them)",
                    ));
                }
                faults.push(Fault {
                    devices,
                    kind: FaultKind::Server {
                        fault: kinds[0],
                        times: d.times,
                    },
                });
                continue;
            }
            if let Some(c) = &f.command {
                use otarig_agent::protocol::CommandKind;
                let d = c.get_ref();
                let cmd = match d.cmd.as_str() {
                    "update-now" => CommandKind::UpdateNow,
                    "reboot" => CommandKind::Reboot,
                    "report" => CommandKind::Report,
                    other => {
                        return Err(cx.span(
                            c,
                            format!("unknown command '{other}' (update-now, reboot, report)"),
                        ))
                    }
                };
                let at_ms = parse_duration(&d.at).map_err(|m| cx.span(c, m))?;
                faults.push(Fault {
                    devices,
                    kind: FaultKind::Command {
                        cmd,
                        at_ms,
                        repeat: d.repeat.unwrap_or(1).max(1),
                    },
                });
                continue;
            }
            if let Some(pd) = &f.payload {
                let d = pd.get_ref();
                let topic = match d.topic.as_str() {
                    "cmd" => PayloadTopic::Cmd,
                    "release" => PayloadTopic::Release,
                    other => {
                        return Err(cx.span(pd, format!("unknown topic '{other}' (cmd, release)")))
                    }
                };
                let at_ms = parse_duration(&d.at).map_err(|m| cx.span(pd, m))?;
                faults.push(Fault {
                    devices,
                    kind: FaultKind::Payload {
                        topic,
                        text: d.text.clone(),
                        at_ms,
                    },
                });
                continue;
            }
            let kind = match (&f.power_loss, &f.force_install) {
                (Some(pl), None) => {
                    let d = pl.get_ref();
                    if d.progress.is_some() && d.phase != Phase::Download {
                        return Err(cx.span(pl, "`progress` applies only to phase = \"download\""));
                    }
                    if d.progress.is_some_and(|p| p > 100) {
                        return Err(cx.span(pl, "`progress` is a percentage, 0 to 100"));
                    }
                    if d.progress.is_some() && d.op.is_some() {
                        return Err(cx.span(pl, "give either `progress` or `op`, not both"));
                    }
                    let off_for_ms = match &d.off_for {
                        Some(s) => parse_duration(s).map_err(|m| cx.span(pl, m))?,
                        None => 1_000,
                    };
                    FaultKind::PowerLoss(PowerLoss {
                        phase: d.phase,
                        progress: d.progress,
                        op: d.op,
                        flash_op: d.flash_op,
                        off_for_ms,
                    })
                }
                (None, Some(fi)) => {
                    let d = fi.get_ref();
                    if !raw.firmware.contains_key(&d.firmware) {
                        return Err(
                            cx.span(fi, format!("no firmware '{}' in this file", d.firmware))
                        );
                    }
                    FaultKind::ForceInstall {
                        firmware: d.firmware.clone(),
                        at_ms: parse_duration(&d.at).map_err(|m| cx.span(fi, m))?,
                    }
                }
                _ => {
                    return Err(ScenarioError {
                        file: path.to_path_buf(),
                        line: 0,
                        column: 0,
                        message:
                            "each [[fault]] needs exactly one of `power-loss` or `force-install`"
                                .into(),
                    })
                }
            };
            faults.push(Fault { devices, kind });
        }

        let mut expects = Vec::new();
        for e in &raw.expect {
            let at = cx.span(e, "");
            let at = format!("{}:{}", at.file.display(), at.line);
            let d = e.get_ref();
            let devs = selector(&d.devices.clone().map(|s| Spanned::new(e.span(), s)))?;
            let mut checks = Vec::new();
            let bad = |m: String| cx.span(e, m);
            if let Some(v) = &d.version {
                checks.push(Check::Version(v.clone()));
            }
            let states = [
                "new",
                "pending-verify",
                "valid",
                "invalid",
                "aborted",
                "undefined",
                "none",
            ];
            if let Some(v) = &d.running_state {
                if !states.contains(&v.as_str()) {
                    return Err(bad(format!(
                        "running-state '{v}' is not one of {}",
                        states.join(", ")
                    )));
                }
                checks.push(Check::RunningState(v.clone()));
            }
            if let Some(v) = &d.update_slot_state {
                let list = match v {
                    OneOrMany::One(s) => vec![s.clone()],
                    OneOrMany::Many(l) => l.clone(),
                };
                if let Some(s) = list.iter().find(|s| !states.contains(&s.as_str())) {
                    return Err(bad(format!(
                        "update-slot-state '{s}' is not one of {}",
                        states.join(", ")
                    )));
                }
                checks.push(Check::UpdateSlotState(list));
            }
            if let Some(n) = d.acks {
                checks.push(Check::Acks(n));
            }
            if let Some(v) = &d.ack_outcome {
                if !["installed", "refused", "rolled-back"].contains(&v.as_str()) {
                    return Err(bad(format!(
                        "ack-outcome '{v}' is not installed, refused or rolled-back"
                    )));
                }
                checks.push(Check::AckOutcome(v.clone()));
            }
            if let Some(v) = &d.refused {
                if otarig_agent::Check::from_name(v).is_none() {
                    let names: Vec<&str> =
                        otarig_agent::Check::ALL.iter().map(|c| c.name()).collect();
                    return Err(bad(format!(
                        "refused = '{v}' is not a check the agent makes ({})",
                        names.join(", ")
                    )));
                }
                checks.push(Check::Refused(v.clone()));
            }
            if let Some(v) = &d.bootloader_rejected {
                checks.push(Check::BootloaderRejected(v.clone()));
            }
            if let Some(v) = d.rolled_back {
                checks.push(Check::RolledBack(v));
            }
            if let Some(v) = d.max_fetch_ratio {
                if v.is_nan() || v <= 0.0 {
                    return Err(bad("max-fetch-ratio must be positive".into()));
                }
                checks.push(Check::MaxFetchRatio(v));
            }
            if let Some(v) = d.resumed {
                checks.push(Check::Resumed(v));
            }
            if let Some(v) = d.power_cuts {
                checks.push(Check::PowerCuts(v));
            }
            if let Some(v) = d.boot_partition_set {
                checks.push(Check::BootPartitionSet(v));
            }
            if let Some(v) = &d.reported_failure {
                checks.push(Check::ReportedFailure(v.clone()));
            }
            if let Some(n) = d.bad_messages {
                checks.push(Check::BadMessages(n));
            }
            if let Some(n) = d.boots {
                checks.push(Check::Boots(n));
            }
            if let Some(n) = d.reports {
                checks.push(Check::Reports(n));
            }
            if let Some(n) = d.fetch_retries {
                checks.push(Check::FetchRetries(n));
            }
            if let Some(t) = &d.min_download_time {
                checks
                    .push(Check::MinDownloadMs(parse_duration(t).map_err(|m| {
                        bad(format!("min-download-time = '{t}': {m}"))
                    })?));
            }
            if checks.is_empty() {
                return Err(bad(
                    "this [[expect]] block checks nothing: add a key such as version = \"2.0.0\""
                        .into(),
                ));
            }
            expects.push(Expect {
                devices: devs,
                checks,
                at,
            });
        }
        if expects.is_empty() {
            return Err(ScenarioError {
                file: path.to_path_buf(),
                line: 0,
                column: 0,
                message: "the scenario has no [[expect]] block: a scenario that checks nothing cannot fail".into(),
            });
        }

        let last_event = releases
            .iter()
            .map(|r| {
                r.at_ms
                    + r.rollout
                        .as_ref()
                        .map_or(0, |p| p.interval_ms * p.waves.len() as u64)
            })
            .chain(faults.iter().filter_map(|f| match f.kind {
                FaultKind::ForceInstall { at_ms, .. }
                | FaultKind::Command { at_ms, .. }
                | FaultKind::Payload { at_ms, .. } => Some(at_ms),
                _ => None,
            }))
            .max()
            .unwrap_or(0);
        let duration_ms = match &raw.scenario.duration {
            Some(s) => cx.duration(s)?,
            None => last_event + 30 * 60_000,
        };
        let mut channel_of = Vec::new();
        for (name, sel) in raw.fleet.channels.iter().flatten() {
            otarig_server::release_store::check_name("channel", name)
                .map_err(|e| cx.span(sel, e.to_string()))?;
            channel_of.push((name.clone(), selector(&Some(sel.clone()))?));
        }
        Ok(Scenario {
            path: path.to_path_buf(),
            name: raw.scenario.name.clone(),
            description: raw.scenario.description.clone(),
            seed: raw.scenario.seed,
            duration_ms,
            devices,
            device_type: raw.fleet.device_type.clone(),
            channel,
            channel_of,
            table,
            start_firmware,
            anti_rollback: raw.fleet.anti_rollback,
            efuse_secure_version: raw.fleet.efuse_secure_version,
            trusted_keys,
            poll_interval_ms: raw
                .fleet
                .poll_interval
                .as_ref()
                .map(|s| cx.duration(s))
                .transpose()?
                .unwrap_or(60_000),
            confirm_timeout_ms: raw
                .fleet
                .confirm_timeout
                .as_ref()
                .map(|s| cx.duration(s))
                .transpose()?
                .unwrap_or(120_000),
            range_size: match &raw.fleet.range_size {
                None => 16 * 1024,
                Some(v) => parse_size(v.get_ref())
                    .ok()
                    .filter(|n| (4096..=16 * 1024 * 1024).contains(n))
                    .map(|n| n as u32)
                    .ok_or_else(|| {
                        cx.span(
                            v,
                            "range-size must be a size from 4KiB to 16MiB, like \"256KiB\"",
                        )
                    })?,
            },
            firmware,
            releases,
            faults,
            expects,
            plr_known_hazards: raw
                .scenario
                .plr_known_hazards
                .iter()
                .map(|h| {
                    if KNOWN_HAZARDS.contains(&h.get_ref().as_str()) {
                        Ok(h.get_ref().clone())
                    } else {
                        Err(cx.span(
                            h,
                            format!(
                                "unknown hazard '{}' (known: {})",
                                h.get_ref(),
                                KNOWN_HAZARDS.join(", ")
                            ),
                        ))
                    }
                })
                .collect::<Result<_, _>>()?,
        })
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
    fn a_typo_in_a_key_is_an_error_not_a_silent_default() {
        let text = OK.replace("device-type", "device_typo");
        let e = Scenario::parse(Path::new("t.toml"), &text).unwrap_err();
        assert_eq!(e.line, 6, "{e}");
        assert!(e.message.contains("device_typo"), "{e}");
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
