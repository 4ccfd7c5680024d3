//! What a board is flashed with before a scenario: its bootloader (real boards), the
//! partition table, the scenario's starting firmware in its slot, and otadata, the agent's
//! journal and NVS erased.

use anyhow::{bail, Context};
use otarig_scenario::runner::Prepared;
use otarig_scenario::scenario::Scenario;
use otarig_serial::flasher::{self, Image, Target};

use crate::HilOptions;

/// The build of a scenario firmware for a real board: `VERSION.bin`, or with a variant suffix
/// for the behaviours the firmware's build flags select (`-selftest-fail`, `-crash`,
/// `-no-network`). What only the simulator can make (another chip id, a size) is refused.
pub fn firmware_file(
    dir: &std::path::Path,
    fw: &otarig_scenario::scenario::Firmware,
) -> anyhow::Result<Vec<u8>> {
    use otarig_esp32s3::appimage::{BootBehaviour, NetworkBehaviour, SelfTest};
    if fw.chip_id != otarig_agent::image::CHIP_ID_ESP32S3 {
        bail!(
            "firmware '{}' has chip id {}: only the simulator builds images for another chip",
            fw.id,
            fw.chip_id
        );
    }
    let mut name = fw.version.clone();
    if fw.self_test == SelfTest::Fail {
        name.push_str("-selftest-fail");
    }
    if fw.boot == BootBehaviour::Crash {
        name.push_str("-crash");
    }
    if fw.network == NetworkBehaviour::Never {
        name.push_str("-no-network");
    }
    let path = dir.join(format!("{name}.bin"));
    std::fs::read(&path).with_context(|| {
        format!(
            "firmware '{}' ({name}) for the real board: {} is missing; build it with `just fw-build {}`",
            fw.id,
            path.display(),
            fw.version
        )
    })
}

/// Put the board in download mode and flash the scenario's starting state with espflash.
pub(crate) async fn flash_starting_state(
    s: &Scenario,
    prep: &Prepared,
    nvs: Option<&[u8]>,
    opts: &HilOptions,
) -> anyhow::Result<()> {
    let images = starting_images(s, prep, nvs, opts)?;
    opts.reset.download_mode()?;
    let (port, target, show) = (opts.port.clone(), opts.target, opts.progress);
    tokio::task::spawn_blocking(move || {
        let mut bars = if show {
            flasher::Bars::new("flashing")
        } else {
            flasher::Bars::quiet()
        };
        flasher::flash(&port, target, &images, &mut bars)
    })
    .await??;
    // espflash's stub leaves a board in the loader; a real one it resets itself.
    opts.reset.reset_into_app()?;
    Ok(())
}

fn starting_images(
    s: &Scenario,
    prep: &Prepared,
    nvs: Option<&[u8]>,
    opts: &HilOptions,
) -> anyhow::Result<Vec<Image>> {
    let mut images = Vec::new();
    if let (Target::Hardware, Some(dir)) = (opts.target, &opts.firmware_dir) {
        // ESP32-S3's second-stage bootloader lives at 0x0 (built with app rollback enabled).
        let path = dir.join("bootloader.bin");
        let data = std::fs::read(&path)
            .with_context(|| format!("{} is missing (just fw-build)", path.display()))?;
        images.push(Image {
            name: "bootloader".into(),
            addr: 0,
            data,
        });
    }
    let table = prep.proto.table();
    images.push(Image {
        name: "partition table".into(),
        addr: otarig_esp32s3::partition::TABLE_OFFSET,
        data: table.to_binary()?,
    });
    // A fresh board per scenario: otadata (espflash never writes it), the agent's journal
    // (it remembers the last release sequence, which would refuse this scenario's releases as
    // replays) and NVS (provisioning follows) are erased by writing 0xFF.
    let erased = [
        table.otadata(),
        table.find(otarig_esp32s3::partition::AGENT_LABEL),
        table.find("nvs"),
    ];
    for p in erased.into_iter().flatten() {
        // Over TLS, NVS gets the factory image that provisions the board instead.
        let (name, data) = match nvs {
            Some(image) if p.label == "nvs" => {
                ("nvs (factory provisioning)".to_string(), image.to_vec())
            }
            _ => (format!("{} (erased)", p.label), vec![0xFF; p.size as usize]),
        };
        images.push(Image {
            name,
            addr: p.offset,
            data,
        });
    }
    let start_slot = table
        .app_slots()
        .into_iter()
        .find(|sl| sl.kind == prep.start_slot)
        .context("the scenario's partition table lost its starting slot")?;
    images.push(Image {
        name: format!("app {} -> {}", s.start_firmware, start_slot.kind),
        addr: start_slot.address,
        data: prep.images[&s.start_firmware].to_vec(),
    });
    Ok(images)
}
