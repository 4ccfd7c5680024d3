//! Peak heap of the agent during a 1 MiB full update, measured with a counting allocator.
//!
//! Only allocations made by the agent count: the simulated board's own allocations (flash
//! sectors) happen with counting paused, through the [`Untracked`] adapter. The figure is
//! printed (`cargo test --test agent_heap -- --nocapture`) and bounded, so a change that makes
//! the agent buffer the image fails here.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::sync::atomic::{AtomicIsize, Ordering};
use std::sync::Arc;

use otarig_agent::cipher::{ImageKeys, Scheme};
use otarig_agent::manifest::Manifest;
use otarig_agent::{
    Action, Agent, Config, EspResult, Input, OtaImgState, Platform, Slot, SlotKind,
};
use otarig_esp32s3::appimage::{self, AppSpec};
use otarig_esp32s3::board::{Board, BootConfig, BootOutcome};
use otarig_esp32s3::partition::PartitionTable;
use otarig_server::encrypt::ImageKey;
use otarig_server::keys::{fixture_dir, NamedKey};

struct Counting;

thread_local! {
    static TRACK: Cell<bool> = const { Cell::new(false) };
}
static CURRENT: AtomicIsize = AtomicIsize::new(0);
static PEAK: AtomicIsize = AtomicIsize::new(0);

fn tracking() -> bool {
    TRACK.try_with(|t| t.get()).unwrap_or(false)
}

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if tracking() {
            let now = CURRENT.fetch_add(layout.size() as isize, Ordering::Relaxed)
                + layout.size() as isize;
            PEAK.fetch_max(now, Ordering::Relaxed);
        }
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        if tracking() {
            CURRENT.fetch_sub(layout.size() as isize, Ordering::Relaxed);
        }
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

fn tracked<T>(f: impl FnOnce() -> T) -> T {
    TRACK.with(|t| t.set(true));
    let out = f();
    TRACK.with(|t| t.set(false));
    out
}

fn untracked<T>(f: impl FnOnce() -> T) -> T {
    let was = TRACK.with(|t| t.replace(false));
    let out = f();
    TRACK.with(|t| t.set(was));
    out
}

/// The board with counting paused for everything it does.
struct Untracked<'a>(&'a mut Board);

impl Platform for Untracked<'_> {
    fn running_slot(&self) -> Slot {
        untracked(|| self.0.running_slot())
    }
    fn next_update_slot(&self) -> Option<Slot> {
        untracked(|| self.0.next_update_slot())
    }
    fn slot_state(&mut self, s: Slot) -> EspResult<Option<OtaImgState>> {
        untracked(|| self.0.slot_state(s))
    }
    fn ota_begin(&mut self, s: Slot) -> EspResult<()> {
        untracked(|| self.0.ota_begin(s))
    }
    fn ota_resume(&mut self, s: Slot, o: u32) -> EspResult<()> {
        untracked(|| self.0.ota_resume(s, o))
    }
    fn ota_write(&mut self, d: &[u8]) -> EspResult<()> {
        untracked(|| self.0.ota_write(d))
    }
    fn ota_end(&mut self) -> EspResult<()> {
        untracked(|| self.0.ota_end())
    }
    fn ota_abort(&mut self) {
        untracked(|| self.0.ota_abort())
    }
    fn set_boot_partition(&mut self, s: Slot) -> EspResult<()> {
        untracked(|| self.0.set_boot_partition(s))
    }
    fn mark_app_valid_cancel_rollback(&mut self) -> EspResult<()> {
        untracked(|| self.0.mark_app_valid_cancel_rollback())
    }
    fn mark_app_invalid_rollback(&mut self) -> EspResult<()> {
        untracked(|| self.0.mark_app_invalid_rollback())
    }
    fn slot_read(&mut self, s: Slot, o: u32, b: &mut [u8]) -> EspResult<()> {
        untracked(|| self.0.slot_read(s, o, b))
    }
    fn state_size(&self) -> u32 {
        untracked(|| self.0.state_size())
    }
    fn state_read(&mut self, o: u32, b: &mut [u8]) -> EspResult<()> {
        untracked(|| self.0.state_read(o, b))
    }
    fn state_erase_sector(&mut self, o: u32) -> EspResult<()> {
        untracked(|| self.0.state_erase_sector(o))
    }
    fn state_write(&mut self, o: u32, d: &[u8]) -> EspResult<()> {
        untracked(|| self.0.state_write(o, d))
    }
    fn efuse_secure_version(&mut self) -> u32 {
        untracked(|| self.0.efuse_secure_version())
    }
}

static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// What kind of update [`peak_heap_of_update`] runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Full,
    Delta,
    Encrypted(Scheme),
    /// By the chunked protocol, AES-256-CBC encrypted (the three layers together).
    Chunked,
}

/// The image key the board holds, and the update encrypted for it.
fn encrypted(scheme: Scheme, image: &[u8]) -> (BoardKey, otarig_server::encrypt::Encrypted) {
    use rand::SeedableRng;
    let dir = fixture_dir();
    let (keys, key) = match scheme {
        Scheme::Aes256Cbc => {
            let key = ImageKey::load(&dir.join("aes-256-image.hex")).unwrap();
            let ImageKey::Aes256(k) = key else {
                panic!("an AES key")
            };
            (BoardKey::Aes(k), key)
        }
        Scheme::EspEncryptedImg => {
            let private = otarig_server::encrypt::load_board_rsa(&dir.join("rsa-3072-image.pem"));
            let key = ImageKey::load(&dir.join("rsa-3072-image.pem")).unwrap();
            (BoardKey::Rsa(Box::new(private.unwrap())), key)
        }
    };
    let mut rng = rand_chacha::ChaCha20Rng::seed_from_u64(1);
    (
        keys,
        otarig_server::encrypt::encrypt(&key, image, &mut rng).unwrap(),
    )
}

/// A board's image key as loaded (outside the count).
#[derive(Clone)]
enum BoardKey {
    None,
    Aes([u8; 32]),
    Rsa(Box<rsa::RsaPrivateKey>),
}

impl BoardKey {
    /// A fresh copy, made where the count sees it: the agent holds its key in RAM.
    fn image_keys(&self) -> ImageKeys {
        match self.clone() {
            BoardKey::None => ImageKeys::default(),
            BoardKey::Aes(k) => ImageKeys::default().with_aes256(k),
            BoardKey::Rsa(k) => ImageKeys::default().with_rsa(*k),
        }
    }
}

/// Run one 1 MiB update through the agent and return its peak heap in bytes.
fn peak_heap_of_update(kind: Kind) -> isize {
    let delta = kind == Kind::Delta;
    let _one_at_a_time = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    CURRENT.store(0, Ordering::Relaxed);
    PEAK.store(0, Ordering::Relaxed);
    const NOW: u64 = 1_767_225_600_000;
    let table = Arc::new(PartitionTable::default_two_ota());
    let v1 = appimage::build(&AppSpec::new("heap", "1.0.0", 1024 * 1024 - 4096));
    let v2 = appimage::build(&AppSpec::new("heap", "2.0.0", 1024 * 1024 - 64));
    let patch = otarig_server::delta::make(&v1, &v2);
    let mut board =
        Board::factory_flashed(table, BootConfig::default(), SlotKind::Factory, &v1, 0).unwrap();
    assert!(matches!(board.boot(), BootOutcome::App(_)));
    let key = NamedKey::load(&fixture_dir(), "rsa-test").unwrap();
    let trusted = vec![key.trusted().unwrap()];
    let patch_sha = otarig_server::store::sha256(&patch);
    let (image_keys, served, encryption) = match kind {
        Kind::Encrypted(scheme) => {
            let (keys, enc) = encrypted(scheme, &v2);
            (keys, enc.ciphertext, Some(enc.entry))
        }
        Kind::Chunked => {
            let (keys, enc) = encrypted(Scheme::Aes256Cbc, &v2);
            (keys, enc.ciphertext, Some(enc.entry))
        }
        _ => (BoardKey::None, v2.clone(), None),
    };
    let manifest = key.sign_manifest(&Manifest {
        format: 1,
        device_type: "heap".into(),
        channel: "stable".into(),
        version: "2.0.0".into(),
        secure_version: 0,
        sequence: 1,
        size: v2.len() as u32,
        sha256: hex::encode(otarig_server::store::sha256(&v2)),
        url: None,
        cid: None,
        deltas: if delta {
            vec![otarig_agent::manifest::DeltaRef {
                from_sha256: hex::encode(otarig_server::store::sha256(&v1)),
                sha256: hex::encode(patch_sha),
                size: patch.len() as u32,
                url: None,
            }]
        } else {
            Vec::new()
        },
        encryption,
        issued_at: NOW / 1000,
        expires_at: NOW / 1000 + 3600,
    });

    // The answer as a server with every statement sends it: a key set naming the release key,
    // a full revocation list and a timestamp, which the board requires.
    let root = NamedKey::load(&fixture_dir(), "ed25519-root").unwrap();
    let stamper = NamedKey::load(&fixture_dir(), "ed25519-timestamp").unwrap();
    let keys = otarig_server::statements::key_set(
        &root,
        1,
        std::slice::from_ref(&key),
        std::slice::from_ref(&stamper),
        None,
    )
    .unwrap();
    let revoked = otarig_agent::trust::RevocationsBody {
        device_type: "heap".into(),
        serial: 1,
        sequences: (100..100 + otarig_agent::trust::MAX_REVOKED as u64).collect(),
        images: vec![hex::encode([7u8; 32]); otarig_agent::trust::MAX_REVOKED],
    };
    let revocations = otarig_server::statements::revocation_list(&key, &revoked).unwrap();
    let signer = otarig_server::statements::TimestampSigner {
        key: stamper.clone(),
        valid_for_s: 600,
    };
    let statements = otarig_server::statements::Statements {
        keys: Some(&keys),
        revocations: Some(&revocations),
    };
    let manifest = statements
        .answer(&manifest, Some(&signer), NOW / 1000)
        .unwrap();
    let mut cfg = Config::new("dev-0", "heap", trusted.clone());
    cfg.root_keys = vec![root.trusted().unwrap()];
    cfg.require_timestamp = true;
    let mut actions: Vec<Action> = Vec::with_capacity(64);
    const FLEET: &[u8] = b"heap fleet key";
    let mut agent = tracked(|| {
        let mut cfg = cfg.clone();
        cfg.image_keys = image_keys.image_keys();
        if kind == Kind::Chunked {
            let key = otarig_agent::chunk::ChunkKey::derive(FLEET, "dev-0");
            cfg.fetch = otarig_agent::FetchMode::Chunked(key);
        }
        Agent::new(cfg)
    });
    // The server's side of the chunked protocol, outside the count. A chunk's frame (at most
    // 1,090 bytes) is the shell's receive buffer, not the agent's heap.
    let chunks = otarig_server::chunked::ChunkService::default();
    chunks.enable(FLEET);
    let mut answer: Option<(bool, Vec<u8>)> = None;
    let mut inputs: Vec<Input> = vec![Input::Boot, Input::Online, Input::Manifest(&manifest)];
    let mut fetched_patch = false;
    let mut rebooted = false;
    let mut frames = 0;
    while (!inputs.is_empty() || answer.is_some()) && !rebooted {
        let owned = answer.take();
        let input = match &owned {
            Some((true, session)) => Input::Session(session),
            Some((false, frame)) => Input::Chunk(frame),
            None => inputs.remove(0),
        };
        tracked(|| {
            agent.handle(&mut Untracked(&mut board), NOW, input);
            while let Some(a) = agent.poll_action() {
                actions.push(a);
            }
        });
        for a in actions.drain(..) {
            if let Action::Fetch {
                offset,
                len,
                sha256,
                ..
            } = &a
            {
                let blob: &[u8] = if *sha256 == patch_sha {
                    &patch
                } else {
                    &served
                };
                fetched_patch |= *sha256 == patch_sha;
                let (o, l) = (*offset as usize, *len as usize);
                inputs.push(Input::Body {
                    offset: *offset,
                    data: &blob[o..o + l],
                });
                inputs.push(Input::BodyEnd);
            }
            match &a {
                Action::OpenSession {
                    sequence,
                    sha256,
                    from,
                    ..
                } => {
                    let len = served.len() as u64;
                    let open = untracked(|| chunks.open("dev-0", *sequence, *sha256, len, *from));
                    answer = Some((true, open.unwrap()));
                }
                Action::FetchChunk { index, .. } => {
                    let frame = untracked(|| chunks.frame("dev-0", *index, &served, None));
                    answer = Some((false, frame.unwrap()));
                    frames += 1;
                }
                _ => {}
            }
            rebooted |= a == Action::Reboot;
            tracked(|| drop(a));
        }
    }
    assert!(rebooted, "the update did not finish");
    assert_eq!(kind == Kind::Chunked, frames > 1000, "{frames} chunks");
    assert_eq!(fetched_patch, delta, "delta used: {fetched_patch}");
    let slot = board.next_update_slot().unwrap();
    assert!(board
        .peek_image(slot)
        .is_some_and(|i| i.version() == "2.0.0"));
    let peak = PEAK.load(Ordering::Relaxed);
    assert!(
        peak > 0,
        "nothing was counted: the allocator hook is not working"
    );
    let what = match kind {
        Kind::Full => "full",
        Kind::Delta => "delta",
        Kind::Encrypted(s) => s.name(),
        Kind::Chunked => "chunked aes-256-cbc",
    };
    println!(
        "agent peak heap during a {} byte {what} update: {peak} bytes ({:.1} KiB)",
        v2.len(),
        peak as f64 / 1024.0
    );
    peak
}

#[test]
fn peak_agent_heap_during_a_1_mib_full_update() {
    let peak = peak_heap_of_update(Kind::Full);
    assert!(
        peak < 32 * 1024,
        "agent peak heap {peak} bytes exceeds 32 KiB"
    );
}

#[test]
fn peak_agent_heap_during_a_1_mib_delta_update() {
    let peak = peak_heap_of_update(Kind::Delta);
    assert!(
        peak <= 32 * 1024,
        "agent peak heap {peak} bytes exceeds 32 KiB"
    );
}

/// Encrypted and chunked updates may take 16 KiB more than the 22.8 KiB a plain one took when
/// they came.
const ENCRYPTED_BUDGET: isize = (22_800 + 16 * 1024) as isize;

#[test]
fn peak_agent_heap_during_a_1_mib_aes_256_cbc_update() {
    let peak = peak_heap_of_update(Kind::Encrypted(Scheme::Aes256Cbc));
    assert!(
        peak <= ENCRYPTED_BUDGET,
        "agent peak heap {peak} bytes exceeds {ENCRYPTED_BUDGET}"
    );
}

#[test]
fn peak_agent_heap_during_a_1_mib_esp_encrypted_img_update() {
    let peak = peak_heap_of_update(Kind::Encrypted(Scheme::EspEncryptedImg));
    assert!(
        peak <= ENCRYPTED_BUDGET,
        "agent peak heap {peak} bytes exceeds {ENCRYPTED_BUDGET}"
    );
}

#[test]
fn peak_agent_heap_during_a_1_mib_chunked_encrypted_update() {
    let peak = peak_heap_of_update(Kind::Chunked);
    assert!(
        peak <= ENCRYPTED_BUDGET,
        "agent peak heap {peak} bytes exceeds {ENCRYPTED_BUDGET}"
    );
}
