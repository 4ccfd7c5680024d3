//! `otarig bench …`: figures for the README. Build with --release; numbers are printed, never
//! asserted (machines are noisy).

use std::path::Path;
use std::process::{Command, ExitCode};
use std::time::Instant;

use otarig_fleet::bench::{self as fleet_bench, ShardLaunch};
use otarig_fleet::fleet::Shard;

use otarig_esp32s3::appimage::{build, AppSpec};
use otarig_scenario::plr;
use otarig_scenario::scenario::Scenario;

#[derive(clap::Subcommand)]
pub enum Cmd {
    /// Exhaustive power-loss exploration of 1 MiB full and delta updates: cut points per
    /// second and wall time.
    Plr {
        #[arg(long)]
        threads: Option<usize>,
    },
    /// Patch sizes and apply throughput on 1 MiB image pairs, against Python bsdiff4 (bz2)
    /// when `python3 -c "import bsdiff4"` works.
    Delta,
    /// Decrypt throughput of the agent's streaming decryptors (AES-256-CBC and
    /// esp_encrypted_img's AES-256-GCM) on a 16 MiB image, next to the SHA-256 every update
    /// already pays, on this machine.
    Crypto,
    /// N boards each update a 1 MiB image through the embedded broker and server, in real
    /// time: boards/s, MB/s, peak RSS and RSS per board.
    Fleet {
        #[arg(long, default_value_t = 1000)]
        devices: u32,
        /// An external broker (mqtt://HOST:PORT) instead of the embedded rumqttd (one
        /// process) or a Mosquitto started for the run (shards).
        #[arg(long)]
        broker: Option<String>,
        /// Board processes. Default: up to 1,000 boards, none (boards, embedded broker and
        /// server in this one process); more, one per 1,250 boards, with the firmware server
        /// in this process and the broker (Mosquitto, or --broker) in its own.
        #[arg(long)]
        shards: Option<u32>,
        /// Everything over mutual TLS (HTTPS and MQTTS with a certificate per board; the
        /// broker is Mosquitto with the per-device ACL).
        #[arg(long)]
        tls: bool,
    },
    /// One shard of a sharded `bench fleet` (started by it; prints its figures as JSON).
    #[command(hide = true)]
    FleetShard {
        #[arg(long)]
        devices: u32,
        #[arg(long)]
        shard: u32,
        #[arg(long)]
        shards: u32,
        #[arg(long)]
        broker: String,
        #[arg(long)]
        server: String,
        /// Virtual time 0, in ms since the Unix epoch.
        #[arg(long)]
        epoch_ms: u64,
        /// Over mutual TLS: the PKI directory that issues this shard's certificates.
        #[arg(long)]
        pki: Option<std::path::PathBuf>,
    },
}

pub fn run(cmd: Cmd) -> anyhow::Result<ExitCode> {
    match cmd {
        Cmd::Plr { threads } => plr(threads),
        Cmd::Delta => delta(),
        Cmd::Crypto => crypto(),
        Cmd::Fleet {
            devices,
            broker,
            shards,
            tls,
        } => fleet_bench::fleet(devices, broker, shards, tls, &shard_command),
        Cmd::FleetShard {
            devices,
            shard,
            shards,
            broker,
            server,
            epoch_ms,
            pki,
        } => fleet_bench::fleet_shard(ShardLaunch {
            devices,
            shard: Shard {
                index: shard,
                count: shards,
            },
            broker,
            server,
            epoch_ms,
            pki,
        }),
    }
}

/// A shard of `bench fleet` is this program again, as `otarig bench fleet-shard`, at nice 10.
///
/// The shards stand in for thousands of boards, each with a CPU of its own; at the same
/// priority their worker threads took most of this machine's two cores from what the
/// benchmark measures, the firmware server and the broker: Mosquitto's one thread got 0.65 of
/// a core while 10,000 boards reconnected after their reboots, and its handshakes set the
/// pace. Niced, the boards still do all their work, after the broker's and the server's.
fn shard_command(l: &ShardLaunch) -> Command {
    let exe = std::env::current_exe().unwrap_or_else(|_| "otarig".into());
    let mut c = Command::new("nice");
    c.args(["-n", "10"])
        .arg(exe)
        .args(["bench", "fleet-shard"])
        .args(["--devices", &l.devices.to_string()])
        .args(["--shard", &l.shard.index.to_string()])
        .args(["--shards", &l.shard.count.to_string()])
        .args(["--broker", &l.broker, "--server", &l.server])
        .args(["--epoch-ms", &l.epoch_ms.to_string()]);
    if let Some(p) = &l.pki {
        c.arg("--pki").arg(p);
    }
    c
}

fn scenario(name: &str) -> anyhow::Result<Scenario> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../scenarios")
        .join(name);
    Scenario::load(&path).map_err(|e| anyhow::anyhow!("{e}"))
}

fn plr(threads: Option<usize>) -> anyhow::Result<ExitCode> {
    if cfg!(debug_assertions) {
        eprintln!("warning: a debug build; run `cargo run --release -p otarig -- bench plr` for real figures");
    }
    let threads =
        threads.unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    println!("exhaustive power-loss exploration, {threads} thread(s)");
    println!(
        "{:<34} {:>8} {:>10} {:>12} {:>10}",
        "scenario", "ops", "wall s", "cuts/s", "violations"
    );
    let mut rates = Vec::new();
    for name in [
        "plr-1mib-full.toml",
        "plr-1mib-delta.toml",
        // Benchmark-only: the encrypted-update scenarios cover them under `cargo test`.
        "bench/plr-1mib-encrypted.toml",
        "bench/plr-1mib-esp-encrypted.toml",
        "bench/plr-1mib-chunked.toml",
    ] {
        let s = scenario(name)?;
        let r = plr::exhaustive(&s, 1, threads, &|_, _| {})?;
        let rate = r.explored as f64 / r.elapsed.as_secs_f64();
        rates.push(rate);
        println!(
            "{:<34} {:>8} {:>10.1} {:>12.0} {:>10}",
            name,
            r.ops,
            r.elapsed.as_secs_f64(),
            rate,
            r.failures.len()
        );
    }
    println!(
        "cut-point rate vs full: delta {:.2}x, aes-256-cbc {:.2}x, esp_encrypted_img {:.2}x, chunked {:.2}x",
        rates[1] / rates[0],
        rates[2] / rates[0],
        rates[3] / rates[0],
        rates[4] / rates[0]
    );
    Ok(ExitCode::SUCCESS)
}

fn crypto() -> anyhow::Result<ExitCode> {
    use otarig_agent::cipher::{Decryptor, ImageKeys};
    use otarig_server::encrypt::{encrypt, load_board_rsa, ImageKey};
    use rand::SeedableRng;
    if cfg!(debug_assertions) {
        eprintln!("warning: a debug build; run `cargo run --release -p otarig -- bench crypto` for real figures");
    }
    let dir = otarig_server::keys::fixture_dir();
    let plain = build(&AppSpec::new("bench", "1.0.0", 16 << 20));
    let aes = ImageKey::load(&dir.join("aes-256-image.hex"))?;
    let rsa = ImageKey::load(&dir.join("rsa-3072-image.pem"))?;
    let mut keys = ImageKeys::default().with_rsa(load_board_rsa(&dir.join("rsa-3072-image.pem"))?);
    if let ImageKey::Aes256(k) = &aes {
        keys = keys.with_aes256(*k);
    }
    let mb = plain.len() as f64 / 1e6;
    let t = Instant::now();
    let sha = otarig_server::store::sha256(&plain);
    println!(
        "{:<34} {:>8.0} MB/s",
        "SHA-256 (the slot check)",
        mb / t.elapsed().as_secs_f64()
    );
    let mut rng = rand_chacha::ChaCha20Rng::seed_from_u64(1);
    for (label, key) in [
        ("AES-256-CBC decrypt", &aes),
        ("esp_encrypted_img decrypt", &rsa),
    ] {
        let enc = encrypt(key, &plain, &mut rng)?;
        let t = Instant::now();
        let mut d = Decryptor::new(&enc.entry, plain.len() as u32, &keys, 0)?;
        let mut h = <sha2::Sha256 as sha2::Digest>::new();
        let mut sink = |p: &[u8]| -> Result<(), std::convert::Infallible> {
            sha2::Digest::update(&mut h, p);
            Ok(())
        };
        // In 16 KiB ranges, as the agent asks for them.
        for chunk in enc.ciphertext.chunks(16 * 1024) {
            d.feed(chunk, &mut sink)
                .map_err(|e| anyhow::anyhow!("{e:?}"))?;
        }
        d.finish(&mut sink).map_err(|e| anyhow::anyhow!("{e:?}"))?;
        let secs = t.elapsed().as_secs_f64();
        anyhow::ensure!(
            sha2::Digest::finalize(h).as_slice() == sha,
            "{label}: wrong plaintext"
        );
        println!(
            "{label:<34} {:>8.0} MB/s   (with the SHA-256 of the plaintext)",
            mb / secs
        );
    }
    chunk_tags(&plain)
}

/// The chunked protocol's check on the board (parse, HMAC-SHA256 over header and 1 KiB,
/// sequence) over frames the server made, and the server's side (making them).
fn chunk_tags(blob: &[u8]) -> anyhow::Result<ExitCode> {
    use otarig_agent::chunk::{frame, ChunkKey, Place, Session, CHUNK_SIZE};
    let key = ChunkKey::derive(b"bench fleet key", "bench-0");
    let place = |index| Place {
        device: "bench-0",
        session: [7; 16],
        sequence: 1,
        index,
    };
    let t = Instant::now();
    let frames: Vec<Vec<u8>> = blob
        .chunks(CHUNK_SIZE as usize)
        .enumerate()
        .map(|(n, c)| frame(&key, &place(n as u32), c))
        .collect();
    let made = t.elapsed().as_secs_f64();
    let mut session = Session {
        id: [7; 16],
        sequence: 1,
        size: blob.len() as u32,
        next: 0,
    };
    let t = Instant::now();
    let mut taken = 0usize;
    for f in &frames {
        taken += session
            .take(&key, "bench-0", f)
            .map_err(|e| anyhow::anyhow!("{e}"))?
            .len();
    }
    let checked = t.elapsed().as_secs_f64();
    anyhow::ensure!(taken == blob.len(), "chunks lost");
    let mb = blob.len() as f64 / 1e6;
    println!(
        "{:<34} {:>8.0} MB/s   ({:.0} chunks/s)",
        "chunk check (HMAC-SHA256, 1 KiB)",
        mb / checked,
        frames.len() as f64 / checked
    );
    println!(
        "{:<34} {:>8.0} MB/s",
        "chunk frames made (server)",
        mb / made
    );
    Ok(ExitCode::SUCCESS)
}

fn delta() -> anyhow::Result<ExitCode> {
    if cfg!(debug_assertions) {
        eprintln!("warning: a debug build; run `cargo run --release -p otarig -- bench delta` for real figures");
    }
    let dir = tempfile_dir()?;
    println!(
        "{:<26} {:>10} {:>12} {:>11} {:>14}",
        "pair (1 MiB images)", "raw", "otarig LZ4", "% of image", "apply MB/s"
    );
    let mut py_rows = Vec::new();
    for (label, a_ver, b_ver, shift) in [
        ("patch release", "1.0.0", "1.0.1", 0u32),
        ("minor release", "1.0.0", "1.1.0", 4096),
    ] {
        let a = build(&AppSpec::new("bench", a_ver, 1 << 20));
        let b = build(&AppSpec::new("bench", b_ver, (1 << 20) + shift));
        let mut raw = Vec::new();
        let _ = bsdiff::diff(&a, &b, &mut raw);
        let patch = otarig_server::delta::container(&a, &b, &raw);
        let t = Instant::now();
        let mut n = 0;
        while t.elapsed().as_millis() < 1000 || n < 3 {
            let out = otarig_server::delta::apply(&a, &patch)?;
            assert_eq!(out.len(), b.len());
            n += 1;
        }
        let mbs = n as f64 * b.len() as f64 / 1e6 / t.elapsed().as_secs_f64();
        println!(
            "{:<26} {:>10} {:>12} {:>10.2}% {:>14.0}",
            label,
            raw.len(),
            patch.len(),
            patch.len() as f64 * 100.0 / b.len() as f64,
            mbs
        );
        let (pa, pb) = (
            dir.join(format!("{label}-a.bin")),
            dir.join(format!("{label}-b.bin")),
        );
        std::fs::write(&pa, &a)?;
        std::fs::write(&pb, &b)?;
        py_rows.push((label, pa, pb, patch.len(), mbs));
    }
    let probe = Command::new("python3")
        .args(["-c", "import bsdiff4"])
        .output();
    if !probe.is_ok_and(|o| o.status.success()) {
        println!("(Python bsdiff4 not installed: `pip install bsdiff4` for the comparison)");
        return Ok(ExitCode::SUCCESS);
    }
    println!("\nagainst Python bsdiff4 (BSDIFF40, bzip2), same pairs:");
    println!(
        "{:<26} {:>12} {:>12} {:>10} {:>16}",
        "pair", "bsdiff4 B", "otarig B", "size ratio", "apply speed ratio"
    );
    for (label, pa, pb, ours, our_mbs) in py_rows {
        let script = format!(
            "import bsdiff4,time\na=open({:?},'rb').read();b=open({:?},'rb').read()\np=bsdiff4.diff(a,b)\nt=time.time();n=0\nwhile time.time()-t<1 or n<3:\n  bsdiff4.patch(a,p);n+=1\nprint(len(p), n*len(b)/1e6/(time.time()-t))",
            pa.display().to_string(),
            pb.display().to_string()
        );
        let out = Command::new("python3").args(["-c", &script]).output()?;
        let text = String::from_utf8_lossy(&out.stdout);
        let mut it = text.split_whitespace();
        let (Some(size), Some(mbs)) = (
            it.next().and_then(|x| x.parse::<f64>().ok()),
            it.next().and_then(|x| x.parse::<f64>().ok()),
        ) else {
            println!(
                "{label}: python failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            continue;
        };
        println!(
            "{:<26} {:>12} {:>12} {:>9.2}x {:>15.2}x",
            label,
            size,
            ours,
            ours as f64 / size,
            our_mbs / mbs
        );
    }
    println!("(size ratio: otarig / bsdiff4, lower is smaller; speed ratio: otarig / bsdiff4, higher is faster.\n bsdiff4 applies in memory with the whole old and new image; otarig streams with 8 KiB of buffers.)");
    let _ = std::fs::remove_dir_all(&dir);
    Ok(ExitCode::SUCCESS)
}

fn tempfile_dir() -> anyhow::Result<std::path::PathBuf> {
    let d = std::env::temp_dir().join(format!("otarig-bench-{}", std::process::id()));
    std::fs::create_dir_all(&d)?;
    Ok(d)
}
