//! Releases published without an MQTT announcement stay unannounced, also when a new
//! revocation list renews the retained announcements: boards find them only by polling.

use std::path::Path;

use otarig_scenario::expect::judge;
use otarig_scenario::runner::{run, RunOptions};
use otarig_scenario::scenario::Scenario;

#[test]
fn a_renewed_announcement_does_not_announce_an_unannounced_release() {
    let path =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../scenarios/chunked-poll-fleet.toml");
    let text = std::fs::read_to_string(&path).unwrap();
    // A revocation list (of a release nobody has) served two hours in, between the release
    // and the boards' next poll.
    let text = format!("{text}\n[[revoke]]\nat = \"2h\"\nsequences = [99]\n");
    let s = Scenario::parse(&path, &text).unwrap_or_else(|e| panic!("{e}"));
    assert!(!s.latest_is_announced("stable", 3 * 3_600_000));
    let r = run(&s, &RunOptions::default()).unwrap();
    let failures = judge(&r, None);
    assert!(failures.is_empty(), "{failures:#?}");
}
