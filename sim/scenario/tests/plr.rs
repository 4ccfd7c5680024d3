//! The exhaustive power-loss explorer over a small update: power is cut at every flash
//! operation (image, journal, otadata, confirmation), and every invariant holds after each.

use std::path::Path;

use otarig_scenario::plr;
use otarig_scenario::scenario::Scenario;

fn small() -> Scenario {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../scenarios/plr-small.toml");
    Scenario::load(&path).unwrap_or_else(|e| panic!("{e}"))
}

#[test]
fn every_cut_point_of_a_small_update_recovers() {
    let s = small();
    let report = plr::exhaustive(&s, 1, 2, &|_, _| {}).unwrap();
    assert!(
        report.ops > 500,
        "expected several hundred flash operations, got {}",
        report.ops
    );
    assert_eq!(
        report.explored, report.ops,
        "every operation is a cut point"
    );
    let lines: Vec<String> = report
        .failures
        .iter()
        .map(|p| format!("{}: {}", p.repro(&s.path, None), p.violations.join("; ")))
        .collect();
    assert!(
        lines.is_empty(),
        "invariant violations:\n{}",
        lines.join("\n")
    );
    assert!(
        report.worst_refetch <= plr::refetch_bound(),
        "worst re-download {}",
        report.worst_refetch
    );
}

/// The same update fetched by the chunked protocol and encrypted (AES-256-CBC), as the system
/// the protocol comes from ships it: a cut anywhere resumes in a new session at the last
/// journaled checkpoint, and nothing is re-downloaded beyond the bound.
#[test]
fn every_cut_point_of_a_chunked_encrypted_update_recovers() {
    let small = small();
    let text = std::fs::read_to_string(&small.path).unwrap();
    let text = text
        .replace(
            "firmware = \"v1\"\n\n",
            "firmware = \"v1\"\ndownload = \"chunked\"\n\n",
        )
        .replace("at = \"1s\"", "at = \"1s\"\nencrypt = \"aes-256-cbc\"")
        .replace("160KiB", "40KiB");
    let s = Scenario::parse(&small.path, &text).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(s.download, otarig_scenario::scenario::Download::Chunked);
    assert!(s.releases[0].encrypt.is_some());
    let report = plr::exhaustive(&s, 1, 2, &|_, _| {}).unwrap();
    assert!(report.ops > 100, "{} flash operations", report.ops);
    assert_eq!(report.explored, report.ops);
    let lines: Vec<String> = report
        .failures
        .iter()
        .map(|p| p.violations.join("; "))
        .collect();
    assert!(
        lines.is_empty(),
        "invariant violations:\n{}",
        lines.join("\n")
    );
    assert!(report.worst_refetch <= plr::refetch_bound());
}

#[test]
fn a_double_fault_during_recovery_is_survived() {
    let s = small();
    let g = plr::golden(&s).unwrap();
    // A cut in the middle of the download, then another early in the recovery that follows.
    let mid = g.ops / 2;
    for second in [mid + 1, mid + 3, mid + 10, mid + 40] {
        let p = plr::probe(&s, &g, &[mid, second], 99).unwrap();
        assert!(
            p.violations.is_empty(),
            "cuts {:?}: {:?}",
            p.cuts,
            p.violations
        );
        assert_eq!(p.fired, 2, "both cuts should land (cuts {:?})", p.cuts);
    }
}

/// A server that ignores `Range` makes every resume start over from byte 0: the explorer
/// bounds the re-download by the whole image there, and still by a checkpoint interval
/// everywhere else (found by the nightly random explorer on `no-range-server.toml`).
#[test]
fn a_resume_from_a_server_without_range_may_fetch_the_whole_image_again() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../scenarios/no-range-server.toml");
    let s = Scenario::load(&path).unwrap_or_else(|e| panic!("{e}"));
    let g = plr::golden(&s).unwrap();
    assert!(g.ranges_ignored);
    assert_eq!(
        g.refetch_per_cut().0,
        g.image_size.max(plr::refetch_bound())
    );
    let p = plr::probe(&s, &g, &[g.ops / 2], 7).unwrap();
    assert_eq!(p.fired, 1);
    assert!(
        p.refetched > plr::refetch_bound(),
        "the resume re-fetched only {} bytes: this no longer tests the no-Range bound",
        p.refetched
    );
    assert!(p.violations.is_empty(), "{:?}", p.violations);
    assert!(!plr::golden(&small()).unwrap().ranges_ignored);
}
