//! The eFuse secure version on the ESP32-S3: a 16-bit thermometer field, raised by
//! `esp_ota_mark_app_valid_cancel_rollback` and by the bootloader with anti-rollback on.

use std::sync::Arc;

use otarig_agent::SlotKind;
use otarig_agent::{EspError, OtaImgState, Platform};
use otarig_esp32s3::appimage::{build, AppSpec};
use otarig_esp32s3::board::{Board, BoardEvent, BootConfig, BootOutcome};
use otarig_esp32s3::partition::PartitionTable;

/// A board with anti-rollback on, running factory v1 (secure version 0), with `image` written
/// to its update slot and selected for the next boot, then rebooted into it.
fn booted_into(image: &[u8]) -> Board {
    let table = Arc::new(PartitionTable::default_two_ota());
    let config = BootConfig {
        rollback: true,
        anti_rollback: true,
    };
    let v1 = build(&AppSpec::new("fuse", "1.0.0", 16 * 1024));
    let mut b = Board::factory_flashed(table, config, SlotKind::Factory, &v1, 0).unwrap();
    assert!(matches!(b.boot(), BootOutcome::App(_)));
    let slot = b.next_update_slot().unwrap();
    b.ota_begin(slot).unwrap();
    b.ota_write(image).unwrap();
    b.ota_end().unwrap();
    b.set_boot_partition(slot).unwrap();
    b.power_off();
    match b.boot() {
        BootOutcome::App(booted) => assert_eq!(booted.slot, slot),
        other => panic!("did not boot the update: {other:?}"),
    }
    b
}

fn image(secure_version: u32) -> Vec<u8> {
    let mut spec = AppSpec::new("fuse", "2.0.0", 16 * 1024);
    spec.secure_version = secure_version;
    build(&spec)
}

#[test]
fn a_secure_version_above_16_is_marked_valid_but_burns_nothing() {
    let mut b = booted_into(&image(17));
    b.take_events();
    assert_eq!(
        b.mark_app_valid_cancel_rollback(),
        Err(EspError::InvalidArg)
    );
    let running = b.running().unwrap();
    assert_eq!(
        b.peek_slot_state(running),
        Some(OtaImgState::Valid),
        "VALID is written first"
    );
    assert_eq!(b.efuse_secure_version(), 0, "nothing burned");
    assert!(b
        .take_events()
        .contains(&BoardEvent::EfuseRaiseRefused { requested: 17 }));
    // The bootloader tries again at every boot of the VALID entry, logs, and boots it.
    b.power_off();
    assert!(matches!(b.boot(), BootOutcome::App(booted) if booted.slot == running));
    assert_eq!(b.efuse_secure_version(), 0);
}

#[test]
fn a_secure_version_of_16_fills_the_field() {
    let mut b = booted_into(&image(16));
    assert_eq!(b.mark_app_valid_cancel_rollback(), Ok(()));
    assert_eq!(b.efuse_secure_version(), 16);
}
