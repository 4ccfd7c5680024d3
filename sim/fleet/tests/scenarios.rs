//! Every `scenarios/*.toml` and `scenarios/attacks/*.toml` becomes four named tests:
//! - `<name>`: run it on the deterministic simulator; every expectation and invariant holds;
//! - `<name>::can_fail`: each expectation, replaced by a false one, is reported as failing on
//!   the same run (a scenario whose checks cannot fail proves nothing);
//! - `<name>::replays`: a second run from the same seed gives the same event stream;
//! - `<name>::wire`: the scenario again with every board on real sockets (its own MQTT
//!   connection to an embedded broker, HTTP to the firmware server, on loopback); every
//!   expectation holds, and each board ends exactly as in the in-process run.
//!
//! Adding a file adds its tests. Filter as usual: `cargo test --test scenarios -- power`.

use std::path::{Path, PathBuf};

use libtest_mimic::{Arguments, Failed, Trial};
use otarig_scenario::expect::{falsified, judge};
use otarig_scenario::runner::{run, RunOptions};
use otarig_scenario::scenario::{Expect, Scenario};
use otarig_scenario::summary;

fn scenario_files() -> Vec<PathBuf> {
    let dir = scenario_dir();
    otarig_scenario::scenario::files_in(&dir)
        .unwrap_or_else(|e| panic!("cannot list {}: {e}", dir.display()))
}

fn scenario_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../scenarios")
}

/// `full-update`, or `attacks/forged-commands` for a file in a subdirectory.
fn test_name(path: &Path) -> String {
    let dir = scenario_dir();
    let rel = path.strip_prefix(&dir).unwrap_or(path).with_extension("");
    rel.to_string_lossy().replace('\\', "/")
}

fn load(path: &Path) -> Result<Scenario, Failed> {
    Scenario::load(path).map_err(|e| Failed::from(e.to_string()))
}

fn passes(path: &Path) -> Result<(), Failed> {
    let s = load(path)?;
    let r = run(&s, &RunOptions::default()).map_err(|e| Failed::from(format!("{e:#}")))?;
    let failures = judge(&r, None);
    if failures.is_empty() {
        Ok(())
    } else {
        Err(summary::render(&r, &failures).into())
    }
}

fn can_fail(path: &Path) -> Result<(), Failed> {
    let s = load(path)?;
    let r = run(&s, &RunOptions::default()).map_err(|e| Failed::from(format!("{e:#}")))?;
    let mut unfalsifiable = Vec::new();
    for e in &s.expects {
        for c in &e.checks {
            let lie = Expect {
                devices: e.devices.clone(),
                checks: vec![falsified(c)],
                at: e.at.clone(),
            };
            if judge(&r, Some(std::slice::from_ref(&lie))).is_empty() {
                unfalsifiable.push(format!(
                    "{}: `{}` still passes when changed to {:?}",
                    e.at,
                    c.key(),
                    lie.checks[0]
                ));
            }
        }
    }
    if unfalsifiable.is_empty() {
        Ok(())
    } else {
        Err(unfalsifiable.join("\n").into())
    }
}

fn replays(path: &Path) -> Result<(), Failed> {
    let s = load(path)?;
    let stream = |s: &Scenario| -> Result<Vec<String>, Failed> {
        let r = run(s, &RunOptions::default()).map_err(|e| Failed::from(format!("{e:#}")))?;
        Ok(r.records.iter().map(|x| x.to_json().to_string()).collect())
    };
    let (a, b) = (stream(&s)?, stream(&s)?);
    if a.is_empty() {
        return Err("the run produced no events".into());
    }
    match a.iter().zip(&b).position(|(x, y)| x != y) {
        None if a.len() == b.len() => Ok(()),
        None => Err(format!("runs differ in length: {} vs {} events", a.len(), b.len()).into()),
        Some(i) => Err(format!("runs diverge at event {i}:\n  {}\n  {}", a[i], b[i]).into()),
    }
}

/// What must be the same for a board whichever way the scenario ran.
fn outcome(run: &otarig_scenario::runner::Run) -> Vec<String> {
    use otarig_scenario::runner::What;
    run.devices
        .iter()
        .map(|d| {
            let mine = || run.records.iter().filter(|r| r.device == d.index);
            let mut refusals: Vec<&str> = mine()
                .filter_map(|r| match &r.what {
                    What::Agent(otarig_agent::Event::Refused { check, .. }) => Some(check.name()),
                    _ => None,
                })
                .collect();
            refusals.sort();
            refusals.dedup();
            let mut acks: Vec<String> = mine()
                .filter_map(|r| match &r.what {
                    What::Ack {
                        ack,
                        duplicate: false,
                    } => Some(format!("{}:{}", ack.sequence, ack.outcome.name())),
                    _ => None,
                })
                .collect();
            acks.sort();
            format!(
                "board {}: {} {} update-slot {} refused {:?} acks {:?} bricked {}",
                d.index,
                d.version.as_deref().unwrap_or("-"),
                d.running_state,
                d.update_slot_state.as_deref().unwrap_or("-"),
                refusals,
                acks,
                d.bricked.is_some() || d.crash_loop.is_some()
            )
        })
        .collect()
}

/// Each board's refused handshakes: the peer and what the TLS stack said.
fn handshakes(run: &otarig_scenario::runner::Run) -> Vec<Vec<(&'static str, String)>> {
    use otarig_scenario::runner::What;
    run.devices
        .iter()
        .map(|d| {
            let mut seen: Vec<_> = run
                .records
                .iter()
                .filter(|r| r.device == d.index)
                .filter_map(|r| match &r.what {
                    What::Agent(otarig_agent::Event::TransportRefused { peer, detail, .. }) => {
                        Some((*peer, detail.clone()))
                    }
                    _ => None,
                })
                .collect();
            seen.sort();
            seen.dedup();
            seen
        })
        .collect()
}

/// The in-process runner's model of a `tls` fault says what the wire's TLS stack says: the
/// same peers refuse each board, and the model's words begin the wire's (which go on with
/// times and names of the run).
fn same_handshakes(
    local: &otarig_scenario::runner::Run,
    wired: &otarig_scenario::runner::Run,
) -> Result<(), Failed> {
    for (i, (a, b)) in handshakes(local).iter().zip(handshakes(wired)).enumerate() {
        let agree = a.len() == b.len()
            && a.iter()
                .zip(&b)
                .all(|((pa, da), (pb, db))| pa == pb && db.starts_with(da.as_str()));
        if !agree {
            return Err(format!(
                "board {i}'s refused handshakes differ on the wire:\n in-process: {a:?}\n       wire: {b:?}"
            )
            .into());
        }
    }
    Ok(())
}

fn wire(path: &Path) -> Result<(), Failed> {
    let s = load(path)?;
    let local = run(&s, &RunOptions::default()).map_err(|e| Failed::from(format!("{e:#}")))?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| Failed::from(e.to_string()))?;
    let opts = otarig_fleet::fleet::FleetOptions {
        speedup: s.wire_speedup.unwrap_or(25.0),
        ..Default::default()
    };
    let wired = rt
        .block_on(otarig_fleet::fleet::run_fleet(&s, &opts))
        .map_err(|e| Failed::from(format!("{e:#}")))?;
    let failures = judge(&wired, None);
    if !failures.is_empty() {
        return Err(summary::render(&wired, &failures).into());
    }
    let (a, b) = (outcome(&local), outcome(&wired));
    let diff: Vec<String> = a
        .iter()
        .zip(&b)
        .filter(|(x, y)| x != y)
        .map(|(x, y)| format!("in-process: {x}\n      wire: {y}"))
        .collect();
    if diff.is_empty() && a.len() == b.len() {
        same_handshakes(&local, &wired)
    } else {
        Err(format!("boards ended differently on the wire:\n{}", diff.join("\n")).into())
    }
}

/// Tests at once, unless `--test-threads` or `RUST_TEST_THREADS` says otherwise (libtest-mimic
/// reads only the first): two per core. The wire twins run at 25x real time and mostly wait
/// on timers and sockets; with one test per core this binary kept 0.49 of 2 cores busy over
/// 424 s, with two per core it took 224 s and no more CPU.
fn test_threads(args: &Arguments) -> usize {
    let from_env = std::env::var("RUST_TEST_THREADS")
        .ok()
        .and_then(|v| v.parse().ok());
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    args.test_threads.or(from_env).unwrap_or(2 * cores)
}

fn main() {
    let mut args = Arguments::from_args();
    args.test_threads = Some(test_threads(&args));
    let mut trials = Vec::new();
    for path in scenario_files() {
        let name = test_name(&path);
        let (p1, p2, p3, p4) = (path.clone(), path.clone(), path.clone(), path.clone());
        trials.push(Trial::test(name.clone(), move || passes(&p1)));
        trials.push(Trial::test(format!("{name}::can_fail"), move || {
            can_fail(&p2)
        }));
        trials.push(Trial::test(format!("{name}::replays"), move || {
            replays(&p3)
        }));
        trials.push(Trial::test(format!("{name}::wire"), move || wire(&p4)));
    }
    libtest_mimic::run(&args, trials).exit();
}
