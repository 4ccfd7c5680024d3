//! What `esp_ota_ops` answers when asked something it refuses: the simulated board, the
//! agent's `EspError` and ESP-IDF (esp_ota_ops.c, esp_partition_write) agree, one row each.

use std::sync::Arc;

use otarig_agent::{EspError, EspResult, Platform, Slot, SlotKind};
use otarig_esp32s3::appimage::{build, AppSpec};
use otarig_esp32s3::board::{Board, BootConfig, BootOutcome};
use otarig_esp32s3::partition::PartitionTable;

const TABLE: &str = "\
nvs,      data, nvs,     0x9000,  0x3000
otadata,  data, ota,     0xc000,  0x2000
otarig,   data, 0x40,    0xe000,  0x2000
factory,  app,  factory, 0x10000, 256K
test,     app,  test,    ,        256K
ota_0,    app,  ota_0,   ,        256K
ota_1,    app,  ota_1,   ,        256K
";

/// A board running its factory app, with valid apps in `test` and `ota_0` too.
fn board() -> Board {
    let table = PartitionTable::from_csv("errors.csv", TABLE).unwrap();
    let (test, ota_0) = (table.test_slot().unwrap(), table.ota(0).unwrap());
    let app = |v: &str| build(&AppSpec::new("errors", v, 16 * 1024));
    let b = Board::factory_flashed(
        Arc::new(table),
        BootConfig::default(),
        SlotKind::Factory,
        &app("1.0.0"),
        0,
    )
    .unwrap();
    let mut flash = b.into_flash();
    flash.program(test.address, &app("0.0.1-test")).unwrap();
    flash.program(ota_0.address, &app("2.0.0")).unwrap();
    let mut b = Board::from_flash(flash, BootConfig::default(), 0).unwrap();
    assert!(matches!(b.boot(), BootOutcome::App(booted) if booted.slot.kind == SlotKind::Factory));
    b
}

fn slot(b: &Board, kind: SlotKind) -> Slot {
    b.table()
        .app_slots()
        .into_iter()
        .find(|s| s.kind == kind)
        .unwrap()
}

type Call = fn(&mut Board) -> EspResult<()>;

#[test]
fn refusals_carry_esp_idf_error_codes() {
    let rows: [(&str, Call, EspResult<()>); 8] = [
        (
            "mark valid while the factory app runs (\"Running firmware is factory\")",
            |b| b.mark_app_valid_cancel_rollback(),
            Err(EspError::Fail),
        ),
        (
            "mark invalid while the factory app runs",
            |b| b.mark_app_invalid_rollback(),
            Err(EspError::Fail),
        ),
        (
            "write past the partition end (esp_partition_write)",
            |b| {
                let s = slot(b, SlotKind::Ota(1));
                b.ota_begin(s)?;
                b.ota_write(&vec![0xE9; 256 * 1024])?;
                b.ota_write(&[0xFF; 16])
            },
            Err(EspError::InvalidSize),
        ),
        (
            "otadata state of the factory partition",
            |b| {
                let s = slot(b, SlotKind::Factory);
                b.slot_state(s).map(|_| ())
            },
            Err(EspError::NotSupported),
        ),
        (
            "write without a handle (\"not found the handle\")",
            |b| b.ota_write(&[0xE9]),
            Err(EspError::InvalidArg),
        ),
        (
            "end without a handle",
            |b| b.ota_end(),
            Err(EspError::NotFound),
        ),
        (
            "begin on a partition not in the table (esp_partition_verify)",
            |b| {
                b.ota_begin(Slot {
                    kind: SlotKind::Ota(2),
                    address: 0x3F_0000,
                    size: 0x1_0000,
                })
            },
            Err(EspError::NotFound),
        ),
        (
            "set the test app to boot: OTA_SLOT(0x20) is 0, so ota_0 is selected",
            |b| {
                let s = slot(b, SlotKind::Test);
                b.set_boot_partition(s)
            },
            Ok(()),
        ),
    ];
    let mut wrong = Vec::new();
    for (what, call, expected) in rows {
        let mut b = board();
        let got = call(&mut b);
        if got != expected {
            wrong.push(format!("{what}: expected {expected:?}, got {got:?}"));
        }
    }
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
}

#[test]
fn setting_the_test_app_to_boot_boots_ota_0() {
    let mut b = board();
    let test = slot(&b, SlotKind::Test);
    b.set_boot_partition(test).unwrap();
    b.power_off();
    match b.boot() {
        BootOutcome::App(booted) => assert_eq!(booted.slot.kind, SlotKind::Ota(0)),
        other => panic!("{other:?}"),
    }
}
