//! The expectations checker: judges a run from its event stream and the boards' final flash.
//!
//! The same checker judges simulated boards, the virtual board and real boards; it reads only
//! [`Record`]s and [`DeviceReport`]s. Besides the checks a scenario names, three invariants
//! hold for every scenario: no board is bricked, no board saw a strict-mode flash violation
//! (a program over unerased bytes), and the agent never hit an unexplained storage error.

use std::fmt;

use otarig_agent::{Event, Outcome};

use crate::runner::{DeviceReport, Record, Run, What};
use crate::scenario::{Check, Expect};
use otarig_esp32s3::board::BoardEvent;

/// One failed check on one board.
#[derive(Clone, Debug, PartialEq)]
pub struct Failure {
    /// `file:line` of the `[[expect]]` block, or "invariant".
    pub at: String,
    pub device: u32,
    pub check: String,
    pub expected: String,
    pub seen: String,
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}: board {}: {}: expected {}, saw {}",
            self.at, self.device, self.check, self.expected, self.seen
        )
    }
}

/// What one board did, distilled from the stream.
#[derive(Default, Debug)]
struct Seen {
    acks: Vec<(String, String)>,
    refusals: Vec<(String, String)>,
    rejected: Vec<String>,
    rolled_back: bool,
    resumed: bool,
    boot_sets: u32,
    failures: Vec<String>,
    violations: u32,
    storage_errors: Vec<String>,
    delta_used: bool,
    delta_failed: bool,
    bad_messages: u32,
    boots: u32,
    reports: u32,
    fetch_retries: u32,
    /// When the first download started and when its image was verified.
    download_started: Option<u64>,
    download_verified: Option<u64>,
    /// The newest key set version adopted.
    keys_version: u32,
}

fn distil<'a>(records: impl IntoIterator<Item = &'a Record>) -> Seen {
    let mut s = Seen::default();
    for r in records {
        match &r.what {
            What::Ack {
                ack,
                duplicate: false,
            } => {
                let detail = match &ack.outcome {
                    Outcome::Installed => String::new(),
                    Outcome::Refused { check, detail } => format!("{check}: {detail}"),
                    Outcome::RolledBack { detail } => detail.clone(),
                };
                if !matches!(ack.outcome, Outcome::Installed) {
                    s.failures.push(detail.clone());
                }
                s.acks.push((ack.outcome.name().to_string(), detail));
            }
            What::Agent(
                Event::Refused { check, detail, .. }
                | Event::CommandRefused { check, detail, .. }
                | Event::TransportRefused { check, detail, .. },
            ) => s.refusals.push((check.name().to_string(), detail.clone())),
            What::Agent(Event::RollingBack { reason, .. }) => {
                s.rolled_back = true;
                s.failures.push(reason.clone());
            }
            // Not final (the ack comes later), but reported: a rollback for want of network.
            What::Agent(Event::Retrying { detail, .. }) => s.failures.push(detail.clone()),
            What::Agent(Event::Downloading { resumed_from, .. }) => {
                s.resumed |= *resumed_from > 0;
                s.download_started.get_or_insert(r.t_ms);
            }
            What::Agent(Event::Verified { .. }) if s.download_started.is_some() => {
                s.download_verified.get_or_insert(r.t_ms);
            }
            What::Agent(Event::StorageError { during, error }) => {
                s.storage_errors.push(format!("{during}: {error}"))
            }
            What::Board(BoardEvent::BootRejected { reason, .. }) => s.rejected.push(reason.clone()),
            What::Board(BoardEvent::BootloaderStarted { .. }) => s.boots += 1,
            What::Agent(Event::BadMessage { .. }) => s.bad_messages += 1,
            What::Agent(Event::KeysAdopted { version }) => {
                s.keys_version = s.keys_version.max(*version)
            }
            What::Agent(Event::Report { .. }) => s.reports += 1,
            What::Agent(Event::FetchFailed { .. }) => s.fetch_retries += 1,
            What::Board(BoardEvent::BootloaderAborted { .. }) => s.rolled_back = true,
            What::Board(BoardEvent::BootPartitionSet { .. }) => s.boot_sets += 1,
            What::Board(BoardEvent::FlashViolation { .. }) => s.violations += 1,
            _ => {}
        }
    }
    s
}

/// What a failed check expected, and what it saw.
type Verdict = Result<(), (String, String)>;

/// `Ok` when `ok`; otherwise what was expected and what was seen, rendered only then.
fn verdict(ok: bool, expected: impl FnOnce() -> String, seen: impl FnOnce() -> String) -> Verdict {
    if ok {
        Ok(())
    } else {
        Err((expected(), seen()))
    }
}

/// A count that must be exactly `want`: "`want` `what`" expected, the count seen.
fn count(want: u32, got: u32, what: &str) -> Verdict {
    verdict(got == want, || format!("{want} {what}"), || got.to_string())
}

/// Items joined by "; ", or `none` when there are none.
fn list_or(items: Vec<String>, none: &str) -> String {
    if items.is_empty() {
        none.into()
    } else {
        items.join("; ")
    }
}

fn check_one(c: &Check, d: &DeviceReport, s: &Seen) -> Verdict {
    match c {
        Check::Version(v) => verdict(
            d.version.as_deref() == Some(v),
            || format!("running {v}"),
            || {
                format!(
                    "running {}",
                    d.version.as_deref().unwrap_or("nothing (bricked)")
                )
            },
        ),
        Check::RunningState(st) => verdict(
            &d.running_state == st,
            || format!("running slot in state {st}"),
            || {
                format!(
                    "{} in state {}",
                    d.running_slot.clone().unwrap_or_default(),
                    d.running_state
                )
            },
        ),
        Check::UpdateSlotState(list) => {
            let got = d
                .update_slot_state
                .clone()
                .unwrap_or_else(|| "no update slot written".into());
            verdict(
                list.contains(&got),
                || format!("update slot in state {}", list.join(" or ")),
                || got.clone(),
            )
        }
        Check::Acks(n) => verdict(
            s.acks.len() as u32 == *n,
            || format!("{n} ack(s)"),
            || {
                let list: Vec<&str> = s.acks.iter().map(|a| a.0.as_str()).collect();
                format!("{} ({})", s.acks.len(), list.join(", "))
            },
        ),
        Check::AckOutcome(o) => verdict(
            !s.acks.is_empty() && s.acks.iter().all(|a| &a.0 == o),
            || format!("every ack {o}"),
            || {
                list_or(
                    s.acks.iter().map(|a| format!("{} {}", a.0, a.1)).collect(),
                    "no ack",
                )
            },
        ),
        Check::Refused(check) => verdict(
            s.refusals.iter().any(|r| &r.0 == check),
            || format!("a refusal by check '{check}'"),
            || {
                let list = s.refusals.iter().map(|r| format!("{} ({})", r.0, r.1));
                list_or(list.collect(), "no refusal")
            },
        ),
        Check::BootloaderRejected(reason) => verdict(
            s.rejected.iter().any(|r| r.contains(reason.as_str())),
            || format!("the bootloader to reject an image for '{reason}'"),
            || list_or(s.rejected.clone(), "no rejection"),
        ),
        Check::RolledBack(b) => verdict(
            s.rolled_back == *b,
            || format!("rolled back: {b}"),
            || format!("rolled back: {}", s.rolled_back),
        ),
        Check::MaxFetchRatio(r) => max_fetch_ratio(*r, d),
        Check::Resumed(b) => verdict(
            s.resumed == *b,
            || format!("resumed: {b}"),
            || format!("resumed: {}", s.resumed),
        ),
        Check::PowerCuts(n) => count(*n, d.power_cuts, "power cut(s)"),
        Check::BootPartitionSet(n) => verdict(
            s.boot_sets == *n,
            || format!("boot partition set {n} time(s)"),
            || s.boot_sets.to_string(),
        ),
        Check::Delta(want) => {
            let got = if s.delta_failed {
                "fell-back"
            } else if s.delta_used {
                "used"
            } else {
                "none"
            };
            verdict(
                got == want,
                || format!("delta {want}"),
                || format!("delta {got}"),
            )
        }
        Check::BadMessages(n) => count(*n, s.bad_messages, "bad-message status event(s)"),
        Check::MinDownloadMs(ms) => min_download(*ms, s),
        Check::DownloadStartsAfterMs(ms) => verdict(
            s.download_started.is_some_and(|t| t >= *ms),
            || format!("the first download to start at {} s or later", ms / 1000),
            || match s.download_started {
                Some(t) => format!("it started at {:.1} s", t as f64 / 1000.0),
                None => "no download".into(),
            },
        ),
        Check::KeysAdopted(v) => verdict(
            s.keys_version == *v,
            || format!("key set v{v} adopted"),
            || format!("v{}", s.keys_version),
        ),
        Check::FetchRetries(n) => count(*n, s.fetch_retries, "failed request(s) retried"),
        Check::Reports(n) => count(*n, s.reports, "report(s)"),
        Check::Boots(n) => count(*n, s.boots, "boot(s)"),
        Check::ReportedFailure(text) => verdict(
            s.failures.iter().any(|f| f.contains(text.as_str())),
            || format!("a reported failure containing '{text}'"),
            || list_or(s.failures.clone(), "none"),
        ),
    }
}

fn max_fetch_ratio(r: f64, d: &DeviceReport) -> Verdict {
    let expected = || format!("fetched < {r} x image size");
    if d.image_size == 0 {
        return Err((expected(), "no download started".into()));
    }
    let ratio = d.fetched_bytes as f64 / d.image_size as f64;
    verdict(ratio < r, expected, || {
        format!(
            "{} of {} bytes = {ratio:.3}x",
            d.fetched_bytes, d.image_size
        )
    })
}

fn min_download(ms: u64, s: &Seen) -> Verdict {
    let expected = format!("a download taking at least {ms} ms");
    match (s.download_started, s.download_verified) {
        (Some(a), Some(b)) if b - a >= ms => Ok(()),
        (Some(a), Some(b)) => Err((expected, format!("{} ms", b - a))),
        _ => Err((expected, "no completed download".into())),
    }
}

/// Judge a run against the scenario's expectations (or `expects`, when given) and the
/// invariants.
pub fn judge(run: &Run, expects: Option<&[Expect]>) -> Vec<Failure> {
    let expects = expects.unwrap_or(&run.scenario.expects);
    let mut out = Vec::new();
    // Each device's records, in order, found once (a fleet has thousands of devices).
    let mut by_device: std::collections::HashMap<u32, Vec<&Record>> = Default::default();
    for r in &run.records {
        by_device.entry(r.device).or_default().push(r);
    }
    for d in &run.devices {
        let seen = distil(by_device.get(&d.index).into_iter().flatten().copied());
        if let Some(reason) = &d.crash_loop {
            out.push(Failure {
                at: "invariant".into(),
                device: d.index,
                check: "never-bricked".into(),
                expected: "a bootable image".into(),
                seen: format!("crash loop: {reason}"),
            });
        }
        if let Some(reason) = &d.bricked {
            out.push(Failure {
                at: "invariant".into(),
                device: d.index,
                check: "never-bricked".into(),
                expected: "a bootable image".into(),
                seen: format!("bricked: {reason}"),
            });
        }
        if seen.violations > 0 {
            out.push(Failure {
                at: "invariant".into(),
                device: d.index,
                check: "flash-discipline".into(),
                expected: "every program on erased flash".into(),
                seen: format!("{} program(s) over unerased bytes", seen.violations),
            });
        }
        if let Some(e) = seen.storage_errors.first() {
            out.push(Failure {
                at: "invariant".into(),
                device: d.index,
                check: "storage".into(),
                expected: "no storage error".into(),
                seen: e.clone(),
            });
        }
        for e in expects.iter().filter(|e| e.devices.contains(d.index)) {
            for c in &e.checks {
                if let Err((expected, seen_text)) = check_one(c, d, &seen) {
                    out.push(Failure {
                        at: e.at.clone(),
                        device: d.index,
                        check: c.key().into(),
                        expected,
                        seen: seen_text,
                    });
                }
            }
        }
    }
    out
}

/// A deliberately false version of a check, used to prove each scenario can fail.
pub fn falsified(c: &Check) -> Check {
    match c {
        Check::Version(v) => Check::Version(format!("{v}-never")),
        Check::RunningState(s) => Check::RunningState(if s == "valid" {
            "aborted".into()
        } else {
            "valid".into()
        }),
        Check::UpdateSlotState(l) => Check::UpdateSlotState(
            crate::scenario::SLOT_STATES
                .iter()
                .filter(|s| !l.iter().any(|x| x == *s))
                .take(1)
                .map(|s| s.to_string())
                .collect(),
        ),
        Check::Acks(n) => Check::Acks(n + 1),
        Check::AckOutcome(o) => Check::AckOutcome(if o == "installed" {
            "refused".into()
        } else {
            "installed".into()
        }),
        Check::Refused(c) => Check::Refused(format!("{c}-never")),
        Check::BootloaderRejected(r) => Check::BootloaderRejected(format!("{r}-never")),
        Check::RolledBack(b) => Check::RolledBack(!b),
        Check::MaxFetchRatio(r) => Check::MaxFetchRatio(r / 100.0),
        Check::Resumed(b) => Check::Resumed(!b),
        Check::PowerCuts(n) => Check::PowerCuts(n + 1),
        Check::BootPartitionSet(n) => Check::BootPartitionSet(n + 1),
        Check::ReportedFailure(t) => Check::ReportedFailure(format!("{t} and no such text")),
        Check::Delta(d) => Check::Delta(if d == "used" {
            "none".into()
        } else {
            "used".into()
        }),
        Check::BadMessages(n) => Check::BadMessages(n + 1),
        Check::Boots(n) => Check::Boots(n + 1),
        Check::Reports(n) => Check::Reports(n + 1),
        Check::FetchRetries(n) => Check::FetchRetries(n + 1),
        Check::MinDownloadMs(ms) => Check::MinDownloadMs(ms * 100 + 1),
        Check::DownloadStartsAfterMs(ms) => Check::DownloadStartsAfterMs(ms * 100 + 1),
        Check::KeysAdopted(v) => Check::KeysAdopted(v + 1),
    }
}
