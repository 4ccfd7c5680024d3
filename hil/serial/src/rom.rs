//! The ESP32-S3 ROM serial loader, and the flasher stub a host uploads into it, as a virtual
//! board answers them: enough that `espflash flash` and `esptool write-flash` in their
//! default modes (stub, compressed writes) and with `--no-stub` connect, detect the chip and
//! its flash, write images and check them.
//!
//! From Espressif's serial protocol reference ("esptool: Serial Protocol"), esptool's and
//! espflash's loaders and the esp-flasher-stub sources:
//! - SLIP framing (0xC0 ends a frame, 0xDB escapes), requests `00 op len:u16 checksum:u32
//!   data`, answers `01 op len:u16 value:u32 data status`. The ROM's status is 4 bytes
//!   `[0/1, error, 0, 0]` with errors 0x05–0x0F; the stub's is 2 bytes `[error, 0]` with
//!   errors 0xC0–0xC9 (espflash tells them apart by the answer's length).
//! - `SYNC` is answered eight times, by the ROM with a non-zero value and by the stub with 0
//!   (which is how esptool knows a stub already runs).
//! - `READ_REG`/`WRITE_REG` on a register file holding the factory MAC in the eFuse BLOCK1
//!   words esptool reads; the SPI0 user-command registers run an RDID (0x9F) when
//!   `SPI_CMD_REG` gets the USR bit (bit 18), so flash-size detection works.
//! - `GET_SECURITY_INFO` (0x14): no security features, chip id 9 (ESP32-S3), ECO 0.
//! - `SPI_ATTACH`, `SPI_SET_PARAMS`, `CHANGE_BAUDRATE`: accepted (a pty has no baud rate).
//! - `FLASH_BEGIN`/`FLASH_DEFL_BEGIN` erase the sectors the write covers, `*_DATA` checks each
//!   block's sequence number and XOR checksum (seed 0xEF), inflates a compressed (zlib)
//!   stream, and programs it; `FLASH_END`/`FLASH_DEFL_END` leave the ROM loader for the app
//!   (0 reboots, 1 runs user code); the stub stays with 1 and with 0 reboots into the ROM
//!   loader (the "stay in bootloader" soft reset of esptool and espflash).
//! - `MEM_BEGIN/DATA/END` upload into internal SRAM; `MEM_END` with an entry point starts
//!   what was uploaded, which is taken to be the flasher stub: it greets with `OHAI` and
//!   answers from then on in its format, with its commands `ERASE_FLASH`, `ERASE_REGION`,
//!   `READ_FLASH` (every packet at once; the host's acks are ignored) and `RUN_USER_CODE`.
//!   The uploaded code itself is not executed.
//! - `SPI_FLASH_MD5` (0x13) answers 32 ASCII hex digits from the ROM, 16 bytes from the stub;
//!   the ROM's `READ_FLASH_SLOW` (0x0E) reads up to 64 bytes.
//! - Anything else fails with "invalid message" (0x05 / 0xC3), as the ROM does for the
//!   stub-only commands.

use md5::{Digest, Md5};
use std::collections::HashMap;

/// What the loader needs from the board: its SPI flash.
pub trait FlashMemory {
    fn size(&self) -> u32;
    /// Erase whole 4 KiB sectors from `addr` (sector aligned) for `len` bytes.
    fn erase(&mut self, addr: u32, len: u32) -> Result<(), String>;
    fn write(&mut self, addr: u32, data: &[u8]) -> Result<(), String>;
    fn read(&self, addr: u32, buf: &mut [u8]);
}

/// Flash as a plain byte vector, for tests, fuzzing and tools: NOR semantics (a write can only
/// clear bits), every access bounds-checked.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VecFlash(pub Vec<u8>);

impl FlashMemory for VecFlash {
    fn size(&self) -> u32 {
        self.0.len() as u32
    }
    fn erase(&mut self, addr: u32, len: u32) -> Result<(), String> {
        let range = addr as usize..addr as usize + len as usize;
        let bytes = self.0.get_mut(range).ok_or("erase outside the flash")?;
        bytes.fill(0xFF);
        Ok(())
    }
    fn write(&mut self, addr: u32, data: &[u8]) -> Result<(), String> {
        let range = addr as usize..addr as usize + data.len();
        let bytes = self.0.get_mut(range).ok_or("write outside the flash")?;
        bytes
            .iter_mut()
            .zip(data)
            .for_each(|(old, new)| *old &= new);
        Ok(())
    }
    fn read(&self, addr: u32, buf: &mut [u8]) {
        match self.0.get(addr as usize..addr as usize + buf.len()) {
            Some(bytes) => buf.copy_from_slice(bytes),
            None => buf.fill(0xFF),
        }
    }
}

/// Chip id the ESP32-S3 ROM reports in `GET_SECURITY_INFO`.
pub const CHIP_ID_ESP32S3: u32 = 9;
/// The ROM's flash write block (espflash `FLASH_WRITE_SIZE`).
pub const FLASH_WRITE_SIZE: u32 = 0x400;
/// What the ROM answers SYNC with (a stub answers 0, which tells esptool it is running).
pub const ROM_SYNC_VALUE: u32 = 0x2012_0707;
/// The frame the flasher stub sends once it runs (`OHAI`).
pub const STUB_GREETING: &[u8] = b"OHAI";
const SECTOR: u32 = 4096;

const SPI0_BASE: u32 = 0x6000_2000;
const SPI_CMD: u32 = SPI0_BASE;
const SPI_USR2: u32 = SPI0_BASE + 0x20;
const SPI_W0: u32 = SPI0_BASE + 0x58;
const SPI_CMD_USR: u32 = 1 << 18;
const RDID: u32 = 0x9F;
/// BLOCK1 words 0 and 1, where the factory MAC is (esptool `read_mac` on the ESP32-S3).
const EFUSE_MAC_0: u32 = 0x6000_7044;
const EFUSE_MAC_1: u32 = 0x6000_7048;
/// The S3's internal SRAM as the ROM's MEM_BEGIN accepts it (data bus, instruction bus).
const RAM: [std::ops::Range<u32>; 2] = [0x3FC8_8000..0x3FD0_0000, 0x4037_0000..0x403E_0000];

/// Request opcodes (esptool's serial protocol reference).
mod op {
    pub const FLASH_BEGIN: u8 = 0x02;
    pub const FLASH_DATA: u8 = 0x03;
    pub const FLASH_END: u8 = 0x04;
    pub const MEM_BEGIN: u8 = 0x05;
    pub const MEM_END: u8 = 0x06;
    pub const MEM_DATA: u8 = 0x07;
    pub const SYNC: u8 = 0x08;
    pub const WRITE_REG: u8 = 0x09;
    pub const READ_REG: u8 = 0x0A;
    pub const SPI_SET_PARAMS: u8 = 0x0B;
    pub const SPI_ATTACH: u8 = 0x0D;
    pub const READ_FLASH_SLOW: u8 = 0x0E;
    pub const CHANGE_BAUDRATE: u8 = 0x0F;
    pub const FLASH_DEFL_BEGIN: u8 = 0x10;
    pub const FLASH_DEFL_DATA: u8 = 0x11;
    pub const FLASH_DEFL_END: u8 = 0x12;
    pub const SPI_FLASH_MD5: u8 = 0x13;
    pub const GET_SECURITY_INFO: u8 = 0x14;
    pub const ERASE_FLASH: u8 = 0xD0;
    pub const ERASE_REGION: u8 = 0xD1;
    pub const READ_FLASH: u8 = 0xD2;
    pub const RUN_USER_CODE: u8 = 0xD3;
}

/// Why a request failed, named once; [`Failure::code`] gives the byte the ROM or the stub
/// sends for it (their numbering differs).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Failure {
    /// A malformed request, an unknown or unsupported command, a bad length or block size.
    BadMessage,
    BadDataLength,
    BadChecksum,
    BadBlockSize,
    NotInFlashMode,
    FlashWrite,
    FlashRead,
    Inflate,
    TooMuchData,
    BadRamSize,
    BadRamAddress,
}

impl Failure {
    /// ROM: 0x05 bad message, 0x07 checksum, 0x08 flash write, 0x09 flash read, 0x0A read
    /// length, 0x0B deflate, 0x0E bad RAM size, 0x0F bad RAM address. Stub: 0xC0 data length,
    /// 0xC1 checksum, 0xC2 block size, 0xC3 invalid command, 0xC4 SPI operation, 0xC6 not in
    /// flash mode, 0xC7 inflate, 0xC9 too much data.
    pub fn code(self, stub: bool) -> u8 {
        use Failure::*;
        match (self, stub) {
            (BadMessage, false) | (BadDataLength, false) | (BadBlockSize, false) => 0x05,
            (NotInFlashMode, false) | (TooMuchData, false) => 0x05,
            (BadChecksum, false) => 0x07,
            (FlashWrite, false) => 0x08,
            (FlashRead, false) => 0x0A,
            (Inflate, false) => 0x0B,
            (BadRamSize, false) => 0x0E,
            (BadRamAddress, false) => 0x0F,
            (BadMessage, true) => 0xC3,
            (BadDataLength, true) | (BadRamSize, true) | (BadRamAddress, true) => 0xC0,
            (BadChecksum, true) => 0xC1,
            (BadBlockSize, true) => 0xC2,
            (FlashWrite, true) | (FlashRead, true) => 0xC4,
            (NotInFlashMode, true) => 0xC6,
            (Inflate, true) => 0xC7,
            (TooMuchData, true) => 0xC9,
        }
    }
}

/// What the loader wants done after answering.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum After {
    Nothing,
    /// Leave the loader: boot the app from flash (FLASH_END on the ROM, a reboot, or the
    /// stub's RUN_USER_CODE).
    RunApp,
}

/// A flash write between FLASH_(DEFL_)BEGIN and its END.
struct FlashWrite {
    offset: u32,
    /// Bytes the begun region holds (the ROM erased them at begin).
    erase_size: u32,
    block_size: u32,
    next_seq: u32,
    /// Plaintext bytes written so far.
    written: u32,
    /// The zlib stream of a compressed write (FLASH_DEFL_*).
    inflate: Option<Box<flate2::Decompress>>,
}

/// An upload to RAM between MEM_BEGIN and MEM_END.
#[derive(Debug)]
struct MemWrite {
    size: u32,
    block_size: u32,
    next_seq: u32,
    received: u32,
}

/// The loader's state between requests: the ROM's, or the flasher stub's once it runs.
pub struct RomLoader {
    regs: HashMap<u32, u32>,
    writing: Option<FlashWrite>,
    mem: Option<MemWrite>,
    /// JEDEC id the flash answers to RDID (manufacturer, type, capacity = log2 bytes).
    jedec: u32,
    /// The flasher stub was uploaded and started (MEM_END with an entry point).
    stub: bool,
}

impl std::fmt::Debug for RomLoader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RomLoader")
            .field("stub", &self.stub)
            .field("writing", &self.writing.is_some())
            .field("mem", &self.mem)
            .finish()
    }
}

impl RomLoader {
    /// A loader for a board with `flash_size` bytes of flash (a power of two) and factory
    /// MAC `mac`, readable where esptool reads it (BLOCK1 words 0 and 1).
    pub fn new(flash_size: u32, mac: [u8; 6]) -> RomLoader {
        let capacity = flash_size.max(1).trailing_zeros();
        let mut regs = HashMap::new();
        regs.insert(
            EFUSE_MAC_0,
            u32::from_be_bytes([mac[2], mac[3], mac[4], mac[5]]),
        );
        regs.insert(EFUSE_MAC_1, u32::from_be_bytes([0, 0, mac[0], mac[1]]));
        RomLoader {
            regs,
            writing: None,
            mem: None,
            // GigaDevice (0xC8), type 0x40, as on ESP32-S3-DevKitC modules.
            jedec: 0xC8 | (0x40 << 8) | (capacity << 16),
            stub: false,
        }
    }

    /// Whether the flasher stub runs (answers come in its format).
    pub fn stub_running(&self) -> bool {
        self.stub
    }

    /// Answer one request (a SLIP frame's payload). Returns the frames to send back (each a
    /// payload to SLIP-encode), and what to do next.
    pub fn handle(&mut self, req: &[u8], flash: &mut dyn FlashMemory) -> (Vec<Vec<u8>>, After) {
        let Some(r) = Request::parse(req) else {
            return (vec![], After::Nothing); // not a request (a host ack): ignored
        };
        if r.data.len() != r.len {
            return (
                vec![self.fail(r.op, Failure::BadDataLength)],
                After::Nothing,
            );
        }
        if r.op == op::SYNC {
            let value = if self.stub { 0 } else { ROM_SYNC_VALUE };
            return (
                (0..8).map(|_| self.ok(r.op, value, &[])).collect(),
                After::Nothing,
            );
        }
        if r.op == op::RUN_USER_CODE && self.stub {
            return (vec![], After::RunApp); // the stub jumps without answering
        }
        let mut extra = Vec::new();
        let mut after = After::Nothing;
        let answer = match r.op {
            op::READ_REG => self.read_reg(&r),
            op::WRITE_REG => self.write_reg(&r),
            op::GET_SECURITY_INFO => Ok((0, security_info())),
            op::SPI_ATTACH | op::SPI_SET_PARAMS | op::CHANGE_BAUDRATE => Ok((0, Vec::new())),
            op::FLASH_BEGIN => self.flash_begin(&r, flash, false),
            op::FLASH_DEFL_BEGIN => self.flash_begin(&r, flash, true),
            op::FLASH_DATA | op::FLASH_DEFL_DATA => self.flash_data(&r, flash),
            op::FLASH_END | op::FLASH_DEFL_END => {
                after = self.flash_end(&r);
                Ok((0, Vec::new()))
            }
            op::MEM_BEGIN if !self.stub => self.mem_begin(&r),
            op::MEM_DATA if !self.stub => self.mem_data(&r),
            op::MEM_END if !self.stub => {
                let answer = self.mem_end(&r);
                if answer.is_ok() && self.stub {
                    extra.push(STUB_GREETING.to_vec());
                }
                answer
            }
            op::READ_FLASH_SLOW if !self.stub => read_flash_slow(&r, flash),
            op::SPI_FLASH_MD5 => spi_flash_md5(&r, flash, self.stub),
            op::ERASE_FLASH if self.stub => {
                let size = flash.size();
                erase(flash, 0, size)
            }
            op::ERASE_REGION if self.stub => match (r.word(0), r.word(1)) {
                (Some(at), Some(len)) => erase(flash, at, len),
                _ => Err(Failure::BadDataLength),
            },
            op::READ_FLASH if self.stub => return (read_flash(&r, flash, self), After::Nothing),
            _ => Err(Failure::BadMessage),
        };
        let mut replies = vec![match answer {
            Ok((value, data)) => self.ok(r.op, value, &data),
            Err(f) => self.fail(r.op, f),
        }];
        replies.extend(extra);
        (replies, after)
    }

    fn ok(&self, op: u8, value: u32, data: &[u8]) -> Vec<u8> {
        response(op, value, data, self.status(None))
    }

    fn fail(&self, op: u8, f: Failure) -> Vec<u8> {
        response(op, 0, &[], self.status(Some(f)))
    }

    /// The ROM ends an answer with 4 status bytes `[status, error, 0, 0]`; the stub with 2,
    /// `[error, 0]` (0xC100 read big-endian by esptool; status byte first for espflash).
    fn status(&self, failure: Option<Failure>) -> Vec<u8> {
        match (failure, self.stub) {
            (None, false) => vec![0, 0, 0, 0],
            (Some(f), false) => vec![1, f.code(false), 0, 0],
            (None, true) => vec![0, 0],
            (Some(f), true) => vec![f.code(true), 0],
        }
    }

    fn read_reg(&self, r: &Request) -> Answer {
        let addr = r.word(0).ok_or(Failure::BadDataLength)?;
        Ok((self.regs.get(&addr).copied().unwrap_or(0), Vec::new()))
    }

    fn write_reg(&mut self, r: &Request) -> Answer {
        let (Some(addr), Some(value)) = (r.word(0), r.word(1)) else {
            return Err(Failure::BadDataLength);
        };
        let mask = r.word(2).unwrap_or(0xFFFF_FFFF);
        let old = self.regs.get(&addr).copied().unwrap_or(0);
        self.regs.insert(addr, (old & !mask) | (value & mask));
        if addr == SPI_CMD && value & SPI_CMD_USR != 0 {
            self.spi_user_command();
        }
        Ok((0, Vec::new()))
    }

    /// `FLASH_(DEFL_)BEGIN(size, blocks, block size, offset[, encrypt])`: the region the
    /// write will cover is erased at once (the ROM does so; the stub erases as it goes, which
    /// ends the same). `size` is the plaintext size.
    fn flash_begin(&mut self, r: &Request, flash: &mut dyn FlashMemory, deflate: bool) -> Answer {
        let (Some(size), Some(_blocks), Some(block_size), Some(offset)) =
            (r.word(0), r.word(1), r.word(2), r.word(3))
        else {
            return Err(Failure::BadDataLength);
        };
        if block_size == 0 || block_size > 0x4000 {
            return Err(Failure::BadBlockSize);
        }
        let start = offset - offset % SECTOR;
        let end = (offset as u64 + size as u64).div_ceil(SECTOR as u64) * SECTOR as u64;
        if end > flash.size() as u64 {
            return Err(Failure::FlashWrite);
        }
        if let Err(e) = flash.erase(start, end as u32 - start) {
            tracing::warn!("FLASH_BEGIN erase failed: {e}");
            return Err(Failure::FlashWrite);
        }
        self.writing = Some(FlashWrite {
            offset,
            erase_size: (end as u32) - offset,
            block_size,
            next_seq: 0,
            written: 0,
            inflate: deflate.then(|| Box::new(flate2::Decompress::new(true))),
        });
        Ok((0, Vec::new()))
    }

    /// `FLASH_(DEFL_)DATA(size, seq, 0, 0, block)`: the next block, checked, inflated when
    /// compressed, and programmed after what was written before.
    fn flash_data(&mut self, r: &Request, flash: &mut dyn FlashMemory) -> Answer {
        let w = self.writing.as_mut().ok_or(Failure::NotInFlashMode)?;
        let block = check_block(r, w.block_size, w.next_seq)?;
        // Padding past the begun region is not written (the ROM clips to the erase).
        let room = w.erase_size.saturating_sub(w.written);
        let plain = match w.inflate.as_mut() {
            None => block.to_vec(),
            Some(z) => inflate(z, block, room as usize)?,
        };
        let addr = w.offset + w.written;
        let n = (plain.len() as u32).min(room) as usize;
        if let Err(e) = flash.write(addr, &plain[..n]) {
            tracing::warn!("FLASH_DATA write at 0x{addr:x} failed: {e}");
            return Err(Failure::FlashWrite);
        }
        w.written += plain.len() as u32;
        w.next_seq += 1;
        Ok((0, Vec::new()))
    }

    /// `FLASH_(DEFL_)END(flag)`: 0 reboots, 1 runs user code. The ROM leaves the loader either
    /// way (the app boots). The stub stays with 1; with 0 it reboots the chip into the ROM
    /// loader (esptool's and espflash's "stay in bootloader" soft reset), so the stub is gone.
    fn flash_end(&mut self, r: &Request) -> After {
        self.writing = None;
        let run_user_code = r.word(0).unwrap_or(1) != 0;
        match (self.stub, run_user_code) {
            (false, _) => After::RunApp,
            (true, true) => After::Nothing,
            (true, false) => {
                self.stub = false;
                self.mem = None;
                After::Nothing
            }
        }
    }

    /// `MEM_BEGIN(size, blocks, block size, address)`: an upload into internal SRAM.
    fn mem_begin(&mut self, r: &Request) -> Answer {
        let (Some(size), Some(_blocks), Some(block_size), Some(addr)) =
            (r.word(0), r.word(1), r.word(2), r.word(3))
        else {
            return Err(Failure::BadDataLength);
        };
        let Some(ram) = RAM.iter().find(|ram| ram.contains(&addr)) else {
            return Err(Failure::BadRamAddress);
        };
        if addr as u64 + size as u64 > ram.end as u64 {
            return Err(Failure::BadRamSize);
        }
        if block_size == 0 || block_size > 0x4000 {
            return Err(Failure::BadBlockSize);
        }
        self.mem = Some(MemWrite {
            size,
            block_size,
            next_seq: 0,
            received: 0,
        });
        Ok((0, Vec::new()))
    }

    fn mem_data(&mut self, r: &Request) -> Answer {
        let m = self.mem.as_mut().ok_or(Failure::NotInFlashMode)?;
        let block = check_block(r, m.block_size, m.next_seq)?;
        m.received = m.received.saturating_add(block.len() as u32);
        if m.received > m.size.next_multiple_of(4) {
            return Err(Failure::TooMuchData);
        }
        m.next_seq += 1;
        Ok((0, Vec::new()))
    }

    /// `MEM_END(no_entry, entry)`: with an entry point the ROM jumps to what was uploaded.
    /// What a host uploads there is the flasher stub, which from then on answers in its
    /// own format and greets with `OHAI`.
    fn mem_end(&mut self, r: &Request) -> Answer {
        let (Some(no_entry), Some(entry)) = (r.word(0), r.word(1)) else {
            return Err(Failure::BadDataLength);
        };
        self.mem = None;
        if no_entry == 0 {
            if !RAM.iter().any(|ram| ram.contains(&entry)) {
                return Err(Failure::BadRamAddress);
            }
            self.stub = true;
            self.writing = None;
        }
        Ok((0, Vec::new()))
    }

    /// `SPI_CMD_REG` got USR: run the command in `SPI_USER2_REG` (only RDID is answered).
    fn spi_user_command(&mut self) {
        let command = self.regs.get(&SPI_USR2).copied().unwrap_or(0) & 0xFFFF;
        let result = if command == RDID { self.jedec } else { 0 };
        self.regs.insert(SPI_W0, result);
        // Done at once: clear the busy bit espflash polls.
        let cmd = self.regs.get(&SPI_CMD).copied().unwrap_or(0);
        self.regs.insert(SPI_CMD, cmd & !SPI_CMD_USR);
    }
}

/// A request frame: `00 op len:u16 checksum:u32 data`.
struct Request<'a> {
    op: u8,
    /// What the header says the data's length is.
    len: usize,
    checksum: u32,
    data: &'a [u8],
}

impl Request<'_> {
    fn parse(req: &[u8]) -> Option<Request<'_>> {
        if req.len() < 8 || req[0] != 0 {
            return None;
        }
        Some(Request {
            op: req[1],
            len: u16::from_le_bytes([req[2], req[3]]) as usize,
            checksum: u32::from_le_bytes([req[4], req[5], req[6], req[7]]),
            data: &req[8..],
        })
    }

    /// The `i`th little-endian word of the data.
    fn word(&self, i: usize) -> Option<u32> {
        self.data
            .get(i * 4..i * 4 + 4)
            .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }
}

/// A successful answer's value and data, or why it failed.
type Answer = Result<(u32, Vec<u8>), Failure>;

/// A data block's checks (FLASH_DATA, FLASH_DEFL_DATA, MEM_DATA): `size, seq, 0, 0`, then
/// `size` bytes whose XOR (seed 0xEF) is the request's checksum, in sequence.
fn check_block<'a>(r: &Request<'a>, block_size: u32, next_seq: u32) -> Result<&'a [u8], Failure> {
    let (Some(size), Some(seq)) = (r.word(0), r.word(1)) else {
        return Err(Failure::BadDataLength);
    };
    let block = &r.data[16.min(r.data.len())..];
    if block.len() != size as usize || size > block_size {
        return Err(Failure::BadDataLength);
    }
    if block.iter().fold(0xEFu8, |c, b| c ^ b) as u32 != r.checksum {
        return Err(Failure::BadChecksum);
    }
    if seq != next_seq {
        return Err(Failure::BadMessage);
    }
    Ok(block)
}

/// Inflate one block of a zlib stream, refusing more than `limit` bytes of output (what the
/// begun region still holds): a block that inflates past it is `TooMuchData`, whatever its
/// ratio.
fn inflate(z: &mut flate2::Decompress, mut input: &[u8], limit: usize) -> Result<Vec<u8>, Failure> {
    let mut out = Vec::with_capacity(input.len().saturating_mul(4).min(limit));
    loop {
        if out.len() > limit {
            return Err(Failure::TooMuchData);
        }
        out.reserve(16 * 1024);
        let before_in = z.total_in();
        let status = z
            .decompress_vec(input, &mut out, flate2::FlushDecompress::None)
            .map_err(|_| Failure::Inflate)?;
        input = &input[(z.total_in() - before_in) as usize..];
        let room_left = out.len() < out.capacity();
        // Done at the stream's end, or when the input is used up without filling the buffer.
        if status == flate2::Status::StreamEnd || (input.is_empty() && room_left) {
            return if out.len() > limit {
                Err(Failure::TooMuchData)
            } else {
                Ok(out)
            };
        }
        if room_left && status == flate2::Status::BufError {
            return Ok(out); // needs more input than this block holds
        }
    }
}

/// The stub's ERASE_FLASH and ERASE_REGION (whole sectors).
fn erase(flash: &mut dyn FlashMemory, at: u32, len: u32) -> Answer {
    if !at.is_multiple_of(SECTOR) || !len.is_multiple_of(SECTOR) {
        return Err(Failure::BadMessage);
    }
    if at as u64 + len as u64 > flash.size() as u64 {
        return Err(Failure::FlashWrite);
    }
    flash.erase(at, len).map_err(|_| Failure::FlashWrite)?;
    Ok((0, Vec::new()))
}

/// The ROM's READ_FLASH_SLOW(offset, length): at most 64 bytes in the answer.
fn read_flash_slow(r: &Request, flash: &dyn FlashMemory) -> Answer {
    let (Some(at), Some(len)) = (r.word(0), r.word(1)) else {
        return Err(Failure::BadDataLength);
    };
    if len > 64 || at as u64 + len as u64 > flash.size() as u64 {
        return Err(Failure::FlashRead);
    }
    let mut buf = vec![0u8; len as usize];
    flash.read(at, &mut buf);
    Ok((0, buf))
}

/// The stub's READ_FLASH(offset, length, packet size, in flight): the answer, then the data
/// in raw packets, then its 16-byte MD5. The host's acks (4-byte running totals) arrive as
/// frames too short to be requests and are ignored: every packet is sent at once.
fn read_flash(r: &Request, flash: &dyn FlashMemory, l: &RomLoader) -> Vec<Vec<u8>> {
    let (Some(at), Some(len), Some(packet)) = (r.word(0), r.word(1), r.word(2)) else {
        return vec![l.fail(r.op, Failure::BadDataLength)];
    };
    if packet == 0 || packet > 0x4000 || at as u64 + len as u64 > flash.size() as u64 {
        return vec![l.fail(r.op, Failure::FlashRead)];
    }
    let mut data = vec![0u8; len as usize];
    flash.read(at, &mut data);
    let mut frames = vec![l.ok(r.op, 0, &[])];
    frames.extend(data.chunks(packet as usize).map(<[u8]>::to_vec));
    frames.push(Md5::digest(&data).to_vec());
    frames
}

/// `GET_SECURITY_INFO`: no security features, chip id 9 (ESP32-S3), ECO 0.
fn security_info() -> Vec<u8> {
    let mut info = Vec::with_capacity(20);
    info.extend_from_slice(&0u32.to_le_bytes()); // flags: nothing enabled
    info.push(0); // flash_crypt_cnt
    info.extend_from_slice(&[0; 7]); // key purposes
    info.extend_from_slice(&CHIP_ID_ESP32S3.to_le_bytes());
    info.extend_from_slice(&0u32.to_le_bytes()); // eco version
    info
}

/// `SPI_FLASH_MD5(addr, size, 0, 0)`: the region's MD5, as 32 ASCII hex digits from the ROM
/// and as 16 raw bytes from the stub.
fn spi_flash_md5(r: &Request, flash: &dyn FlashMemory, stub: bool) -> Answer {
    let (Some(addr), Some(size)) = (r.word(0), r.word(1)) else {
        return Err(Failure::BadDataLength);
    };
    if addr.checked_add(size).is_none_or(|e| e > flash.size()) {
        return Err(Failure::FlashRead);
    }
    let mut md5 = Md5::new();
    let mut buf = vec![0u8; 64 * 1024];
    let mut done = 0;
    while done < size {
        let n = (size - done).min(buf.len() as u32) as usize;
        flash.read(addr + done, &mut buf[..n]);
        md5.update(&buf[..n]);
        done += n as u32;
    }
    let digest = md5.finalize();
    if stub {
        return Ok((0, digest.to_vec()));
    }
    let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
    Ok((0, hex.into_bytes()))
}

/// `01 op len:u16 value:u32 data status`, `len` counting data and status.
fn response(op: u8, value: u32, data: &[u8], status: Vec<u8>) -> Vec<u8> {
    let mut r = Vec::with_capacity(12 + data.len());
    r.push(0x01);
    r.push(op);
    r.extend_from_slice(&((data.len() + status.len()) as u16).to_le_bytes());
    r.extend_from_slice(&value.to_le_bytes());
    r.extend_from_slice(data);
    r.extend_from_slice(&status);
    r
}

/// SLIP frame assembly from a byte stream that also carries console text: bytes outside a
/// frame are ignored. Incremental, because the virtual board reads its pty in pieces.
#[derive(Debug, Default)]
pub struct SlipFrames {
    buf: Vec<u8>,
    in_frame: bool,
    escaped: bool,
}

impl SlipFrames {
    /// Feed bytes; returns the frames they completed.
    pub fn push(&mut self, bytes: &[u8]) -> Vec<Vec<u8>> {
        let mut frames = Vec::new();
        for &b in bytes {
            match (b, self.escaped) {
                (0xC0, _) => {
                    if self.in_frame && !self.buf.is_empty() {
                        frames.push(std::mem::take(&mut self.buf));
                    }
                    self.in_frame = true;
                    self.escaped = false;
                    self.buf.clear();
                }
                _ if !self.in_frame => {}
                (0xDB, false) => self.escaped = true,
                (0xDC, true) => {
                    self.buf.push(0xC0);
                    self.escaped = false;
                }
                (0xDD, true) => {
                    self.buf.push(0xDB);
                    self.escaped = false;
                }
                (b, _) => {
                    self.buf.push(b);
                    self.escaped = false;
                }
            }
            if self.buf.len() > 64 * 1024 {
                // Not a loader frame (the largest is a 16 KiB block): drop it.
                self.buf.clear();
                self.in_frame = false;
            }
        }
        frames
    }
}

/// SLIP-encode one frame.
pub fn slip_encode(payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(payload.len() + 8);
    let mut enc = slip_codec::SlipEncoder::new(true);
    // Writing to a Vec cannot fail.
    let _ = enc.encode(payload, &mut out);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAC: [u8; 6] = [0x7C, 0xDF, 0xA1, 0x01, 0x02, 0x03];

    fn req(op: u8, data: &[u8], checksum: u32) -> Vec<u8> {
        let mut r = vec![0, op];
        r.extend_from_slice(&(data.len() as u16).to_le_bytes());
        r.extend_from_slice(&checksum.to_le_bytes());
        r.extend_from_slice(data);
        r
    }

    fn words(w: &[u32]) -> Vec<u8> {
        w.iter().flat_map(|x| x.to_le_bytes()).collect()
    }

    fn block(seq: u32, data: &[u8]) -> (Vec<u8>, u32) {
        let mut d = words(&[data.len() as u32, seq, 0, 0]);
        d.extend_from_slice(data);
        (d, data.iter().fold(0xEF, |c, b| c ^ b) as u32)
    }

    /// (status, error) of a single response.
    fn status(r: &[Vec<u8>]) -> (u8, u8) {
        let last = &r[0];
        (last[last.len() - 4], last[last.len() - 3])
    }

    #[test]
    fn sync_is_answered_eight_times() {
        let mut l = RomLoader::new(1 << 20, MAC);
        let (r, _) = l.handle(
            &req(0x08, &[0x07, 0x07, 0x12, 0x20], 0),
            &mut VecFlash(vec![0xFF; 1 << 20]),
        );
        assert_eq!(r.len(), 8);
    }

    #[test]
    fn flash_data_checks_checksum_sequence_and_begin() {
        let mut m = VecFlash(vec![0u8; 1 << 20]);
        let mut l = RomLoader::new(1 << 20, MAC);
        let (d, sum) = block(0, &[1, 2, 3, 4]);
        let (r, _) = l.handle(&req(0x03, &d, sum), &mut m);
        assert_eq!(status(&r), (1, 0x05), "data before FLASH_BEGIN");
        let (r, _) = l.handle(&req(0x02, &words(&[4, 1, 0x400, 0x1000, 0]), 0), &mut m);
        assert_eq!(status(&r), (0, 0));
        assert!(
            m.0[0x1000..0x2000].iter().all(|b| *b == 0xFF),
            "begin erased the sector"
        );
        let (r, _) = l.handle(&req(0x03, &d, sum ^ 1), &mut m);
        assert_eq!(status(&r), (1, 0x07));
        let (d1, s1) = block(1, &[1, 2, 3, 4]);
        let (r, _) = l.handle(&req(0x03, &d1, s1), &mut m);
        assert_eq!(status(&r), (1, 0x05), "out of sequence");
        let (r, _) = l.handle(&req(0x03, &d, sum), &mut m);
        assert_eq!(status(&r), (0, 0));
        assert_eq!(&m.0[0x1000..0x1004], &[1, 2, 3, 4]);
        let (_, after) = l.handle(&req(0x04, &words(&[0]), 0), &mut m);
        assert_eq!(after, After::RunApp, "FLASH_END 0 reboots into the app");
    }

    #[test]
    fn out_of_range_and_stub_only_requests_fail_cleanly() {
        let mut m = VecFlash(vec![0u8; 1 << 20]);
        let mut l = RomLoader::new(1 << 20, MAC);
        let (r, _) = l.handle(
            &req(0x02, &words(&[u32::MAX, 1, 0x400, 0xFFFF_F000, 0]), 0),
            &mut m,
        );
        assert_eq!(status(&r), (1, 0x08));
        let (r, _) = l.handle(&req(0x13, &words(&[0xF_0000, 0x10_0000, 0, 0]), 0), &mut m);
        assert_eq!(status(&r), (1, 0x0A));
        let (r, _) = l.handle(&req(0xD1, &words(&[0, 4096]), 0), &mut m);
        assert_eq!(status(&r), (1, 0x05), "ERASE_REGION is stub-only");
        assert!(m.0.iter().all(|b| *b == 0), "nothing was written");
    }

    #[test]
    fn the_rom_answers_sync_with_a_value_and_the_stub_with_zero() {
        let mut m = VecFlash(vec![0xFF; 1 << 20]);
        let mut l = RomLoader::new(1 << 20, MAC);
        let (r, _) = l.handle(&req(0x08, &[0x07, 0x07, 0x12, 0x20], 0), &mut m);
        let value = |r: &[u8]| u32::from_le_bytes([r[4], r[5], r[6], r[7]]);
        assert!(
            r.iter().all(|x| value(x) == ROM_SYNC_VALUE),
            "esptool: non-zero is the ROM"
        );
        start_stub(&mut l, &mut m);
        let (r, _) = l.handle(&req(0x08, &[0x07, 0x07, 0x12, 0x20], 0), &mut m);
        assert_eq!(r.len(), 8);
        assert!(
            r.iter().all(|x| value(x) == 0 && x.len() == 10),
            "stub: 0, two status bytes"
        );
    }

    /// Upload a (pretend) stub and jump to it, as espflash and esptool do.
    fn start_stub(l: &mut RomLoader, m: &mut VecFlash) {
        let (r, _) = l.handle(&req(0x05, &words(&[8, 1, 0x1800, 0x4037_8000]), 0), m);
        assert_eq!(status(&r), (0, 0));
        let (d, sum) = block(0, &[0x36, 0x41, 0x00, 0x00, 1, 2, 3, 4]);
        let (r, _) = l.handle(&req(0x07, &d, sum), m);
        assert_eq!(status(&r), (0, 0));
        let (r, _) = l.handle(&req(0x06, &words(&[0, 0x4037_8004]), 0), m);
        assert_eq!(r.len(), 2, "MEM_END's answer, then the stub's greeting");
        assert_eq!(r[1], STUB_GREETING);
        assert!(l.stub_running());
    }

    #[test]
    fn flash_end_leaves_the_rom_loader_whatever_its_flag() {
        let mut m = VecFlash(vec![0u8; 1 << 20]);
        for flag in [0, 1] {
            let mut l = RomLoader::new(1 << 20, MAC);
            let (_, after) = l.handle(&req(0x04, &words(&[flag]), 0), &mut m);
            assert_eq!(after, After::RunApp, "FLASH_END({flag})");
        }
        // The stub stays unless asked to reboot; RUN_USER_CODE leaves it without an answer.
        let mut l = RomLoader::new(1 << 20, MAC);
        start_stub(&mut l, &mut m);
        assert_eq!(
            l.handle(&req(0x12, &words(&[1]), 0), &mut m).1,
            After::Nothing
        );
        assert_eq!(
            l.handle(&req(0xD3, &[], 0), &mut m),
            (vec![], After::RunApp)
        );
    }

    #[test]
    fn esptool_reads_the_factory_mac_from_the_efuse_registers() {
        let mut m = VecFlash(vec![0u8; 1 << 20]);
        let mut l = RomLoader::new(1 << 20, MAC);
        let mut reg = |addr: u32| {
            let (r, _) = l.handle(&req(0x0A, &words(&[addr]), 0), &mut m);
            u32::from_le_bytes([r[0][4], r[0][5], r[0][6], r[0][7]])
        };
        // esptool: struct.pack(">II", reg(0x60007048), reg(0x60007044))[2:]
        let (hi, lo) = (reg(0x6000_7048), reg(0x6000_7044));
        let mut packed = hi.to_be_bytes().to_vec();
        packed.extend(lo.to_be_bytes());
        assert_eq!(packed[2..], MAC);
    }

    #[test]
    fn rom_reads_flash_slowly_and_the_stub_erases_and_hashes_in_its_format() {
        let mut m = VecFlash((0..1 << 20).map(|i| i as u8).collect());
        let mut l = RomLoader::new(1 << 20, MAC);
        let (r, _) = l.handle(&req(0x0E, &words(&[0x100, 64]), 0), &mut m);
        assert_eq!(&r[0][8..72], &m.0[0x100..0x140]);
        let (r, _) = l.handle(&req(0x0E, &words(&[0x100, 65]), 0), &mut m);
        assert_eq!(status(&r), (1, 0x0A), "at most 64 bytes");
        start_stub(&mut l, &mut m);
        let (r, _) = l.handle(&req(0xD1, &words(&[0x1000, 0x1000]), 0), &mut m);
        assert_eq!(&r[0][r[0].len() - 2..], &[0, 0]);
        assert!(m.0[0x1000..0x2000].iter().all(|b| *b == 0xFF));
        let (r, _) = l.handle(&req(0x13, &words(&[0, 0x1000, 0, 0]), 0), &mut m);
        assert_eq!(r[0].len(), 26, "8 + 16 raw MD5 bytes + 2 status bytes");
        let (r, _) = l.handle(&req(0xD1, &words(&[0x1001, 0x1000]), 0), &mut m);
        assert_eq!(&r[0][r[0].len() - 2..], &[0xC3, 0], "stub error codes");
    }

    #[test]
    fn a_compressed_block_that_inflates_past_the_begun_region_is_refused() {
        use std::io::Write;
        let mut m = VecFlash(vec![0x5A; 1 << 20]);
        let mut l = RomLoader::new(1 << 20, MAC);
        let mut z = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::best());
        z.write_all(&vec![0u8; 512 * 1024]).unwrap();
        let bomb = z.finish().unwrap();
        assert!(bomb.len() < 0x400, "{} bytes", bomb.len());
        let (r, _) = l.handle(&req(0x10, &words(&[4096, 1, 0x400, 0x2000, 0]), 0), &mut m);
        assert_eq!(status(&r), (0, 0));
        let (d, sum) = block(0, &bomb);
        let (r, _) = l.handle(&req(0x11, &d, sum), &mut m);
        assert_eq!(status(&r), (1, 0x05), "the ROM's 'too much data'");
        assert!(
            m.0[0x2000..0x3000].iter().all(|b| *b == 0xFF),
            "nothing written"
        );
        assert_eq!(m.0[0x3000], 0x5A, "nothing past the region touched");
    }

    #[test]
    fn slip_frames_survive_console_text_and_escapes() {
        let mut f = SlipFrames::default();
        let payload = [1u8, 0xC0, 2, 0xDB, 3];
        let mut bytes = b"I (5) boot: noise\r\n".to_vec();
        bytes.extend(slip_encode(&payload));
        let mut frames = f.push(&bytes[..10]);
        frames.extend(f.push(&bytes[10..]));
        assert_eq!(frames, vec![payload.to_vec()]);
    }
}
