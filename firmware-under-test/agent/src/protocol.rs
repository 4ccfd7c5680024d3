//! The MQTT protocol between boards and the release server: topic names and payloads, in one
//! place. Every payload is a JSON object with a format version `"v": 1`; a board that gets a
//! payload it cannot read answers with a `bad-message` status event and carries on.
//!
//! | topic | direction | retained | payload |
//! |---|---|---|---|
//! | `{prefix}/release/{device_type}/{channel}` | server → boards | yes | [`ReleasePayload`]: `{"v":1,"signed":<signed manifest>,"keys":<key set>,"revocations":<list>}` (the last two optional; the answer to `GET /firmware/latest` is the same object, with a fresh `"timestamp"`) |
//! | `{prefix}/device/{device_id}/cmd` | server → board | no | a signed command: `{"v":1,"signed":<envelope of {"device":"…","id":17,"cmd":"update-now","expires_at":…}>}` (`update-now`, `reboot`, `report`; [`CommandBody`]) |
//! | `{prefix}/device/{device_id}/status` | board → server | no | an event: `{"v":1,"device":"…","t_ms":…,"kind":"downloading",…}` ([`event_json`]) |
//! | `{prefix}/device/{device_id}/ack` | board → server | no | an ack: `{"v":1,"device":"…","sequence":7,"version":"2.0.0","outcome":"installed","detail":""}` |
//! | `{prefix}/device/{device_id}/telemetry` | board → server | no | [`telemetry_json`]: `{"v":1,"device":"…","t_ms":…,"uptime_ms":…,"version":"2.0.0","slot":"ota_1","activity":"downloading","progress":40,"probation":false}` every second by default |
//!
//! A command acts only if it is authentic whatever the broker lets through: signed (context
//! [`Context::Command`]) by a key the board trusts, addressed to this device, unexpired, with
//! an id above the last one the board acted on (kept in its journal, so a replayed or retained
//! command never acts twice, across reboots too). The checks after the signature are the
//! agent's ([`crate::Agent`]); this module reads and writes the payloads.

use alloc::format;
use alloc::string::{String, ToString};
use serde::Deserialize;
use serde_json::{json, Value};

use crate::event::{Ack, Event, Outcome};
use crate::manifest::{Context, EnvelopeError, SignedManifest, TrustedKey};

/// The payload format version this agent writes and reads.
pub const VERSION: u32 = 1;
/// Payloads larger than this are refused before parsing.
pub const MAX_PAYLOAD: usize = 16 * 1024;
pub const DEFAULT_PREFIX: &str = "otarig";

pub fn release_topic(prefix: &str, device_type: &str, channel: &str) -> String {
    format!("{prefix}/release/{device_type}/{channel}")
}

pub fn device_topic(prefix: &str, device_id: &str, leaf: Leaf) -> String {
    format!("{prefix}/device/{device_id}/{}", leaf.name())
}

/// The per-device topics.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Leaf {
    Cmd,
    Status,
    Ack,
    Telemetry,
}

impl Leaf {
    pub const fn name(self) -> &'static str {
        match self {
            Leaf::Cmd => "cmd",
            Leaf::Status => "status",
            Leaf::Ack => "ack",
            Leaf::Telemetry => "telemetry",
        }
    }
}

/// Why a payload was not understood.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PayloadError {
    TooLarge(usize),
    NotJson(String),
    Version(u32),
    UnknownCommand(String),
}

impl core::fmt::Display for PayloadError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            PayloadError::TooLarge(n) => write!(f, "payload of {n} bytes exceeds {MAX_PAYLOAD}"),
            PayloadError::NotJson(e) => write!(f, "payload is not the expected JSON: {e}"),
            PayloadError::Version(v) => {
                write!(f, "payload format v{v}; this agent reads v{VERSION}")
            }
            PayloadError::UnknownCommand(c) => {
                write!(f, "unknown command '{c}' (update-now, reboot, report)")
            }
        }
    }
}

/// A signed command as it travels on MQTT, `{"v":1,"signed":<envelope of a [`CommandBody`]>}`
/// (a release travels as a [`ReleasePayload`], which starts the same way).
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SignedPayload {
    pub v: u32,
    pub signed: SignedManifest,
}

/// A release as boards receive it, on the release topic or from `GET /firmware/latest`: the
/// signed manifest and the statements that decide whether to believe it ([`crate::trust`]).
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReleasePayload {
    pub v: u32,
    /// The manifest.
    pub signed: SignedManifest,
    /// The key set the manifest's key belongs to (signed by a root key).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keys: Option<SignedManifest>,
    /// The device type's revocation list (signed by a release key).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revocations: Option<SignedManifest>,
    /// The server's short-lived statement that this manifest is current (a timestamp key's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timestamp: Option<SignedManifest>,
}

/// Read a release payload; every envelope inside is still to be verified.
pub fn parse_release(bytes: &[u8]) -> Result<ReleasePayload, PayloadError> {
    parse_versioned(bytes, |r: &ReleasePayload| r.v)
}

/// A payload of at most [`MAX_PAYLOAD`] bytes, of this format version (`v`).
fn parse_versioned<T: serde::de::DeserializeOwned>(
    bytes: &[u8],
    v: impl Fn(&T) -> u32,
) -> Result<T, PayloadError> {
    check_len(bytes)?;
    let p: T = serde_json::from_slice(bytes).map_err(|e| PayloadError::NotJson(e.to_string()))?;
    match v(&p) {
        VERSION => Ok(p),
        other => Err(PayloadError::Version(other)),
    }
}

/// Host side: the release payload for a signed manifest and the statements served with it
/// (each the JSON bytes of a signed envelope).
pub fn release_payload(
    manifest: &[u8],
    keys: Option<&[u8]>,
    revocations: Option<&[u8]>,
    timestamp: Option<&[u8]>,
) -> Result<alloc::vec::Vec<u8>, PayloadError> {
    let env = |b: &[u8]| -> Result<SignedManifest, PayloadError> {
        serde_json::from_slice(b).map_err(|e| PayloadError::NotJson(e.to_string()))
    };
    let opt = |b: Option<&[u8]>| b.map(env).transpose();
    let r = ReleasePayload {
        v: VERSION,
        signed: env(manifest)?,
        keys: opt(keys)?,
        revocations: opt(revocations)?,
        timestamp: opt(timestamp)?,
    };
    serde_json::to_vec(&r).map_err(|e| PayloadError::NotJson(e.to_string()))
}

/// What a command asks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CommandKind {
    /// Ask the server for the latest manifest now, instead of at the next poll.
    UpdateNow,
    Reboot,
    /// Publish a status report of where the board is.
    Report,
}

/// What a command's signature covers.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CommandBody {
    /// The one board this command is for.
    pub device: String,
    /// Strictly increasing per board (the server uses its clock in microseconds).
    pub id: u64,
    pub cmd: String,
    /// Unix seconds after which the board refuses it.
    pub expires_at: u64,
}

/// A command whose signature verified; the agent checks the rest.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Command {
    pub device: String,
    pub id: u64,
    pub kind: CommandKind,
    pub expires_at: u64,
}

/// Why a command was not taken.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CommandError {
    /// Not a command payload at all (a `bad-message`).
    Payload(PayloadError),
    /// The signature did not verify, or the key is not trusted.
    Envelope(EnvelopeError),
}

fn check_len(bytes: &[u8]) -> Result<(), PayloadError> {
    if bytes.len() > MAX_PAYLOAD {
        return Err(PayloadError::TooLarge(bytes.len()));
    }
    Ok(())
}

/// Read a command payload; the envelope inside is still to be verified.
pub fn parse_signed(bytes: &[u8]) -> Result<SignedPayload, PayloadError> {
    parse_versioned(bytes, |a: &SignedPayload| a.v)
}

/// Wrap a signed envelope (its JSON bytes: a signed manifest, or a signed command body) into
/// the payload published on MQTT.
pub fn signed_payload(envelope: &[u8]) -> Result<String, PayloadError> {
    let signed: SignedManifest =
        serde_json::from_slice(envelope).map_err(|e| PayloadError::NotJson(e.to_string()))?;
    Ok(json!({"v": VERSION, "signed": signed}).to_string())
}

/// Read a command payload and verify its signature; nothing in the body is looked at first.
pub fn parse_command(bytes: &[u8], keys: &[TrustedKey]) -> Result<Command, CommandError> {
    let env = parse_signed(bytes).map_err(CommandError::Payload)?;
    let body = crate::manifest::verify_parsed(&env.signed, keys, Context::Command)
        .map_err(CommandError::Envelope)?;
    let b: CommandBody = serde_json::from_slice(&body)
        .map_err(|e| CommandError::Payload(PayloadError::NotJson(e.to_string())))?;
    let kind = match b.cmd.as_str() {
        "update-now" => CommandKind::UpdateNow,
        "reboot" => CommandKind::Reboot,
        "report" => CommandKind::Report,
        // The name goes into an event: a long one is cut, not echoed whole.
        other => {
            let cut = other.char_indices().nth(32).map_or(other.len(), |(i, _)| i);
            return Err(CommandError::Payload(PayloadError::UnknownCommand(
                other[..cut].to_string(),
            )));
        }
    };
    Ok(Command {
        device: b.device,
        id: b.id,
        kind,
        expires_at: b.expires_at,
    })
}

impl CommandKind {
    pub const fn name(self) -> &'static str {
        match self {
            CommandKind::UpdateNow => "update-now",
            CommandKind::Reboot => "reboot",
            CommandKind::Report => "report",
        }
    }
}

fn outcome_detail(o: &Outcome) -> String {
    match o {
        Outcome::Installed => String::new(),
        Outcome::Refused { check, detail } => format!("{check}: {detail}"),
        Outcome::RolledBack { detail } => detail.clone(),
    }
}

/// An ack as JSON (MQTT `ack` topic and `POST /ack` body).
pub fn ack_json(device: &str, ack: &Ack) -> Value {
    json!({"v": VERSION, "device": device, "sequence": ack.sequence, "version": ack.version,
        "outcome": ack.outcome.name(), "detail": outcome_detail(&ack.outcome)})
}

/// A telemetry sample as sent (JSON). `uptime_ms` is time since the board's last reset;
/// `progress` is present while an image downloads.
///
/// Rendered straight from a borrowed struct rather than through a [`Value`]: a board sends
/// one every second, and a `Value` costs a map and a dozen allocations per sample (a tenth
/// of a simulated fleet's CPU while it idles).
pub fn telemetry_json(device: &str, t_ms: u64, uptime_ms: u64, t: &crate::Telemetry<'_>) -> String {
    #[derive(serde::Serialize)]
    struct Sample<'a> {
        v: u32,
        device: &'a str,
        t_ms: u64,
        uptime_ms: u64,
        version: Option<&'a str>,
        slot: Option<String>,
        activity: &'a str,
        #[serde(skip_serializing_if = "Option::is_none")]
        progress: Option<u8>,
        probation: bool,
        online: bool,
    }
    let sample = Sample {
        v: VERSION,
        device,
        t_ms,
        uptime_ms,
        version: t.version,
        slot: t.slot.map(|s| s.to_string()),
        activity: t.activity.name(),
        progress: t.progress_pct,
        probation: t.probation,
        online: t.online,
    };
    // Cannot fail: no maps with non-string keys, no custom serializers.
    serde_json::to_string(&sample).unwrap_or_default()
}

/// An agent event as JSON: the `status` topic payload, the console event line, and the
/// simulator's event log all use this one rendering.
pub fn event_json(device: &str, t_ms: u64, e: &Event) -> Value {
    let body = match e {
        Event::Booted {
            version,
            slot,
            sha256,
            state,
        } => json!({"kind": "booted", "version": version,
            "slot": slot.to_string(), "sha256": hex::encode(sha256), "state": state.map(|s| s.name())}),
        Event::SelfTest { passed, detail } => {
            json!({"kind": "self-test", "passed": passed, "detail": detail})
        }
        Event::Confirmed { version } => json!({"kind": "confirmed", "version": version}),
        Event::RollingBack { version, reason } => {
            json!({"kind": "rolling-back", "version": version, "reason": reason})
        }
        Event::Refused {
            sequence,
            version,
            check,
            detail,
        } => json!({"kind": "refused", "sequence": sequence,
            "version": version, "check": check.name(), "detail": detail}),
        Event::Downloading {
            sequence,
            version,
            size,
            resumed_from,
            delta,
        } => json!({"kind": "downloading",
            "sequence": sequence, "version": version, "size": size, "resumed_from": resumed_from, "delta": delta}),
        Event::Retrying {
            sequence,
            version,
            detail,
        } => json!({"kind": "retrying", "sequence": sequence, "version": version,
            "detail": detail}),
        Event::KeysAdopted { version } => json!({"kind": "keys-adopted", "version": version}),
        Event::TransportRefused {
            peer,
            check,
            detail,
        } => json!({"kind": "transport-refused", "peer": peer, "check": check.name(),
            "detail": detail}),
        Event::DeltaFailed { sequence, reason } => {
            json!({"kind": "delta-failed", "sequence": sequence, "reason": reason})
        }
        Event::Progress {
            sequence,
            written,
            size,
        } => json!({"kind": "progress", "sequence": sequence,
            "written": written, "size": size, "percent": (*written as u64 * 100 / (*size).max(1) as u64)}),
        Event::FetchFailed {
            sequence,
            offset,
            reason,
            retry_in_ms,
        } => json!({"kind": "fetch-failed",
            "sequence": sequence, "offset": offset, "reason": reason, "retry_in_ms": retry_in_ms}),
        Event::Verified { sequence } => json!({"kind": "verified", "sequence": sequence}),
        Event::BootSet { sequence, slot } => {
            json!({"kind": "boot-set", "sequence": sequence, "slot": slot.to_string()})
        }
        Event::StorageError { during, error } => {
            json!({"kind": "storage-error", "during": during, "error": error})
        }
        Event::CommandRefused { id, check, detail } => {
            json!({"kind": "command-refused", "id": id, "check": check.name(), "detail": detail})
        }
        Event::BadMessage { topic, reason } => {
            json!({"kind": "bad-message", "topic": topic, "reason": reason})
        }
        Event::Report { state, version } => {
            json!({"kind": "report", "state": state, "version": version})
        }
    };
    let mut v = json!({"v": VERSION, "device": device, "t_ms": t_ms});
    if let (Some(o), Value::Object(b)) = (v.as_object_mut(), body) {
        o.extend(b);
    }
    v
}

#[derive(Deserialize)]
struct Probe {
    v: u32,
}

/// The format version of any payload, for routing and error messages.
pub fn payload_version(bytes: &[u8]) -> Option<u32> {
    serde_json::from_slice::<Probe>(bytes).ok().map(|p| p.v)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The sample names every field, `slot` as the partition label and `null` before boot,
    /// and `progress` only while an image downloads.
    #[test]
    fn a_telemetry_sample_has_every_field_and_progress_only_while_downloading() {
        use crate::platform::SlotKind;
        let mut t = crate::Telemetry {
            version: Some("2.0.0"),
            slot: Some(SlotKind::Ota(1)),
            probation: true,
            activity: crate::agent::Activity::Downloading,
            progress_pct: Some(40),
            online: true,
        };
        let parsed = |t: &crate::Telemetry<'_>| {
            serde_json::from_str::<Value>(&telemetry_json("d-1", 5, 3, t)).unwrap()
        };
        assert_eq!(
            parsed(&t),
            json!({"v": 1, "device": "d-1", "t_ms": 5, "uptime_ms": 3, "version": "2.0.0",
                "slot": "ota_1", "activity": "downloading", "progress": 40,
                "probation": true, "online": true})
        );
        (t.version, t.slot, t.progress_pct) = (None, None, None);
        t.activity = crate::agent::Activity::Starting;
        assert_eq!(
            parsed(&t),
            json!({"v": 1, "device": "d-1", "t_ms": 5, "uptime_ms": 3, "version": null,
                "slot": null, "activity": "starting", "probation": true, "online": true})
        );
    }

    #[test]
    fn bad_command_payloads_say_why() {
        let keys = &[];
        let payload = |b: &[u8]| match parse_command(b, keys) {
            Err(CommandError::Payload(e)) => Some(e),
            _ => None,
        };
        assert!(matches!(payload(b"{nope"), Some(PayloadError::NotJson(_))));
        // The unsigned form of the first protocol is refused, not obeyed.
        assert!(matches!(
            payload(br#"{"v":1,"id":"a","cmd":"reboot"}"#),
            Some(PayloadError::NotJson(_))
        ));
        let signed = r#"{"manifest":"e30=","key_id":"k","alg":"ed25519","signature":"AA=="}"#;
        let future = alloc::format!(r#"{{"v":2,"signed":{signed}}}"#);
        assert_eq!(payload(future.as_bytes()), Some(PayloadError::Version(2)));
        let unknown_key = alloc::format!(r#"{{"v":1,"signed":{signed}}}"#);
        assert!(matches!(
            parse_command(unknown_key.as_bytes(), keys),
            Err(CommandError::Envelope(EnvelopeError::UnknownKey(_)))
        ));
        let big = alloc::vec![b' '; MAX_PAYLOAD + 1];
        assert_eq!(payload(&big), Some(PayloadError::TooLarge(MAX_PAYLOAD + 1)));
    }

    #[test]
    fn topics() {
        assert_eq!(
            release_topic("otarig", "s3-devkit", "beta"),
            "otarig/release/s3-devkit/beta"
        );
        assert_eq!(
            device_topic("otarig", "d-1", Leaf::Telemetry),
            "otarig/device/d-1/telemetry"
        );
    }
}
