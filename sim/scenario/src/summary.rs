//! Human-readable summaries and the JSON-lines event log of a run.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io::Write;

use otarig_agent::Event;

use crate::expect::Failure;
use crate::runner::{Run, What};

/// The end-of-run summary: versions, rollbacks, refusals with reasons, bytes, time.
pub fn render(run: &Run, failures: &[Failure]) -> String {
    let mut s = String::new();
    let sc = &run.scenario;
    let _ = writeln!(s, "scenario  {} ({})", sc.name, sc.path.display());
    let _ = writeln!(
        s,
        "boards    {}    seed {}    virtual time {:.1} s",
        run.devices.len(),
        sc.seed,
        run.end_ms as f64 / 1000.0
    );
    let mut versions: BTreeMap<String, usize> = BTreeMap::new();
    for d in &run.devices {
        *versions
            .entry(d.version.clone().unwrap_or_else(|| "BRICKED".into()))
            .or_default() += 1;
    }
    let v: Vec<String> = versions.iter().map(|(k, n)| format!("{k} x{n}")).collect();
    let _ = writeln!(s, "versions  {}", v.join(", "));
    let mut refusals: BTreeMap<String, usize> = BTreeMap::new();
    let mut rollbacks = 0;
    let mut cuts = 0;
    for r in &run.records {
        match &r.what {
            What::Agent(Event::Refused { check, .. } | Event::CommandRefused { check, .. }) => {
                *refusals.entry(check.name().to_string()).or_default() += 1
            }
            What::Agent(Event::RollingBack { .. })
            | What::Board(otarig_esp32s3::board::BoardEvent::BootloaderAborted { .. }) => {
                rollbacks += 1
            }
            What::Board(otarig_esp32s3::board::BoardEvent::PowerCut { .. }) => cuts += 1,
            _ => {}
        }
    }
    let r: Vec<String> = refusals.iter().map(|(k, n)| format!("{k} x{n}")).collect();
    let _ = writeln!(
        s,
        "refusals  {}",
        if r.is_empty() {
            "none".into()
        } else {
            r.join(", ")
        }
    );
    let _ = writeln!(s, "rollbacks {rollbacks}    power cuts {cuts}");
    let fetched: u64 = run.devices.iter().map(|d| d.fetched_bytes).sum();
    let _ = writeln!(
        s,
        "bytes     {fetched} fetched by boards, {} served",
        run.served_bytes
    );
    if failures.is_empty() {
        let _ = writeln!(s, "verdict   PASS: every expectation held on every board");
    } else {
        let _ = writeln!(s, "verdict   FAIL: {} failed check(s)", failures.len());
        for f in failures.iter().take(20) {
            let _ = writeln!(s, "  - {f}");
        }
        if failures.len() > 20 {
            let _ = writeln!(
                s,
                "  … and {} more (see the event log)",
                failures.len() - 20
            );
        }
    }
    s
}

/// Write the event stream as JSON lines.
pub fn write_events(run: &Run, out: &mut dyn Write) -> std::io::Result<()> {
    for r in &run.records {
        serde_json::to_writer(&mut *out, &r.to_json())?;
        out.write_all(b"\n")?;
    }
    Ok(())
}

/// Write a run's event stream to `DIR/<scenario file stem>.jsonl` (`--events DIR`).
pub fn write_events_file(
    dir: &std::path::Path,
    scenario_file: &std::path::Path,
    run: &Run,
) -> anyhow::Result<()> {
    use anyhow::Context;
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let stem = scenario_file
        .file_stem()
        .and_then(|s| s.to_str())
        .unwrap_or("scenario");
    let path = dir.join(format!("{stem}.jsonl"));
    let mut out = std::io::BufWriter::new(
        std::fs::File::create(&path).with_context(|| format!("creating {}", path.display()))?,
    );
    write_events(run, &mut out)?;
    out.flush()?;
    Ok(())
}

/// Write [`junit`] of `verdicts` to `path` (`--junit PATH`).
pub fn write_junit_file(
    path: &std::path::Path,
    suite: &str,
    verdicts: &[Verdict],
) -> anyhow::Result<()> {
    use anyhow::Context;
    std::fs::write(path, junit(suite, verdicts))
        .with_context(|| format!("writing {}", path.display()))
}

/// One scenario's verdict for a JUnit report.
pub struct Verdict {
    pub name: String,
    pub file: String,
    pub seconds: f64,
    pub failures: Vec<crate::expect::Failure>,
    /// Not run, and why (a HIL run of a scenario only the simulator can play).
    pub skipped: Option<String>,
}

fn xml_escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// JUnit XML: one test case per scenario, its failed checks as the failure text. CI systems
/// (GitLab, Jenkins, GitHub test reporters) read this.
pub fn junit(suite: &str, verdicts: &[Verdict]) -> String {
    let failed = verdicts.iter().filter(|v| !v.failures.is_empty()).count();
    let skipped = verdicts.iter().filter(|v| v.skipped.is_some()).count();
    let total: f64 = verdicts.iter().map(|v| v.seconds).sum();
    let mut x = format!(
        "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<testsuites>\n  <testsuite name=\"{}\" tests=\"{}\" failures=\"{failed}\" skipped=\"{skipped}\" time=\"{total:.3}\">\n",
        xml_escape(suite),
        verdicts.len()
    );
    for v in verdicts {
        let _ = write!(
            x,
            "    <testcase classname=\"{}\" name=\"{}\" time=\"{:.3}\"",
            xml_escape(&v.file),
            xml_escape(&v.name),
            v.seconds
        );
        if let Some(why) = &v.skipped {
            let _ = writeln!(
                x,
                ">\n      <skipped message=\"{}\"/>\n    </testcase>",
                xml_escape(why)
            );
        } else if v.failures.is_empty() {
            x.push_str("/>\n");
        } else {
            let text: Vec<String> = v
                .failures
                .iter()
                .map(|f| xml_escape(&f.to_string()))
                .collect();
            let _ = write!(
                x,
                ">\n      <failure message=\"{} failed check(s)\">{}</failure>\n    </testcase>\n",
                v.failures.len(),
                text.join("\n")
            );
        }
    }
    x.push_str("  </testsuite>\n</testsuites>\n");
    x
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn junit_marks_failures_and_skips() {
        let v = |name: &str, failures, skipped: Option<&str>| Verdict {
            name: name.into(),
            file: format!("scenarios/{name}.toml"),
            seconds: 1.0,
            failures,
            skipped: skipped.map(str::to_string),
        };
        let fail = crate::expect::Failure {
            at: "x.toml:3".into(),
            device: 0,
            check: "version".into(),
            expected: "running 2.0.0".into(),
            seen: "running <1.0.0>".into(),
        };
        let x = junit(
            "otarig hil",
            &[
                v("ok", vec![], None),
                v("bad", vec![fail], None),
                v("cut", vec![], Some("needs the simulator")),
            ],
        );
        assert!(x.contains(r#"tests="3" failures="1" skipped="1""#), "{x}");
        assert!(
            x.contains(r#"<skipped message="needs the simulator"/>"#),
            "{x}"
        );
        assert!(x.contains("&lt;1.0.0&gt;"), "escaped: {x}");
        assert_eq!(x.matches("<testcase").count(), 3);
    }
}
