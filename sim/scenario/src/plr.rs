//! The power-loss explorer: cut power at flash operations of an update and check that the
//! board always recovers.
//!
//! A *golden* run (one board, no cuts) counts every flash operation of the scenario: sector
//! erases and page programs of the image, the journal, otadata and confirmation. A *probe*
//! re-runs the scenario from scratch with a cut at operation `k` (and optionally a second cut
//! `k2` during recovery: a double fault), tearing that operation as chosen by the seed. After
//! each probe these invariants must hold:
//!
//! 1. the board always boots (never bricked);
//! 2. every image it ever starts is one of the scenario's images, byte-exact (its SHA-256);
//! 3. it ends on the same version as the golden run (it converges, or stays where it should);
//! 4. it re-downloads at most one checkpoint interval plus one range per cut;
//! 5. it never starts an OTA app while otadata has no valid entry (that would be the
//!    bootloader's fallback scan rescuing a broken selection, not the design working);
//!
//! plus the checker's own invariants (no program over unerased flash, no storage error).
//! Every failing probe comes with a one-line reproduction.

use std::collections::BTreeSet;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::expect::judge;
use crate::runner::{build_firmware, prepare, run_prepared, Prepared, Run, RunOptions, What};
use crate::scenario::Scenario;
use otarig_esp32s3::board::BoardEvent;

/// Bytes a resume may re-download per cut: the agent's checkpoint interval plus one range,
/// plus, for a delta, what the patch spends over one interval of output beyond the output
/// itself (2-byte block lengths, bsdiff control entries, stored blocks of incompressible data)
/// and the block a patch resumes inside (it restarts at that block's first byte). 1/8 of the
/// interval plus one 4 KiB block covers the worst the random explorer has found (an 8 KiB to
/// 132 KiB delta of incompressible data: 4,190 bytes over interval + range).
pub fn refetch_bound() -> u64 {
    let c = otarig_agent::Config::new("", "", Vec::new());
    let block = 1u64 << otarig_agent::delta::BLOCK_LOG2;
    let interval = c.checkpoint_interval as u64;
    interval + interval / 8 + block + c.chunk_size as u64
}

/// What the golden run established.
#[derive(Clone)]
pub struct Golden {
    /// Images, patches and manifests, built once for every probe.
    pub prepared: Prepared,
    pub ops: u64,
    pub final_version: String,
    pub image_size: u64,
    /// Bytes fetched without a cut (a scenario may download more than once on purpose).
    pub fetched: u64,
    /// The scenario's server ignores `Range` for the board, so every resume starts over from
    /// byte 0 and may re-download the whole image: that is the bound per cut then.
    pub ranges_ignored: bool,
    /// A release of the scenario is encrypted in a format that cannot resume
    /// (esp_encrypted_img): a cut starts its download over, header included.
    pub restarts: bool,
    /// Bytes an answer carries past the blob's end (an endless server's junk, which the board
    /// receives before it cuts the answer): added to the bound per cut.
    pub junk_per_answer: u64,
    pub known_images: BTreeSet<String>,
}

/// One probe and what went wrong in it.
#[derive(Clone, Debug)]
pub struct Probe {
    pub cuts: Vec<u64>,
    pub seed: u64,
    pub violations: Vec<String>,
    /// Bytes fetched beyond the image size.
    pub refetched: u64,
    /// The violations are a hazard the scenario acknowledges (`plr-known-hazards`).
    pub known_hazard: Option<String>,
    /// Cuts that actually happened (a cut past the end of the run never fires).
    pub fired: u32,
}

impl Probe {
    /// The command that replays this probe exactly.
    pub fn repro(&self, file: &Path, broken: Option<&str>) -> String {
        let at: Vec<String> = self.cuts.iter().map(u64::to_string).collect();
        let broken = broken.map(|b| format!(" --broken {b}")).unwrap_or_default();
        format!(
            "otarig plr {} --at {} --seed {}{broken}",
            file.display(),
            at.join(","),
            self.seed
        )
    }
}

/// The outcome of an exploration.
#[derive(Debug, Default)]
pub struct Report {
    pub explored: u64,
    pub ops: u64,
    pub failures: Vec<Probe>,
    /// Probes whose violations are an acknowledged hazard of the scenario.
    pub known: Vec<Probe>,
    pub worst_refetch: u64,
    /// What a resume may re-download per cut in this scenario (see [`Golden::refetch_per_cut`]).
    pub refetch_per_cut: u64,
    pub elapsed: Duration,
}

fn one_board(s: &Scenario) -> Scenario {
    let mut s = s.clone();
    s.set_devices(1);
    s
}

/// Count the operations of the update and record where it ends.
pub fn golden(s: &Scenario) -> anyhow::Result<Golden> {
    let s = one_board(s);
    let prepared = prepare(&s)?;
    let opts = RunOptions {
        without_power_faults: true,
        ..Default::default()
    };
    let r = run_prepared(&s, &prepared, &opts)?;
    let d = &r.devices[0];
    let known_images = s
        .firmware
        .values()
        .map(|fw| hex::encode(otarig_server::store::sha256(&build_firmware(&s, fw))))
        .collect();
    let failures = judge(&r, Some(&[]));
    if let Some(f) = failures.first() {
        anyhow::bail!("the scenario fails even without a power cut: {f}");
    }
    use crate::scenario::ServerFault;
    let faults = s.server_faults_for(0);
    let endless = faults.iter().any(|(f, _)| *f == ServerFault::Endless);
    let ranges_ignored = endless || faults.iter().any(|(f, _)| *f == ServerFault::NoRange);
    let restarts = s.releases.iter().any(|r| {
        r.encrypt
            .as_ref()
            .is_some_and(|e| !otarig_agent::cipher::resumable(e.scheme))
    });
    let junk_per_answer = if endless {
        crate::runner::ENDLESS_JUNK as u64
    } else {
        0
    };
    Ok(Golden {
        prepared,
        fetched: d.fetched_bytes,
        ranges_ignored,
        restarts,
        junk_per_answer,
        ops: d.flash_ops,
        final_version: d.version.clone().unwrap_or_default(),
        image_size: d.image_size,
        known_images,
    })
}

impl Golden {
    /// Bytes a resume may re-download per cut, and why: [`refetch_bound`], or the whole image
    /// when the server ignores `Range` or the image is encrypted with AES-GCM (every resume
    /// starts over from byte 0).
    pub fn refetch_per_cut(&self) -> (u64, &'static str) {
        if self.restarts {
            let header = otarig_agent::cipher::esp_img::HEADER_LEN as u64;
            (
                (self.image_size + header).max(refetch_bound()),
                "the whole ciphertext: an esp_encrypted_img download cannot resume",
            )
        } else if self.ranges_ignored {
            (
                self.image_size.max(refetch_bound()) + self.junk_per_answer,
                "the whole image (and an endless answer's junk): this server ignores Range",
            )
        } else {
            (
                refetch_bound(),
                "checkpoint interval, patch framing over it, one range",
            )
        }
    }
}

/// Run one probe: cuts at `cuts` (flash operation indices), tearing chosen by `seed`.
pub fn probe(s: &Scenario, g: &Golden, cuts: &[u64], seed: u64) -> anyhow::Result<Probe> {
    let s = one_board(s);
    let opts = RunOptions {
        seed: Some(seed),
        cut_at_ops: cuts.to_vec(),
        without_power_faults: true,
        ..Default::default()
    };
    let r = run_prepared(&s, &g.prepared, &opts)?;
    let mut p = assess(&r, g, cuts, seed);
    if s.plr_known_hazards.iter().any(|h| h == "crash-loop") && r.devices[0].crash_loop.is_some() {
        p.known_hazard = Some("crash-loop".into());
    }
    Ok(p)
}

fn assess(r: &Run, g: &Golden, cuts: &[u64], seed: u64) -> Probe {
    let d = &r.devices[0];
    let mut v: Vec<String> = judge(r, Some(&[]))
        .iter()
        .map(|f| format!("{}: {}", f.check, f.seen))
        .collect();
    for rec in &r.records {
        if let What::Board(BoardEvent::BootloaderStarted {
            slot,
            version,
            sha256,
            otadata_valid,
            ..
        }) = &rec.what
        {
            if !g.known_images.contains(sha256) {
                v.push(format!("booted {version} from {slot} whose SHA-256 {sha256} is none of the scenario's images"));
            }
            if *otadata_valid == 0 && slot.starts_with("ota_") {
                v.push(format!(
                    "booted {slot} at t={} ms while otadata had no valid entry",
                    rec.t_ms
                ));
            }
        }
    }
    let final_version = d.version.clone().unwrap_or_else(|| "nothing".into());
    if final_version != g.final_version {
        v.push(format!(
            "ended on {final_version}, the run without a cut ends on {}",
            g.final_version
        ));
    }
    let refetched = d.fetched_bytes.saturating_sub(g.fetched);
    let (per_cut, why) = g.refetch_per_cut();
    let bound = per_cut * d.power_cuts.max(1) as u64;
    if refetched > bound {
        v.push(format!(
            "re-downloaded {refetched} bytes more than the run without a cut, after {} cut(s); the bound is {per_cut} per cut ({why})",
            d.power_cuts
        ));
    }
    Probe {
        known_hazard: None,
        cuts: cuts.to_vec(),
        seed,
        violations: v,
        refetched,
        fired: d.power_cuts,
    }
}

/// Progress callback: (probes done, total or 0 when open-ended).
pub type Progress<'a> = &'a (dyn Fn(u64, u64) + Sync);

/// Cut at every operation of the golden run, one probe each, on `threads` threads.
pub fn exhaustive(
    s: &Scenario,
    seed: u64,
    threads: usize,
    progress: Progress,
) -> anyhow::Result<Report> {
    let g = golden(s)?;
    let total = g.ops;
    let mut report = explore(s, &g, threads, total, progress, |i| {
        (i < total).then(|| (vec![i], seed))
    })?;
    report.failures.sort_by_key(|p| p.cuts.clone());
    Ok(report)
}

/// Random probes until `budget` runs out: single cuts, double faults (a second cut during
/// recovery) and varied tearing, each from its own seed derived from `seed`.
pub fn random(
    s: &Scenario,
    seed: u64,
    budget: Duration,
    threads: usize,
    progress: Progress,
) -> anyhow::Result<Report> {
    let g = golden(s)?;
    let started = Instant::now();
    let ops = g.ops.max(1);
    explore(s, &g, threads, 0, progress, |i| {
        if started.elapsed() >= budget {
            return None;
        }
        let mut rng = ChaCha8Rng::seed_from_u64(seed ^ i.wrapping_mul(0x9E37_79B9_7F4A_7C15));
        let probe_seed = rng.gen::<u64>();
        let k1 = rng.gen_range(0..ops);
        let cuts = if rng.gen_bool(0.5) {
            // The recovery after a cut is short: aim the second cut just after it.
            vec![k1, k1 + 1 + rng.gen_range(0..256)]
        } else {
            vec![k1]
        };
        Some((cuts, probe_seed))
    })
}

/// Run probes `next(0)`, `next(1)`, … on `threads` threads until `next` says `None` or a
/// probe cannot run at all.
fn explore(
    s: &Scenario,
    g: &Golden,
    threads: usize,
    total: u64,
    progress: Progress,
    next: impl Fn(u64) -> Option<(Vec<u64>, u64)> + Sync,
) -> anyhow::Result<Report> {
    let started = Instant::now();
    let counter = AtomicU64::new(0);
    let done = AtomicU64::new(0);
    let stop = AtomicBool::new(false);
    let out = Mutex::new(Report {
        ops: g.ops,
        refetch_per_cut: g.refetch_per_cut().0,
        ..Default::default()
    });
    let error = Mutex::new(None);
    std::thread::scope(|scope| {
        for _ in 0..threads.max(1) {
            scope.spawn(|| {
                while !stop.load(Ordering::Relaxed) {
                    let Some((cuts, seed)) = next(counter.fetch_add(1, Ordering::Relaxed)) else {
                        break;
                    };
                    match probe(s, g, &cuts, seed) {
                        Ok(p) => record(&out, p),
                        Err(e) => {
                            *error.lock().unwrap_or_else(|p| p.into_inner()) = Some(e);
                            stop.store(true, Ordering::Relaxed);
                        }
                    }
                    progress(done.fetch_add(1, Ordering::Relaxed) + 1, total);
                }
            });
        }
    });
    if let Some(e) = error.into_inner().unwrap_or_else(|p| p.into_inner()) {
        return Err(e);
    }
    let mut report = out.into_inner().unwrap_or_else(|p| p.into_inner());
    report.elapsed = started.elapsed();
    Ok(report)
}

fn record(out: &Mutex<Report>, p: Probe) {
    let mut r = out.lock().unwrap_or_else(|p| p.into_inner());
    r.explored += 1;
    r.worst_refetch = r.worst_refetch.max(p.refetched);
    if p.known_hazard.is_some() {
        r.known.push(p);
    } else if !p.violations.is_empty() {
        r.failures.push(p);
    }
}
