//! Flashing a board with espflash as a library, the same code path for a real ESP32-S3 and for
//! the virtual board.
//!
//! - Real boards: espflash's default reset into the ROM loader (an RTS/DTR sequence for UART
//!   bridges, its own sequence for the USB-Serial-JTAG port, VID 0x303a PID 0x1001), the RAM
//!   stub, and a hard reset into the app afterwards.
//! - The virtual board (a pty, no modem lines): the runner has already put it in download mode
//!   through its control socket, so espflash connects without a reset. With the stub (the
//!   default, as on a real board) espflash uploads it, writes compressed, and the board stays
//!   in the loader until it is reset; without it (`flash_with(.., false, ..)`) espflash talks
//!   to the ROM loader and `FLASH_END` boots the app.
//!
//! Either way every image is verified afterwards with `SPI_FLASH_MD5`. `otadata` is never
//! written by espflash, so the runner passes it as an image of 0xFF bytes: erased, which makes
//! the bootloader start from the factory/first OTA slot as on a fresh board.

use espflash::connection::{Connection, ResetAfterOperation, ResetBeforeOperation};
use espflash::flasher::Flasher;
use espflash::image_format::Segment;
use espflash::target::{Chip, ProgressCallbacks};
use serialport::UsbPortInfo;

/// One thing to write.
#[derive(Clone, Debug)]
pub struct Image {
    pub name: String,
    pub addr: u32,
    pub data: Vec<u8>,
}

/// How the board on the port is reached.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Target {
    /// A board on a USB-UART bridge or its USB-Serial-JTAG port.
    Hardware,
    /// The virtual board on a pty, already waiting in download mode.
    Virtual,
}

#[derive(Debug, thiserror::Error)]
pub enum FlashError {
    #[error("cannot open serial port {port}: {source} (is another program, such as a serial monitor, using it?)")]
    Open {
        port: String,
        source: serialport::Error,
    },
    #[error("cannot talk to the ROM loader on {port}: {source}. {hint}")]
    Connect {
        port: String,
        source: Box<espflash::Error>,
        hint: &'static str,
    },
    #[error("writing {image} at 0x{addr:x} on {port} failed: {source}")]
    Write {
        port: String,
        image: String,
        addr: u32,
        source: Box<espflash::Error>,
    },
}

/// Open `port`, connect to the ESP32-S3 ROM loader and write `images`, verifying each.
pub fn flash(
    port: &str,
    target: Target,
    images: &[Image],
    progress: &mut dyn ProgressCallbacks,
) -> Result<(), FlashError> {
    flash_with(port, target, true, images, progress)
}

/// [`flash`], saying whether espflash uploads and uses its flasher stub (`use_stub`, its
/// default and the faster way) or talks to the ROM loader only (`--no-stub`). With the stub,
/// a virtual board stays in the loader after flashing until it is reset.
pub fn flash_with(
    port: &str,
    target: Target,
    use_stub: bool,
    images: &[Image],
    progress: &mut dyn ProgressCallbacks,
) -> Result<(), FlashError> {
    let serial = serialport::new(port, 115_200)
        .timeout(std::time::Duration::from_secs(3))
        .open_native()
        .map_err(|source| FlashError::Open {
            port: port.to_string(),
            source,
        })?;
    let info = port_info(port);
    let (before, after, hint) = match target {
        Target::Hardware => (
            ResetBeforeOperation::DefaultReset,
            ResetAfterOperation::HardReset,
            "Check the cable and that the port is the board's; hold BOOT while pressing RESET to force download mode.",
        ),
        Target::Virtual => (
            ResetBeforeOperation::NoReset,
            ResetAfterOperation::NoResetNoStub,
            "Is the virtual board in download mode (the runner asks it through --control)?",
        ),
    };
    let conn = Connection::new(serial, info, after, before, 115_200);
    let mut flasher = Flasher::connect(conn, use_stub, true, false, Some(Chip::Esp32s3), None)
        .map_err(|source| FlashError::Connect {
            port: port.to_string(),
            source: Box::new(source),
            hint,
        })?;
    let segments: Vec<Segment<'_>> = images
        .iter()
        .map(|i| Segment {
            addr: i.addr,
            data: std::borrow::Cow::Borrowed(&i.data),
        })
        .collect();
    // One session: every segment, then FLASH_END and the after-reset once. The progress
    // callbacks say which segment was being written when something failed.
    let mut seen = Track {
        inner: progress,
        addr: None,
    };
    flasher
        .write_bins_to_flash(&segments, &mut seen)
        .map_err(|source| {
            let addr = seen.addr.unwrap_or(0);
            let image = images
                .iter()
                .find(|i| i.addr == addr)
                .map_or_else(|| "?".to_string(), |i| i.name.clone());
            FlashError::Write {
                port: port.to_string(),
                image,
                addr,
                source: Box::new(source),
            }
        })
}

/// Remembers the segment being written.
struct Track<'a> {
    inner: &'a mut dyn ProgressCallbacks,
    addr: Option<u32>,
}

impl ProgressCallbacks for Track<'_> {
    fn init(&mut self, addr: u32, total: usize) {
        self.addr = Some(addr);
        self.inner.init(addr, total);
    }
    fn update(&mut self, current: usize) {
        self.inner.update(current);
    }
    fn verifying(&mut self) {
        self.inner.verifying();
    }
    fn finish(&mut self, skipped: bool) {
        self.inner.finish(skipped);
    }
}

/// The USB identity of a port (zeros for a pty or an unknown port).
fn port_info(port: &str) -> UsbPortInfo {
    let listed = serialport::available_ports().unwrap_or_default();
    for p in listed {
        if p.port_name == port {
            if let serialport::SerialPortType::UsbPort(info) = p.port_type {
                return info;
            }
        }
    }
    UsbPortInfo {
        vid: 0,
        pid: 0,
        serial_number: None,
        manufacturer: None,
        product: None,
    }
}

/// espflash progress on an indicatif bar, one bar per image.
pub struct Bars {
    bar: indicatif::ProgressBar,
    name: String,
}

impl Bars {
    pub fn new(name: &str) -> Bars {
        Bars {
            bar: indicatif::ProgressBar::hidden(),
            name: name.to_string(),
        }
    }

    /// A hidden bar (tests, logs).
    pub fn quiet() -> Bars {
        Bars::new("")
    }
}

impl ProgressCallbacks for Bars {
    fn init(&mut self, addr: u32, total: usize) {
        if self.name.is_empty() {
            return;
        }
        self.bar = indicatif::ProgressBar::new(total as u64);
        self.bar.set_style(
            indicatif::ProgressStyle::with_template("{msg:>28} [{bar:30}] {pos}/{len} blocks")
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
        self.bar.set_message(format!("{} @ 0x{addr:x}", self.name));
    }
    fn update(&mut self, current: usize) {
        self.bar.set_position(current as u64);
    }
    fn verifying(&mut self) {
        self.bar.set_message(format!("{} verifying", self.name));
    }
    fn finish(&mut self, _skipped: bool) {
        self.bar.finish();
    }
}
