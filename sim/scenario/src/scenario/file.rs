//! The scenario file's shape as serde reads it: unknown keys are errors, values are kept with
//! their spans so that [`super::parse`] can point at the one at fault.

use std::collections::BTreeMap;

use serde::Deserialize;
use serde_spanned::Spanned;

use otarig_esp32s3::appimage::{BootBehaviour, NetworkBehaviour, SelfTest};
use otarig_esp32s3::board::Phase;

#[derive(Deserialize, Debug)]
#[serde(deny_unknown_fields)]
pub(super) struct FileDef {
    pub(super) scenario: MetaDef,
    pub(super) fleet: FleetDef,
    pub(super) firmware: BTreeMap<String, FirmwareDef>,
    #[serde(default)]
    pub(super) release: Vec<ReleaseDef>,
    #[serde(default)]
    pub(super) fault: Vec<FaultDef>,
    /// Key sets a root key signs during the run (key rotation).
    #[serde(default)]
    pub(super) keys: Vec<Spanned<KeySetDef>>,
    /// Revocation lists a release key signs during the run.
    #[serde(default)]
    pub(super) revoke: Vec<Spanned<RevokeDef>>,
    #[serde(default)]
    pub(super) expect: Vec<Spanned<ExpectDef>>,
}

#[derive(Deserialize, Debug)]
#[serde(deny_unknown_fields)]
pub(super) struct MetaDef {
    pub(super) name: String,
    #[serde(default)]
    pub(super) description: String,
    #[serde(default)]
    pub(super) seed: u64,
    #[serde(default)]
    pub(super) duration: Option<Spanned<String>>,
    #[serde(default, rename = "plr-known-hazards")]
    pub(super) plr_known_hazards: Vec<Spanned<String>>,
}

#[derive(Deserialize, Debug)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub(super) struct FleetDef {
    pub(super) devices: Spanned<u32>,
    pub(super) device_type: String,
    #[serde(default)]
    pub(super) channel: Option<String>,
    /// Boards on other channels than `channel`: `{ beta = "0..5" }`.
    #[serde(default)]
    pub(super) channels: Option<BTreeMap<String, Spanned<String>>>,
    #[serde(default)]
    pub(super) partition_table: Option<Spanned<String>>,
    pub(super) firmware: Spanned<String>,
    #[serde(default)]
    pub(super) anti_rollback: bool,
    /// The boards' clocks read from 1970 until this much time has passed (SNTP not yet run).
    #[serde(default)]
    pub(super) clock_set_after: Option<Spanned<String>>,
    #[serde(default)]
    pub(super) efuse_secure_version: Option<Spanned<u32>>,
    #[serde(default)]
    pub(super) trusted_keys: Option<Vec<Spanned<String>>>,
    #[serde(default)]
    pub(super) poll_interval: Option<Spanned<String>>,
    #[serde(default)]
    pub(super) confirm_timeout: Option<Spanned<String>>,
    /// How much faster than real time the `::wire` twin runs (default 25): a scenario whose
    /// timeline spans hours sets more, and keeps its timeouts long enough for it.
    #[serde(default)]
    pub(super) wire_speedup: Option<Spanned<f64>>,
    /// Bytes a board asks for in one HTTP range request (the agent's `chunk_size`).
    #[serde(default)]
    pub(super) range_size: Option<Spanned<SizeDef>>,
    /// Keys that sign key sets (default: ed25519-root).
    #[serde(default)]
    pub(super) root_keys: Option<Vec<Spanned<String>>>,
    /// Keys that sign timestamps until a key set names others; the server signs with the
    /// first (default: ed25519-timestamp).
    #[serde(default)]
    pub(super) timestamp_keys: Option<Vec<Spanned<String>>>,
    /// Boards install only what a fresh timestamp vouches for.
    #[serde(default)]
    pub(super) require_timestamp: bool,
    /// How long each timestamp the server signs is valid (default 10m).
    #[serde(default)]
    pub(super) timestamp_valid_for: Option<Spanned<String>>,
    /// `"tls"`: on the wire, boards reach the firmware server over HTTPS with a device
    /// certificate each (default `"plain"`).
    #[serde(default)]
    pub(super) transport: super::Transport,
    /// `"chunked"`: boards fetch images by the chunked protocol (`/ota/*`, 1 KiB chunks
    /// tagged under per-device keys) instead of HTTP ranges (default `"ranges"`).
    #[serde(default)]
    pub(super) download: super::Download,
}

/// `[[keys]]`: at `at`, the server starts serving a key set signed by a root key.
#[derive(Deserialize, Debug)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub(super) struct KeySetDef {
    pub(super) at: Spanned<String>,
    pub(super) version: u32,
    pub(super) release: Vec<Spanned<String>>,
    #[serde(default)]
    pub(super) timestamp: Option<Vec<Spanned<String>>>,
    #[serde(default)]
    pub(super) sequence_base: Option<u64>,
    #[serde(default)]
    pub(super) signed_by: Option<Spanned<String>>,
}

/// `[[revoke]]`: at `at`, the server starts serving a revocation list of the fleet's device
/// type that withdraws these release sequences.
#[derive(Deserialize, Debug)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub(super) struct RevokeDef {
    pub(super) at: Spanned<String>,
    pub(super) sequences: Vec<u64>,
    #[serde(default)]
    pub(super) serial: Option<u64>,
    #[serde(default)]
    pub(super) signed_by: Option<Spanned<String>>,
}

#[derive(Deserialize, Debug, Clone)]
#[serde(untagged)]
pub(super) enum SizeDef {
    Bytes(u64),
    Text(String),
}

#[derive(Deserialize, Debug)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub(super) struct FirmwareDef {
    pub(super) version: String,
    #[serde(default)]
    pub(super) secure_version: Option<Spanned<u32>>,
    pub(super) size: Spanned<SizeDef>,
    #[serde(default)]
    pub(super) self_test: SelfTest,
    #[serde(default)]
    pub(super) boot: BootBehaviour,
    #[serde(default)]
    pub(super) network: NetworkBehaviour,
    #[serde(default)]
    pub(super) chip_id: Option<u16>,
}

#[derive(Deserialize, Debug)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub(super) struct ReleaseDef {
    pub(super) firmware: Spanned<String>,
    #[serde(default)]
    pub(super) at: Option<Spanned<String>>,
    #[serde(default)]
    pub(super) signed_by: Option<Spanned<String>>,
    #[serde(default)]
    pub(super) device_type: Option<String>,
    #[serde(default)]
    pub(super) channel: Option<String>,
    /// The channel the manifest names, when it is published on another (mix-and-match).
    #[serde(default)]
    pub(super) signed_channel: Option<String>,
    #[serde(default)]
    pub(super) sequence: Option<u64>,
    #[serde(default)]
    pub(super) expires_in: Option<Spanned<String>>,
    #[serde(default)]
    pub(super) tamper: Option<Spanned<TamperDef>>,
    #[serde(default)]
    pub(super) delta_from: Option<Vec<Spanned<String>>>,
    #[serde(default)]
    pub(super) rollout: Option<Spanned<RolloutDef>>,
    /// Encrypt the image: "aes-256-cbc" or "esp-encrypted-img".
    #[serde(default)]
    pub(super) encrypt: Option<Spanned<String>>,
    /// The image key file in fixtures/keys (without extension); the scheme's fixture key by
    /// default, which every simulated board holds.
    #[serde(default)]
    pub(super) image_key: Option<Spanned<String>>,
    /// `false`: the release is not announced over MQTT; boards find it when they poll
    /// (a fleet that only polls, as HTTP-only firmware does).
    #[serde(default = "yes")]
    pub(super) announce: bool,
}

fn yes() -> bool {
    true
}

#[derive(Deserialize, Debug)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub(super) struct RolloutDef {
    pub(super) waves: Vec<u32>,
    pub(super) interval: String,
    #[serde(default = "default_halt")]
    pub(super) halt_failure_rate: u32,
}

pub(super) fn default_halt() -> u32 {
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
pub(super) struct FaultDef {
    #[serde(default)]
    pub(super) devices: Option<Spanned<String>>,
    #[serde(default)]
    pub(super) power_loss: Option<Spanned<PowerLossDef>>,
    #[serde(default)]
    pub(super) force_install: Option<Spanned<ForceDef>>,
    #[serde(default)]
    pub(super) command: Option<Spanned<CommandDef>>,
    #[serde(default)]
    pub(super) payload: Option<Spanned<PayloadDef>>,
    #[serde(default)]
    pub(super) server: Option<Spanned<ServerFaultDef>>,
    #[serde(default)]
    pub(super) outage: Option<Spanned<OutageDef>>,
    #[serde(default)]
    pub(super) flood: Option<Spanned<FloodDef>>,
    /// `freeze = "2s"`: from then on the server answers the boards' polls with the answer it
    /// gave then, word for word (a mirror frozen in time).
    #[serde(default)]
    pub(super) freeze: Option<Spanned<String>>,
    /// `tls = "wrong-ca"`: trust breaks for these boards (needs `transport = "tls"`).
    #[serde(default)]
    pub(super) tls: Option<Spanned<super::TlsFault>>,
}

/// `flood = { at = "5s", connections = 40, target = "broker" }`: strangers flood the MQTT
/// broker (or `"server"`, the firmware server) from then on.
#[derive(Deserialize, Debug)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub(super) struct FloodDef {
    pub(super) at: String,
    pub(super) connections: u32,
    #[serde(default = "default_flood_target")]
    pub(super) target: super::FloodTarget,
}

fn default_flood_target() -> super::FloodTarget {
    super::FloodTarget::Broker
}

/// `outage = { on-boot-of = "v2", for = "10m" }`: the board's network (Wi-Fi, broker and
/// server alike) is down from the first boot of that firmware, for that long.
#[derive(Deserialize, Debug)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub(super) struct OutageDef {
    pub(super) on_boot_of: String,
    #[serde(rename = "for")]
    pub(super) lasts: String,
}

#[derive(Deserialize, Debug)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub(super) struct ServerFaultDef {
    #[serde(default)]
    pub(super) drop_after: Option<String>,
    #[serde(default)]
    pub(super) no_range: bool,
    #[serde(default)]
    pub(super) status: Option<u16>,
    #[serde(default)]
    pub(super) stall: bool,
    /// The rest of the blob, then junk for ever.
    #[serde(default)]
    pub(super) endless: bool,
    /// Bytes per second, as a number or a string with a unit ("32 KiB/s", "1 MB/s").
    #[serde(default)]
    pub(super) throttle: Option<toml::Value>,
    /// A man in the middle of the chunked protocol: `"reorder"`, `"other-session"` (a chunk
    /// replayed from an earlier session) or `"other-device"` (a chunk made for another board).
    #[serde(default)]
    pub(super) chunk: Option<String>,
    #[serde(default)]
    pub(super) times: Option<u32>,
}

#[derive(Deserialize, Debug)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub(super) struct CommandDef {
    pub(super) cmd: String,
    pub(super) at: String,
    #[serde(default)]
    pub(super) repeat: Option<u32>,
    /// Key id in fixtures/keys (default: the operator key, ed25519-test).
    #[serde(default)]
    pub(super) signed_by: Option<Spanned<String>>,
    /// Address the command to this device id instead of the board it is sent to.
    #[serde(default)]
    pub(super) device: Option<String>,
    /// Published retained: brokers deliver it again at every subscription.
    #[serde(default)]
    pub(super) retained: bool,
    /// "-1m" makes an expired command (default 5m).
    #[serde(default)]
    pub(super) expires_in: Option<Spanned<String>>,
}

#[derive(Deserialize, Debug)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub(super) struct PayloadDef {
    pub(super) topic: String,
    pub(super) text: String,
    pub(super) at: String,
}

#[derive(Deserialize, Debug)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub(super) struct PowerLossDef {
    pub(super) phase: Phase,
    #[serde(default)]
    pub(super) progress: Option<u32>,
    #[serde(default)]
    pub(super) op: Option<u64>,
    #[serde(default)]
    pub(super) flash_op: Option<u64>,
    #[serde(default)]
    pub(super) off_for: Option<String>,
}

#[derive(Deserialize, Debug)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub(super) struct ForceDef {
    pub(super) firmware: String,
    pub(super) at: String,
}

#[derive(Deserialize, Debug, Clone, PartialEq)]
#[serde(untagged)]
pub(super) enum OneOrMany {
    One(String),
    Many(Vec<String>),
}

#[derive(Deserialize, Debug, Clone, PartialEq)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub(super) struct ExpectDef {
    #[serde(default)]
    pub(super) devices: Option<String>,
    #[serde(default)]
    pub(super) version: Option<String>,
    #[serde(default)]
    pub(super) running_state: Option<String>,
    #[serde(default)]
    pub(super) update_slot_state: Option<OneOrMany>,
    #[serde(default)]
    pub(super) acks: Option<u32>,
    #[serde(default)]
    pub(super) ack_outcome: Option<String>,
    #[serde(default)]
    pub(super) refused: Option<String>,
    #[serde(default)]
    pub(super) bootloader_rejected: Option<String>,
    #[serde(default)]
    pub(super) rolled_back: Option<bool>,
    #[serde(default)]
    pub(super) max_fetch_ratio: Option<f64>,
    #[serde(default)]
    pub(super) resumed: Option<bool>,
    #[serde(default)]
    pub(super) power_cuts: Option<u32>,
    #[serde(default)]
    pub(super) boot_partition_set: Option<u32>,
    #[serde(default)]
    pub(super) reported_failure: Option<String>,
    #[serde(default)]
    pub(super) delta: Option<String>,
    #[serde(default)]
    pub(super) bad_messages: Option<u32>,
    #[serde(default)]
    pub(super) boots: Option<u32>,
    #[serde(default)]
    pub(super) reports: Option<u32>,
    #[serde(default)]
    pub(super) fetch_retries: Option<u32>,
    #[serde(default)]
    pub(super) min_download_time: Option<String>,
    /// The first download starts no earlier than this (virtual time since the run began).
    #[serde(default)]
    pub(super) download_starts_after: Option<String>,
    #[serde(default)]
    pub(super) keys_adopted: Option<u32>,
}
