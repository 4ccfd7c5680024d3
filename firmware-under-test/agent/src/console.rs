//! The console protocol: how a board's serial console carries machine-readable events among
//! ESP-IDF's own log lines, and how the bench provisions it. The same functions render lines
//! on the real board (esp32s3 shell), on the virtual board, and parse them in the HIL runner.
//!
//! Board → host, one line each, in between any other output:
//!
//! ```text
//! @otarig {"v":1,"device":"bench-1","t_ms":5120,"kind":"downloading",...}   an agent event (protocol::event_json)
//! @otarig {"v":1,"device":"bench-1","kind":"ack","sequence":2,...}          an ack, as sent to the server
//! @otarig {"v":1,"device":"bench-1","kind":"provisioned"}                   provisioning stored
//! @otarig {"v":1,"device":"…","kind":"console-error","detail":"…"}          a command line it could not use
//! ```
//!
//! Host → board:
//!
//! ```text
//! @otarig-cmd {"v":1,"cmd":"provision","device":"bench-1","broker":"mqtt://10.0.0.2:1883","server":"http://10.0.0.2:8080","wifi_ssid":"lab","wifi_password":"…"}
//! @otarig-cmd {"v":1,"cmd":"report"}
//! @otarig-cmd {"v":1,"cmd":"reboot"}
//! ```
//!
//! Every other line (ESP-IDF logs, the ROM banner) is not part of the protocol; the runner
//! keeps it in the console log. A malformed command line gets a `console-error` event, never
//! a crash; the line length is bounded ([`MAX_LINE`]).

use alloc::string::{String, ToString};
use serde::Deserialize;
use serde_json::{json, Value};

use crate::event::{Ack, Check, Event, Outcome};
use crate::platform::{OtaImgState, SlotKind};
use crate::protocol::{self, PayloadError, VERSION};

pub const EVENT_PREFIX: &str = "@otarig ";
pub const COMMAND_PREFIX: &str = "@otarig-cmd ";
/// Longer lines are refused (a provisioning line is well under 1 KiB).
pub const MAX_LINE: usize = 2048;

/// What the bench sends a board.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(tag = "cmd", rename_all = "kebab-case", deny_unknown_fields)]
pub enum HostCommand {
    /// Store the board's identity and where its broker and server are (NVS on the board).
    Provision {
        device: String,
        broker: String,
        server: String,
        /// The release channel the board follows ("stable" when left out).
        #[serde(default)]
        channel: Option<String>,
        #[serde(default)]
        wifi_ssid: String,
        #[serde(default)]
        wifi_password: String,
    },
    /// Answer with a `report` event (what the agent is doing, which version runs).
    Report,
    /// `esp_restart()`.
    Reboot,
}

#[derive(Deserialize)]
struct Envelope {
    v: u32,
    #[serde(flatten)]
    command: Value,
}

/// A console line from the host: `None` when it is not a command line at all.
pub fn parse_command_line(line: &str) -> Option<Result<HostCommand, PayloadError>> {
    let body = line.trim_end().strip_prefix(COMMAND_PREFIX.trim_end())?;
    if line.len() > MAX_LINE {
        return Some(Err(PayloadError::TooLarge(line.len())));
    }
    let env: Envelope = match serde_json::from_str(body.trim()) {
        Ok(e) => e,
        Err(e) => return Some(Err(PayloadError::NotJson(e.to_string()))),
    };
    if env.v != VERSION {
        return Some(Err(PayloadError::Version(env.v)));
    }
    Some(serde_json::from_value(env.command).map_err(|e| PayloadError::NotJson(e.to_string())))
}

/// Render a command line (the runner's side).
pub fn command_line(cmd: &HostCommand) -> String {
    let body = match cmd {
        HostCommand::Provision {
            device,
            broker,
            server,
            channel,
            wifi_ssid,
            wifi_password,
        } => json!({"v": VERSION, "cmd": "provision", "device": device, "broker": broker,
            "server": server, "channel": channel, "wifi_ssid": wifi_ssid, "wifi_password": wifi_password}),
        HostCommand::Report => json!({"v": VERSION, "cmd": "report"}),
        HostCommand::Reboot => json!({"v": VERSION, "cmd": "reboot"}),
    };
    alloc::format!("{COMMAND_PREFIX}{body}\n")
}

/// An agent event as a console line.
pub fn event_line(device: &str, t_ms: u64, e: &Event) -> String {
    alloc::format!("{EVENT_PREFIX}{}\n", protocol::event_json(device, t_ms, e))
}

/// An ack as a console line.
pub fn ack_line(device: &str, t_ms: u64, ack: &Ack) -> String {
    let mut v = protocol::ack_json(device, ack);
    if let Some(o) = v.as_object_mut() {
        o.insert("kind".into(), json!("ack"));
        o.insert("t_ms".into(), json!(t_ms));
    }
    alloc::format!("{EVENT_PREFIX}{v}\n")
}

/// A board-side notice (`provisioned`, `console-error`) as a console line.
pub fn notice_line(device: &str, kind: &str, detail: &str) -> String {
    let v = json!({"v": VERSION, "device": device, "kind": kind, "detail": detail});
    alloc::format!("{EVENT_PREFIX}{v}\n")
}

/// What a board line carries, for the host.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum BoardLine {
    Event {
        device: String,
        t_ms: u64,
        event: Event,
    },
    Ack {
        device: String,
        t_ms: u64,
        ack: Ack,
    },
    /// `provisioned`, `console-error`, or a kind this runner does not know.
    Notice {
        kind: String,
        detail: String,
    },
    /// Not a protocol line: ESP-IDF output.
    Log,
}

/// Parse one line of a board's console.
pub fn parse_board_line(line: &str) -> Result<BoardLine, String> {
    let Some(body) = line.trim_end().strip_prefix(EVENT_PREFIX.trim_end()) else {
        return Ok(BoardLine::Log);
    };
    let v: Value =
        serde_json::from_str(body.trim()).map_err(|e| alloc::format!("not JSON: {e}"))?;
    if v["v"] != VERSION {
        return Err(alloc::format!(
            "format {} (this runner reads v{VERSION})",
            v["v"]
        ));
    }
    let s = |k: &str| v[k].as_str().map(ToString::to_string);
    let n = |k: &str| v[k].as_u64();
    let device = s("device").unwrap_or_default();
    let t_ms = n("t_ms").unwrap_or(0);
    let kind = s("kind").ok_or("no kind")?;
    if kind == "ack" {
        let outcome = match v["outcome"].as_str() {
            Some("installed") => Outcome::Installed,
            Some("rolled-back") => Outcome::RolledBack {
                detail: s("detail").unwrap_or_default(),
            },
            Some("refused") => {
                let detail = s("detail").unwrap_or_default();
                let (check, rest) = detail.split_once(": ").unwrap_or(("malformed", &detail));
                Outcome::Refused {
                    check: Check::from_name(check).unwrap_or(Check::Malformed),
                    detail: rest.to_string(),
                }
            }
            other => return Err(alloc::format!("ack outcome {other:?}")),
        };
        let ack = Ack {
            sequence: n("sequence").ok_or("ack without sequence")?,
            version: s("version").unwrap_or_default(),
            outcome,
        };
        return Ok(BoardLine::Ack { device, t_ms, ack });
    }
    match event_from_json(&kind, &v) {
        Some(event) => Ok(BoardLine::Event {
            device,
            t_ms,
            event,
        }),
        None => Ok(BoardLine::Notice {
            kind,
            detail: s("detail").unwrap_or_default(),
        }),
    }
}

fn slot_kind(s: &str) -> Option<SlotKind> {
    match s {
        "factory" => Some(SlotKind::Factory),
        "test" => Some(SlotKind::Test),
        _ => s.strip_prefix("ota_")?.parse().ok().map(SlotKind::Ota),
    }
}

fn ota_state(s: &str) -> Option<OtaImgState> {
    [
        OtaImgState::New,
        OtaImgState::PendingVerify,
        OtaImgState::Valid,
        OtaImgState::Invalid,
        OtaImgState::Aborted,
        OtaImgState::Undefined,
    ]
    .into_iter()
    .find(|st| st.name() == s)
}

/// The agent's fixed vocabularies: names in events are `&'static str`.
fn known(s: &str, names: &[&'static str]) -> &'static str {
    names
        .iter()
        .find(|n| **n == s)
        .copied()
        .unwrap_or("unknown")
}

const REPORT_STATES: [&str; 9] = [
    "off",
    "self-test",
    "await-network",
    "ready",
    "await-manifest",
    "downloading",
    "backoff",
    "rebooting",
    "halted",
];
const DURING: [&str; 10] = [
    "esp_ota_begin",
    "esp_ota_end",
    "esp_ota_resume",
    "esp_ota_set_boot_partition",
    "esp_ota_write",
    "marking the app valid",
    "reading otadata",
    "reading the journal",
    "rolling back",
    "writing the journal",
];

/// The inverse of [`protocol::event_json`] for one event kind.
fn event_from_json(kind: &str, v: &Value) -> Option<Event> {
    let s = |k: &str| v[k].as_str().map(ToString::to_string);
    let n = |k: &str| v[k].as_u64();
    let n32 = |k: &str| n(k).and_then(|x| u32::try_from(x).ok());
    Some(match kind {
        "booted" => {
            let mut sha256 = [0u8; 32];
            hex::decode_to_slice(v["sha256"].as_str()?, &mut sha256).ok()?;
            Event::Booted {
                version: s("version")?,
                slot: slot_kind(v["slot"].as_str()?)?,
                sha256,
                state: v["state"].as_str().and_then(ota_state),
            }
        }
        "self-test" => Event::SelfTest {
            passed: v["passed"].as_bool()?,
            detail: s("detail")?,
        },
        "confirmed" => Event::Confirmed {
            version: s("version")?,
        },
        "rolling-back" => Event::RollingBack {
            version: s("version")?,
            reason: s("reason")?,
        },
        "refused" => Event::Refused {
            sequence: n("sequence")?,
            version: s("version")?,
            check: Check::from_name(v["check"].as_str()?)?,
            detail: s("detail")?,
        },
        "downloading" => Event::Downloading {
            sequence: n("sequence")?,
            version: s("version")?,
            size: n32("size")?,
            resumed_from: n32("resumed_from")?,
            delta: v["delta"].as_bool()?,
        },
        "command-refused" => Event::CommandRefused {
            id: n("id")?,
            check: Check::from_name(&s("check")?)?,
            detail: s("detail")?,
        },
        "transport-refused" => Event::TransportRefused {
            peer: known(v["peer"].as_str()?, &["server", "broker"]),
            check: Check::from_name(&s("check")?)?,
            detail: s("detail")?,
        },
        "keys-adopted" => Event::KeysAdopted {
            version: n32("version")?,
        },
        "retrying" => Event::Retrying {
            sequence: n("sequence")?,
            version: s("version")?,
            detail: s("detail")?,
        },
        "delta-failed" => Event::DeltaFailed {
            sequence: n("sequence")?,
            reason: s("reason")?,
        },
        "progress" => Event::Progress {
            sequence: n("sequence")?,
            written: n32("written")?,
            size: n32("size")?,
        },
        "fetch-failed" => Event::FetchFailed {
            sequence: n("sequence")?,
            offset: n32("offset")?,
            reason: s("reason")?,
            retry_in_ms: n("retry_in_ms")?,
        },
        "verified" => Event::Verified {
            sequence: n("sequence")?,
        },
        "boot-set" => Event::BootSet {
            sequence: n("sequence")?,
            slot: slot_kind(v["slot"].as_str()?)?,
        },
        "bad-message" => Event::BadMessage {
            topic: known(v["topic"].as_str()?, &["cmd", "release"]),
            reason: s("reason")?,
        },
        "report" => Event::Report {
            state: known(v["state"].as_str()?, &REPORT_STATES),
            version: s("version")?,
        },
        "storage-error" => Event::StorageError {
            during: known(v["during"].as_str()?, &DURING),
            error: s("error")?,
        },
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::vec;

    #[test]
    fn every_event_kind_survives_the_console() {
        let events = vec![
            Event::Booted {
                version: "2.0.0".into(),
                slot: SlotKind::Ota(1),
                sha256: [7; 32],
                state: Some(OtaImgState::PendingVerify),
            },
            Event::SelfTest {
                passed: false,
                detail: "sensor".into(),
            },
            Event::Confirmed {
                version: "2.0.0".into(),
            },
            Event::RollingBack {
                version: "2.0.0".into(),
                reason: "self-test".into(),
            },
            Event::Refused {
                sequence: 3,
                version: "3.0.0".into(),
                check: Check::Signature,
                detail: "no trusted key".into(),
            },
            Event::Downloading {
                sequence: 2,
                version: "2.0.0".into(),
                size: 1000,
                resumed_from: 64,
                delta: true,
            },
            Event::CommandRefused {
                id: 7,
                check: Check::Replayed,
                detail: "id 7 is not above 9".into(),
            },
            Event::Retrying {
                sequence: 2,
                version: "2.0.0".into(),
                detail: "no network".into(),
            },
            Event::KeysAdopted { version: 3 },
            Event::TransportRefused {
                peer: "broker",
                check: Check::Tls,
                detail: "invalid peer certificate: UnknownIssuer".into(),
            },
            Event::DeltaFailed {
                sequence: 2,
                reason: "bad patch".into(),
            },
            Event::Progress {
                sequence: 2,
                written: 500,
                size: 1000,
            },
            Event::FetchFailed {
                sequence: 2,
                offset: 4096,
                reason: "HTTP 503".into(),
                retry_in_ms: 2000,
            },
            Event::Verified { sequence: 2 },
            Event::BootSet {
                sequence: 2,
                slot: SlotKind::Ota(0),
            },
            Event::BadMessage {
                topic: "cmd",
                reason: "not JSON".into(),
            },
            Event::Report {
                state: "ready",
                version: "1.0.0".into(),
            },
            Event::StorageError {
                during: "esp_ota_write",
                error: "flash".into(),
            },
        ];
        for e in events {
            let line = event_line("bench-1", 42, &e);
            assert!(line.starts_with(EVENT_PREFIX) && line.ends_with('\n'));
            assert_eq!(
                parse_board_line(&line),
                Ok(BoardLine::Event {
                    device: "bench-1".into(),
                    t_ms: 42,
                    event: e.clone()
                }),
                "{line}"
            );
        }
    }

    #[test]
    fn acks_and_logs() {
        for outcome in [
            Outcome::Installed,
            Outcome::RolledBack {
                detail: "self-test failed".into(),
            },
            Outcome::Refused {
                check: Check::Expired,
                detail: "expired at 5".into(),
            },
        ] {
            let ack = Ack {
                sequence: 2,
                version: "2.0.0".into(),
                outcome,
            };
            let line = ack_line("b", 9, &ack);
            assert_eq!(
                parse_board_line(&line),
                Ok(BoardLine::Ack {
                    device: "b".into(),
                    t_ms: 9,
                    ack
                })
            );
        }
        assert_eq!(
            parse_board_line("I (312) boot: Loaded app from partition at offset 0x10000"),
            Ok(BoardLine::Log)
        );
        assert!(parse_board_line("@otarig {not json").is_err());
        assert!(parse_board_line("@otarig {\"v\":2,\"kind\":\"booted\"}").is_err());
    }

    #[test]
    fn host_commands_round_trip_and_bad_ones_are_explained() {
        let p = HostCommand::Provision {
            device: "bench-1".into(),
            broker: "mqtt://10.0.0.2:1883".into(),
            server: "http://10.0.0.2:8080".into(),
            channel: Some("beta".into()),
            wifi_ssid: "lab".into(),
            wifi_password: "pw".into(),
        };
        for c in [p, HostCommand::Report, HostCommand::Reboot] {
            assert_eq!(parse_command_line(&command_line(&c)), Some(Ok(c)));
        }
        assert_eq!(parse_command_line("I (5) wifi: connected"), None);
        assert!(matches!(
            parse_command_line("@otarig-cmd {\"v\":1,\"cmd\":\"format-flash\"}"),
            Some(Err(PayloadError::NotJson(_)))
        ));
        assert!(matches!(
            parse_command_line("@otarig-cmd {\"v\":9,\"cmd\":\"report\"}"),
            Some(Err(PayloadError::Version(9)))
        ));
        let long = alloc::format!("@otarig-cmd {}", "x".repeat(MAX_LINE));
        assert!(matches!(
            parse_command_line(&long),
            Some(Err(PayloadError::TooLarge(_)))
        ));
    }
}
