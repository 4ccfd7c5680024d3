//! The 2nd stage bootloader's choice of partition, against what ESP-IDF's
//! `bootloader_utility_get_selected_boot_partition` does with the same otadata.

use std::sync::Arc;

use otarig_agent::{OtaImgState, SlotKind};
use otarig_esp32s3::appimage::{build, AppSpec};
use otarig_esp32s3::board::{Board, BootConfig, BootOutcome};
use otarig_esp32s3::otadata::Entry;
use otarig_esp32s3::partition::PartitionTable;

#[test]
fn an_otadata_entry_with_sequence_zero_boots_ota_1() {
    let table = PartitionTable::default_two_ota();
    let (ota_1, otadata) = (table.ota(1).unwrap(), table.otadata().unwrap().offset);
    let factory = build(&AppSpec::new("seq0", "1.0.0", 16 * 1024));
    let b = Board::factory_flashed(
        Arc::new(table),
        BootConfig::default(),
        SlotKind::Factory,
        &factory,
        0,
    )
    .unwrap();
    let mut flash = b.into_flash();
    flash
        .program(
            ota_1.address,
            &build(&AppSpec::new("seq0", "3.0.0", 16 * 1024)),
        )
        .unwrap();
    // ota_seq 0: CRC 0xFFFFFFFF, valid; (0 - 1) % 2 = 1 in uint32_t.
    let entry = Entry::new(0, OtaImgState::Valid, [0xFF; 20]);
    flash.program(otadata, &entry.encode()).unwrap();
    let mut b = Board::from_flash(flash, BootConfig::default(), 0).unwrap();
    match b.boot() {
        BootOutcome::App(booted) => {
            assert_eq!(booted.slot.kind, SlotKind::Ota(1));
            assert_eq!(booted.info.version(), "3.0.0");
        }
        other => panic!("{other:?}"),
    }
}
