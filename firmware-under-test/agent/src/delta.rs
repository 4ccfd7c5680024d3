//! Delta patches: the container, and a streaming, resumable applier with bounded memory.
//!
//! The patch is the raw stream of the `bsdiff` crate (a sequence of records: a 24-byte control
//! `{mix_len u64, copy_len u64, seek i64 sign-magnitude}`, then `mix_len` diff bytes added to
//! old bytes, then `copy_len` literal bytes; the old position moves by `mix_len + seek`), cut
//! into blocks of 4 KiB that are LZ4-compressed independently:
//!
//! ```text
//! header  96 bytes: "OTRGDLT1", codec (1 = LZ4 blocks), log2(block size), 2 reserved,
//!                   old_size u32, new_size u32, raw_size u32, block count u32,
//!                   old SHA-256 [32], new SHA-256 [32], 4 reserved
//! block   u16 LE compressed length (high bit set: stored uncompressed), then the bytes
//! ```
//!
//! Applying reads the patch once, front to back; reads old bytes by offset from the running
//! slot; writes new bytes sequentially. State: one compressed block, one decompressed block,
//! a 256-byte old-bytes buffer. Because blocks are independent, the applier can stop at any
//! point where the *output* reaches a sector boundary, describe itself in a [`Resume`] of a
//! few bytes (which block, how far into it, the bsdiff position), and continue later from
//! there after re-fetching only that block — which is what makes a power cut mid-patch cheap.

use alloc::vec;
use alloc::vec::Vec;
use core::fmt;

pub const MAGIC: &[u8; 8] = b"OTRGDLT1";
pub const HEADER_LEN: usize = 96;
pub const CODEC_LZ4_BLOCKS: u8 = 1;
/// Block size used by the host tooling (the format allows 2^10..2^14).
pub const BLOCK_LOG2: u8 = 12;
const STORED: u16 = 0x8000;

/// What the header says.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Header {
    pub block_size: u32,
    pub old_size: u32,
    pub new_size: u32,
    pub raw_size: u32,
    pub blocks: u32,
    pub old_sha256: [u8; 32],
    pub new_sha256: [u8; 32],
}

impl Header {
    pub fn parse(b: &[u8]) -> Result<Header, DeltaError> {
        if b.len() < HEADER_LEN || &b[..8] != MAGIC {
            return Err(DeltaError::BadMagic);
        }
        if b[8] != CODEC_LZ4_BLOCKS {
            return Err(DeltaError::UnknownCodec(b[8]));
        }
        if !(10..=14).contains(&b[9]) {
            return Err(DeltaError::BadBlockSize(b[9]));
        }
        let u = |i: usize| u32::from_le_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
        let mut old_sha256 = [0u8; 32];
        let mut new_sha256 = [0u8; 32];
        old_sha256.copy_from_slice(&b[28..60]);
        new_sha256.copy_from_slice(&b[60..92]);
        Ok(Header {
            block_size: 1 << b[9],
            old_size: u(12),
            new_size: u(16),
            raw_size: u(20),
            blocks: u(24),
            old_sha256,
            new_sha256,
        })
    }

    pub fn encode(&self) -> [u8; HEADER_LEN] {
        let mut b = [0u8; HEADER_LEN];
        b[..8].copy_from_slice(MAGIC);
        b[8] = CODEC_LZ4_BLOCKS;
        b[9] = self.block_size.trailing_zeros() as u8;
        b[12..16].copy_from_slice(&self.old_size.to_le_bytes());
        b[16..20].copy_from_slice(&self.new_size.to_le_bytes());
        b[20..24].copy_from_slice(&self.raw_size.to_le_bytes());
        b[24..28].copy_from_slice(&self.blocks.to_le_bytes());
        b[28..60].copy_from_slice(&self.old_sha256);
        b[60..92].copy_from_slice(&self.new_sha256);
        b
    }
}

/// Why a patch cannot be applied. Any of these makes the agent fall back to the full image.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DeltaError {
    BadMagic,
    UnknownCodec(u8),
    BadBlockSize(u8),
    BadBlock {
        block: u32,
    },
    BadControl {
        reason: &'static str,
    },
    OldOutOfRange {
        pos: u64,
    },
    NewTooLong,
    Truncated,
    Io,
    /// A checkpoint that does not fit this patch's header (a journal of another patch, or a
    /// record corrupted past its CRC).
    BadResume,
}

impl fmt::Display for DeltaError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DeltaError::BadMagic => f.write_str("not an otarig delta (bad magic)"),
            DeltaError::UnknownCodec(c) => write!(f, "unknown delta codec {c}"),
            DeltaError::BadBlockSize(l) => write!(f, "block size 2^{l} outside 2^10..2^14"),
            DeltaError::BadBlock { block } => write!(f, "block {block} does not decompress"),
            DeltaError::BadControl { reason } => write!(f, "bad bsdiff control record: {reason}"),
            DeltaError::OldOutOfRange { pos } => {
                write!(f, "patch reads old image at {pos}, past its end")
            }
            DeltaError::BadResume => f.write_str("the checkpoint does not fit this patch"),
            DeltaError::NewTooLong => {
                f.write_str("patch produces more bytes than the new image has")
            }
            DeltaError::Truncated => f.write_str("patch ended early"),
            DeltaError::Io => f.write_str("flash read or write failed while patching"),
        }
    }
}

/// Where the applier is, at a point where the output is at `new_written`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Resume {
    /// Patch offset of the block being applied (its 2-byte length prefix).
    pub block_offset: u32,
    /// Index of that block.
    pub block_index: u32,
    /// Decompressed bytes of that block already applied.
    pub raw_skip: u32,
    pub new_written: u32,
    pub old_pos: u32,
    /// 0: at a control record; 1: inside diff bytes; 2: inside literal bytes.
    pub phase: u8,
    pub remaining: u32,
    /// Literal bytes that follow the diff bytes of the current record.
    pub pending_copy: u32,
    pub seek: i64,
}

impl Resume {
    /// Whether this checkpoint can belong to a patch with header `h`: every position within
    /// what the header declares. The journal's CRC catches torn writes, not a checkpoint of
    /// another patch or a record corrupted with a valid CRC.
    fn fits(&self, h: &Header) -> bool {
        let block = h.block_size as u64;
        self.new_written as u64 <= h.new_size as u64
            && self.old_pos as u64 <= h.old_size as u64
            && self.block_offset as usize >= HEADER_LEN
            && self.block_index <= h.blocks
            && self.raw_skip as u64 <= block
            && self.phase <= 2
    }

    /// Bytes of [`Resume::encode`]'s output.
    pub const ENCODED_LEN: usize = 40;

    /// Little-endian, in field order (`phase` widened to four bytes), for the journal.
    pub fn encode(&self, out: &mut [u8]) {
        let words = [
            self.block_offset,
            self.block_index,
            self.raw_skip,
            self.new_written,
            self.old_pos,
            u32::from(self.phase),
            self.remaining,
            self.pending_copy,
        ];
        for (chunk, w) in out[..32].chunks_exact_mut(4).zip(words) {
            chunk.copy_from_slice(&w.to_le_bytes());
        }
        out[32..40].copy_from_slice(&self.seek.to_le_bytes());
    }

    /// The inverse of [`Resume::encode`]; `b` holds at least [`Resume::ENCODED_LEN`] bytes.
    pub fn decode(b: &[u8]) -> Resume {
        let w = |i: usize| u32::from_le_bytes([b[4 * i], b[4 * i + 1], b[4 * i + 2], b[4 * i + 3]]);
        let mut seek = [0u8; 8];
        seek.copy_from_slice(&b[32..40]);
        Resume {
            block_offset: w(0),
            block_index: w(1),
            raw_skip: w(2),
            new_written: w(3),
            old_pos: w(4),
            phase: b[20],
            remaining: w(6),
            pending_copy: w(7),
            seek: i64::from_le_bytes(seek),
        }
    }
}

/// A sink could not read or write (it keeps the details itself).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SinkError;

/// Where old bytes come from and new bytes go.
pub trait Sink {
    /// Read `buf.len()` bytes of the old image at `offset`.
    fn read_old(&mut self, offset: u32, buf: &mut [u8]) -> Result<(), SinkError>;
    /// Append new bytes.
    fn write_new(&mut self, data: &[u8]) -> Result<(), SinkError>;
    /// The output just reached a multiple of the checkpoint interval; `at` resumes here.
    fn checkpoint(&mut self, at: Resume);
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Bs {
    Control { have: u8 },
    Mix { remaining: u64 },
    Copy { remaining: u64 },
}

/// The streaming applier.
pub struct Applier {
    header: Option<Header>,
    resume_to: Option<Resume>,
    /// Next patch offset wanted.
    next: u64,
    /// Bytes of the item being collected (header, or a block with its prefix).
    inbuf: Vec<u8>,
    need: usize,
    outbuf: Vec<u8>,
    block_index: u32,
    block_offset: u64,
    ctrl: [u8; 24],
    bs: Bs,
    seek: i64,
    pending_copy: u64,
    old_pos: u64,
    raw_done: u64,
    /// Set when reading the header moved `next` to the resume point.
    jumped: bool,
    new_written: u64,
    interval: u32,
}

impl Applier {
    /// Start at the beginning of a patch. Checkpoints are offered every `interval` bytes of
    /// output (a multiple of the 4 KiB sector).
    pub fn new(interval: u32) -> Applier {
        Applier {
            header: None,
            resume_to: None,
            next: 0,
            inbuf: Vec::new(),
            need: HEADER_LEN,
            outbuf: Vec::new(),
            block_index: 0,
            block_offset: HEADER_LEN as u64,
            ctrl: [0; 24],
            bs: Bs::Control { have: 0 },
            seek: 0,
            pending_copy: 0,
            old_pos: 0,
            raw_done: 0,
            jumped: false,
            new_written: 0,
            interval,
        }
    }

    /// Continue from a checkpoint: the header is read again, then the patch from the block
    /// the checkpoint is in.
    pub fn resume(interval: u32, at: Resume) -> Applier {
        let mut a = Applier::new(interval);
        a.resume_to = Some(at);
        a
    }

    /// The patch offset the applier wants next: fetch from here.
    pub fn next_offset(&self) -> u64 {
        self.next
    }

    pub fn header(&self) -> Option<&Header> {
        self.header.as_ref()
    }

    pub fn new_written(&self) -> u64 {
        self.new_written
    }

    /// True when all of the new image has been produced.
    pub fn is_done(&self) -> bool {
        self.header.is_some_and(|h| {
            self.new_written == h.new_size as u64 && self.raw_done == h.raw_size as u64
        })
    }

    /// Feed patch bytes starting at [`Applier::next_offset`]; returns how many were taken.
    pub fn feed<S: Sink>(&mut self, data: &[u8], sink: &mut S) -> Result<usize, DeltaError> {
        let mut used = 0;
        while used < data.len() && !self.is_done() {
            let take = core::cmp::min(self.need - self.inbuf.len(), data.len() - used);
            self.inbuf.extend_from_slice(&data[used..used + take]);
            used += take;
            self.next += take as u64;
            if self.inbuf.len() < self.need {
                break;
            }
            self.item_complete(sink)?;
            if core::mem::take(&mut self.jumped) {
                break; // the rest of `data` is not at the resume point
            }
        }
        Ok(used)
    }

    fn item_complete<S: Sink>(&mut self, sink: &mut S) -> Result<(), DeltaError> {
        let Some(h) = self.header else {
            let h = Header::parse(&self.inbuf)?;
            self.header = Some(h);
            self.inbuf = Vec::with_capacity(h.block_size as usize + 2);
            self.outbuf = vec![0; h.block_size as usize];
            self.need = 2;
            if let Some(r) = self.resume_to {
                if !r.fits(&h) {
                    return Err(DeltaError::BadResume);
                }
                self.block_offset = r.block_offset as u64;
                self.next = r.block_offset as u64;
                self.new_written = r.new_written as u64;
                self.old_pos = r.old_pos as u64;
                self.seek = r.seek;
                self.pending_copy = r.pending_copy as u64;
                self.jumped = true;
                self.bs = match r.phase {
                    1 => Bs::Mix {
                        remaining: r.remaining as u64,
                    },
                    2 => Bs::Copy {
                        remaining: r.remaining as u64,
                    },
                    _ => Bs::Control { have: 0 },
                };
                self.block_index = r.block_index;
            }
            return Ok(());
        };
        if self.need == 2 && self.inbuf.len() == 2 {
            let len = u16::from_le_bytes([self.inbuf[0], self.inbuf[1]]);
            let n = (len & !STORED) as usize;
            if n == 0 || n > h.block_size as usize + h.block_size as usize / 255 + 16 {
                return Err(DeltaError::BadBlock {
                    block: self.block_index,
                });
            }
            self.need = 2 + n;
            return Ok(());
        }
        // A whole block: decompress, then run its raw bytes through bsdiff.
        let prefix = u16::from_le_bytes([self.inbuf[0], self.inbuf[1]]);
        let expect = core::cmp::min(
            h.block_size as u64,
            (h.raw_size as u64).saturating_sub(self.block_index as u64 * h.block_size as u64),
        ) as usize;
        if expect == 0 {
            return Err(DeltaError::BadBlock {
                block: self.block_index,
            });
        }
        let raw_len = if prefix & STORED != 0 {
            let body = &self.inbuf[2..];
            if body.len() != expect {
                return Err(DeltaError::BadBlock {
                    block: self.block_index,
                });
            }
            self.outbuf[..expect].copy_from_slice(body);
            expect
        } else {
            match lz4_flex::block::decompress_into(&self.inbuf[2..], &mut self.outbuf[..expect]) {
                Ok(n) if n == expect => n,
                _ => {
                    return Err(DeltaError::BadBlock {
                        block: self.block_index,
                    })
                }
            }
        };
        let skip = match self.resume_to.take() {
            Some(r) => r.raw_skip as usize,
            None => 0,
        };
        self.raw_done = self.block_index as u64 * h.block_size as u64 + skip as u64;
        let outbuf = core::mem::take(&mut self.outbuf);
        let res = self.apply_raw(&outbuf[skip.min(raw_len)..raw_len], skip, sink);
        self.outbuf = outbuf;
        res?;
        self.block_index += 1;
        self.block_offset = self.next;
        self.inbuf.clear();
        self.need = 2;
        Ok(())
    }

    fn apply_raw<S: Sink>(
        &mut self,
        raw: &[u8],
        skip: usize,
        sink: &mut S,
    ) -> Result<(), DeltaError> {
        let h = self.header.ok_or(DeltaError::Truncated)?;
        let mut i = 0;
        let mut old = [0u8; 256];
        while i < raw.len() {
            match self.bs {
                Bs::Control { have } => {
                    let n = core::cmp::min(24 - have as usize, raw.len() - i);
                    self.ctrl[have as usize..have as usize + n].copy_from_slice(&raw[i..i + n]);
                    i += n;
                    let have = have + n as u8;
                    if have < 24 {
                        self.bs = Bs::Control { have };
                        continue;
                    }
                    let word = |k: usize| {
                        let mut w = [0u8; 8];
                        w.copy_from_slice(&self.ctrl[k * 8..k * 8 + 8]);
                        u64::from_le_bytes(w)
                    };
                    let (mix, copy, seek_raw) = (word(0), word(1), word(2));
                    let seek = if seek_raw & (1 << 63) == 0 {
                        seek_raw as i64
                    } else {
                        -((seek_raw & !(1 << 63)) as i64)
                    };
                    if mix.saturating_add(copy).saturating_add(self.new_written) > h.new_size as u64
                    {
                        return Err(DeltaError::NewTooLong);
                    }
                    self.seek = seek;
                    self.bs = if mix > 0 {
                        Bs::Mix { remaining: mix }
                    } else {
                        Bs::Copy { remaining: copy }
                    };
                    if mix == 0 && copy == 0 {
                        self.end_record()?;
                    }
                    self.pending_copy = copy;
                }
                Bs::Mix { remaining } => {
                    let n = self
                        .until_boundary(core::cmp::min(remaining, (raw.len() - i) as u64))
                        .min(old.len() as u64) as usize;
                    if self.old_pos + n as u64 > h.old_size as u64 {
                        return Err(DeltaError::OldOutOfRange {
                            pos: self.old_pos + n as u64,
                        });
                    }
                    sink.read_old(self.old_pos as u32, &mut old[..n])
                        .map_err(|_| DeltaError::Io)?;
                    for (o, d) in old[..n].iter_mut().zip(&raw[i..i + n]) {
                        *o = o.wrapping_add(*d);
                    }
                    sink.write_new(&old[..n]).map_err(|_| DeltaError::Io)?;
                    i += n;
                    self.old_pos += n as u64;
                    self.new_written += n as u64;
                    let left = remaining - n as u64;
                    self.bs = if left > 0 {
                        Bs::Mix { remaining: left }
                    } else {
                        Bs::Copy {
                            remaining: self.pending_copy,
                        }
                    };
                    if left == 0 && self.pending_copy == 0 {
                        self.end_record()?;
                    }
                    self.offer_checkpoint(skip + i, sink);
                }
                Bs::Copy { remaining } => {
                    let n = self.until_boundary(core::cmp::min(remaining, (raw.len() - i) as u64))
                        as usize;
                    sink.write_new(&raw[i..i + n]).map_err(|_| DeltaError::Io)?;
                    i += n;
                    self.new_written += n as u64;
                    let left = remaining - n as u64;
                    self.bs = Bs::Copy { remaining: left };
                    if left == 0 {
                        self.end_record()?;
                    }
                    self.offer_checkpoint(skip + i, sink);
                }
            }
        }
        self.raw_done += raw.len() as u64;
        Ok(())
    }

    /// At most `n`, stopping at the next 256-byte page of the output: every write is then
    /// one page program (no page is programmed twice), and checkpoint boundaries, multiples
    /// of the page, are always hit exactly.
    fn until_boundary(&self, n: u64) -> u64 {
        const PAGE: u64 = 256;
        n.min(PAGE - self.new_written % PAGE)
    }

    /// Move the old position by the record's seek. The seek comes from the patch: the sum is
    /// taken in `i128` (no overflow for any `u64` + `i64`) and must stay within the old image.
    fn end_record(&mut self) -> Result<(), DeltaError> {
        let pos = i128::from(self.old_pos) + i128::from(self.seek);
        let old_size = self.header.as_ref().map_or(0, |h| h.old_size);
        if pos < 0 {
            return Err(DeltaError::BadControl {
                reason: "seek before the start of the old image",
            });
        }
        if pos > i128::from(old_size) {
            return Err(DeltaError::BadControl {
                reason: "seek past the end of the old image",
            });
        }
        self.old_pos = pos as u64;
        self.seek = 0;
        self.pending_copy = 0;
        self.bs = Bs::Control { have: 0 };
        Ok(())
    }

    fn offer_checkpoint<S: Sink>(&mut self, raw_pos_in_block: usize, sink: &mut S) {
        if self.new_written == 0 || !self.new_written.is_multiple_of(self.interval.max(1) as u64) {
            return;
        }
        let (phase, remaining) = match self.bs {
            Bs::Control { .. } => (0, 0),
            Bs::Mix { remaining } => (1, remaining as u32),
            Bs::Copy { remaining } => (2, remaining as u32),
        };
        // A checkpoint inside a control record cannot be described without its bytes; the
        // output only moves in diff and literal bytes, so it never happens.
        if matches!(self.bs, Bs::Control { have } if have > 0) {
            return;
        }
        sink.checkpoint(Resume {
            block_offset: self.block_offset as u32,
            block_index: self.block_index,
            pending_copy: self.pending_copy as u32,
            raw_skip: raw_pos_in_block as u32,
            new_written: self.new_written as u32,
            old_pos: self.old_pos as u32,
            phase,
            remaining,
            seek: self.seek,
        });
    }
}
