//! What an ESP32-S3 prints on its console when it resets: the ROM banner, and the 2nd stage
//! bootloader's log lines for what the simulated bootloader did. The virtual board writes them
//! to its pty and the wire fleet to its console logs, so the HIL runner parses the same lines
//! from real and virtual boards.

use crate::board::BoardEvent;

/// The ROM's banner when it boots into the serial download mode (strapping pin low, or a
/// blank flash).
pub const DOWNLOAD_BANNER: &str = "ESP-ROM:esp32s3-20210327\r\nBuild:Mar 27 2021\r\nrst:0x1 (POWERON),boot:0x0 (DOWNLOAD(USB/UART0))\r\nwaiting for download\r\n";

/// ESP-IDF-like log lines for what the simulated bootloader did. Every boot prints the ROM
/// banner first, as the chip does after any reset: the HIL runner counts boots by it, on real
/// and virtual boards alike.
pub fn bootloader_log(t_ms: u64, e: &BoardEvent) -> String {
    const BANNER: &str = "ESP-ROM:esp32s3-20210327\r\nBuild:Mar 27 2021\r\nrst:0x1 (POWERON),boot:0x8 (SPI_FAST_FLASH_BOOT)\r\n";
    match e {
        BoardEvent::BootloaderStarted {
            slot,
            version,
            sha256,
            ..
        } => format!(
            "{BANNER}I ({t_ms}) boot: ESP-IDF 2nd stage bootloader (otarig virtual board)\r\nI ({t_ms}) boot: Loaded app from partition {slot}: version {version}, sha256 {}\r\n",
            &sha256[..sha256.len().min(16)]
        ),
        BoardEvent::Bricked { reason } => {
            format!("{BANNER}E ({t_ms}) boot: No bootable app partitions in the partition table ({reason})\r\n")
        }
        BoardEvent::BootloaderAborted { slot } => {
            format!("W ({t_ms}) boot: {slot} was PENDING_VERIFY at reset: marked ABORTED, rolling back\r\n")
        }
        BoardEvent::BootRejected { slot, reason } => {
            format!("E ({t_ms}) esp_image: {slot} not bootable: {reason}\r\n")
        }
        other => format!("D ({t_ms}) otarig-sim: {other:?}\r\n"),
    }
}
