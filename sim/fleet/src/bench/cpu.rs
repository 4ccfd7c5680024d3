//! The CPU time the benchmark's processes spend in its window, so that each run says how much
//! work it took as well as how long: on a shared VM the same work takes a third more CPU time
//! in one hour than in the next, and the time in the window follows it. A run that took
//! longer with the same CPU-seconds was held up by something else; one that took more
//! CPU-seconds for the same fleet met a slower machine (or a costlier build).
//!
//! Linux only: it reads `/proc/PID/stat` (`utime` + `stime`, every thread of the process) and
//! the machine's `/proc/stat`. Elsewhere it measures nothing and the report leaves the line
//! out.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// How often the meter reads the counters: the window's ends fall between two readings and
/// are interpolated, so a reading every quarter second puts them within a tick or two.
const EVERY: Duration = Duration::from_millis(250);

/// One reading: CPU seconds so far of each followed process (in the order given to
/// [`CpuMeter::start`]; `None` once it has gone), and of the whole machine (busy, all).
#[derive(Debug)]
struct Reading {
    at: Instant,
    processes: Vec<Option<f64>>,
    machine: Option<Machine>,
}

/// The machine's CPU seconds so far, summed over its cores (`/proc/stat`'s first line).
#[derive(Clone, Copy, Debug)]
struct Machine {
    busy: f64,
    all: f64,
}

/// Reads the followed processes' CPU time on a thread of its own until [`CpuMeter::stop`]
/// (or until dropped, on a run that failed).
pub(super) struct CpuMeter {
    names: Vec<String>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<Vec<Reading>>>,
}

/// What the followed processes and the machine spent between two instants.
#[derive(Debug, PartialEq)]
pub(super) struct Spent {
    /// CPU seconds by name; processes of one name (the shards) are added up.
    pub(super) by_name: Vec<(String, f64)>,
    /// The whole machine in the window; `None` without `/proc/stat`.
    pub(super) machine: Option<MachineSpent>,
}

/// What the whole machine did in a window.
#[derive(Debug, PartialEq)]
pub(super) struct MachineSpent {
    /// Of its CPU time (every core), the share that was busy.
    pub(super) busy_share: f64,
    /// CPU seconds busy outside the followed processes (the kernel's threads, anything else
    /// running).
    pub(super) elsewhere: f64,
}

impl CpuMeter {
    /// Follow `processes` (a name and a pid each; one name may repeat) from now on. The first
    /// reading is taken here, before this returns, and the last once [`CpuMeter::stop`] is
    /// called, so the readings cover everything in between however late the thread runs.
    pub(super) fn start(processes: Vec<(String, u32)>) -> CpuMeter {
        let (names, pids): (Vec<String>, Vec<u32>) = processes.into_iter().unzip();
        let tick = clock_tick();
        let read = move || Reading {
            at: Instant::now(),
            processes: pids.iter().map(|p| process_seconds(*p, tick)).collect(),
            machine: machine_seconds(tick),
        };
        let mut readings = vec![read()];
        let stop = Arc::new(AtomicBool::new(false));
        let stopped = stop.clone();
        let thread = std::thread::spawn(move || loop {
            std::thread::sleep(EVERY);
            readings.push(read());
            if stopped.load(Ordering::Relaxed) {
                return readings;
            }
        });
        CpuMeter {
            names,
            stop,
            thread: Some(thread),
        }
    }

    /// Stop reading, and say what was spent between `from` and `to`; `None` if the readings
    /// do not cover that span (no `/proc`, or a window outside the readings).
    pub(super) fn stop(mut self, from: Instant, to: Instant) -> Option<Spent> {
        self.stop.store(true, Ordering::Relaxed);
        let readings = self.thread.take()?.join().ok()?;
        spent(&self.names, &readings, from, to)
    }
}

impl Drop for CpuMeter {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

fn spent(names: &[String], readings: &[Reading], from: Instant, to: Instant) -> Option<Spent> {
    let mut by_name: Vec<(String, f64)> = Vec::new();
    for (i, name) in names.iter().enumerate() {
        let at = |t| interpolate(readings, t, |r| r.processes.get(i).copied().flatten());
        let secs = at(to)? - at(from)?;
        match by_name.iter_mut().find(|(n, _)| n == name) {
            Some((_, total)) => *total += secs,
            None => by_name.push((name.clone(), secs)),
        }
    }
    let followed: f64 = by_name.iter().map(|(_, s)| s).sum();
    let machine = machine_spent(readings, from, to, followed);
    Some(Spent { by_name, machine })
}

/// What the machine did between `from` and `to`, beyond `followed` (what the followed
/// processes spent).
fn machine_spent(
    readings: &[Reading],
    from: Instant,
    to: Instant,
    followed: f64,
) -> Option<MachineSpent> {
    let busy = |t| interpolate(readings, t, |r| r.machine.map(|m| m.busy));
    let all = |t| interpolate(readings, t, |r| r.machine.map(|m| m.all));
    let (busy, all) = (busy(to)? - busy(from)?, all(to)? - all(from)?);
    if all <= 0.0 {
        return None;
    }
    Some(MachineSpent {
        busy_share: (busy / all).clamp(0.0, 1.0),
        elsewhere: (busy - followed).max(0.0),
    })
}

/// A counter's value at `t`, on the line between the readings either side of it; `None`
/// when `t` lies outside the readings or either side lacks the value.
fn interpolate(
    readings: &[Reading],
    t: Instant,
    value: impl Fn(&Reading) -> Option<f64>,
) -> Option<f64> {
    let after = readings.iter().position(|r| r.at >= t)?;
    let b = &readings[after];
    if after == 0 {
        return (b.at == t).then(|| value(b)).flatten();
    }
    let a = &readings[after - 1];
    let (va, vb) = (value(a)?, value(b)?);
    let span = b.at.duration_since(a.at).as_secs_f64();
    if span <= 0.0 {
        return Some(vb);
    }
    let share = t.duration_since(a.at).as_secs_f64() / span;
    Some(va + (vb - va) * share)
}

/// Clock ticks per second of `/proc`'s counters (`sysconf(_SC_CLK_TCK)`, 100 on Linux's
/// common architectures, which is also the fallback).
fn clock_tick() -> f64 {
    match nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK) {
        Ok(Some(hz)) if hz > 0 => hz as f64,
        _ => 100.0,
    }
}

/// `utime` + `stime` of process `pid` in seconds (all its threads), from `/proc/PID/stat`.
fn process_seconds(pid: u32, tick: f64) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    parse_process_stat(&stat).map(|ticks| ticks as f64 / tick)
}

/// `utime` + `stime` (fields 14 and 15) of a `/proc/PID/stat` line, in ticks. The command
/// name (field 2) is in parentheses and may hold spaces and parentheses itself, so the
/// fields are counted from its closing parenthesis, the line's last.
fn parse_process_stat(stat: &str) -> Option<u64> {
    let rest = &stat[stat.rfind(')')? + 1..];
    // `rest` begins with field 3 (the state): utime is its 12th field, stime its 13th.
    let mut fields = rest.split_whitespace().skip(11);
    let utime: u64 = fields.next()?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    utime.checked_add(stime)
}

fn machine_seconds(tick: f64) -> Option<Machine> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let (busy, all) = parse_machine_stat(&stat)?;
    Some(Machine {
        busy: busy as f64 / tick,
        all: all as f64 / tick,
    })
}

/// Busy and all ticks of `/proc/stat`'s `cpu` line (every core): user, nice, system, idle,
/// iowait, irq, softirq, steal; idle and iowait are not busy. (guest time is already in user.)
fn parse_machine_stat(stat: &str) -> Option<(u64, u64)> {
    let line = stat.lines().find(|l| l.starts_with("cpu "))?;
    let ticks: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .take(8)
        .map(|f| f.parse().ok())
        .collect::<Option<_>>()?;
    let [user, nice, system, idle, iowait, irq, softirq, steal] = ticks.try_into().ok()?;
    let busy = [user, nice, system, irq, softirq, steal]
        .iter()
        .try_fold(0u64, |a, b| a.checked_add(*b))?;
    Some((busy, busy.checked_add(idle)?.checked_add(iowait)?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_process_stat_line_is_read_after_the_command_name() {
        // A command name with a space and a parenthesis in it, as `/proc` prints it.
        let line = "4242 (tokio (rt) x) S 1 4242 4242 0 -1 4194560 5000 0 0 0 1234 567 0 0 20 0 10 0 100 0 0";
        assert_eq!(parse_process_stat(line), Some(1234 + 567));
        assert_eq!(parse_process_stat("4242 (cut short) S 1 2"), None);
        assert_eq!(parse_process_stat("no parenthesis at all"), None);
    }

    #[test]
    fn the_machine_line_counts_idle_and_iowait_as_not_busy() {
        let stat = "cpu  100 5 50 800 20 3 7 15 0 0\ncpu0 50 2 25 400 10 1 3 7 0 0\n";
        assert_eq!(parse_machine_stat(stat), Some((180, 1000)));
        assert_eq!(parse_machine_stat("cpu0 1 2 3\n"), None);
        assert_eq!(parse_machine_stat("cpu  1 2 x 4 5 6 7 8\n"), None);
    }

    /// Two processes named alike (shards) are added up, each counter is read on the line
    /// between the readings either side of the window's ends, and the machine's time outside
    /// the followed processes is what is left of its busy time.
    #[test]
    fn the_window_is_interpolated_between_readings_and_shards_are_added_up() {
        let t0 = Instant::now();
        let at = |ms| t0 + Duration::from_millis(ms);
        let reading = |ms, a, b, c, busy, all| Reading {
            at: at(ms),
            processes: vec![Some(a), Some(b), Some(c)],
            machine: Some(Machine { busy, all }),
        };
        let readings = [
            reading(0, 0.0, 0.0, 0.0, 0.0, 0.0),
            reading(1000, 1.0, 0.5, 0.2, 1.8, 2.0),
            reading(2000, 2.0, 1.0, 0.4, 3.6, 4.0),
        ];
        let names = ["shards", "shards", "server"].map(String::from);
        let s = spent(&names, &readings, at(500), at(1500)).expect("covered");
        let close = |a: f64, b: f64| (a - b).abs() < 1e-9;
        assert_eq!(s.by_name.len(), 2);
        assert!(s.by_name[0].0 == "shards" && close(s.by_name[0].1, 1.5));
        assert!(s.by_name[1].0 == "server" && close(s.by_name[1].1, 0.2));
        let m = s.machine.expect("machine read");
        assert!(close(m.busy_share, 0.9) && close(m.elsewhere, 0.1), "{m:?}");
    }

    #[test]
    fn a_window_the_readings_do_not_cover_measures_nothing() {
        let t0 = Instant::now();
        let readings = [Reading {
            at: t0 + Duration::from_secs(1),
            processes: vec![Some(1.0)],
            machine: None,
        }];
        let names = [String::from("server")];
        assert_eq!(
            spent(&names, &readings, t0, t0 + Duration::from_secs(1)),
            None
        );
        assert_eq!(
            spent(
                &names,
                &readings,
                t0 + Duration::from_secs(1),
                t0 + Duration::from_secs(2)
            ),
            None
        );
        // A process gone before the window's end: no figure rather than a wrong one.
        let gone = [
            Reading {
                at: t0,
                processes: vec![Some(1.0)],
                machine: None,
            },
            Reading {
                at: t0 + Duration::from_secs(1),
                processes: vec![None],
                machine: None,
            },
        ];
        assert_eq!(
            spent(&names, &gone, t0, t0 + Duration::from_millis(500)),
            None
        );
    }

    /// On Linux the meter reads this very process, which burns some CPU meanwhile.
    #[test]
    #[cfg(target_os = "linux")]
    fn the_meter_reads_this_process() {
        let meter = CpuMeter::start(vec![("test".into(), std::process::id())]);
        let from = Instant::now();
        let spin_until = from + Duration::from_millis(600);
        let mut x = 0u64;
        while Instant::now() < spin_until {
            x = std::hint::black_box(x.wrapping_add(1));
        }
        let to = Instant::now();
        let s = meter.stop(from, to).expect("Linux has /proc");
        assert!(s.by_name[0].1 > 0.0, "{s:?}");
        assert!(s.machine.is_some());
    }
}
