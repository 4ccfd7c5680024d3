//! The explorer can fail: with the agent's journal written in place (one copy instead of two,
//! a test-only switch), some cut points lose the resume state, and the explorer reports them
//! with a reproduction that replays the same failure.
//!
//! Its own test binary, because the switch is process-wide.

use std::path::Path;

use otarig_scenario::plr;
use otarig_scenario::scenario::Scenario;

#[test]
fn a_single_copy_journal_is_caught_with_a_reproduction() {
    otarig_agent::fault::set_single_copy_journal(true);
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../scenarios/plr-small.toml");
    let s = Scenario::load(&path).unwrap_or_else(|e| panic!("{e}"));
    let report = plr::exhaustive(&s, 1, 2, &|_, _| {}).unwrap();
    assert!(
        !report.failures.is_empty(),
        "the explorer missed a journal written without its two-copy scheme"
    );
    let first = &report.failures[0];
    let line = first.repro(&s.path, Some("single-copy-journal"));
    assert!(
        line.contains(&format!("--at {}", first.cuts[0])) && line.contains("--seed 1"),
        "{line}"
    );
    // The reproduction replays exactly.
    let g = plr::golden(&s).unwrap();
    let again = plr::probe(&s, &g, &first.cuts, first.seed).unwrap();
    assert_eq!(again.violations, first.violations);
}
