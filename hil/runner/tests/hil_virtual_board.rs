//! The HIL runner end to end against the virtual board, through exactly the code a real board
//! gets: espflash writes the images over a pty into the simulated ROM loader, the board is
//! provisioned over its console, and the scenario is judged from console lines alone.

use std::path::Path;
use std::time::Duration;

use otarig_agent::console::{self, BoardLine};
use otarig_agent::Event;
use otarig_fleet::virtual_board;
use otarig_hil::{run_scenario, HilOptions};
use otarig_scenario::expect;
use otarig_scenario::scenario::Scenario;
use otarig_serial::flasher::Target;
use otarig_serial::reset::ResetMethod;

fn scenario(name: &str) -> Scenario {
    Scenario::load(
        &Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../scenarios")
            .join(name),
    )
    .unwrap()
}

async fn run_on_virtual_board(name: &str) -> otarig_hil::HilRun {
    let s = scenario(name);
    let dir = tempfile::tempdir().unwrap();
    let control = dir.path().join("control.sock");
    let board = virtual_board::start(virtual_board::options_for(&s).unwrap(), &control)
        .await
        .unwrap();
    let opts = HilOptions {
        port: board.pty.display().to_string(),
        target: Target::Virtual,
        reset: ResetMethod::Control(control.clone()),
        host: "127.0.0.1".parse().unwrap(),
        wifi_ssid: String::new(),
        wifi_password: String::new(),
        step_timeout: Duration::from_secs(20),
        quiet: Duration::from_secs(4),
        idle_skip: Duration::from_secs(2),
        log_dir: None,
        progress: false,
        firmware_dir: None,
    };
    let r = run_scenario(&s, &opts).await;
    board.stop();
    let hil = r.unwrap_or_else(|e| panic!("{name}: {e:#}"));
    let failures = expect::judge(&hil.run, None);
    assert!(
        failures.is_empty(),
        "{failures:#?}\nconsole:\n{}",
        hil.console.join("\n")
    );
    hil
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_release_rolls_back_on_the_virtual_board() {
    let hil = run_on_virtual_board("self-test-rollback.toml").await;
    let d = &hil.run.devices[0];
    assert_eq!(
        d.version.as_deref(),
        Some("2.0.0"),
        "back on v2 after v3 failed"
    );
    assert_eq!(d.running_state, "valid");
    // v3 really ran and failed: its self-test event and the bootloader's rollback are in the
    // console, not inferred.
    let console = hil.console.join("\n");
    let failed_self_test = hil.console.iter().any(|l| {
        matches!(
            console::parse_board_line(l),
            Ok(BoardLine::Event {
                event: Event::SelfTest { passed: false, .. },
                ..
            })
        )
    });
    assert!(failed_self_test, "{console}");
    assert!(
        console.contains("version 3.0.0"),
        "the bootloader started v3: {console}"
    );
    assert!(
        hil.skipped.iter().any(|s| s.contains("update-slot-state")),
        "the otadata check is reported as skipped: {:?}",
        hil.skipped
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn power_loss_mid_download_resumes_on_the_virtual_board() {
    let hil = run_on_virtual_board("power-cut-mid-download.toml").await;
    let d = &hil.run.devices[0];
    assert_eq!(d.power_cuts, 1);
    assert_eq!(d.version.as_deref(), Some("2.0.0"));
    let console = hil.console.join("\n");
    assert!(
        console.matches("ESP-ROM:esp32s3").count() >= 3,
        "boots: first, after the cut, after the update"
    );
}

/// Over mutual TLS: the runner writes the board's factory NVS image (provisioning, root CA,
/// device certificate and key) with espflash instead of provisioning it over the console; the
/// virtual board reads it at boot, as the shell does, and updates over HTTPS and MQTTS.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_board_provisioned_by_its_nvs_image_updates_over_mutual_tls() {
    let hil = run_on_virtual_board("tls-update.toml").await;
    let d = &hil.run.devices[0];
    assert_eq!(d.version.as_deref(), Some("3.0.0"));
    let console = hil.console.join("\n");
    assert!(
        !console.contains("\"kind\":\"provisioned\""),
        "provisioned by NVS, not the console: {console}"
    );
}

/// The chunked protocol on a bench: the runner writes the board's own chunk key (derived from
/// the fleet key) into its factory NVS image, the virtual board reads it as the shell does and
/// fetches by chunks; a man in the middle's replayed chunks are refused (only a board that
/// checks chunks can report `chunk-sequence`) and the update completes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_board_with_its_chunk_key_in_nvs_refuses_replayed_chunks() {
    let hil = run_on_virtual_board("attacks/chunk-replay.toml").await;
    let d = &hil.run.devices[0];
    assert_eq!(d.version.as_deref(), Some("2.0.0"));
    let console = hil.console.join("\n");
    assert!(
        console.contains("chunk-sequence"),
        "the replayed chunks were refused by name: {console}"
    );
    assert!(
        !console.contains("\"kind\":\"provisioned\""),
        "provisioned by NVS, not the console: {console}"
    );
}

/// A board-side trust fault on a bench: the runner writes an NVS image whose root CA is
/// another otarig PKI's (`wrong-ca`, device 0 of the scenario); the virtual board refuses the
/// broker's chain, reports `tls` on its console and stays on its image.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_board_provisioned_with_another_root_refuses_the_bench() {
    let hil = run_on_virtual_board("attacks/tls-broken-trust.toml").await;
    assert_eq!(hil.run.devices[0].version.as_deref(), Some("1.0.0"));
    let console = hil.console.join("\n");
    assert!(console.contains("BadSignature"), "{console}");
}
