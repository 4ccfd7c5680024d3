//! The chunked OTA protocol, the server's half: a session per device and release, frames
//! tagged under each device's key, and the status of every session.
//!
//! | endpoint | answer |
//! |---|---|
//! | `POST /ota/check` `{"v":1,"device":…,"sequence":7,"sha256":"<blob>","from":0}` | opens (or replaces) the device's session: [`otarig_agent::chunk::SessionAnswer`] |
//! | `GET /ota/chunk?device=…&session=…&n=5` | chunk 5 as an [`otarig_agent::chunk::frame`] (`application/octet-stream`) |
//! | `POST /ota/verify` `{"v":1,"device":…,"sequence":7}` | the board verified the image in its slot (its hash and `esp_ota_end`) |
//! | `POST /ota/complete` | the board's ack (the body `POST /ack` takes): recorded, and the session ends with its outcome |
//! | `GET /ota/status[?device=…]` | [`SessionStatus`]: one device's, or every session's (at most [`STATUS_LIMIT`]) |
//!
//! The board checks every chunk ([`otarig_agent::chunk`]); this side only makes frames. The
//! fleet key stays here: a device's key is derived when its session opens. Session ids come
//! from an HMAC of a counter under the fleet key, so they are unpredictable to anyone without
//! it and the same in every replay of a deterministic run.
//!
//! Chunk faults stand in for a man in the middle (the firmware server is where faults live,
//! so they act the same on simulated and real boards): [`ChunkFault`].

use std::collections::HashMap;
use std::sync::Mutex;

use hmac::{Hmac, Mac};
use otarig_agent::chunk::{self, ChunkKey, Place, SessionAnswer, CHUNK_SIZE, SESSION_LEN};
use serde::Serialize;
use sha2::Sha256;

/// Sessions kept at once (one per device): a client naming new device ids cannot grow the
/// table past this. About 200 bytes each.
pub const MAX_SESSIONS: usize = 200_000;
/// Sessions one `/ota/status` answer lists.
pub const STATUS_LIMIT: usize = 1_000;
/// Longest device id the protocol takes.
pub const MAX_DEVICE_ID: usize = 128;

/// How an on-path attacker bends the answer to a chunk request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ChunkFault {
    /// The chunk after the one asked for (or before, at the end): a reordered stream.
    Reorder,
    /// The chunk asked for, as an earlier session of this device carried it (replayed).
    OtherSession,
    /// The chunk asked for, as it was made for another device (under that device's key).
    OtherDevice,
}

impl ChunkFault {
    pub fn name(self) -> &'static str {
        match self {
            ChunkFault::Reorder => "reorder",
            ChunkFault::OtherSession => "other-session",
            ChunkFault::OtherDevice => "other-device",
        }
    }

    pub fn from_name(name: &str) -> Option<ChunkFault> {
        [
            ChunkFault::Reorder,
            ChunkFault::OtherSession,
            ChunkFault::OtherDevice,
        ]
        .into_iter()
        .find(|f| f.name() == name)
    }
}

/// Why a chunked-protocol request was refused; each maps to an HTTP status.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ChunkServiceError {
    #[error("the chunked protocol is off on this server: start it with a fleet key (`otarig serve --chunk-psk FILE`)")]
    Disabled,
    #[error("{0}")]
    BadRequest(String),
    #[error("no session {session} for device '{device}' (replaced by a newer one, or never opened): open one with POST /ota/check")]
    NoSession { device: String, session: String },
    #[error("chunk {index} is past the end: the blob has {chunks} chunks")]
    PastEnd { index: u32, chunks: u32 },
    #[error("{0} sessions are open, the most this server keeps: try again later")]
    Full(usize),
}

/// Where a session stands.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case", tag = "state")]
pub enum Stage {
    Downloading,
    /// The board verified the image in its slot.
    Verified,
    /// The board acked the release (`installed`, `refused` or `rolled-back`).
    Complete {
        outcome: String,
    },
}

/// One device's session, as `/ota/status` shows it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct SessionStatus {
    pub device: String,
    pub session: String,
    pub sequence: u64,
    pub sha256: String,
    pub chunks: u32,
    /// The highest chunk served, plus one.
    pub reached: u32,
    pub progress_pct: u32,
    /// Frames sent in this session (retries and faults included).
    pub frames: u64,
    #[serde(flatten)]
    pub stage: Stage,
}

#[derive(Clone, Debug)]
struct Session {
    id: [u8; SESSION_LEN],
    /// The device's key, derived once when the session opens.
    key: ChunkKey,
    /// The device's session before this one, for [`ChunkFault::OtherSession`].
    previous: Option<[u8; SESSION_LEN]>,
    sequence: u64,
    sha256: [u8; 32],
    size: u32,
    reached: u32,
    frames: u64,
    stage: Stage,
}

impl Session {
    fn chunks(&self) -> u32 {
        self.size.div_ceil(CHUNK_SIZE)
    }

    fn status(&self, device: &str) -> SessionStatus {
        let chunks = self.chunks();
        SessionStatus {
            device: device.to_string(),
            session: hex::encode(self.id),
            sequence: self.sequence,
            sha256: hex::encode(self.sha256),
            chunks,
            reached: self.reached,
            progress_pct: (self.reached as u64 * 100 / chunks.max(1) as u64) as u32,
            frames: self.frames,
            stage: self.stage.clone(),
        }
    }
}

#[derive(Default)]
struct Inner {
    fleet_key: Option<Vec<u8>>,
    sessions: HashMap<String, Session>,
    opened: u64,
}

/// The sessions of one server. Off until [`ChunkService::enable`] gives it the fleet key.
#[derive(Default)]
pub struct ChunkService {
    inner: Mutex<Inner>,
}

impl std::fmt::Debug for ChunkService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChunkService").finish_non_exhaustive()
    }
}

/// What the chunk request names, once its session is found.
#[derive(Clone, Copy, Debug)]
pub struct Lookup {
    /// The blob to cut the chunk from.
    pub sha256: [u8; 32],
    pub chunks: u32,
}

fn check_device(device: &str) -> Result<(), ChunkServiceError> {
    if device.is_empty() || device.len() > MAX_DEVICE_ID {
        return Err(ChunkServiceError::BadRequest(format!(
            "device must be 1 to {MAX_DEVICE_ID} characters"
        )));
    }
    Ok(())
}

impl ChunkService {
    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Serve the protocol with this fleet key (the pre-shared key each device's is derived
    /// from).
    pub fn enable(&self, fleet_key: &[u8]) {
        self.lock().fleet_key = Some(fleet_key.to_vec());
    }

    pub fn is_enabled(&self) -> bool {
        self.lock().fleet_key.is_some()
    }

    /// `POST /ota/check`: open `device`'s session for release `sequence`, whose blob
    /// `sha256` has `size` bytes, from chunk `from`; the answer's JSON bytes.
    pub fn open(
        &self,
        device: &str,
        sequence: u64,
        sha256: [u8; 32],
        size: u64,
        from: u32,
    ) -> Result<Vec<u8>, ChunkServiceError> {
        check_device(device)?;
        let size = u32::try_from(size).map_err(|_| {
            ChunkServiceError::BadRequest("blob too large for 32-bit offsets".into())
        })?;
        let mut inner = self.lock();
        let Some(fleet_key) = inner.fleet_key.clone() else {
            return Err(ChunkServiceError::Disabled);
        };
        let chunks = size.div_ceil(CHUNK_SIZE);
        if from >= chunks {
            return Err(ChunkServiceError::PastEnd {
                index: from,
                chunks,
            });
        }
        let fresh = !inner.sessions.contains_key(device);
        if fresh && inner.sessions.len() >= MAX_SESSIONS {
            return Err(ChunkServiceError::Full(MAX_SESSIONS));
        }
        inner.opened += 1;
        let id = session_id(&fleet_key, inner.opened, device);
        let previous = inner.sessions.get(device).map(|s| s.id);
        inner.sessions.insert(
            device.to_string(),
            Session {
                id,
                key: ChunkKey::derive(&fleet_key, device),
                previous,
                sequence,
                sha256,
                size,
                reached: from,
                frames: 0,
                stage: Stage::Downloading,
            },
        );
        tracing::debug!(device, sequence, from, session = %hex::encode(id), "chunk session opened");
        let answer = SessionAnswer {
            v: otarig_agent::protocol::VERSION,
            session: hex::encode(id),
            sequence,
            size,
            chunk_size: CHUNK_SIZE,
            chunks,
        };
        serde_json::to_vec(&answer).map_err(|e| ChunkServiceError::BadRequest(e.to_string()))
    }

    /// The blob of `device`'s session `session` (hex), if that is its current session.
    pub fn lookup(&self, device: &str, session: &str) -> Result<Lookup, ChunkServiceError> {
        let inner = self.lock();
        if inner.fleet_key.is_none() {
            return Err(ChunkServiceError::Disabled);
        }
        match inner.sessions.get(device) {
            Some(s) if hex::encode(s.id) == session => Ok(Lookup {
                sha256: s.sha256,
                chunks: s.chunks(),
            }),
            _ => Err(ChunkServiceError::NoSession {
                device: device.chars().take(MAX_DEVICE_ID).collect(),
                session: session.chars().take(2 * SESSION_LEN).collect(),
            }),
        }
    }

    /// `GET /ota/chunk`: the frame of chunk `index` of `blob` in `device`'s current session
    /// (found by [`ChunkService::lookup`]), bent by `fault` if one applies.
    pub fn frame(
        &self,
        device: &str,
        index: u32,
        blob: &[u8],
        fault: Option<ChunkFault>,
    ) -> Result<Vec<u8>, ChunkServiceError> {
        let mut guard = self.lock();
        let inner = &mut *guard;
        let Some(fleet_key) = inner.fleet_key.as_deref() else {
            return Err(ChunkServiceError::Disabled);
        };
        let Some(s) = inner.sessions.get_mut(device) else {
            return Err(ChunkServiceError::NoSession {
                device: device.to_string(),
                session: String::new(),
            });
        };
        let chunks = s.chunks();
        if index >= chunks || blob.len() as u64 != s.size as u64 {
            return Err(ChunkServiceError::PastEnd { index, chunks });
        }
        s.frames += 1;
        s.reached = s.reached.max(index + 1);
        let origin = bend(s, fleet_key, device, index, fault);
        let start = origin.index as usize * CHUNK_SIZE as usize;
        let end = (start + CHUNK_SIZE as usize).min(blob.len());
        let place = Place {
            device: &origin.device,
            session: origin.session,
            sequence: s.sequence,
            index: origin.index,
        };
        Ok(chunk::frame(&origin.key, &place, &blob[start..end]))
    }

    /// `POST /ota/verify`: `device` verified release `sequence` in its slot.
    pub fn verified(&self, device: &str, sequence: u64) -> Result<(), ChunkServiceError> {
        self.set_stage(device, sequence, Stage::Verified)
    }

    /// `POST /ota/complete`: `device` acked release `sequence` with `outcome`.
    pub fn completed(
        &self,
        device: &str,
        sequence: u64,
        outcome: &str,
    ) -> Result<(), ChunkServiceError> {
        let outcome = outcome.to_string();
        self.set_stage(device, sequence, Stage::Complete { outcome })
    }

    fn set_stage(
        &self,
        device: &str,
        sequence: u64,
        stage: Stage,
    ) -> Result<(), ChunkServiceError> {
        let mut inner = self.lock();
        if inner.fleet_key.is_none() {
            return Err(ChunkServiceError::Disabled);
        }
        match inner.sessions.get_mut(device) {
            Some(s) if s.sequence == sequence => {
                s.stage = stage;
                Ok(())
            }
            _ => Err(ChunkServiceError::NoSession {
                device: device.chars().take(MAX_DEVICE_ID).collect(),
                session: format!("for sequence {sequence}"),
            }),
        }
    }

    /// `GET /ota/status?device=…`.
    pub fn status(&self, device: &str) -> Option<SessionStatus> {
        self.lock().sessions.get(device).map(|s| s.status(device))
    }

    /// `GET /ota/status`: up to [`STATUS_LIMIT`] sessions, by device id.
    pub fn statuses(&self) -> Vec<SessionStatus> {
        let inner = self.lock();
        let mut all: Vec<SessionStatus> = inner.sessions.iter().map(|(d, s)| s.status(d)).collect();
        all.sort_by(|a, b| a.device.cmp(&b.device));
        all.truncate(STATUS_LIMIT);
        all
    }
}

/// The fleet key file's name in `fixtures/keys` (TEST ONLY): what scenarios with
/// `download = "chunked"` run under.
pub const FIXTURE_FLEET_KEY: &str = "fleet-chunk.psk";

/// Read a fleet key file: hex digits for 16 to 64 bytes (`otarig keys gen NAME --alg psk`
/// writes 32), the file at most 1 KiB.
pub fn load_fleet_key(path: &std::path::Path) -> anyhow::Result<Vec<u8>> {
    use anyhow::Context;
    use std::io::Read;
    let file = std::fs::File::open(path)
        .with_context(|| format!("cannot open the fleet key {}", path.display()))?;
    let mut text = String::new();
    file.take(1024)
        .read_to_string(&mut text)
        .with_context(|| format!("reading the fleet key {}", path.display()))?;
    let key = hex::decode(text.trim())
        .ok()
        .filter(|k| (16..=64).contains(&k.len()));
    key.with_context(|| {
        format!(
            "{}: a fleet key is 32 to 128 hex digits on one line (make one with `otarig keys gen NAME --alg psk`)",
            path.display()
        )
    })
}

/// A new fleet key: 32 random bytes, as the hex a key file holds.
pub fn generate_fleet_key(rng: &mut impl rand::RngCore) -> String {
    let mut key = [0u8; 32];
    rng.fill_bytes(&mut key);
    hex::encode(key)
}

/// Where a frame says its chunk comes from, and the key that tags it.
struct Origin {
    index: u32,
    device: String,
    session: [u8; SESSION_LEN],
    key: ChunkKey,
}

/// The origin of the frame for chunk `index` of session `s` under `fault`. Without one, the
/// chunk asked for, made for `device` in its session. A one-chunk blob cannot be reordered.
fn bend(
    s: &Session,
    fleet_key: &[u8],
    device: &str,
    index: u32,
    fault: Option<ChunkFault>,
) -> Origin {
    let genuine = Origin {
        index,
        device: device.to_string(),
        session: s.id,
        key: s.key.clone(),
    };
    match fault {
        None => genuine,
        Some(ChunkFault::Reorder) => Origin {
            index: if index + 1 < s.chunks() {
                index + 1
            } else {
                index.saturating_sub(1)
            },
            ..genuine
        },
        // An earlier session's frame; a device with none gets one an attacker recorded from
        // a session this server never told it about.
        Some(ChunkFault::OtherSession) => Origin {
            session: s
                .previous
                .unwrap_or_else(|| session_id(fleet_key, u64::MAX, device)),
            ..genuine
        },
        Some(ChunkFault::OtherDevice) => {
            let neighbour = format!("{device}~neighbour");
            Origin {
                key: ChunkKey::derive(fleet_key, &neighbour),
                device: neighbour,
                ..genuine
            }
        }
    }
}

/// HMAC-SHA256(fleet key, "otarig session" ‖ counter ‖ device)[..16].
fn session_id(fleet_key: &[u8], counter: u64, device: &str) -> [u8; SESSION_LEN] {
    let mut m = match <Hmac<Sha256> as Mac>::new_from_slice(fleet_key) {
        Ok(m) => m,
        // HMAC takes keys of every length; nothing reaches here.
        Err(_) => return [0; SESSION_LEN],
    };
    m.update(b"otarig session");
    m.update(&counter.to_be_bytes());
    m.update(device.as_bytes());
    let mut id = [0u8; SESSION_LEN];
    id.copy_from_slice(&m.finalize().into_bytes()[..SESSION_LEN]);
    id
}

#[cfg(test)]
mod tests;
