//! The ESP32-S3 ROM serial loader, as a virtual board answers it: enough of the protocol that
//! espflash, used exactly as on a real board (ROM loader, no stub), connects, detects the chip
//! and its flash, writes images and checks them.
//!
//! What is modelled, from Espressif's serial protocol reference ("esptool: Serial Protocol")
//! and the ESP32-S3 ROM:
//! - SLIP framing (0xC0 ends a frame, 0xDB escapes), requests `00 op len:u16 checksum:u32 data`,
//!   responses `01 op len:u16 value:u32 data` whose data ends with 4 status bytes (the ROM's;
//!   the stub uses 2): `status` (0 ok, 1 failed) and `error`.
//! - `SYNC` (0x08) is answered eight times, as the ROM does.
//! - `READ_REG`/`WRITE_REG` on a register file; the SPI0 user-command registers run an RDID
//!   (0x9F) when `SPI_CMD_REG` gets the USR bit (bit 18), so flash-size detection works.
//! - `GET_SECURITY_INFO` (0x14): no security features, chip id 9 (ESP32-S3), ECO 0.
//! - `SPI_ATTACH`, `SPI_SET_PARAMS`, `CHANGE_BAUDRATE`: accepted.
//! - `FLASH_BEGIN` erases the sectors the write will cover (the ROM erases at begin),
//!   `FLASH_DATA` checks the block's sequence number and its XOR checksum (seed 0xEF) and
//!   programs it, `FLASH_END` with 0 reboots into the flashed app.
//! - `SPI_FLASH_MD5` (0x13) answers the MD5 of a flash region as 32 ASCII hex digits (ROM).
//! - Anything else fails with error 0x05 ("received message is invalid"), as the ROM does for
//!   stub-only commands such as `ERASE_REGION`.

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
const SECTOR: u32 = 4096;

const SPI0_BASE: u32 = 0x6000_2000;
const SPI_CMD: u32 = SPI0_BASE;
const SPI_USR2: u32 = SPI0_BASE + 0x20;
const SPI_W0: u32 = SPI0_BASE + 0x58;
const SPI_CMD_USR: u32 = 1 << 18;
const RDID: u32 = 0x9F;

/// Request opcodes (esptool's serial protocol reference).
mod op {
    pub const FLASH_BEGIN: u8 = 0x02;
    pub const FLASH_DATA: u8 = 0x03;
    pub const FLASH_END: u8 = 0x04;
    pub const SYNC: u8 = 0x08;
    pub const WRITE_REG: u8 = 0x09;
    pub const READ_REG: u8 = 0x0A;
    pub const SPI_SET_PARAMS: u8 = 0x0B;
    pub const SPI_ATTACH: u8 = 0x0D;
    pub const CHANGE_BAUDRATE: u8 = 0x0F;
    pub const SPI_FLASH_MD5: u8 = 0x13;
    pub const GET_SECURITY_INFO: u8 = 0x14;
}

/// ROM error codes (the `error` status byte).
mod err {
    pub const INVALID_MESSAGE: u8 = 0x05;
    pub const BAD_DATA_LEN: u8 = 0xC0;
    pub const BAD_DATA_CHECKSUM: u8 = 0xC1;
    pub const BAD_BLOCKSIZE: u8 = 0xC2;
    pub const FLASH_WRITE_ERR: u8 = 0xC5;
    pub const NOT_IN_FLASH_MODE: u8 = 0xC9;
}

/// What the loader wants done after answering.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum After {
    Nothing,
    /// `FLASH_END` asked to leave the loader: reset and boot from flash.
    RunApp,
}

#[derive(Debug)]
struct FlashWrite {
    offset: u32,
    erase_size: u32,
    block_size: u32,
    next_seq: u32,
}

/// The loader's state between requests.
#[derive(Debug, Default)]
pub struct RomLoader {
    regs: HashMap<u32, u32>,
    writing: Option<FlashWrite>,
    /// JEDEC id the flash answers to RDID (manufacturer, type, capacity = log2 bytes).
    jedec: u32,
}

impl RomLoader {
    /// A loader for a board with `flash_size` bytes of flash (a power of two).
    pub fn new(flash_size: u32) -> RomLoader {
        let capacity = flash_size.max(1).trailing_zeros();
        RomLoader {
            regs: HashMap::new(),
            writing: None,
            // GigaDevice (0xC8), type 0x40, as on ESP32-S3-DevKitC modules.
            jedec: 0xC8 | (0x40 << 8) | (capacity << 16),
        }
    }

    /// Answer one request (a SLIP frame's payload). Returns the response frames' payloads.
    pub fn handle(&mut self, req: &[u8], flash: &mut dyn FlashMemory) -> (Vec<Vec<u8>>, After) {
        let Some(r) = Request::parse(req) else {
            return (vec![], After::Nothing); // not a request: the ROM ignores it
        };
        if r.data.len() != r.len {
            return (vec![fail(r.op, err::BAD_DATA_LEN)], After::Nothing);
        }
        if r.op == op::SYNC {
            return ((0..8).map(|_| ok(r.op, 0, &[])).collect(), After::Nothing);
        }
        let mut after = After::Nothing;
        let answer = match r.op {
            op::READ_REG => self.read_reg(&r),
            op::WRITE_REG => self.write_reg(&r),
            op::GET_SECURITY_INFO => Ok((0, security_info())),
            op::SPI_ATTACH | op::SPI_SET_PARAMS | op::CHANGE_BAUDRATE => Ok((0, Vec::new())),
            op::FLASH_BEGIN => self.flash_begin(&r, flash),
            op::FLASH_DATA => self.flash_data(&r, flash),
            op::FLASH_END => {
                self.writing = None;
                let stay = r.word(0).unwrap_or(1) != 0;
                if !stay {
                    after = After::RunApp;
                }
                Ok((0, Vec::new()))
            }
            op::SPI_FLASH_MD5 => spi_flash_md5(&r, flash),
            _ => Err(err::INVALID_MESSAGE),
        };
        let reply = match answer {
            Ok((value, data)) => ok(r.op, value, &data),
            Err(e) => fail(r.op, e),
        };
        (vec![reply], after)
    }

    fn read_reg(&self, r: &Request) -> Answer {
        let addr = r.word(0).ok_or(err::BAD_DATA_LEN)?;
        Ok((self.regs.get(&addr).copied().unwrap_or(0), Vec::new()))
    }

    fn write_reg(&mut self, r: &Request) -> Answer {
        let (Some(addr), Some(value)) = (r.word(0), r.word(1)) else {
            return Err(err::BAD_DATA_LEN);
        };
        let mask = r.word(2).unwrap_or(0xFFFF_FFFF);
        let old = self.regs.get(&addr).copied().unwrap_or(0);
        self.regs.insert(addr, (old & !mask) | (value & mask));
        if addr == SPI_CMD && value & SPI_CMD_USR != 0 {
            self.spi_user_command();
        }
        Ok((0, Vec::new()))
    }

    /// `FLASH_BEGIN(size, blocks, block size, offset)`: the ROM erases what the write will
    /// cover at once.
    fn flash_begin(&mut self, r: &Request, flash: &mut dyn FlashMemory) -> Answer {
        let (Some(size), Some(_blocks), Some(block_size), Some(offset)) =
            (r.word(0), r.word(1), r.word(2), r.word(3))
        else {
            return Err(err::BAD_DATA_LEN);
        };
        if block_size == 0 || block_size > 0x4000 {
            return Err(err::BAD_BLOCKSIZE);
        }
        let start = offset - offset % SECTOR;
        let end = (offset as u64 + size as u64).div_ceil(SECTOR as u64) * SECTOR as u64;
        if end > flash.size() as u64 {
            return Err(err::FLASH_WRITE_ERR);
        }
        if let Err(e) = flash.erase(start, end as u32 - start) {
            tracing::warn!("FLASH_BEGIN erase failed: {e}");
            return Err(err::FLASH_WRITE_ERR);
        }
        self.writing = Some(FlashWrite {
            offset,
            erase_size: size,
            block_size,
            next_seq: 0,
        });
        Ok((0, Vec::new()))
    }

    /// `FLASH_DATA(size, seq, 0, 0, block)`: the next block, checked and programmed.
    fn flash_data(&mut self, r: &Request, flash: &mut dyn FlashMemory) -> Answer {
        let w = self.writing.as_mut().ok_or(err::NOT_IN_FLASH_MODE)?;
        let (Some(size), Some(seq)) = (r.word(0), r.word(1)) else {
            return Err(err::BAD_DATA_LEN);
        };
        let block = &r.data[16.min(r.data.len())..];
        if block.len() != size as usize || size > w.block_size {
            return Err(err::BAD_DATA_LEN);
        }
        if block.iter().fold(0xEFu8, |c, b| c ^ b) as u32 != r.checksum {
            return Err(err::BAD_DATA_CHECKSUM);
        }
        if seq != w.next_seq {
            return Err(err::INVALID_MESSAGE);
        }
        let addr = w.offset + seq * w.block_size;
        // Padding past the begun region is not written (the ROM clips to the erase).
        let room = (w.offset + w.erase_size.div_ceil(SECTOR) * SECTOR).saturating_sub(addr);
        let n = (block.len() as u32).min(room) as usize;
        if let Err(e) = flash.write(addr, &block[..n]) {
            tracing::warn!("FLASH_DATA write at 0x{addr:x} failed: {e}");
            return Err(err::FLASH_WRITE_ERR);
        }
        w.next_seq += 1;
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

/// A successful answer's value and data, or the error code of a failed one.
type Answer = Result<(u32, Vec<u8>), u8>;

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

/// `SPI_FLASH_MD5(addr, size, 0, 0)`: the region's MD5 as 32 ASCII hex digits, as the ROM
/// answers it.
fn spi_flash_md5(r: &Request, flash: &dyn FlashMemory) -> Answer {
    let (Some(addr), Some(size)) = (r.word(0), r.word(1)) else {
        return Err(err::BAD_DATA_LEN);
    };
    if addr.checked_add(size).is_none_or(|e| e > flash.size()) {
        return Err(err::FLASH_WRITE_ERR);
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
    let hex: String = md5.finalize().iter().map(|b| format!("{b:02x}")).collect();
    Ok((0, hex.into_bytes()))
}

fn response(op: u8, value: u32, data: &[u8], status: u8, error: u8) -> Vec<u8> {
    let mut r = Vec::with_capacity(12 + data.len());
    r.push(0x01);
    r.push(op);
    r.extend_from_slice(&((data.len() + 4) as u16).to_le_bytes());
    r.extend_from_slice(&value.to_le_bytes());
    r.extend_from_slice(data);
    r.extend_from_slice(&[status, error, 0, 0]);
    r
}

fn ok(op: u8, value: u32, data: &[u8]) -> Vec<u8> {
    response(op, value, data, 0, 0)
}

fn fail(op: u8, error: u8) -> Vec<u8> {
    response(op, 0, &[], 1, error)
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
        let mut l = RomLoader::new(1 << 20);
        let (r, _) = l.handle(
            &req(0x08, &[0x07, 0x07, 0x12, 0x20], 0),
            &mut VecFlash(vec![0xFF; 1 << 20]),
        );
        assert_eq!(r.len(), 8);
    }

    #[test]
    fn flash_data_checks_checksum_sequence_and_begin() {
        let mut m = VecFlash(vec![0u8; 1 << 20]);
        let mut l = RomLoader::new(1 << 20);
        let (d, sum) = block(0, &[1, 2, 3, 4]);
        let (r, _) = l.handle(&req(0x03, &d, sum), &mut m);
        assert_eq!(
            status(&r),
            (1, err::NOT_IN_FLASH_MODE),
            "data before FLASH_BEGIN"
        );
        let (r, _) = l.handle(&req(0x02, &words(&[4, 1, 0x400, 0x1000, 0]), 0), &mut m);
        assert_eq!(status(&r), (0, 0));
        assert!(
            m.0[0x1000..0x2000].iter().all(|b| *b == 0xFF),
            "begin erased the sector"
        );
        let (r, _) = l.handle(&req(0x03, &d, sum ^ 1), &mut m);
        assert_eq!(status(&r), (1, err::BAD_DATA_CHECKSUM));
        let (d1, s1) = block(1, &[1, 2, 3, 4]);
        let (r, _) = l.handle(&req(0x03, &d1, s1), &mut m);
        assert_eq!(status(&r), (1, err::INVALID_MESSAGE), "out of sequence");
        let (r, _) = l.handle(&req(0x03, &d, sum), &mut m);
        assert_eq!(status(&r), (0, 0));
        assert_eq!(&m.0[0x1000..0x1004], &[1, 2, 3, 4]);
        let (_, after) = l.handle(&req(0x04, &words(&[0]), 0), &mut m);
        assert_eq!(after, After::RunApp, "FLASH_END 0 reboots into the app");
    }

    #[test]
    fn out_of_range_and_stub_only_requests_fail_cleanly() {
        let mut m = VecFlash(vec![0u8; 1 << 20]);
        let mut l = RomLoader::new(1 << 20);
        let (r, _) = l.handle(
            &req(0x02, &words(&[u32::MAX, 1, 0x400, 0xFFFF_F000, 0]), 0),
            &mut m,
        );
        assert_eq!(status(&r), (1, err::FLASH_WRITE_ERR));
        let (r, _) = l.handle(&req(0x13, &words(&[0xF_0000, 0x10_0000, 0, 0]), 0), &mut m);
        assert_eq!(status(&r), (1, err::FLASH_WRITE_ERR));
        let (r, _) = l.handle(&req(0xD1, &words(&[0, 4096]), 0), &mut m);
        assert_eq!(
            status(&r),
            (1, err::INVALID_MESSAGE),
            "ERASE_REGION is stub-only"
        );
        assert!(m.0.iter().all(|b| *b == 0), "nothing was written");
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
