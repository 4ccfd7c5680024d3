//! Simulated SPI NOR flash, as on an ESP32-S3 module.
//!
//! - Erase sets every bit to 1 (0xFF), the way `esp_flash_erase_region` (esp_flash_api.c)
//!   issues it: one 64 KiB block erase where the address is 64 KiB-aligned and at least 64 KiB
//!   remain, one 4 KiB sector erase otherwise.
//! - Program can only clear bits (new = old & data). `esp_flash_write` hands the chip at most
//!   64 bytes per program (`SPI_FLASH_HAL_MAX_WRITE_BYTES`), never across a 256-byte page:
//!   `memspi_host_write_data_slicer` (memspi_host_driver.c) cuts every write that way. In
//!   strict mode, programming a byte that is not erased is recorded as a [`Violation`]:
//!   ESP-IDF requires erase before write, and an agent that relies on AND-ing over old data is
//!   buggy on real chips.
//! - Every block erase, sector erase and program slice is one *flash operation* with an index
//!   that counts from 0 for the board's lifetime. [`Flash::arm_cut`] makes operation k the one
//!   interrupted by a power cut: it is torn (an erase leaves a mix of old bytes and 0xFF, a
//!   program clears only a random subset of its bits, chosen from the seed) and every
//!   operation after it fails until [`Flash::power_on`].
//!
//! Storage is sparse and copy-on-write: an erased sector takes no memory and a written one is
//! an `Arc` shared with every clone until one of them writes it. Ten thousand boards that
//! start from the same image share its sectors; with a [`SectorPool`], boards that *write*
//! the same bytes (a fleet installing one release) end up sharing them too.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

pub const SECTOR_SIZE: u32 = 4096;
pub const PAGE_SIZE: u32 = 256;
/// The erase block of the chips ESP-IDF's generic driver runs (`block_erase_size`).
pub const BLOCK_SIZE: u32 = 64 * 1024;
/// The most bytes one program operation writes (`SPI_FLASH_HAL_MAX_WRITE_BYTES`).
pub const MAX_PROGRAM: u32 = 64;

type Sector = [u8; SECTOR_SIZE as usize];

/// The kinds of flash operation.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum OpKind {
    /// A 4 KiB sector erase.
    Erase,
    /// A 64 KiB block erase.
    BlockErase,
    Program,
}

/// Why a flash call failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum FlashError {
    #[error("power was lost during flash operation {op}")]
    PowerLost { op: u64 },
    #[error("flash access 0x{addr:08x}+{len} is outside the {size}-byte chip")]
    OutOfBounds { addr: u32, len: u32, size: u32 },
    #[error("erase at 0x{addr:08x} is not sector aligned")]
    Unaligned { addr: u32 },
    #[error("flash at 0x{addr:08x} is worn out: the erase or program failed")]
    Worn { addr: u32 },
}

/// A program over bytes that were not erased (strict mode).
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Violation {
    pub op: u64,
    pub addr: u32,
    pub old: u8,
    pub new: u8,
}

/// A planned power cut.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Cut {
    /// Index of the operation that is torn.
    pub at_op: u64,
    /// Chooses which bytes/bits the torn operation got to.
    pub seed: u64,
}

/// Record of a cut that happened.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub struct CutReport {
    pub op: u64,
    pub kind: OpKind,
    pub addr: u32,
}

/// Written sectors shared by content across many boards' flash (copy-on-write, as clones
/// already are). A board's flash hands a sector to the pool once it moves on to write another
/// one, so only the sector being written is private; identical contents become one `Arc`.
/// Costs one CRC-32 per sector written, and a compare when it matches.
#[derive(Default)]
pub struct SectorPool {
    by_crc: Mutex<HashMap<u32, Vec<Arc<Sector>>>>,
    /// Results computed over a region, keyed by the region's exact sectors (see
    /// [`Flash::memo_region`]).
    memo: Mutex<HashMap<MemoKey, Memo>>,
}

/// What was computed over a region (address, length), and the identity of each of the
/// region's sectors (0: erased).
type MemoKey = (&'static str, u32, u32, Vec<usize>);

/// A remembered result and the sectors it was computed from, kept alive (and therefore
/// shared: any later write to them copies first, so their contents never change).
type Memo = (
    Vec<Option<Arc<Sector>>>,
    Arc<dyn std::any::Any + Send + Sync>,
);

/// All bytes 0xFF. Folds 64-byte blocks without an early exit inside a block, which the
/// compiler vectorises (a byte-wise `all` does not; this runs for every page programmed).
fn is_erased(bytes: &[u8]) -> bool {
    bytes
        .chunks(64)
        .all(|block| block.iter().fold(0xFF, |acc, b| acc & b) == 0xFF)
}

/// A write of `len` bytes at `addr` cut into pieces of at most `max` bytes that do not cross
/// a multiple of `boundary`: each piece's address and its range in the data.
fn pieces(
    addr: u32,
    len: usize,
    boundary: u32,
    max: u32,
) -> impl Iterator<Item = (u32, std::ops::Range<usize>)> {
    let mut done = 0usize;
    std::iter::from_fn(move || {
        if done >= len {
            return None;
        }
        let a = addr + done as u32;
        let n = ((boundary - a % boundary).min(max) as usize).min(len - done);
        done += n;
        Some((a, done - n..done))
    })
}

/// The program operations `memspi_host_write_data_slicer` cuts a write into: at most 64
/// bytes, never across a 256-byte page.
fn slices(addr: u32, len: usize) -> impl Iterator<Item = (u32, std::ops::Range<usize>)> {
    pieces(addr, len, PAGE_SIZE, MAX_PROGRAM)
}

/// The same write cut at sector boundaries instead.
fn sector_runs(addr: u32, len: usize) -> impl Iterator<Item = (u32, std::ops::Range<usize>)> {
    pieces(addr, len, SECTOR_SIZE, SECTOR_SIZE)
}

impl SectorPool {
    /// The pool's copy of `sector`'s contents (added if new).
    fn intern(&self, sector: &Arc<Sector>) -> Arc<Sector> {
        self.find_or_add(sector, || sector.clone())
    }

    /// The pool's copy of `bytes`, a whole sector (added if new): what programming an erased
    /// sector whole leaves, without a private copy first.
    fn intern_bytes(&self, bytes: &Sector) -> Arc<Sector> {
        self.find_or_add(bytes, || Arc::new(*bytes))
    }

    fn find_or_add(&self, bytes: &Sector, make: impl FnOnce() -> Arc<Sector>) -> Arc<Sector> {
        let crc = crc32fast::hash(bytes);
        let mut map = self.by_crc.lock().unwrap_or_else(|p| p.into_inner());
        let same = map.entry(crc).or_default();
        if let Some(found) = same.iter().find(|s| s[..] == bytes[..]) {
            return found.clone();
        }
        let sector = make();
        same.push(sector.clone());
        sector
    }

    /// Distinct sectors held.
    pub fn len(&self) -> usize {
        let map = self.by_crc.lock().unwrap_or_else(|p| p.into_inner());
        map.values().map(Vec::len).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[derive(Clone)]
pub struct Flash {
    size: u32,
    sectors: Vec<Option<Arc<Sector>>>,
    /// Where finished sectors are shared, and the sector being written (kept private).
    pool: Option<Arc<SectorPool>>,
    dirty: Option<usize>,
    ops: u64,
    powered: bool,
    cut: Option<Cut>,
    last_cut: Option<CutReport>,
    strict: bool,
    violations: Vec<Violation>,
    /// Addresses whose erases and programs fail ([`Flash::wear_out`]).
    worn: Option<std::ops::Range<u32>>,
}

impl std::fmt::Debug for Flash {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Flash")
            .field("size", &self.size)
            .field("ops", &self.ops)
            .field("powered", &self.powered)
            .finish()
    }
}

impl Flash {
    /// An erased chip of `size` bytes (a multiple of the sector size).
    pub fn new(size: u32) -> Flash {
        assert!(
            size.is_multiple_of(SECTOR_SIZE),
            "flash size must be whole sectors"
        );
        Flash {
            size,
            sectors: vec![None; (size / SECTOR_SIZE) as usize],
            pool: None,
            dirty: None,
            ops: 0,
            powered: true,
            cut: None,
            last_cut: None,
            strict: true,
            violations: Vec::new(),
            worn: None,
        }
    }

    /// From now on every erase or program that touches `range` fails ([`FlashError::Worn`])
    /// and changes nothing, as sectors past their erase endurance do; reads still work.
    pub fn wear_out(&mut self, range: std::ops::Range<u32>) {
        self.worn = Some(range);
    }

    pub fn size(&self) -> u32 {
        self.size
    }

    /// Start counting operations from 0 again (after factory programming).
    pub fn reset_op_count(&mut self) {
        self.ops = 0;
    }

    /// Operations performed so far (the index the next one gets).
    pub fn ops(&self) -> u64 {
        self.ops
    }

    pub fn is_powered(&self) -> bool {
        self.powered
    }

    /// `compute` over `len` bytes from `addr`, or its remembered result when this flash (or
    /// another one on the same [`SectorPool`]) computed the same `what` over exactly the same
    /// sectors. A pure function of the region's bytes gives the same answer either way; the
    /// fleet uses this so that ten thousand boards verifying the same image hash it once.
    /// `what` names the computation: two different ones over one region must not share.
    /// Without a pool, or without power, it simply computes.
    pub fn memo_region<T: Clone + Send + Sync + 'static>(
        &mut self,
        what: &'static str,
        addr: u32,
        len: u32,
        compute: impl FnOnce(&Flash) -> T,
    ) -> T {
        if !self.powered {
            return compute(self);
        }
        // The sector being written is private until interned: share it so the key is the
        // same for every board holding the same bytes.
        if self.pool.is_some() {
            if let Some(d) = self.dirty.take() {
                self.intern(d);
            }
        }
        self.memo_peek(what, addr, len, compute)
    }

    /// [`Flash::memo_region`] for a computation that reads with [`Flash::peek`] (reports made
    /// from outside the board), so power does not matter. It leaves the sector being written
    /// private: a region holding it is computed, not remembered.
    pub fn memo_peek<T: Clone + Send + Sync + 'static>(
        &self,
        what: &'static str,
        addr: u32,
        len: u32,
        compute: impl FnOnce(&Flash) -> T,
    ) -> T {
        let Some(pool) = self.pool.as_ref() else {
            return compute(self);
        };
        if self.check_bounds(addr, len).is_err() || len == 0 {
            return compute(self);
        }
        let first = (addr / SECTOR_SIZE) as usize;
        let last = ((addr + len - 1) / SECTOR_SIZE) as usize;
        if self.dirty.is_some_and(|d| (first..=last).contains(&d)) {
            return compute(self);
        }
        let sectors: Vec<Option<Arc<Sector>>> = self.sectors[first..=last].to_vec();
        let key = (
            what,
            addr,
            len,
            sectors
                .iter()
                .map(|s| s.as_ref().map_or(0, |a| Arc::as_ptr(a) as usize))
                .collect::<Vec<_>>(),
        );
        if let Some(v) = pool
            .memo
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&key)
            .and_then(|(_, v)| v.downcast_ref::<T>().cloned())
        {
            return v;
        }
        let v = compute(self);
        pool.memo
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(key, (sectors, Arc::new(v.clone())));
        v
    }

    /// Share written sectors with every other flash using `pool`.
    pub fn set_pool(&mut self, pool: Arc<SectorPool>) {
        self.pool = Some(pool);
    }

    pub fn set_strict(&mut self, strict: bool) {
        self.strict = strict;
    }

    pub fn violations(&self) -> &[Violation] {
        &self.violations
    }

    /// Plan a power cut at operation `cut.at_op` (replaces an earlier plan).
    pub fn arm_cut(&mut self, cut: Cut) {
        self.cut = Some(cut);
    }

    pub fn disarm_cut(&mut self) {
        self.cut = None;
    }

    pub fn armed_cut(&self) -> Option<Cut> {
        self.cut
    }

    /// The cut that happened since the last [`Flash::power_on`], if any.
    pub fn take_cut_report(&mut self) -> Option<CutReport> {
        self.last_cut.take()
    }

    /// Power lost without a flash operation in flight (nothing is torn).
    pub fn power_off(&mut self) {
        self.powered = false;
    }

    /// Power comes back: operations work again.
    pub fn power_on(&mut self) {
        self.powered = true;
    }

    /// Sectors holding data (the others are erased and take no memory).
    pub fn written_sectors(&self) -> usize {
        self.sectors.iter().filter(|s| s.is_some()).count()
    }

    /// Sectors whose storage is shared with another clone.
    pub fn shared_sectors(&self) -> usize {
        self.sectors
            .iter()
            .filter(|s| s.as_ref().is_some_and(|a| Arc::strong_count(a) > 1))
            .count()
    }

    pub fn read(&self, addr: u32, buf: &mut [u8]) -> Result<(), FlashError> {
        if !self.powered {
            return Err(FlashError::PowerLost { op: self.ops });
        }
        self.check_bounds(addr, buf.len() as u32)?;
        self.peek(addr, buf);
        Ok(())
    }

    /// Read regardless of power (for reports and checks made from outside the board).
    pub fn peek(&self, addr: u32, buf: &mut [u8]) {
        let mut done = 0usize;
        while done < buf.len() {
            let a = addr as usize + done;
            let sector = a / SECTOR_SIZE as usize;
            let off = a % SECTOR_SIZE as usize;
            let n = (SECTOR_SIZE as usize - off).min(buf.len() - done);
            match self.sectors.get(sector).and_then(|s| s.as_ref()) {
                Some(s) => buf[done..done + n].copy_from_slice(&s[off..off + n]),
                None => buf[done..done + n].fill(0xFF),
            }
            done += n;
        }
    }

    /// Erase `len` bytes from `addr` (both sector aligned), as `esp_flash_erase_region` does:
    /// a 64 KiB block per operation where `addr` is block-aligned and a whole block remains,
    /// a 4 KiB sector per operation otherwise.
    pub fn erase(&mut self, addr: u32, len: u32) -> Result<(), FlashError> {
        if !addr.is_multiple_of(SECTOR_SIZE) || !len.is_multiple_of(SECTOR_SIZE) {
            return Err(FlashError::Unaligned { addr });
        }
        self.check_writable(addr, len)?;
        let (mut at, end) = (addr, addr + len);
        while at < end {
            let (kind, n) = if at.is_multiple_of(BLOCK_SIZE) && end - at >= BLOCK_SIZE {
                (OpKind::BlockErase, BLOCK_SIZE)
            } else {
                (OpKind::Erase, SECTOR_SIZE)
            };
            let sectors = (at / SECTOR_SIZE) as usize..((at + n) / SECTOR_SIZE) as usize;
            let op = self.begin_op()?;
            if let Some(seed) = self.tears(op) {
                sectors.for_each(|s| self.tear_erase(s, op, seed));
                return Err(self.cut_now(op, kind, at));
            }
            self.sectors[sectors].fill(None);
            at += n;
        }
        Ok(())
    }

    /// Program `data` at `addr`: one operation per slice of at most 64 bytes that does not
    /// cross a 256-byte page (`memspi_host_write_data_slicer`).
    ///
    /// Slices that no cut reaches are applied a sector at a time ([`Flash::program_run`]):
    /// the same bytes, operation indices and violations as slice by slice (a property test
    /// holds the two together), without the calls per 64 bytes that were about 40 % of the
    /// time it takes to program a megabyte.
    pub fn program(&mut self, addr: u32, data: &[u8]) -> Result<(), FlashError> {
        self.check_writable(addr, data.len() as u32)?;
        let first = self.ops;
        let count = slices(addr, data.len()).count() as u64;
        let cut_inside = self
            .cut
            .is_some_and(|c| (first..first + count).contains(&c.at_op));
        if cut_inside || (!self.powered && count > 0) {
            return self.program_by_slice(addr, data);
        }
        self.ops += count;
        let mut op = first;
        for (a, run) in sector_runs(addr, data.len()) {
            let run = &data[run];
            self.program_run(a, run, op);
            op += slices(a, run.len()).count() as u64;
        }
        Ok(())
    }

    /// [`Flash::program`] one operation at a time: where a cut falls inside it, or power is
    /// off.
    fn program_by_slice(&mut self, addr: u32, data: &[u8]) -> Result<(), FlashError> {
        for (a, slice) in slices(addr, data.len()) {
            let op = self.begin_op()?;
            let chunk = &data[slice];
            if let Some(seed) = self.tears(op) {
                self.tear_program(a, chunk, op, seed);
                return Err(self.cut_now(op, OpKind::Program, a));
            }
            self.program_page(a, chunk, op);
        }
        Ok(())
    }

    /// The operations from `first_op` on that program `run` (within one sector) at `addr`,
    /// none of them cut: one copy where the bytes are erased, as they are on every update's
    /// path; slice by slice where they are not, so that a violation names its operation.
    ///
    /// An erased sector programmed whole holds `run` afterwards; with a pool that is the
    /// pool's copy of it, looked up without making a private one first. In a fleet installing
    /// one release that private copy (an allocation, a fill with 0xFF, the copy, and a free
    /// once the pool had it already) was about half of a shard's `malloc` time.
    fn program_run(&mut self, addr: u32, run: &[u8], first_op: u64) {
        if is_erased(run) {
            return; // as in program_page: all-ones changes nothing and materialises nothing
        }
        let s = (addr / SECTOR_SIZE) as usize;
        if let (Ok(whole), None, Some(pool)) = (
            <&Sector>::try_from(run),
            self.sectors[s].as_ref(),
            self.pool.as_ref(),
        ) {
            self.sectors[s] = Some(pool.intern_bytes(whole));
            return;
        }
        let off = (addr % SECTOR_SIZE) as usize;
        let dst = &mut self.sector_mut(s)[off..off + run.len()];
        if is_erased(dst) {
            dst.copy_from_slice(run);
            return;
        }
        for (op, (a, slice)) in (first_op..).zip(slices(addr, run.len())) {
            self.program_page(a, &run[slice], op);
        }
    }

    fn check_bounds(&self, addr: u32, len: u32) -> Result<(), FlashError> {
        if addr.checked_add(len).is_none_or(|end| end > self.size) {
            return Err(FlashError::OutOfBounds {
                addr,
                len,
                size: self.size,
            });
        }
        Ok(())
    }

    /// [`Flash::check_bounds`], and not worn out: what an erase or program needs.
    fn check_writable(&self, addr: u32, len: u32) -> Result<(), FlashError> {
        self.check_bounds(addr, len)?;
        let end = addr + len;
        if self
            .worn
            .as_ref()
            .is_some_and(|w| addr < w.end && w.start < end)
        {
            return Err(FlashError::Worn { addr });
        }
        Ok(())
    }

    fn begin_op(&mut self) -> Result<u64, FlashError> {
        if !self.powered {
            return Err(FlashError::PowerLost { op: self.ops });
        }
        let op = self.ops;
        self.ops += 1;
        Ok(op)
    }

    fn tears(&self, op: u64) -> Option<u64> {
        self.cut.filter(|c| c.at_op == op).map(|c| c.seed)
    }

    fn cut_now(&mut self, op: u64, kind: OpKind, addr: u32) -> FlashError {
        self.cut = None;
        self.powered = false;
        self.last_cut = Some(CutReport { op, kind, addr });
        FlashError::PowerLost { op }
    }

    /// Hand sector `s` to the pool: a board holding the same bytes shares this copy.
    fn intern(&mut self, s: usize) {
        if let (Some(pool), Some(arc)) = (&self.pool, self.sectors[s].as_mut()) {
            *arc = pool.intern(arc);
        }
    }

    fn sector_mut(&mut self, s: usize) -> &mut Sector {
        if self.pool.is_some() && self.dirty != Some(s) {
            if let Some(done) = self.dirty.replace(s) {
                self.intern(done);
            }
        }
        let slot = &mut self.sectors[s];
        let arc = slot.get_or_insert_with(|| Arc::new([0xFF; SECTOR_SIZE as usize]));
        Arc::make_mut(arc)
    }

    fn program_page(&mut self, addr: u32, data: &[u8], op: u64) {
        let s = (addr / SECTOR_SIZE) as usize;
        let off = (addr % SECTOR_SIZE) as usize;
        if is_erased(data) {
            return; // programming all-ones changes nothing; don't materialise the sector
        }
        let strict = self.strict;
        let mut found = None;
        let sector = self.sector_mut(s);
        let dst = &mut sector[off..off + data.len()];
        if is_erased(dst) {
            // The usual case, erased bytes: AND-ing with 0xFF is a copy, and nothing violates.
            dst.copy_from_slice(data);
            return;
        }
        for (i, b) in data.iter().enumerate() {
            let old = sector[off + i];
            if strict && old != 0xFF && found.is_none() && (old & b) != *b {
                found = Some(Violation {
                    op,
                    addr: addr + i as u32,
                    old,
                    new: *b,
                });
            }
            sector[off + i] = old & b;
        }
        if let Some(v) = found {
            self.violations.push(v);
        }
    }

    /// A torn erase: the chip got partway; each 32-bit word is either erased or still old.
    /// Each sector of a torn block gets its own draw.
    fn tear_erase(&mut self, s: usize, op: u64, seed: u64) {
        let mut rng = ChaCha8Rng::seed_from_u64(seed ^ op.rotate_left(17) ^ ((s as u64) << 40));
        if self.sectors[s].is_none() {
            return;
        }
        let sector = self.sector_mut(s);
        for word in sector.chunks_mut(4) {
            if rng.gen_bool(0.5) {
                word.fill(0xFF);
            }
        }
    }

    /// A torn program: only a random subset of the bits that should clear did.
    fn tear_program(&mut self, addr: u32, data: &[u8], op: u64, seed: u64) {
        let mut rng = ChaCha8Rng::seed_from_u64(seed ^ op.rotate_left(17));
        let torn: Vec<u8> = data.iter().map(|b| b | rng.gen::<u8>()).collect();
        self.program_page(addr, &torn, op);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn erase_and_program_follow_nor_rules() {
        let mut f = Flash::new(64 * 1024);
        f.set_strict(false);
        f.program(0x100, &[0x0F, 0xF0]).unwrap();
        f.program(0x100, &[0xF3, 0xFF]).unwrap(); // can only clear bits
        let mut b = [0u8; 2];
        f.read(0x100, &mut b).unwrap();
        assert_eq!(b, [0x03, 0xF0]);
        f.erase(0, SECTOR_SIZE).unwrap();
        f.read(0x100, &mut b).unwrap();
        assert_eq!(b, [0xFF, 0xFF]);
    }

    #[test]
    fn programs_split_at_64_bytes_and_page_boundaries() {
        let mut f = Flash::new(64 * 1024);
        // 250..256, then 256..550 in 64-byte slices: 6, 64, 64, 64, 64, 38 bytes.
        f.program(250, &[0u8; 300]).unwrap();
        assert_eq!(f.ops(), 6);
        f.program(4096, &[0u8; 256]).unwrap(); // one page, four slices
        assert_eq!(f.ops(), 10);
    }

    /// Fills of one byte value each, 0xFF (erased) half the time.
    fn fills() -> impl proptest::strategy::Strategy<Value = Vec<u8>> {
        use proptest::prelude::*;
        proptest::collection::vec((prop_oneof![Just(0xFFu8), any::<u8>()], 1usize..1500), 0..8)
            .prop_map(|runs| {
                runs.into_iter()
                    .flat_map(|(b, n)| std::iter::repeat_n(b, n))
                    .collect()
            })
    }

    proptest::proptest! {
        /// Programming a sector at a time is programming slice by slice: the same bytes,
        /// operation count, violations, torn operation and power, whatever the flash held
        /// before, wherever the write lands and wherever a cut falls (inside it, right after
        /// it, or nowhere).
        #[test]
        fn programming_by_sector_is_programming_by_slice(
            before in proptest::collection::vec((0u32..16 * 1024, fills()), 0..4),
            addr in 0u32..16 * 1024,
            data in fills(),
            cut in proptest::option::of((0u64..160, proptest::prelude::any::<u64>())),
            powered in proptest::prelude::any::<bool>(),
            pooled in proptest::prelude::any::<bool>(),
        ) {
            let mut f = Flash::new(16 * 1024);
            for (a, bytes) in &before {
                if f.check_writable(*a, bytes.len() as u32).is_ok() {
                    let _ = f.program_by_slice(*a, bytes);
                }
            }
            if !powered {
                f.power_off();
            }
            let (mut by_sector, mut by_slice) = (f.clone(), f);
            if pooled {
                by_sector.set_pool(Arc::new(SectorPool::default()));
            }
            if let Some((at, seed)) = cut {
                let c = Cut { at_op: by_slice.ops() + at, seed };
                by_sector.arm_cut(c);
                by_slice.arm_cut(c);
            }
            let check = |f: &Flash| f.check_writable(addr, data.len() as u32);
            let expected = check(&by_slice).and_then(|()| by_slice.program_by_slice(addr, &data));
            proptest::prop_assert_eq!(by_sector.program(addr, &data), expected);
            proptest::prop_assert_eq!(by_sector.ops(), by_slice.ops());
            proptest::prop_assert_eq!(by_sector.violations(), by_slice.violations());
            proptest::prop_assert_eq!(by_sector.take_cut_report(), by_slice.take_cut_report());
            proptest::prop_assert_eq!(by_sector.is_powered(), by_slice.is_powered());
            let (mut x, mut y) = (vec![0; 16 * 1024], vec![0; 16 * 1024]);
            by_sector.peek(0, &mut x);
            by_slice.peek(0, &mut y);
            proptest::prop_assert!(x == y, "the flash contents differ");
            let held = |f: &Flash| f.sectors.iter().map(Option::is_some).collect::<Vec<_>>();
            proptest::prop_assert_eq!(held(&by_sector), held(&by_slice));
        }
    }

    #[test]
    fn a_cut_inside_a_page_leaves_the_slices_before_it_written() {
        let mut f = Flash::new(64 * 1024);
        f.arm_cut(Cut { at_op: 2, seed: 3 }); // the third 64-byte slice of the page
        assert!(f.program(0, &[0u8; 256]).is_err());
        let mut b = [0xAAu8; 256];
        f.peek(0, &mut b);
        assert!(
            b[..128].iter().all(|x| *x == 0),
            "slices 0 and 1 are written"
        );
        assert!(b[192..].iter().all(|x| *x == 0xFF), "slice 3 never started");
        assert!(
            b[128..192].iter().any(|x| *x != 0),
            "slice 2 is torn, not complete"
        );
    }

    #[test]
    fn erases_use_a_64_kib_block_where_aligned_and_whole() {
        let mut f = Flash::new(256 * 1024);
        f.erase(0, 2 * SECTOR_SIZE).unwrap(); // aligned, but less than a block: two sectors
        assert_eq!(f.ops(), 2);
        f.erase(0, 2 * BLOCK_SIZE).unwrap(); // two blocks
        assert_eq!(f.ops(), 4);
        f.erase(SECTOR_SIZE, BLOCK_SIZE).unwrap(); // not aligned: sixteen sectors
        assert_eq!(f.ops(), 20);
        f.erase(BLOCK_SIZE, BLOCK_SIZE + SECTOR_SIZE).unwrap(); // a block, then a sector
        assert_eq!(f.ops(), 22);
    }

    #[test]
    fn a_torn_block_erase_leaves_old_bytes_across_the_block() {
        let mut f = Flash::new(256 * 1024);
        f.program(0, &[0u8; 64 * 1024]).unwrap();
        let ops = f.ops();
        f.arm_cut(Cut {
            at_op: ops,
            seed: 9,
        });
        assert!(f.erase(0, BLOCK_SIZE).is_err());
        assert_eq!(
            f.take_cut_report().map(|r| r.kind),
            Some(OpKind::BlockErase)
        );
        for sector in [0, 7, 15] {
            let mut b = [0u8; SECTOR_SIZE as usize];
            f.peek(sector * SECTOR_SIZE, &mut b);
            let erased = b.iter().filter(|x| **x == 0xFF).count();
            assert!(
                erased > 0 && erased < b.len(),
                "sector {sector} of the torn block: {erased} of {} bytes erased",
                b.len()
            );
        }
    }

    #[test]
    fn strict_mode_reports_program_over_written_bytes() {
        let mut f = Flash::new(8192);
        f.program(0, &[0x00]).unwrap();
        assert!(f.violations().is_empty());
        f.program(0, &[0x01]).unwrap();
        assert_eq!(f.violations().len(), 1);
    }

    #[test]
    fn a_cut_tears_its_operation_and_stops_everything_after_it() {
        let mut f = Flash::new(8192);
        f.program(0, &[0u8; 256]).unwrap(); // ops 0..=3
        f.arm_cut(Cut { at_op: 4, seed: 7 });
        let err = f.erase(0, SECTOR_SIZE).unwrap_err(); // op 4, torn
        assert_eq!(err, FlashError::PowerLost { op: 4 });
        let mut b = [0u8; 256];
        f.peek(0, &mut b);
        let erased = b.iter().filter(|x| **x == 0xFF).count();
        assert!(
            erased > 0 && erased < 256,
            "torn erase leaves a mix, got {erased} erased"
        );
        assert!(f.program(4096, &[0]).is_err(), "no operation after the cut");
        f.power_on();
        f.program(4096, &[0]).unwrap();
    }

    #[test]
    fn clones_share_sectors_until_written() {
        let mut a = Flash::new(16 * SECTOR_SIZE);
        a.program(0, &[1u8; 8192]).unwrap();
        let mut b = a.clone();
        assert_eq!(b.shared_sectors(), 2);
        b.erase(0, SECTOR_SIZE).unwrap();
        assert_eq!(b.shared_sectors(), 1, "sector 1 is still shared");
        assert_eq!(b.written_sectors(), 1);
        let mut byte = [0u8];
        a.read(0, &mut byte).unwrap();
        assert_eq!(byte, [1], "the other clone keeps its data");
    }

    #[test]
    fn boards_programming_the_same_whole_sectors_share_the_pools_copies() {
        let pool = Arc::new(SectorPool::default());
        let image: Vec<u8> = (0..3 * SECTOR_SIZE).map(|i| (i % 251) as u8).collect();
        let mut boards: Vec<Flash> = (0..3).map(|_| Flash::new(64 * 1024)).collect();
        for f in &mut boards {
            f.set_pool(pool.clone());
            f.program(SECTOR_SIZE, &image).unwrap();
            assert_eq!(f.ops(), 3 * 64, "a 64-byte program per slice, as before");
        }
        assert_eq!(pool.len(), 3, "one copy of each distinct sector");
        assert!(boards.iter().all(|f| f.shared_sectors() == 3));
        let (first, rest) = boards.split_first_mut().unwrap();
        rest[0].program(SECTOR_SIZE + 10, &[0]).unwrap();
        let mut byte = [0u8];
        first.read(SECTOR_SIZE + 10, &mut byte).unwrap();
        assert_eq!(byte, [10], "a write to a shared sector copies it first");
        rest[0].read(SECTOR_SIZE + 10, &mut byte).unwrap();
        assert_eq!(byte, [0]);
    }

    #[test]
    fn a_memo_is_shared_by_equal_flashes_and_dropped_by_a_write() {
        let pool = Arc::new(SectorPool::default());
        let mut a = Flash::new(64 * 1024);
        a.set_pool(pool.clone());
        let mut b = a.clone();
        for f in [&mut a, &mut b] {
            f.erase(0, 8192).unwrap();
            f.program(0, &[7u8; 5000]).unwrap();
        }
        let calls = std::cell::Cell::new(0);
        let sum = |f: &Flash| {
            calls.set(calls.get() + 1);
            let mut buf = vec![0u8; 8192];
            f.peek(0, &mut buf);
            buf.iter().map(|x| *x as u64).sum::<u64>()
        };
        let first = a.memo_region("sum", 0, 8192, sum);
        assert_eq!(
            b.memo_region("sum", 0, 8192, sum),
            first,
            "same bytes, same answer"
        );
        assert_eq!(calls.get(), 1, "computed once for both boards");
        b.program(6000, &[0]).unwrap();
        let changed = b.memo_region("sum", 0, 8192, sum);
        assert_eq!(calls.get(), 2, "a write makes it compute again");
        assert_eq!(changed, first - 0xFF);
        assert_eq!(
            a.memo_region("sum", 0, 8192, sum),
            first,
            "the other board is untouched"
        );
        let zero = |_: &Flash| 0u64;
        assert_eq!(
            a.memo_region("zero", 0, 8192, zero),
            0,
            "another computation over the same sectors is not answered from sum's memo"
        );
        assert_eq!(a.memo_peek("sum", 0, 8192, sum), first);
        assert_eq!(calls.get(), 2, "a peek shares the memo too");
    }
}
