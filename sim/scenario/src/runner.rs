//! The deterministic in-process runner: simulated boards running the real agent against the
//! release store's core, on a virtual clock, with no sockets and no threads.
//!
//! Everything that varies (tearing of cut operations, jitter) derives from the scenario's
//! seed, and events are ordered by (virtual time, insertion order), so a run replays exactly.
//! The network between board and server is a model here: each request costs a fixed latency
//! and body bytes arrive at a fixed rate. The wire-level fleet puts real MQTT and HTTP around
//! the same store and agent.

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;

use anyhow::Context;
use otarig_agent::manifest::Manifest;
use otarig_agent::{
    Ack, Action, Agent, Config, Event, Input, OtaImgState, Platform, SlotKind, TrustedKey,
};
use serde_json::json;

use crate::scenario::{FaultKind, Firmware, Scenario, ServerFault, TamperDef};
use otarig_esp32s3::appimage::{
    self, AppSpec, Behaviour, BootBehaviour, NetworkBehaviour, SelfTest,
};
use otarig_esp32s3::board::{Board, BoardEvent, BootConfig, BootOutcome, CutPlan};
use otarig_server::keys::NamedKey;
use otarig_server::store::{Served, Store};

/// Junk bytes an endless server's answer carries in the in-process model, past the blob.
pub const ENDLESS_JUNK: usize = 64 * 1024;
/// Unix time (ms) at virtual time zero: 2026-01-01T00:00:00Z.
pub const EPOCH_MS: u64 = 1_767_225_600_000;
const LATENCY_MS: u64 = 20;
const BYTES_PER_MS: u64 = 1_000; // 1 MB/s per board
const BOOT_MS: u64 = 300;
const SELF_TEST_MS: u64 = 200;
const CONNECT_MS: u64 = 500;
/// How long a board waits for an HTTP answer before it gives up on the request.
pub const FETCH_TIMEOUT_MS: u64 = 30_000;

/// One entry of the event stream all checks read.
#[derive(Clone, Debug)]
pub struct Record {
    pub t_ms: u64,
    pub device: u32,
    pub what: What,
}

#[derive(Clone, Debug)]
pub enum What {
    Agent(Event),
    Ack {
        ack: Ack,
        duplicate: bool,
    },
    Board(BoardEvent),
    AppCrashed,
    Release {
        sequence: u64,
        version: String,
    },
    /// A staged rollout moved on or halted.
    Rollout {
        sequence: u64,
        message: String,
    },
}

impl Record {
    /// One JSON object per line in the event log.
    pub fn to_json(&self) -> serde_json::Value {
        let body = match &self.what {
            What::Agent(e) => {
                let mut v = otarig_agent::protocol::event_json("", self.t_ms, e);
                if let Some(o) = v.as_object_mut() {
                    for k in ["v", "device", "t_ms"] {
                        o.remove(k);
                    }
                    o.insert("source".into(), json!("agent"));
                }
                v
            }
            What::Ack { ack, duplicate } => {
                let mut v = otarig_agent::protocol::ack_json("", ack);
                if let Some(o) = v.as_object_mut() {
                    for k in ["v", "device"] {
                        o.remove(k);
                    }
                    o.insert("source".into(), json!("server"));
                    o.insert("kind".into(), json!("ack"));
                    o.insert("duplicate".into(), json!(duplicate));
                }
                v
            }
            What::Board(b) => {
                let mut v = serde_json::to_value(b).unwrap_or_default();
                if let Some(o) = v.as_object_mut() {
                    o.insert("source".into(), json!("board"));
                }
                v
            }
            What::AppCrashed => json!({"source": "board", "kind": "app-crashed"}),
            What::Release { sequence, version } => {
                json!({"source": "server", "kind": "release", "sequence": sequence, "version": version})
            }
            What::Rollout { sequence, message } => {
                json!({"source": "server", "kind": "rollout", "sequence": sequence, "message": message})
            }
        };
        let mut v = json!({"t_ms": self.t_ms, "device": self.device});
        if let (Some(o), Some(b)) = (v.as_object_mut(), body.as_object()) {
            o.extend(b.clone());
        }
        v
    }
}

/// What a board ended as.
#[derive(Clone, Debug, Default)]
pub struct DeviceReport {
    pub index: u32,
    pub id: String,
    /// Running app version, or `None` when bricked.
    pub version: Option<String>,
    pub running_slot: Option<String>,
    pub running_state: String,
    /// otadata state of the slot the last update was written into.
    pub update_slot_state: Option<String>,
    pub bricked: Option<String>,
    /// The app crashed at each of its last boots and nothing rolled it back.
    pub crash_loop: Option<String>,
    pub fetched_bytes: u64,
    pub image_size: u64,
    pub power_cuts: u32,
    /// SHA-256 of the running image, as read back from flash.
    pub running_sha256: Option<[u8; 32]>,
    pub efuse: u32,
    pub flash_ops: u64,
}

/// The result of one run.
pub struct Run {
    pub scenario: Scenario,
    pub records: Vec<Record>,
    pub devices: Vec<DeviceReport>,
    pub end_ms: u64,
    pub served_bytes: u64,
}

enum Ev {
    PowerOn,
    SelfTestDone(bool),
    Online,
    Manifest(Arc<Vec<u8>>),
    /// A payload on the release topic (retained announcement).
    Announcement(Arc<Vec<u8>>),
    /// A payload on the board's command topic; `retained` as the broker flags it.
    Command {
        payload: Arc<Vec<u8>>,
        retained: bool,
    },
    /// Parts of the answer to a fetch, for fetch generation `gen` of the board (a cancelled
    /// fetch's answer is dropped).
    Body {
        offset: u32,
        data: Vec<u8>,
        gen: u64,
    },
    BodyEnd(u64),
    /// The answer to `/ota/check`, for fetch generation `gen`.
    Session(Vec<u8>, u64),
    /// A chunk frame from `/ota/chunk`, for fetch generation `gen`.
    Chunk(Vec<u8>, u64),
    FetchFailed(String, u64),
    Timer,
    Release(usize),
    /// `statements[n]` starts being served.
    Statement(usize),
    /// The server's answers to this board freeze as they are now.
    Freeze,
    /// A connection of the board failed its TLS handshake.
    TlsFailed(otarig_agent::Peer, &'static str),
    /// Judge the current wave of the rollout of release k.
    WaveCheck(usize),
    Force {
        firmware: String,
    },
}

/// One simulated device as a runner drives it: the board, the agent running on it (none while
/// it is off or bricked) and what the checker needs to know about its life.
pub struct Dev {
    pub id: String,
    pub board: Board,
    pub agent: Option<Agent>,
    pub epoch: u64,
    pub behaviour: Behaviour,
    pub fetched: u64,
    pub image_size: u64,
    pub cuts: u32,
    pub off_for_ms: u64,
    pub bricked: Option<String>,
    pub update_slot: Option<String>,
    /// Consecutive boots whose app crashed before the agent ran.
    pub crash_streak: u32,
    pub crashed_version: String,
    /// The release channel this board follows.
    pub channel: String,
    /// How the server misbehaves towards this board, and how many more times (None: always).
    pub server_faults: Vec<(ServerFault, Option<u32>)>,
    /// Network outages planned for this board, and when the current one ends (virtual ms).
    pub outages: Vec<crate::scenario::Outage>,
    pub network_down_until: u64,
    /// The retained message on this board's command topic, if any.
    pub retained_cmd: Option<Arc<Vec<u8>>>,
    /// Bumped when the agent cancels a fetch: answers of older generations are dropped.
    pub fetch_gen: u64,
    /// A frozen mirror's answer to this board's polls (`Some(None)`: it answers 404).
    pub frozen: Option<Option<Arc<Vec<u8>>>>,
    /// Broken trust: this board's TLS handshakes fail, so it never comes online.
    pub tls_fault: Option<crate::scenario::TlsFault>,
}

impl Dev {
    /// The server fault that applies to a blob request, if any; `applies` decides whether it
    /// bites this request (a drop only bites a range that crosses its point). Counts it.
    pub fn server_fault(&mut self, applies: impl Fn(ServerFault) -> bool) -> Option<ServerFault> {
        let (fault, times) = self
            .server_faults
            .iter_mut()
            .find(|(f, t)| t.is_none_or(|n| n > 0) && applies(*f))?;
        if let Some(n) = times {
            *n -= 1;
        }
        Some(*fault)
    }

    /// The board just booted `version` at `now`: begin the outage planned for that version's
    /// first boot, if any. Returns when the network can be reached (`now` if it is up).
    pub fn network_up_at(&mut self, version: &str, now: u64) -> u64 {
        for o in &mut self.outages {
            if !o.begun && o.version == version {
                o.begun = true;
                self.network_down_until = self.network_down_until.max(now.saturating_add(o.for_ms));
            }
        }
        self.network_down_until.max(now)
    }
}

struct World {
    now: u64,
    seq: u64,
    queue: BTreeMap<(u64, u64), (usize, u64, Ev)>,
    devs: Vec<Dev>,
    store: Store,
    records: Vec<Record>,
    keys: Vec<TrustedKey>,
    cfg_template: Config,
    releases: Vec<SignedRelease>,
    /// Staged rollouts in progress, by release index.
    rollouts: Vec<Option<otarig_server::rollout::Rollout>>,
    scenario: Scenario,
    images: BTreeMap<String, Arc<Vec<u8>>>,
    statements: Vec<Vec<u8>>,
    /// The chunked protocol's server side, called in-process.
    chunks: otarig_server::chunked::ChunkService,
    fleet_key: Option<Arc<Vec<u8>>>,
}

/// Build the image of one scenario firmware.
pub fn build_firmware(s: &Scenario, fw: &Firmware) -> Vec<u8> {
    appimage::build(&AppSpec {
        project: s.device_type.clone(),
        version: fw.version.clone(),
        secure_version: fw.secure_version,
        size: fw.size,
        behaviour: Behaviour {
            self_test: fw.self_test,
            boot: fw.boot,
            network: fw.network,
        },
        chip_id: fw.chip_id,
    })
}

/// Options that override the scenario file.
#[derive(Clone, Debug, Default)]
pub struct RunOptions {
    pub devices: Option<u32>,
    pub seed: Option<u64>,
    /// Power cuts at these flash-operation indices on every board (the explorer's probes).
    pub cut_at_ops: Vec<u64>,
    /// Leave out the scenario's own `[[fault]]` power cuts.
    pub without_power_faults: bool,
}

/// A scenario release, signed and ready to announce.
#[derive(Clone, Debug)]
pub struct SignedRelease {
    pub device_type: String,
    pub channel: String,
    /// The signed manifest envelope, as the server answers and MQTT announces it.
    pub manifest: Vec<u8>,
    pub sequence: u64,
    pub version: String,
}

/// Everything a run needs that does not depend on seed, fleet size or faults: images,
/// patches, signed manifests, the factory-flashed board. Built once, shared by many runs (the
/// power-loss explorer runs thousands).
#[derive(Clone)]
pub struct Prepared {
    pub keys: Vec<TrustedKey>,
    pub images: BTreeMap<String, Arc<Vec<u8>>>,
    pub proto: Board,
    pub cfg_template: Config,
    pub store: Store,
    /// The signed releases, in scenario order.
    pub releases: Vec<SignedRelease>,
    /// The slot the factory-flashed board holds its starting firmware in.
    pub start_slot: SlotKind,
    /// The scenario's key sets and revocation lists, signed, in scenario order.
    pub statements: Vec<Vec<u8>>,
    /// The chunked protocol's fleet key (`download = "chunked"`).
    pub fleet_key: Option<Arc<Vec<u8>>>,
}

/// How board `device` fetches, given the run's fleet key (none: HTTP ranges).
pub fn fetch_mode(fleet_key: Option<&[u8]>, device: &str) -> otarig_agent::FetchMode {
    match fleet_key {
        Some(k) => {
            otarig_agent::FetchMode::Chunked(otarig_agent::chunk::ChunkKey::derive(k, device))
        }
        None => otarig_agent::FetchMode::Ranges,
    }
}

impl Prepared {
    /// How board `device` fetches: with the chunked protocol, under its own key derived
    /// from the fleet key.
    pub fn fetch_mode(&self, device: &str) -> otarig_agent::FetchMode {
        fetch_mode(self.fleet_key.as_deref().map(|k| &k[..]), device)
    }

    /// Every blob the scenario's releases use, by the SHA-256 it is served under (a tampered
    /// blob's name is the hash its manifest claims, not of its bytes).
    pub fn blobs(&self) -> impl Iterator<Item = (&[u8; 32], &Arc<Vec<u8>>)> {
        self.store.blobs()
    }

    /// Put every blob into a release store (`otarig release stage`), so that an external
    /// server over it serves this scenario; how many.
    pub fn stage_into(
        &self,
        store: &otarig_server::release_store::ReleaseStore,
    ) -> anyhow::Result<usize> {
        let mut n = 0;
        for (sha, bytes) in self.blobs() {
            if otarig_server::store::sha256(bytes) == *sha {
                store.put_blob(bytes)?;
            } else {
                store.put_blob_as(sha, bytes)?; // a scenario's deliberately tampered blob
            }
            n += 1;
        }
        Ok(n)
    }
}

/// Build images, patches and signed manifests for a scenario.
pub fn prepare(s: &Scenario) -> anyhow::Result<Prepared> {
    prepare_with(s, &|fw| Ok(build_firmware(s, fw)))
}

/// The agent configuration a scenario's firmware is built with (no device id yet): its
/// trusted keys, device type, channel and timings.
pub fn agent_config(s: &Scenario) -> anyhow::Result<Config> {
    let key_dir = otarig_server::keys::fixture_dir();
    let keys: Vec<TrustedKey> = s
        .trusted_keys
        .iter()
        .map(|id| NamedKey::load(&key_dir, id)?.trusted())
        .collect::<anyhow::Result<_>>()?;
    let mut cfg = Config::new("", &s.device_type, keys);
    (cfg.root_keys, cfg.timestamp_keys) = s.trust.firmware_keys()?;
    cfg.require_timestamp = s.trust.require_timestamp;
    cfg.channel = s.channel.clone();
    cfg.poll_interval_ms = s.poll_interval_ms;
    cfg.chunk_size = s.range_size;
    cfg.confirm_timeout_ms = s.confirm_timeout_ms;
    cfg.image_keys = board_image_keys(s)?;
    Ok(cfg)
}

/// The bootloader's sdkconfig for a scenario: rollback always, anti-rollback as it says.
pub fn boot_config(s: &Scenario) -> BootConfig {
    BootConfig {
        rollback: true,
        anti_rollback: s.anti_rollback,
    }
}

/// [`prepare`] with the firmware images from elsewhere (a real board's builds, for HIL).
pub fn prepare_with(
    s: &Scenario,
    image_of: &dyn Fn(&Firmware) -> anyhow::Result<Vec<u8>>,
) -> anyhow::Result<Prepared> {
    let key_dir = otarig_server::keys::fixture_dir();
    let cfg_template = agent_config(s)?;
    let keys = cfg_template.trusted_keys.clone();
    let mut images = BTreeMap::new();
    for (id, fw) in &s.firmware {
        images.insert(id.clone(), Arc::new(image_of(fw)?));
    }
    let table = Arc::new(s.table.clone());
    let start_slot = if table.factory().is_some() {
        SlotKind::Factory
    } else {
        SlotKind::Ota(0)
    };
    let boot_config = boot_config(s);
    let proto = Board::factory_flashed(
        table,
        boot_config,
        start_slot,
        &images[&s.start_firmware],
        s.efuse_secure_version,
    )
    .with_context(|| format!("flashing firmware '{}'", s.start_firmware))?;

    let mut store = Store::new();
    store.set_timestamps(s.trust.signer()?);
    let mut releases = Vec::new();
    for r in &s.releases {
        let fw = &s.firmware[&r.firmware];
        let full = images[&r.firmware].as_ref().clone();
        let signed_image = match r.tamper {
            Some(TamperDef::TruncateSigned(n)) => full[..n as usize].to_vec(),
            _ => full.clone(),
        };
        // What the server holds: the image, or its ciphertext (the manifest's hash and size
        // describe the plaintext either way).
        let (served, encryption) = match &r.encrypt {
            Some(e) => {
                let enc = encrypt_release(e, &signed_image, r.sequence)?;
                (enc.ciphertext, Some(enc.entry))
            }
            None => (signed_image.clone(), None),
        };
        let sha = otarig_server::store::sha256(&signed_image);
        let blob = store.put_blob(served.clone());
        match r.tamper {
            Some(TamperDef::Truncate(n)) => store.put_blob_as(blob, served[..n as usize].to_vec()),
            Some(TamperDef::CorruptByte(n)) => {
                let mut bad = served.clone();
                bad[n as usize] ^= 0x40;
                store.put_blob_as(blob, bad);
            }
            _ => {}
        }
        let mut deltas = Vec::new();
        for from in &r.delta_from {
            let old = &images[from];
            let patch = otarig_server::delta::make(old, &signed_image);
            let patch_sha = store.put_blob(patch.clone());
            if let Some(TamperDef::CorruptPatch(n)) = r.tamper {
                let mut bad = patch.clone();
                let at = (n as usize).min(bad.len() - 1);
                bad[at] ^= 0x40;
                store.put_blob_as(patch_sha, bad);
            }
            deltas.push(otarig_agent::manifest::DeltaRef {
                from_sha256: hex::encode(otarig_server::store::sha256(old)),
                sha256: hex::encode(patch_sha),
                size: patch.len() as u32,
                url: None,
            });
        }
        let issued_ms = EPOCH_MS + r.at_ms;
        let expires_ms = issued_ms as i64 + r.expires_in_ms;
        let m = Manifest {
            format: otarig_agent::manifest::FORMAT,
            device_type: r.device_type.clone(),
            channel: r.signed_channel.clone(),
            version: fw.version.clone(),
            secure_version: fw.secure_version,
            sequence: r.sequence,
            size: signed_image.len() as u32,
            sha256: hex::encode(sha),
            url: None,
            cid: None,
            deltas,
            encryption,
            issued_at: issued_ms / 1000,
            expires_at: (expires_ms.max(0) as u64) / 1000,
        };
        let key = NamedKey::load(&key_dir, &r.signed_by)?;
        // Published where this fleet looks; the manifest's own device type may say otherwise.
        releases.push(SignedRelease {
            device_type: s.device_type.clone(),
            channel: r.channel.clone(),
            manifest: key.sign_manifest(&m),
            sequence: r.sequence,
            version: fw.version.clone(),
        });
    }

    let statements = s
        .statements
        .iter()
        .map(|st| st.sign(&s.device_type))
        .collect::<anyhow::Result<_>>()?;
    let fleet_key = match s.download {
        crate::scenario::Download::Chunked => {
            let path = key_dir.join(otarig_server::chunked::FIXTURE_FLEET_KEY);
            Some(Arc::new(otarig_server::chunked::load_fleet_key(&path)?))
        }
        crate::scenario::Download::Ranges => None,
    };
    Ok(Prepared {
        keys,
        images,
        proto,
        cfg_template,
        store,
        releases,
        start_slot,
        statements,
        fleet_key,
    })
}

/// Encrypt a release's image for its key, reproducibly (the IV and the GCM key come from a
/// generator seeded with the release's sequence, so a scenario replays byte for byte).
fn encrypt_release(
    e: &crate::scenario::EncryptDef,
    image: &[u8],
    sequence: u64,
) -> anyhow::Result<otarig_server::encrypt::Encrypted> {
    use rand::SeedableRng;
    let key =
        otarig_server::encrypt::ImageKey::load(&e.key_path(&otarig_server::keys::fixture_dir()))?;
    let mut rng = rand_chacha::ChaCha20Rng::seed_from_u64(sequence);
    otarig_server::encrypt::encrypt(&key, image, &mut rng)
}

/// The image keys every simulated board holds (fixtures/keys), when a scenario encrypts.
fn board_image_keys(s: &Scenario) -> anyhow::Result<otarig_agent::cipher::ImageKeys> {
    use otarig_agent::cipher::{ImageKeys, Scheme};
    let mut keys = ImageKeys::default();
    if s.releases.iter().all(|r| r.encrypt.is_none()) {
        return Ok(keys);
    }
    let dir = otarig_server::keys::fixture_dir();
    let aes = dir.join(format!(
        "{}.hex",
        crate::scenario::EncryptDef::default_key(Scheme::Aes256Cbc)
    ));
    if let otarig_server::encrypt::ImageKey::Aes256(k) =
        otarig_server::encrypt::ImageKey::load(&aes)?
    {
        keys = keys.with_aes256(k);
    }
    let rsa = dir.join(format!(
        "{}.pem",
        crate::scenario::EncryptDef::default_key(Scheme::EspEncryptedImg)
    ));
    Ok(keys.with_rsa(otarig_server::encrypt::load_board_rsa(&rsa)?))
}

/// Run a scenario to its end.
pub fn run(scenario: &Scenario, opts: &RunOptions) -> anyhow::Result<Run> {
    run_prepared(scenario, &prepare(scenario)?, opts)
}

/// Run a scenario with artefacts from [`prepare`].
pub fn run_prepared(
    scenario: &Scenario,
    prep: &Prepared,
    opts: &RunOptions,
) -> anyhow::Result<Run> {
    let mut s = scenario.clone();
    if let Some(n) = opts.devices {
        s.set_devices(n);
    }
    if let Some(seed) = opts.seed {
        s.seed = seed;
    }
    let Prepared {
        keys,
        images,
        proto,
        cfg_template,
        store,
        releases,
        statements,
        fleet_key,
        ..
    } = prep.clone();
    let chunks = otarig_server::chunked::ChunkService::default();
    if let Some(k) = &fleet_key {
        chunks.enable(k);
    }
    let mut world = World {
        now: 0,
        seq: 0,
        queue: BTreeMap::new(),
        devs: Vec::with_capacity(s.devices as usize),
        store,
        records: Vec::new(),
        keys,
        cfg_template,
        releases,
        rollouts: vec![None; s.releases.len()],
        scenario: s.clone(),
        images,
        statements,
        chunks,
        fleet_key,
    };
    let first_size = s
        .releases
        .first()
        .map(|r| world.images[&r.firmware].len() as u64)
        .unwrap_or(0);
    for i in 0..s.devices {
        world.devs.push(new_device(&s, &proto, opts, first_size, i));
        // Stagger power-on a little so boards don't act in lockstep.
        world.schedule(i as usize, (i as u64 * 7) % 250, Ev::PowerOn);
    }
    for (k, r) in s.releases.iter().enumerate() {
        world.schedule(usize::MAX, r.at_ms, Ev::Release(k));
    }
    for (n, st) in s.statements.iter().enumerate() {
        world.schedule(usize::MAX, st.at_ms, Ev::Statement(n));
    }
    for (n, f) in s.faults.iter().enumerate() {
        let targets = (0..s.devices).filter(|i| f.devices.contains(*i));
        match &f.kind {
            FaultKind::Command(c) => {
                let targets: Vec<u32> = targets.collect();
                let ids: Vec<String> = targets.iter().map(|i| s.device_id(*i)).collect();
                let payloads = c.payloads(n, ids.iter().map(String::as_str))?;
                for (i, payload) in targets.into_iter().zip(payloads) {
                    let payload = Arc::new(payload);
                    if c.retained {
                        world.devs[i as usize].retained_cmd = Some(payload.clone());
                    }
                    for k in 0..c.repeat as u64 {
                        let ev = Ev::Command {
                            payload: payload.clone(),
                            retained: false,
                        };
                        world.schedule(i as usize, c.at_ms + k * 10, ev);
                    }
                }
                continue;
            }
            FaultKind::Payload { topic, text, at_ms } => {
                let payload = Arc::new(text.clone().into_bytes());
                for i in targets {
                    let ev = match topic {
                        crate::scenario::PayloadTopic::Cmd => Ev::Command {
                            payload: payload.clone(),
                            retained: false,
                        },
                        crate::scenario::PayloadTopic::Release => Ev::Announcement(payload.clone()),
                    };
                    world.schedule(i as usize, *at_ms, ev);
                }
                continue;
            }
            _ => {}
        }
        if let FaultKind::Freeze { at_ms } = f.kind {
            for i in (0..s.devices).filter(|i| f.devices.contains(*i)) {
                world.schedule(i as usize, at_ms, Ev::Freeze);
            }
        }
        if let FaultKind::ForceInstall { firmware, at_ms } = &f.kind {
            for i in (0..s.devices).filter(|i| f.devices.contains(*i)) {
                world.schedule(
                    i as usize,
                    *at_ms,
                    Ev::Force {
                        firmware: firmware.clone(),
                    },
                );
            }
        }
    }

    while let Some(((t, _), (d, epoch, ev))) = world.queue.pop_first() {
        if t > s.duration_ms {
            break;
        }
        world.now = t;
        // The broker's deliveries and the server's freeze do not depend on the board's boot.
        let not_of_a_boot = matches!(ev, Ev::Command { .. } | Ev::Freeze);
        if d != usize::MAX && world.devs[d].epoch != epoch && !not_of_a_boot {
            continue; // addressed to a boot that has since ended
        }
        world.dispatch(d, ev);
    }

    let devices = world
        .devs
        .iter()
        .enumerate()
        .map(|(i, d)| report(i as u32, d))
        .collect();
    Ok(Run {
        scenario: s.clone(),
        records: world.records,
        devices,
        end_ms: world.now.min(s.duration_ms),
        served_bytes: world.store.served_bytes(),
    })
}

/// Board `i` of the fleet, fresh from the programmer, with the scenario's power cuts planned.
pub fn new_device(s: &Scenario, proto: &Board, opts: &RunOptions, first_size: u64, i: u32) -> Dev {
    let mut board = proto.clone();
    let mut off_for_ms = 1_000;
    for (n, op) in opts.cut_at_ops.iter().enumerate() {
        board.plan_cut(CutPlan::AtOp { op: *op }, s.seed.wrapping_add(n as u64));
    }
    for f in s
        .faults
        .iter()
        .filter(|f| f.devices.contains(i) && !opts.without_power_faults)
    {
        if let FaultKind::PowerLoss(pl) = &f.kind {
            let plan = if let Some(op) = pl.flash_op {
                CutPlan::AtOp { op }
            } else if let Some(p) = pl.progress {
                CutPlan::DownloadReaches {
                    bytes: ((first_size * p as u64).div_ceil(100)).max(1) as u32,
                }
            } else {
                CutPlan::InPhase {
                    phase: pl.phase,
                    nth: pl.op.unwrap_or(0),
                }
            };
            board.plan_cut(
                plan,
                s.seed ^ (i as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15),
            );
            off_for_ms = pl.off_for_ms;
        }
    }
    Dev {
        off_for_ms,
        server_faults: s.server_faults_for(i),
        outages: s.outages_for(i),
        tls_fault: s.tls_fault_for(i),
        ..Dev::for_board(&s.device_id(i), s.channel_for(i), board)
    }
}

impl Dev {
    /// A board on its own (the virtual board): no scenario faults, the given id and channel.
    pub fn for_board(id: &str, channel: &str, board: Board) -> Dev {
        Dev {
            id: id.to_string(),
            board,
            agent: None,
            epoch: 0,
            behaviour: Behaviour::default(),
            fetched: 0,
            image_size: 0,
            cuts: 0,
            off_for_ms: 1_000,
            bricked: None,
            update_slot: None,
            crash_streak: 0,
            crashed_version: String::new(),
            channel: channel.to_string(),
            server_faults: Vec::new(),
            outages: Vec::new(),
            network_down_until: 0,
            retained_cmd: None,
            frozen: None,
            tls_fault: None,
            fetch_gen: 0,
        }
    }
}

pub fn report(index: u32, d: &Dev) -> DeviceReport {
    let b = &d.board;
    let running = b.running();
    let update_state = d.update_slot.as_ref().and_then(|label| {
        let slot = b
            .table()
            .app_slots()
            .into_iter()
            .find(|s| &s.kind.to_string() == label)?;
        Some(
            b.peek_slot_state(slot)
                .map(|s| s.name())
                .unwrap_or("none")
                .to_string(),
        )
    });
    let image = running.and_then(|s| b.peek_image(s));
    DeviceReport {
        index,
        id: d.id.clone(),
        version: image.as_ref().map(|i| i.version().to_string()),
        running_slot: running.map(|s| s.kind.to_string()),
        running_state: running
            .and_then(|s| b.peek_slot_state(s))
            .map(|s| s.name())
            .unwrap_or("none")
            .to_string(),
        update_slot_state: update_state,
        bricked: d.bricked.clone(),
        crash_loop: (d.crash_streak >= 3).then(|| {
            format!(
                "{} crashed at each of its last {} boots and nothing rolled it back",
                d.crashed_version, d.crash_streak
            )
        }),
        fetched_bytes: d.fetched,
        image_size: d.image_size,
        power_cuts: d.cuts,
        running_sha256: image.map(|i| i.sha256),
        efuse: b.efuse_secure_version(),
        flash_ops: b.flash.ops(),
    }
}

impl World {
    fn schedule(&mut self, d: usize, t: u64, ev: Ev) {
        let epoch = self.devs.get(d).map(|x| x.epoch).unwrap_or(0);
        self.seq += 1;
        self.queue.insert((t, self.seq), (d, epoch, ev));
    }

    fn record(&mut self, device: usize, what: What) {
        self.records.push(Record {
            t_ms: self.now,
            device: device as u32,
            what,
        });
    }

    fn dispatch(&mut self, d: usize, ev: Ev) {
        match ev {
            Ev::PowerOn => self.power_on(d),
            Ev::Release(k) if self.scenario.releases[k].rollout.is_some() => self.start_rollout(k),
            Ev::WaveCheck(k) => self.wave_check(k),
            Ev::Release(k) => {
                let SignedRelease {
                    device_type: dt,
                    channel: ch,
                    manifest: signed,
                    sequence: seq,
                    version,
                } = self.releases[k].clone();
                self.store.publish(&dt, &ch, signed.clone());
                self.record(
                    usize::MAX,
                    What::Release {
                        sequence: seq,
                        version,
                    },
                );
                if self.scenario.releases[k].announce {
                    self.announce(&dt, &ch, &signed);
                }
            }
            Ev::Statement(n) => {
                let signed = self.statements[n].clone();
                let dt = self.scenario.device_type.clone();
                match self.scenario.statements[n].kind {
                    crate::scenario::StatementKind::KeySet { .. } => self.store.set_keys(signed),
                    crate::scenario::StatementKind::Revocations { .. } => {
                        self.store.set_revocations(&dt, signed)
                    }
                }
                // The server renews the retained announcements with the new statement.
                for ch in self.scenario.renewed_channels(self.now) {
                    if let Some(m) = self.store.latest(&dt, &ch) {
                        self.announce(&dt, &ch, &m);
                    }
                }
            }
            Ev::Freeze => self.devs[d].frozen = Some(self.answer(d)),
            Ev::Force { firmware } => {
                let img = self.images[&firmware].clone();
                let dev = &mut self.devs[d];
                let target = dev.board.next_update_slot().map(|s| s.kind);
                if let Some(kind) = target {
                    if dev.board.force_install(kind, &img).is_ok() {
                        self.drain_board(d);
                        self.restart(d, 100);
                    }
                }
            }
            Ev::SelfTestDone(passed) => {
                let detail = if passed {
                    "all checks passed"
                } else {
                    "self-test reported failure"
                };
                self.feed(d, Input::SelfTestDone { passed, detail })
            }
            Ev::Online => {
                self.feed(d, Input::Online);
                // A retained message comes with every new subscription, flagged retained.
                if let Some(payload) = self.devs[d].retained_cmd.clone() {
                    self.feed(
                        d,
                        Input::Command {
                            payload: &payload,
                            retained: true,
                        },
                    );
                }
            }
            Ev::Manifest(bytes) => self.feed(d, Input::Manifest(&bytes)),
            Ev::TlsFailed(peer, detail) => self.feed(d, Input::TlsFailed { peer, detail }),
            Ev::Announcement(bytes) => self.feed(d, Input::Announcement(&bytes)),
            // A board the broker refused at the handshake gets no commands.
            Ev::Command { .. } if self.devs[d].tls_fault.is_some_and(|t| !t.server_side()) => {}
            Ev::Command { payload, retained } => self.feed(
                d,
                Input::Command {
                    payload: &payload,
                    retained,
                },
            ),
            Ev::Body { gen, .. }
            | Ev::BodyEnd(gen)
            | Ev::Session(_, gen)
            | Ev::Chunk(_, gen)
            | Ev::FetchFailed(_, gen)
                if gen != self.devs[d].fetch_gen => {} // answers a cancelled fetch
            Ev::Session(answer, _) => self.feed(d, Input::Session(&answer)),
            Ev::Chunk(frame, _) => self.feed(d, Input::Chunk(&frame)),
            Ev::Body { offset, data, .. } => self.feed(
                d,
                Input::Body {
                    offset,
                    data: &data,
                },
            ),
            Ev::BodyEnd(_) => self.feed(d, Input::BodyEnd),
            Ev::FetchFailed(reason, _) => self.feed(d, Input::FetchFailed { reason: &reason }),
            Ev::Timer => self.feed(d, Input::Timer),
        }
    }

    /// `POST /ota/check`, in-process.
    fn open_session(&mut self, d: usize, sequence: u64, sha256: [u8; 32], from: u32) {
        let (now, gen) = (self.now, self.devs[d].fetch_gen);
        let ev = match self.store.blob(&sha256) {
            None => Ev::FetchFailed("HTTP 404: no such blob".into(), gen),
            Some(blob) => {
                let id = &self.devs[d].id;
                match self
                    .chunks
                    .open(id, sequence, sha256, blob.len() as u64, from)
                {
                    Ok(answer) => Ev::Session(answer, gen),
                    Err(e) => Ev::FetchFailed(format!("/ota/check refused: {e}"), gen),
                }
            }
        };
        self.schedule(d, now + LATENCY_MS, ev);
    }

    /// `GET /ota/chunk`, in-process, with the board's server faults (an injected status, a
    /// stall, or a man in the middle's chunk).
    fn serve_chunk(&mut self, d: usize, session: [u8; 16], index: u32) {
        let (now, gen) = (self.now, self.devs[d].fetch_gen);
        let id = self.devs[d].id.clone();
        let fault = self.devs[d].server_fault(ServerFault::shapes_chunk);
        let chunk_fault = match fault {
            Some(ServerFault::Status(st)) => {
                let ev = Ev::FetchFailed(format!("HTTP {st}"), gen);
                return self.schedule(d, now + LATENCY_MS, ev);
            }
            Some(ServerFault::Stall) => {
                let why = format!("no answer within {} s", FETCH_TIMEOUT_MS / 1000);
                return self.schedule(d, now + FETCH_TIMEOUT_MS, Ev::FetchFailed(why, gen));
            }
            Some(ServerFault::Chunk(f)) => Some(f),
            _ => None,
        };
        let frame = self
            .chunks
            .lookup(&id, &hex::encode(session))
            .and_then(|found| {
                let blob = self.store.blob(&found.sha256).unwrap_or_default();
                self.chunks.frame(&id, index, &blob, chunk_fault)
            });
        match frame {
            Ok(frame) => {
                let n = frame.len() as u64;
                self.devs[d].fetched += n;
                let t = now + LATENCY_MS + n.div_ceil(BYTES_PER_MS);
                self.schedule(d, t, Ev::Chunk(frame, gen));
            }
            Err(e) => {
                let ev = Ev::FetchFailed(format!("/ota/chunk refused: {e}"), gen);
                self.schedule(d, now + LATENCY_MS, ev);
            }
        }
    }

    /// Answer a range request; with `cut`, the connection drops at that blob position.
    /// Answer a range request: the bytes arrive after the latency plus their transfer time at
    /// the board's link speed, or at `throttle` bytes per second when the server paces them.
    fn serve(
        &mut self,
        d: usize,
        sha256: [u8; 32],
        offset: u32,
        len: u64,
        cut: Option<u64>,
        throttle: Option<u32>,
    ) {
        let (now, gen) = (self.now, self.devs[d].fetch_gen);
        match self.store.serve(&sha256, offset as u64, len) {
            Served::Bytes(mut data) => {
                let dropped = cut
                    .map(|c| c.saturating_sub(offset as u64) as usize)
                    .filter(|n| *n < data.len());
                if let Some(n) = dropped {
                    data.truncate(n);
                }
                let n = data.len() as u64;
                self.devs[d].fetched += n;
                let transfer = match throttle {
                    Some(bps) => (n * 1000).div_ceil(bps.max(1) as u64),
                    None => n.div_ceil(BYTES_PER_MS),
                };
                let t = now + LATENCY_MS + transfer;
                self.schedule(d, t, Ev::Body { offset, data, gen });
                match dropped {
                    Some(n) => self.schedule(
                        d,
                        t,
                        Ev::FetchFailed(format!("connection closed after {n} bytes"), gen),
                    ),
                    None => self.schedule(d, t, Ev::BodyEnd(gen)),
                }
            }
            Served::NotFound => self.schedule(
                d,
                now + LATENCY_MS,
                Ev::FetchFailed("HTTP 404: no such blob".into(), gen),
            ),
            Served::RangeNotSatisfiable { len } => self.schedule(
                d,
                now + LATENCY_MS,
                Ev::FetchFailed(
                    format!("HTTP 416: range starts at {offset}, the blob has {len} bytes"),
                    gen,
                ),
            ),
        }
    }

    /// Endless data: the blob from `offset` to its end, then [`ENDLESS_JUNK`] bytes of junk
    /// (as much as a board receives before it cuts the answer); no end of the answer ever
    /// comes (the board must stop reading by itself).
    fn serve_endless(&mut self, d: usize, sha256: [u8; 32], offset: u32) {
        let (now, gen) = (self.now, self.devs[d].fetch_gen);
        if let Served::Bytes(mut data) = self.store.serve(&sha256, offset as u64, u64::MAX) {
            data.extend(std::iter::repeat_n(0xA5, ENDLESS_JUNK));
            self.devs[d].fetched += data.len() as u64;
            let t = now + LATENCY_MS + (data.len() as u64).div_ceil(BYTES_PER_MS);
            self.schedule(d, t, Ev::Body { offset, data, gen });
        }
    }

    /// The manifest of a rollout whose waves include board `d`, newest release first.
    /// Whether board `i` is connected to the broker now: running, its network up, and its
    /// TLS handshake with the broker not broken.
    fn hears_broker(&self, i: usize) -> bool {
        let dev = &self.devs[i];
        dev.agent.is_some()
            && self.now >= dev.network_down_until
            && dev.tls_fault.is_none_or(|t| t.server_side())
    }

    /// What board `d`'s TLS stack says of the firmware server, when its certificate is broken
    /// (the request never gets through).
    fn server_refused(&self, d: usize) -> Option<&'static str> {
        let t = self.devs[d].tls_fault?;
        t.server_side().then(|| t.detail())
    }

    /// Publish the retained announcement of `manifest` for a device type and channel: every
    /// board of it that is up and online hears it.
    fn announce(&mut self, dt: &str, ch: &str, manifest: &[u8]) {
        let payload = match self.store.statements(dt).announcement(manifest) {
            Ok(p) => Arc::new(p),
            Err(_) => return,
        };
        for i in 0..self.devs.len() {
            // A board whose network is down hears nothing; it polls when it is back.
            if self.hears_broker(i)
                && dt == self.cfg_template.device_type
                && ch == self.devs[i].channel
            {
                self.schedule(i, self.now + LATENCY_MS, Ev::Announcement(payload.clone()));
            }
        }
    }

    /// What the server answers board `d`'s poll now: its rollout offer or its channel's
    /// latest release, with the statements and a fresh timestamp.
    fn answer(&self, d: usize) -> Option<Arc<Vec<u8>>> {
        let dt = &self.cfg_template.device_type;
        let manifest = self
            .rollout_offer(d)
            .or_else(|| self.store.latest(dt, &self.devs[d].channel))?;
        let now_s = (EPOCH_MS + self.now) / 1000;
        self.store.answer(dt, &manifest, now_s).map(Arc::new)
    }

    fn rollout_offer(&self, d: usize) -> Option<Arc<Vec<u8>>> {
        (0..self.rollouts.len()).rev().find_map(|k| {
            let r = self.rollouts[k].as_ref()?;
            r.contains(d as u32)
                .then(|| Arc::new(self.releases[k].manifest.clone()))
        })
    }

    fn start_rollout(&mut self, k: usize) {
        let Some(plan) = self.scenario.releases[k].rollout.clone() else {
            return;
        };
        let SignedRelease {
            channel: ch,
            sequence: seq,
            version,
            ..
        } = self.releases[k].clone();
        self.record(
            usize::MAX,
            What::Release {
                sequence: seq,
                version,
            },
        );
        let eligible = (0..self.devs.len() as u32)
            .filter(|i| self.devs[*i as usize].channel == ch)
            .collect();
        let mut r = otarig_server::rollout::Rollout::new(plan.clone(), eligible);
        let first = r.start();
        self.rollouts[k] = Some(r);
        self.offer(k, &first, 0);
        self.schedule(usize::MAX, self.now + plan.interval_ms, Ev::WaveCheck(k));
    }

    /// Tell these boards about release k (the server pushes it to them: an `update-now`).
    fn offer(&mut self, k: usize, boards: &[u32], wave: usize) {
        let now = self.now;
        let seq = self.releases[k].sequence;
        self.record(
            usize::MAX,
            What::Rollout {
                sequence: seq,
                message: format!("wave {} starts: {} board(s)", wave + 1, boards.len()),
            },
        );
        // The board polls at once (the wire's `update-now`) and gets its offer.
        let answer = self.store.answer(
            &self.cfg_template.device_type,
            &self.releases[k].manifest,
            (EPOCH_MS + now) / 1000,
        );
        if let Some(answer) = answer.map(Arc::new) {
            for b in boards {
                self.schedule(*b as usize, now + LATENCY_MS, Ev::Manifest(answer.clone()));
            }
        }
    }

    fn wave_check(&mut self, k: usize) {
        let seq = self.releases[k].sequence;
        let failed: HashSet<String> = self
            .store
            .acks()
            .iter()
            .filter(|a| a.ack.sequence == seq && a.ack.outcome != otarig_agent::Outcome::Installed)
            .map(|a| a.device.clone())
            .collect();
        let ids: Vec<String> = self.devs.iter().map(|d| d.id.clone()).collect();
        let Some(r) = self.rollouts[k].as_mut() else {
            return;
        };
        let interval = r.plan().interval_ms;
        match r.check(|b| failed.contains(&ids[b as usize])) {
            otarig_server::rollout::Step::Next(boards) => {
                let wave = self.rollouts[k].as_ref().map_or(0, |r| r.wave());
                self.offer(k, &boards, wave);
                self.schedule(usize::MAX, self.now + interval, Ev::WaveCheck(k));
            }
            otarig_server::rollout::Step::Halted {
                wave,
                failed,
                members,
            } => self.record(
                usize::MAX,
                What::Rollout {
                    sequence: seq,
                    message: format!(
                        "halted after wave {}: {failed} of {members} board(s) failed",
                        wave + 1
                    ),
                },
            ),
            otarig_server::rollout::Step::Done => {
                let SignedRelease {
                    device_type: dt,
                    channel: ch,
                    manifest: signed,
                    ..
                } = self.releases[k].clone();
                self.store.publish(&dt, &ch, signed);
                self.record(
                    usize::MAX,
                    What::Rollout {
                        sequence: seq,
                        message: "complete".into(),
                    },
                );
            }
        }
    }

    fn power_on(&mut self, d: usize) {
        let now = self.now;
        let outcome = self.devs[d].board.boot();
        self.drain_board(d);
        match outcome {
            BootOutcome::App(booted) => {
                let dev = &mut self.devs[d];
                dev.behaviour = booted.behaviour;
                if booted.behaviour.boot == BootBehaviour::Crash {
                    dev.crash_streak += 1;
                    dev.crashed_version = booted.info.version().to_string();
                    self.record(d, What::AppCrashed);
                    return self.restart(d, 2_000);
                }
                dev.crash_streak = 0;
                let mut cfg = self.cfg_template.clone();
                cfg.device_id = dev.id.clone();
                cfg.fetch = fetch_mode(self.fleet_key.as_deref().map(|k| &k[..]), &dev.id);
                cfg.channel = dev.channel.clone();
                cfg.trusted_keys = self.keys.clone();
                dev.agent = Some(Agent::new(cfg));
                self.feed(d, Input::Boot);
                let dev = &mut self.devs[d];
                let up = dev.network_up_at(booted.info.version(), now);
                if dev.agent.is_some() && dev.behaviour.network == NetworkBehaviour::Ok {
                    let ev = match dev.tls_fault.filter(|t| !t.server_side()) {
                        Some(t) => Ev::TlsFailed(otarig_agent::Peer::Broker, t.detail()),
                        None => Ev::Online,
                    };
                    self.schedule(d, up + CONNECT_MS, ev);
                }
            }
            BootOutcome::Bricked(reason) => self.devs[d].bricked = Some(reason),
            BootOutcome::PowerLost => self.power_lost(d),
        }
    }

    /// Reset: RAM is gone, pending deliveries to this boot are dropped.
    fn restart(&mut self, d: usize, after_ms: u64) {
        let now = self.now;
        let dev = &mut self.devs[d];
        dev.agent = None;
        dev.epoch += 1;
        self.schedule(d, now + after_ms, Ev::PowerOn);
    }

    fn power_lost(&mut self, d: usize) {
        self.devs[d].cuts += 1;
        let off = self.devs[d].off_for_ms;
        self.restart(d, off);
    }

    fn drain_board(&mut self, d: usize) {
        for e in self.devs[d].board.take_events() {
            if let BoardEvent::OtaBegin { slot, .. } = &e {
                self.devs[d].update_slot = Some(slot.clone());
            }
            self.record(d, What::Board(e));
        }
    }

    fn feed(&mut self, d: usize, input: Input<'_>) {
        let now = self.now;
        let dev = &mut self.devs[d];
        let Some(agent) = dev.agent.as_mut() else {
            return;
        };
        agent.handle(&mut dev.board, self.scenario.wall.read(now), input);
        self.drain_board(d);
        if !self.devs[d].board.is_powered() {
            // The cut stopped the CPU: whatever the agent meant to do next never happens.
            return self.power_lost(d);
        }
        let mut actions = Vec::new();
        if let Some(agent) = self.devs[d].agent.as_mut() {
            while let Some(a) = agent.poll_action() {
                actions.push(a);
            }
        }
        for a in actions {
            self.act(d, a);
        }
    }

    fn act(&mut self, d: usize, a: Action) {
        let now = self.now;
        // A firmware server whose certificate the board refuses: no request gets through.
        if let Some(detail) = self.server_refused(d) {
            let fetch = matches!(
                a,
                Action::Fetch { .. } | Action::OpenSession { .. } | Action::FetchChunk { .. }
            );
            if fetch || matches!(a, Action::PollManifest) {
                let ev = Ev::TlsFailed(otarig_agent::Peer::Server, detail);
                self.schedule(d, now + LATENCY_MS, ev);
                if fetch {
                    let (why, gen) = (format!("request failed: {detail}"), self.devs[d].fetch_gen);
                    self.schedule(d, now + LATENCY_MS, Ev::FetchFailed(why, gen));
                }
                return;
            }
        }
        match a {
            Action::RunSelfTest => {
                let passed = self.devs[d].behaviour.self_test == SelfTest::Pass;
                self.schedule(d, now + SELF_TEST_MS, Ev::SelfTestDone(passed));
            }
            Action::PollManifest => {
                let answer = match &self.devs[d].frozen {
                    Some(frozen) => frozen.clone(),
                    None => self.answer(d),
                };
                if let Some(m) = answer {
                    self.schedule(d, now + LATENCY_MS, Ev::Manifest(m));
                }
            }
            Action::Fetch {
                sha256,
                offset,
                len,
                ..
            } => {
                let gen = self.devs[d].fetch_gen;
                let total = self.store.blob(&sha256).map_or(0, |b| b.len() as u64);
                let (start, end) = (offset as u64, offset as u64 + len as u64);
                let cut_of = |p: u32| total * p as u64 / 100;
                let fault = self.devs[d].server_fault(|f| match f {
                    ServerFault::DropAfterPercent(p) => {
                        start < cut_of(p) && cut_of(p) < end.min(total)
                    }
                    f => f.shapes_range(),
                });
                let throttle =
                    match self.devs[d].server_fault(|f| matches!(f, ServerFault::Throttle(_))) {
                        Some(ServerFault::Throttle(bps)) => Some(bps),
                        _ => None,
                    };
                match fault {
                    Some(ServerFault::Status(st)) => self.schedule(
                        d,
                        now + LATENCY_MS,
                        Ev::FetchFailed(format!("HTTP {st}"), gen),
                    ),
                    Some(ServerFault::Stall) => self.schedule(
                        d,
                        now + FETCH_TIMEOUT_MS,
                        Ev::FetchFailed(
                            format!("no answer within {} s", FETCH_TIMEOUT_MS / 1000),
                            gen,
                        ),
                    ),
                    Some(ServerFault::NoRange) => {
                        self.serve(d, sha256, 0, u64::MAX, None, throttle)
                    }
                    Some(ServerFault::Endless) => self.serve_endless(d, sha256, offset),
                    Some(ServerFault::DropAfterPercent(p)) => {
                        self.serve(d, sha256, offset, len as u64, Some(cut_of(p)), throttle)
                    }
                    Some(ServerFault::Throttle(_) | ServerFault::Chunk(_)) | None => {
                        self.serve(d, sha256, offset, len as u64, None, throttle)
                    }
                }
            }
            Action::OpenSession {
                sequence,
                sha256,
                from,
                ..
            } => self.open_session(d, sequence, sha256, from),
            Action::FetchChunk { session, index } => self.serve_chunk(d, session, index),
            Action::Report(e) => {
                if let Event::Downloading { size, .. } = &e {
                    self.devs[d].image_size = *size as u64;
                }
                if let Event::Verified { sequence } = &e {
                    // The shell's `POST /ota/verify`; without a session, nothing to mark.
                    let _ = self.chunks.verified(&self.devs[d].id, *sequence);
                }
                self.record(d, What::Agent(e));
            }
            Action::Ack(ack) => {
                let id = self.devs[d].id.clone();
                if self.fleet_key.is_some() {
                    // `POST /ota/complete` carries the ack with the chunked protocol.
                    let _ = self.chunks.completed(&id, ack.sequence, ack.outcome.name());
                }
                let fresh = self.store.ack(&id, ack.clone());
                self.record(
                    d,
                    What::Ack {
                        ack,
                        duplicate: !fresh,
                    },
                );
            }
            Action::WakeAt(t) => {
                let at = self.scenario.wall.virtual_time(t).max(now);
                self.schedule(d, at, Ev::Timer);
            }
            Action::Reboot => self.restart(d, BOOT_MS),
            Action::CancelFetch => self.devs[d].fetch_gen += 1,
        }
    }
}

/// For reports: the otadata state name of a slot, "none" for no entry.
pub fn state_name(s: Option<OtaImgState>) -> &'static str {
    s.map(|s| s.name()).unwrap_or("none")
}
