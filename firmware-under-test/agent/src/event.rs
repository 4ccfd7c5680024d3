//! What the agent reports: status events (published as they happen) and acks (the outcome of
//! one release, sent to the server once per release).
//!
//! Every shell renders these identically: JSON on MQTT, event lines on the serial console,
//! entries in the simulator's event stream. The names in [`Check::name`] and
//! [`Outcome::name`] are part of that contract.

use alloc::string::String;
use core::fmt;

use crate::platform::{OtaImgState, SlotKind};

/// The check a manifest or a downloaded image failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Check {
    /// Not a well-formed signed manifest.
    Malformed,
    /// Unknown key, wrong algorithm or a signature that does not verify.
    Signature,
    /// Built for another device type.
    DeviceType,
    /// Signed for another release channel (a beta release offered to a stable board).
    Channel,
    /// `expires_at` is in the past.
    Expired,
    /// The board's clock is not set (before SNTP, an ESP32 counts from 1970), so expiry cannot
    /// be checked: the release waits until it is. Not acked: the condition passes by itself.
    Clock,
    /// Sequence number below the highest installed: a replayed or stale manifest.
    Sequence,
    /// `secure_version` below the eFuse anti-rollback counter.
    SecureVersion,
    /// The image is the one already running.
    AlreadyInstalled,
    /// The image already failed on this board (rolled back or refused).
    KnownBad,
    /// The image does not fit the update slot.
    TooLarge,
    /// SHA-256 of what was written differs from the manifest.
    Hash,
    /// `esp_ota_end` / `esp_image_verify` rejected the image.
    ImageValidation,
    /// `esp_ota_set_boot_partition` refused (e.g. `ESP_ERR_OTA_SMALL_SEC_VER`).
    BootPartition,
    /// The image could not be fetched: too many consecutive failed requests.
    Download,
    /// A command addressed to another device.
    Device,
    /// A command whose id is not above the last one acted on (replayed or duplicated).
    Replayed,
    /// A retained message on a command topic: commands are never retained.
    Retained,
    /// The release is on the device type's signed revocation list.
    Revoked,
    /// No fresh timestamp vouches for the manifest (a frozen or stale answer), or the
    /// revocation list is older than one the board has seen.
    Freshness,
    /// The answer's key set is not signed by a root key, or is older than one the board
    /// adopted (a rotated-out key), or is missing though the board moved past its own keys.
    Keys,
    /// A TLS handshake with the firmware server or the broker failed: this board refused the
    /// peer's certificate (unknown CA, expired, another name), or the peer refused the board's.
    Tls,
    /// An encrypted image could not be decrypted: no key for it on this board, a header or
    /// padding that is not right, a GCM tag that does not match, or plaintext whose SHA-256
    /// differs from the manifest (altered ciphertext or the wrong key).
    Decrypt,
    /// A chunk of the chunked protocol whose HMAC-SHA256 does not verify under the board's
    /// key: altered, forged, re-sized or re-keyed, or made for another device.
    ChunkMac,
    /// A genuine chunk that is not the one asked for: replayed from another session or
    /// release, reordered, duplicated, or of the wrong size.
    ChunkSequence,
}

impl Check {
    pub const fn name(self) -> &'static str {
        match self {
            Check::Malformed => "malformed",
            Check::Signature => "signature",
            Check::DeviceType => "device-type",
            Check::Channel => "channel",
            Check::Expired => "expired",
            Check::Clock => "clock",
            Check::Sequence => "sequence",
            Check::SecureVersion => "secure-version",
            Check::AlreadyInstalled => "already-installed",
            Check::KnownBad => "known-bad",
            Check::TooLarge => "too-large",
            Check::Hash => "hash",
            Check::ImageValidation => "image-validation",
            Check::BootPartition => "boot-partition",
            Check::Download => "download",
            Check::Device => "device",
            Check::Replayed => "replayed",
            Check::Retained => "retained",
            Check::Revoked => "revoked",
            Check::Freshness => "freshness",
            Check::Keys => "keys",
            Check::Tls => "tls",
            Check::Decrypt => "decrypt",
            Check::ChunkMac => "chunk-mac",
            Check::ChunkSequence => "chunk-sequence",
        }
    }

    pub const ALL: [Check; 25] = [
        Check::Malformed,
        Check::Signature,
        Check::DeviceType,
        Check::Channel,
        Check::Expired,
        Check::Clock,
        Check::Sequence,
        Check::SecureVersion,
        Check::AlreadyInstalled,
        Check::KnownBad,
        Check::TooLarge,
        Check::Hash,
        Check::ImageValidation,
        Check::BootPartition,
        Check::Download,
        Check::Device,
        Check::Replayed,
        Check::Retained,
        Check::Revoked,
        Check::Freshness,
        Check::Keys,
        Check::Tls,
        Check::Decrypt,
        Check::ChunkMac,
        Check::ChunkSequence,
    ];

    pub fn from_name(name: &str) -> Option<Check> {
        Check::ALL.into_iter().find(|c| c.name() == name)
    }
}

impl fmt::Display for Check {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// How one release ended on one board.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Running the new image, self-test passed, marked valid.
    Installed,
    /// Refused before anything was switched.
    Refused { check: Check, detail: String },
    /// The new image booted and failed (self-test, crash, never connected); the bootloader or
    /// the app rolled back to the previous image.
    RolledBack { detail: String },
}

impl Outcome {
    pub fn name(&self) -> &'static str {
        match self {
            Outcome::Installed => "installed",
            Outcome::Refused { .. } => "refused",
            Outcome::RolledBack { .. } => "rolled-back",
        }
    }
}

/// The outcome of release `sequence` on this board, sent once per release.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Ack {
    pub sequence: u64,
    pub version: String,
    pub outcome: Outcome,
}

/// Status events, in the order they happen on the board.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Event {
    /// The app started: what runs, from where, in which otadata state.
    Booted {
        version: String,
        slot: SlotKind,
        sha256: [u8; 32],
        state: Option<OtaImgState>,
    },
    SelfTest {
        passed: bool,
        detail: String,
    },
    /// The running image was marked valid (rollback cancelled).
    Confirmed {
        version: String,
    },
    /// The running image failed before it was confirmed and is rolling back itself.
    RollingBack {
        version: String,
        reason: String,
    },
    Refused {
        sequence: u64,
        version: String,
        check: Check,
        detail: String,
    },
    /// Release `sequence` rolled back because its image could not reach the network; it is
    /// not known-bad and installs again at the next poll that reaches the server. Its ack
    /// waits for the final outcome.
    Retrying {
        sequence: u64,
        version: String,
        detail: String,
    },
    /// A download started (or continued from `resumed_from` after a reboot).
    Downloading {
        sequence: u64,
        version: String,
        size: u32,
        resumed_from: u32,
        /// Applying a delta patch rather than fetching the full image.
        delta: bool,
    },
    /// A delta patch could not be applied; the full image is downloaded instead.
    DeltaFailed {
        sequence: u64,
        reason: String,
    },
    Progress {
        sequence: u64,
        written: u32,
        size: u32,
    },
    /// A range request failed; retried after `retry_in_ms`.
    FetchFailed {
        sequence: u64,
        offset: u32,
        reason: String,
        retry_in_ms: u64,
    },
    /// The image in the slot matches the manifest's hash and passed `esp_ota_end`.
    Verified {
        sequence: u64,
    },
    /// `esp_ota_set_boot_partition` succeeded; a reboot follows.
    BootSet {
        sequence: u64,
        slot: SlotKind,
    },
    /// A command was not acted on: `check` says why (`signature`, `device`, `expired`,
    /// `replayed`, `retained`). `id` is 0 when the command's body was not trusted.
    CommandRefused {
        id: u64,
        check: Check,
        detail: String,
    },
    /// The board adopted a new key set signed by a root key: manifests, revocation lists and
    /// commands are checked against its keys from now on.
    KeysAdopted {
        version: u32,
    },
    /// A connection to `peer` (`server` or `broker`) failed its TLS handshake (check `tls`);
    /// reported once per peer and boot, however often the shell retries.
    TransportRefused {
        peer: &'static str,
        check: Check,
        detail: String,
    },
    /// An MQTT payload could not be read; it was ignored.
    BadMessage {
        topic: &'static str,
        reason: String,
    },
    /// Answer to a `report` command: what the agent is doing.
    Report {
        state: &'static str,
        version: String,
    },
    /// The agent hit a storage error it cannot work around (flash failure).
    StorageError {
        during: &'static str,
        error: String,
    },
}
