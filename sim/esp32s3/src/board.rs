//! A simulated ESP32-S3: flash, partition table, otadata, eFuse, the second-stage bootloader,
//! and ESP-IDF's `esp_ota_ops` on top of them (the agent's [`Platform`]).
//!
//! Modelled on ESP-IDF v5.x with `CONFIG_BOOTLOADER_APP_ROLLBACK_ENABLE=y` and, per board,
//! optionally `CONFIG_BOOTLOADER_APP_ANTI_ROLLBACK=y`:
//! - `bootloader_utility_get_selected_boot_partition`: every PENDING_VERIFY entry becomes
//!   ABORTED (written back), the valid entry with the highest sequence is selected, NEW becomes
//!   PENDING_VERIFY; with anti-rollback, entries whose app's `secure_version` is below the eFuse
//!   counter are not selectable, and booting a VALID entry raises the eFuse counter.
//! - `bootloader_utility_load_boot_image`: try the selected slot, then downwards to factory,
//!   then upwards; each candidate passes `esp_image_verify` and the anti-rollback check or is
//!   skipped; nothing bootable is a brick.
//! - `esp_ota_begin/resume/write/end`, `esp_ota_set_boot_partition`,
//!   `esp_ota_mark_app_valid_cancel_rollback`, `esp_ota_mark_app_invalid_rollback` and
//!   `esp_ota_get_state_partition` as in `components/app_update/esp_ota_ops.c`, including the
//!   erase of the inactive otadata entry at `esp_ota_begin` and the partition erase when
//!   `set_boot_partition` meets a too-low `secure_version`.

use std::sync::Arc;

use otarig_agent::image::{self, ImageInfo};
use otarig_agent::{EspError, EspResult, OtaImgState, Platform, Slot, SlotKind};
use serde::Serialize;

use crate::appimage::{self, Behaviour};
use crate::flash::{Cut, CutReport, Flash, FlashError, SECTOR_SIZE};
use crate::otadata::{self, Entry, ENTRY_LEN};
use crate::partition::{PartitionTable, AGENT_LABEL, TABLE_MAX_LEN, TABLE_OFFSET};

/// Bits of the ESP32-S3's `SECURE_VERSION` eFuse field (BLOCK0 bits 142–157): the highest
/// secure version anti-rollback can record.
pub const EFUSE_SECURE_VERSION_BITS: u32 = 16;

/// The simulated chip's revisions (`efuse_hal_chip_revision`, `efuse_hal_blk_version`):
/// every simulated board is an ESP32-S3 v0.2 with eFuse block version v1.3.
pub const CHIP_REVISION: image::ChipRevision = image::ChipRevision::ESP32S3_V0_2;

/// The memo name of `esp_image_verify` over a slot (see [`Flash::memo_region`]).
const VERIFY: &str = "esp_image_verify";

/// Bootloader options (sdkconfig).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BootConfig {
    /// `CONFIG_BOOTLOADER_APP_ROLLBACK_ENABLE`.
    pub rollback: bool,
    /// `CONFIG_BOOTLOADER_APP_ANTI_ROLLBACK`.
    pub anti_rollback: bool,
}

impl Default for BootConfig {
    fn default() -> Self {
        BootConfig {
            rollback: true,
            anti_rollback: false,
        }
    }
}

/// Where in the update a power cut should land.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Phase {
    /// `esp_ota_begin` / `esp_ota_resume` (erasing the inactive otadata entry).
    Begin,
    /// `esp_ota_write`: downloading into the slot.
    Download,
    /// `esp_ota_set_boot_partition`: writing otadata.
    SetBoot,
    /// `esp_ota_mark_app_valid_cancel_rollback`: confirming the new image.
    Confirm,
    /// The agent's journal (resume state) being written.
    Journal,
    /// The bootloader rewriting otadata (NEW → PENDING_VERIFY, PENDING_VERIFY → ABORTED).
    Bootloader,
}

/// A planned power cut, realised on the first flash operation that matches.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CutPlan {
    /// The `nth` flash operation (0-based) inside the next call of `phase`.
    InPhase { phase: Phase, nth: u64 },
    /// The first flash operation of the `esp_ota_write` that brings the slot to `bytes`.
    DownloadReaches { bytes: u32 },
    /// Flash operation `op` of the board's lifetime (sim-only: no real board can aim this).
    AtOp { op: u64 },
}

/// Things only the board can see.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum BoardEvent {
    /// The bootloader started an app.
    BootloaderStarted {
        slot: String,
        version: String,
        secure_version: u32,
        sha256: String,
        /// Valid otadata entries when the app started (0 with an OTA app: it booted by luck).
        otadata_valid: u8,
    },
    /// The bootloader found PENDING_VERIFY and marked it ABORTED: a rollback.
    BootloaderAborted {
        slot: String,
    },
    /// A candidate was not booted.
    BootRejected {
        slot: String,
        reason: String,
    },
    /// Nothing bootable: the board is a brick.
    Bricked {
        reason: String,
    },
    /// The eFuse secure version was burned higher.
    EfuseRaised {
        from: u32,
        to: u32,
    },
    /// `esp_efuse_update_secure_version` refused a version the 16-bit field cannot hold;
    /// nothing was burned.
    EfuseRaiseRefused {
        requested: u32,
    },
    OtaBegin {
        slot: String,
        resumed_at: Option<u32>,
    },
    /// `esp_ota_set_boot_partition` wrote otadata.
    BootPartitionSet {
        slot: String,
    },
    MarkedValid {
        slot: String,
    },
    MarkedInvalid {
        slot: String,
    },
    /// An image was written straight to a slot, bypassing the agent (attack or bench tool).
    ForcedInstall {
        slot: String,
    },
    PowerCut {
        op: u64,
        op_kind: crate::flash::OpKind,
        addr: u32,
        phase: Option<Phase>,
    },
    /// Strict-mode flash violation: a program over bytes that were not erased.
    FlashViolation {
        op: u64,
        addr: u32,
    },
}

/// The app the bootloader started.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Booted {
    pub slot: Slot,
    pub info: ImageInfo,
    pub behaviour: Behaviour,
}

/// How a power-on ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum BootOutcome {
    App(Booted),
    Bricked(String),
    /// Power was cut while the bootloader wrote otadata.
    PowerLost,
}

#[derive(Clone, Copy, Debug)]
struct OtaSession {
    slot: Slot,
    wrote: u32,
    need_erase: bool,
}

/// One simulated board.
#[derive(Clone, Debug)]
pub struct Board {
    pub flash: Flash,
    table: Arc<PartitionTable>,
    pub boot_config: BootConfig,
    efuse_secure_version: u32,
    running: Option<Slot>,
    session: Option<OtaSession>,
    plans: Vec<(CutPlan, u64)>,
    phase: Option<Phase>,
    events: Vec<BoardEvent>,
    violations_seen: usize,
}

/// Errors of board set-up (not of the simulated firmware).
#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    #[error("the image ({len} bytes) does not fit slot {slot} ({size} bytes)")]
    TooLarge {
        len: usize,
        slot: SlotKind,
        size: u32,
    },
    #[error("the partition table has no slot {0}")]
    NoSlot(SlotKind),
    #[error("flash: {0}")]
    Flash(#[from] FlashError),
    #[error("partition table: {0}")]
    Table(crate::partition::TableError),
}

fn fl(e: FlashError) -> EspError {
    match e {
        FlashError::OutOfBounds { .. } | FlashError::Unaligned { .. } => EspError::InvalidArg,
        FlashError::PowerLost { .. } | FlashError::Worn { .. } => EspError::FlashOpFail,
    }
}

impl Board {
    /// A board fresh from the factory programmer: partition table written, `image` in `slot`,
    /// otadata erased (as espflash leaves it), eFuse counter as given.
    pub fn factory_flashed(
        table: Arc<PartitionTable>,
        boot_config: BootConfig,
        slot: SlotKind,
        image: &[u8],
        efuse_secure_version: u32,
    ) -> Result<Board, SetupError> {
        let mut flash = Flash::new(table.flash_size());
        let binary = table.to_binary().map_err(SetupError::Table)?;
        flash.program(TABLE_OFFSET, &binary)?;
        let target = slot_for(&table, slot, image)?;
        flash.program(target.address, image)?;
        // The board's life, and its operation count, starts when it leaves the programmer.
        flash.reset_op_count();
        Ok(Board::assemble(
            flash,
            table,
            boot_config,
            efuse_secure_version,
        ))
    }

    /// A board from whatever its flash holds (the virtual board after espflash wrote it): the
    /// partition table is read from flash at 0x8000, as the second-stage bootloader does.
    pub fn from_flash(
        flash: Flash,
        boot_config: BootConfig,
        efuse_secure_version: u32,
    ) -> Result<Board, Box<(Flash, String)>> {
        let mut raw = vec![0u8; TABLE_MAX_LEN];
        flash.peek(TABLE_OFFSET, &mut raw);
        let table = match PartitionTable::from_binary_on(&raw, flash.size()) {
            Ok(t) => t,
            Err(e) => return Err(Box::new((flash, format!("partition table at 0x8000: {e}")))),
        };
        Ok(Board::assemble(
            flash,
            Arc::new(table),
            boot_config,
            efuse_secure_version,
        ))
    }

    /// A powered-off board over `flash` with nothing running and no cut planned.
    fn assemble(
        flash: Flash,
        table: Arc<PartitionTable>,
        boot_config: BootConfig,
        efuse_secure_version: u32,
    ) -> Board {
        Board {
            flash,
            table,
            boot_config,
            efuse_secure_version,
            running: None,
            session: None,
            plans: Vec::new(),
            phase: None,
            events: Vec::new(),
            violations_seen: 0,
        }
    }

    /// Give the flash back (the virtual board keeps it across resets and flashing).
    pub fn into_flash(self) -> Flash {
        self.flash
    }

    pub fn table(&self) -> &PartitionTable {
        &self.table
    }

    pub fn efuse_secure_version(&self) -> u32 {
        self.efuse_secure_version
    }

    pub fn running(&self) -> Option<Slot> {
        self.running
    }

    /// Drain what the board saw since the last call.
    pub fn take_events(&mut self) -> Vec<BoardEvent> {
        let new = &self.flash.violations()[self.violations_seen..];
        for v in new {
            self.events.push(BoardEvent::FlashViolation {
                op: v.op,
                addr: v.addr,
            });
        }
        self.violations_seen = self.flash.violations().len();
        std::mem::take(&mut self.events)
    }

    /// Plan a power cut; `seed` chooses how the cut operation tears.
    pub fn plan_cut(&mut self, plan: CutPlan, seed: u64) {
        self.plans.push((plan, seed));
        self.rearm_at_op();
    }

    pub fn pending_cuts(&self) -> usize {
        self.plans.len()
    }

    /// Power cut at a moment when no flash operation is in flight.
    pub fn power_off(&mut self) {
        self.flash.power_off();
    }

    pub fn is_powered(&self) -> bool {
        self.flash.is_powered()
    }

    /// Power on (or reset) and run the bootloader.
    pub fn boot(&mut self) -> BootOutcome {
        self.flash.power_on();
        self.running = None;
        self.session = None;
        let out = self.with_phase(Phase::Bootloader, |b| b.bootloader());
        match out {
            Ok(Some(booted)) => {
                self.running = Some(booted.slot);
                let otadata_valid = self
                    .peek_otadata()
                    .map_or(0, |two| two.iter().filter(|e| e.is_valid()).count() as u8);
                self.events.push(BoardEvent::BootloaderStarted {
                    slot: booted.slot.kind.to_string(),
                    version: booted.info.version().to_string(),
                    secure_version: booted.info.secure_version().unwrap_or(0),
                    sha256: hex::encode(booted.info.sha256),
                    otadata_valid,
                });
                BootOutcome::App(booted)
            }
            Ok(None) => {
                let reason =
                    "no bootable app partition (every slot failed verification)".to_string();
                self.events.push(BoardEvent::Bricked {
                    reason: reason.clone(),
                });
                BootOutcome::Bricked(reason)
            }
            Err(BootErr::Table(reason)) => {
                self.events.push(BoardEvent::Bricked {
                    reason: reason.clone(),
                });
                BootOutcome::Bricked(reason)
            }
            Err(BootErr::PowerLost) => BootOutcome::PowerLost,
        }
    }

    /// Write `image` straight into `slot` and select it in otadata, bypassing every check, the
    /// way a host tool with flash access (or an attacker) could.
    pub fn force_install(&mut self, slot: SlotKind, image: &[u8]) -> Result<(), SetupError> {
        let target = slot_for(&self.table, slot, image)?;
        let erase = (image.len() as u32).div_ceil(SECTOR_SIZE) * SECTOR_SIZE;
        self.flash.erase(target.address, erase)?;
        self.flash.program(target.address, image)?;
        if let SlotKind::Ota(n) = slot {
            let two = self.read_otadata().map_err(|_| FlashError::PowerLost {
                op: self.flash.ops(),
            })?;
            let count = self.table.ota_count();
            let (sector, seq) = match otadata::active(&two) {
                Some(a) => ((!a) & 1, otadata::next_seq(two[a].ota_seq, n, count)),
                None => (0, n as u32 + 1),
            };
            let entry = Entry::new(seq, OtaImgState::New, [0xFF; 20]);
            self.write_otadata_sector(sector, &entry)
                .map_err(|_| FlashError::PowerLost {
                    op: self.flash.ops(),
                })?;
        }
        self.events.push(BoardEvent::ForcedInstall {
            slot: slot.to_string(),
        });
        Ok(())
    }

    /// The otadata state of a slot as a tool reading the flash would see it (no power needed).
    pub fn peek_slot_state(&self, slot: Slot) -> Option<OtaImgState> {
        let two = self.peek_otadata()?;
        self.state_in(&two, slot)
    }

    /// The image in a slot, verified, read regardless of power.
    pub fn peek_image(&self, slot: Slot) -> Option<ImageInfo> {
        // Same computation as `verify_slot` (peek reads what a powered read would), so it
        // shares that memo.
        self.flash
            .memo_peek(VERIFY, slot.address, slot.size, |flash| {
                image::verify_on(CHIP_REVISION, slot.size, |off, buf| {
                    flash.peek(slot.address + off, buf);
                    Ok(())
                })
            })
            .ok()
    }

    pub fn peek_otadata(&self) -> Option<[Entry; 2]> {
        let p = self.table.otadata()?;
        let mut two = [[0u8; ENTRY_LEN]; 2];
        self.flash.peek(p.offset, &mut two[0]);
        self.flash.peek(p.offset + SECTOR_SIZE, &mut two[1]);
        Some([Entry::decode(&two[0]), Entry::decode(&two[1])])
    }

    // ---- internals ------------------------------------------------------------------

    fn with_phase<T>(&mut self, phase: Phase, f: impl FnOnce(&mut Board) -> T) -> T {
        let outer = self.phase.replace(phase);
        let start = self.flash.ops();
        let armed_here = self.arm_for_phase(phase, start);
        let out = f(self);
        if let Some(report) = self.flash.take_cut_report() {
            self.events.push(BoardEvent::PowerCut {
                op: report.op,
                op_kind: report.kind,
                addr: report.addr,
                phase: Some(phase),
            });
            self.remove_fired(report);
            self.rearm_at_op();
        } else if armed_here {
            self.flash.disarm_cut(); // the call did fewer operations: the plan waits
            self.rearm_at_op();
        }
        self.phase = outer;
        out
    }

    fn arm_for_phase(&mut self, phase: Phase, start: u64) -> bool {
        let hit = self.plans.iter().find_map(|(p, seed)| match p {
            CutPlan::InPhase { phase: ph, nth } if *ph == phase => Some((start + nth, *seed)),
            _ => None,
        });
        if let Some((at_op, seed)) = hit {
            self.flash.arm_cut(Cut { at_op, seed });
            return true;
        }
        false
    }

    /// Arm the earliest pending `AtOp` cut (several make double faults).
    fn rearm_at_op(&mut self) {
        let next = self
            .plans
            .iter()
            .filter_map(|(p, seed)| match p {
                CutPlan::AtOp { op } if *op >= self.flash.ops() => Some((*op, *seed)),
                _ => None,
            })
            .min();
        if let Some((at_op, seed)) = next {
            self.flash.arm_cut(Cut { at_op, seed });
        }
    }

    fn remove_fired(&mut self, report: CutReport) {
        let phase = self.phase;
        let wrote = self.session.map(|s| s.wrote);
        if let Some(i) = self.plans.iter().position(|(p, _)| match p {
            CutPlan::AtOp { op } => *op == report.op,
            CutPlan::InPhase { phase: ph, .. } => Some(*ph) == phase,
            CutPlan::DownloadReaches { bytes } => {
                phase == Some(Phase::Download) && wrote.is_some_and(|w| w < *bytes)
            }
        }) {
            self.plans.remove(i);
        }
    }

    fn read_otadata(&mut self) -> Result<[Entry; 2], FlashError> {
        let p = self.table.otadata().ok_or(FlashError::OutOfBounds {
            addr: 0,
            len: 0,
            size: 0,
        })?;
        let mut a = [0u8; ENTRY_LEN];
        let mut b = [0u8; ENTRY_LEN];
        self.flash.read(p.offset, &mut a)?;
        self.flash.read(p.offset + SECTOR_SIZE, &mut b)?;
        Ok([Entry::decode(&a), Entry::decode(&b)])
    }

    /// `write_otadata` / `rewrite_ota_seq`: erase the sector, program the 32-byte entry.
    fn write_otadata_sector(&mut self, sector: usize, entry: &Entry) -> Result<(), FlashError> {
        let Some(p) = self.table.otadata().map(|p| p.offset) else {
            return Err(FlashError::OutOfBounds {
                addr: 0,
                len: 0,
                size: 0,
            });
        };
        let addr = p + sector as u32 * SECTOR_SIZE;
        self.flash.erase(addr, SECTOR_SIZE)?;
        self.flash.program(addr, &entry.encode())
    }

    fn state_in(&self, two: &[Entry; 2], slot: Slot) -> Option<OtaImgState> {
        let SlotKind::Ota(n) = slot.kind else {
            return None;
        };
        let count = self.table.ota_count() as u32;
        if count == 0 {
            return None;
        }
        // esp_ota_get_state_partition: the first entry whose slot matches and whose CRC is right.
        two.iter()
            .find(|e| {
                e.ota_seq.wrapping_sub(1) % count == n as u32
                    && e.crc == otadata::seq_crc(e.ota_seq)
            })
            .map(|e| e.state())
    }

    /// `esp_image_verify` over a slot. On a fleet's shared sector pool, boards holding the
    /// same bytes share the result (see [`Flash::memo_region`]): same answer, one hash.
    fn verify_slot(&mut self, slot: Slot) -> Result<ImageInfo, image::ImageError> {
        self.flash
            .memo_region(VERIFY, slot.address, slot.size, |flash| {
                image::verify_on(CHIP_REVISION, slot.size, |off, buf| {
                    flash.read(slot.address + off, buf).map_err(|_| ())
                })
            })
    }

    fn secure_version_ok(&mut self, slot: Slot) -> bool {
        if !self.boot_config.anti_rollback {
            return true;
        }
        let mut desc = [0u8; 80];
        if self
            .flash
            .read(slot.address + image::APP_DESC_OFFSET as u32, &mut desc)
            .is_err()
        {
            return false;
        }
        image::parse_app_desc(&desc).is_ok_and(|d| d.secure_version >= self.efuse_secure_version)
    }

    /// Raise the eFuse secure version to that of the app in `slot`, as
    /// `esp_efuse_update_secure_version` (esp_efuse_fields.c) does: the field is a 16-bit
    /// thermometer on the ESP32-S3 (`CONFIG_BOOTLOADER_APP_SEC_VER_SIZE_EFUSE_FIELD` = 16, its
    /// value the number of bits burned), so a version above 16 is `ESP_ERR_INVALID_ARG` and
    /// burns nothing; a lower or equal one changes nothing.
    fn raise_efuse(&mut self, slot: Slot) -> EspResult<()> {
        let mut desc = [0u8; 80];
        if self
            .flash
            .read(slot.address + image::APP_DESC_OFFSET as u32, &mut desc)
            .is_err()
        {
            return Ok(());
        }
        let Ok(d) = image::parse_app_desc(&desc) else {
            return Ok(());
        };
        if d.secure_version > EFUSE_SECURE_VERSION_BITS {
            self.events.push(BoardEvent::EfuseRaiseRefused {
                requested: d.secure_version,
            });
            return Err(EspError::InvalidArg);
        }
        if d.secure_version > self.efuse_secure_version {
            self.events.push(BoardEvent::EfuseRaised {
                from: self.efuse_secure_version,
                to: d.secure_version,
            });
            self.efuse_secure_version = d.secure_version;
        }
        Ok(())
    }

    /// The 2nd stage bootloader: read the partition table, pick the boot partition from
    /// otadata, then load the first bootable image from there.
    fn bootloader(&mut self) -> Result<Option<Booted>, BootErr> {
        let mut raw = vec![0u8; TABLE_MAX_LEN];
        self.flash
            .read(TABLE_OFFSET, &mut raw)
            .map_err(|_| BootErr::PowerLost)?;
        let table = PartitionTable::from_binary_on(&raw, self.flash.size())
            .map_err(|e| BootErr::Table(e.to_string()))?;
        let selected = if table.otadata().is_some() {
            self.select_boot_partition(&table)?
        } else {
            Selected {
                start: FACTORY,
                initial_contents: false,
            }
        };
        self.load_boot_image(&table, selected)
    }

    /// `bootloader_utility_get_selected_boot_partition`: PENDING_VERIFY entries become
    /// ABORTED (with rollback), then the active entry is chosen (with anti-rollback, among
    /// those whose app's `secure_version` passes); a NEW one becomes PENDING_VERIFY.
    fn select_boot_partition(&mut self, table: &PartitionTable) -> Result<Selected, BootErr> {
        let count = table.bootloader_ota_count();
        let mut two = self.read_otadata().map_err(|_| BootErr::PowerLost)?;
        if self.boot_config.rollback {
            self.abort_pending_verify(table, &mut two)?;
        }
        let initial = |e: &Entry| e.ota_seq == u32::MAX || e.crc != otadata::seq_crc(e.ota_seq);
        let mut selected = Selected {
            start: FACTORY,
            initial_contents: false,
        };
        let active = if !self.boot_config.anti_rollback {
            if (two[0].is_invalid() && two[1].is_invalid()) || count == 0 {
                if table.factory().is_none() {
                    selected.start = 0;
                    selected.initial_contents = initial(&two[0]) && initial(&two[1]);
                }
                None
            } else {
                otadata::active(&two)
            }
        } else if initial(&two[0]) && initial(&two[1]) {
            selected.initial_contents = true;
            None
        } else {
            let ok = self.selectable_by_secure_version(table, &two);
            otadata::select(&two, ok, true)
        };
        let Some(a) = active else {
            return Ok(selected);
        };
        let n = two[a].slot(count).unwrap_or(0);
        selected.start = n as i32;
        if self.boot_config.rollback && two[a].state() == OtaImgState::New {
            two[a].ota_state = OtaImgState::PendingVerify.raw();
            self.write_otadata_sector(a, &two[a])
                .map_err(|_| BootErr::PowerLost)?;
        }
        if self.boot_config.anti_rollback && two[a].state() == OtaImgState::Valid {
            if let Some(slot) = table.ota(n) {
                // The bootloader logs a refused update and boots anyway.
                let _ = self.raise_efuse(slot);
            }
        }
        Ok(selected)
    }

    /// An image still PENDING_VERIFY at boot never confirmed itself: mark it ABORTED.
    fn abort_pending_verify(
        &mut self,
        table: &PartitionTable,
        two: &mut [Entry; 2],
    ) -> Result<(), BootErr> {
        let count = table.bootloader_ota_count();
        for (i, e) in two.iter_mut().enumerate() {
            if e.state() != OtaImgState::PendingVerify {
                continue;
            }
            e.ota_state = OtaImgState::Aborted.raw();
            let slot = e.slot(count).and_then(|n| table.ota(n));
            self.events.push(BoardEvent::BootloaderAborted {
                slot: slot
                    .map(|s| s.kind.to_string())
                    .unwrap_or_else(|| "?".into()),
            });
            self.write_otadata_sector(i, e)
                .map_err(|_| BootErr::PowerLost)?;
        }
        Ok(())
    }

    /// With anti-rollback: which valid entries point at an app whose `secure_version` is at
    /// least the eFuse counter.
    fn selectable_by_secure_version(
        &mut self,
        table: &PartitionTable,
        two: &[Entry; 2],
    ) -> [bool; 2] {
        let count = table.bootloader_ota_count();
        let mut ok = [two[0].is_valid(), two[1].is_valid()];
        for (i, valid) in ok.iter_mut().enumerate() {
            let Some(slot) = two[i]
                .slot(count)
                .and_then(|n| table.ota(n))
                .filter(|_| *valid)
            else {
                continue;
            };
            if !self.secure_version_ok(slot) {
                *valid = false;
                self.events.push(BoardEvent::BootRejected {
                    slot: slot.kind.to_string(),
                    reason: "secure-version".into(),
                });
            }
        }
        ok
    }

    /// `bootloader_utility_load_boot_image`: try the selected partition, then down to
    /// factory, then up; the test partition last. Each candidate passes the anti-rollback
    /// check and `esp_image_verify` or is skipped.
    fn load_boot_image(
        &mut self,
        table: &PartitionTable,
        selected: Selected,
    ) -> Result<Option<Booted>, BootErr> {
        let start = selected.start;
        let slot_of = |i: i32| {
            if i == FACTORY {
                table.factory()
            } else {
                table.ota(i as u8)
            }
        };
        let order: Vec<i32> = (FACTORY..=start)
            .rev()
            .chain(start + 1..table.bootloader_ota_count() as i32)
            .collect();
        for index in order {
            let Some(slot) = slot_of(index) else { continue };
            if !self.secure_version_ok(slot) {
                self.events.push(BoardEvent::BootRejected {
                    slot: slot.kind.to_string(),
                    reason: "secure-version".into(),
                });
                continue;
            }
            match self.verify_slot(slot) {
                Ok(info) => {
                    if index > FACTORY && selected.initial_contents {
                        // set_actual_ota_seq: record what actually booted.
                        let e = Entry::new(index as u32 + 1, OtaImgState::Valid, [0xFF; 20]);
                        self.write_otadata_sector(0, &e)
                            .map_err(|_| BootErr::PowerLost)?;
                        if self.boot_config.anti_rollback {
                            let _ = self.raise_efuse(slot);
                        }
                    }
                    return Ok(Some(self.booted(slot, info)));
                }
                Err(image::ImageError::Read) => return Err(BootErr::PowerLost),
                Err(e) => self.events.push(BoardEvent::BootRejected {
                    slot: slot.kind.to_string(),
                    reason: e.to_string(),
                }),
            }
        }
        let Some(slot) = table.test_slot() else {
            return Ok(None);
        };
        if !self.secure_version_ok(slot) {
            return Ok(None);
        }
        Ok(self
            .verify_slot(slot)
            .ok()
            .map(|info| self.booted(slot, info)))
    }

    /// The app in `slot` boots: what it will do is read from its image.
    fn booted(&self, slot: Slot, info: ImageInfo) -> Booted {
        let flash = &self.flash;
        let behaviour = appimage::behaviour(|off, buf| flash.read(slot.address + off, buf).is_ok());
        Booted {
            slot,
            info,
            behaviour,
        }
    }

    /// The agent's data partition wears out: every erase or program of it fails from now on
    /// (`ESP_ERR_FLASH_OP_FAIL`), reads still work.
    pub fn wear_out_agent_partition(&mut self) {
        let (base, size) = self.agent_partition();
        self.flash.wear_out(base..base + size);
    }

    fn agent_partition(&self) -> (u32, u32) {
        self.table
            .find(AGENT_LABEL)
            .map(|p| (p.offset, p.size))
            .unwrap_or((0, 0))
    }

    fn otadata_rw<T>(
        &mut self,
        f: impl FnOnce(&mut Board, &mut [Entry; 2]) -> EspResult<T>,
    ) -> EspResult<T> {
        let mut two = self.read_otadata().map_err(fl)?;
        f(self, &mut two)
    }

    fn is_ota(slot: Slot) -> bool {
        matches!(slot.kind, SlotKind::Ota(_))
    }

    fn check_rollback_possible(&mut self, two: &[Entry; 2]) -> bool {
        let count = self.table.ota_count();
        if count == 0 {
            return false;
        }
        let valid = [two[0].is_valid(), two[1].is_valid()];
        let Some(active) = otadata::select(two, valid, true) else {
            return false;
        };
        let last = (!active) & 1;
        if !self.boot_config.anti_rollback && !valid[last] {
            if let Some(f) = self.table.factory() {
                if self.verify_slot(f).is_ok() {
                    return true;
                }
            }
        }
        if valid[last] {
            if let Some(slot) = two[last].slot(count).and_then(|n| self.table.ota(n)) {
                return self.verify_slot(slot).is_ok() && self.secure_version_ok(slot);
            }
        }
        false
    }

    /// `esp_ota_set_boot_partition` for an app partition other than factory: the
    /// anti-rollback check on `slot`'s app (a too-low one is erased), then
    /// `esp_rewrite_ota_data` selecting OTA slot `n` in the inactive otadata sector.
    fn select_ota_slot(&mut self, slot: Slot, n: u8) -> EspResult<()> {
        if self.boot_config.anti_rollback && !self.secure_version_ok(slot) {
            // "Partition will be erased."
            self.flash.erase(slot.address, slot.size).map_err(fl)?;
            return Err(EspError::SmallSecVer);
        }
        let count = self.table.ota_count();
        if n >= count {
            return Err(EspError::InvalidArg);
        }
        let new_state = if self.boot_config.rollback {
            OtaImgState::New
        } else {
            OtaImgState::Undefined
        };
        self.otadata_rw(|b, two| {
            let (sector, seq) = match otadata::active(two) {
                Some(a) => ((!a) & 1, otadata::next_seq(two[a].ota_seq, n, count)),
                None => (0, n as u32 + 1),
            };
            let mut e = two[sector];
            e.ota_state = new_state.raw();
            e.ota_seq = seq;
            e.crc = otadata::seq_crc(seq);
            b.write_otadata_sector(sector, &e).map_err(fl)?;
            b.events.push(BoardEvent::BootPartitionSet {
                slot: slot.kind.to_string(),
            });
            Ok(())
        })
    }

    /// `esp_ota_current_ota_is_workable(valid)`.
    fn set_running_state(&mut self, valid: bool) -> EspResult<()> {
        let count = self.table.ota_count();
        let running = self.running.ok_or(EspError::InvalidState)?;
        self.otadata_rw(|b, two| {
            let Some(active) = otadata::active(two).filter(|_| count != 0) else {
                return Err(EspError::Fail); // "Running firmware is factory"
            };
            if valid {
                if two[active].state() != OtaImgState::Valid {
                    two[active].ota_state = OtaImgState::Valid.raw();
                    b.write_otadata_sector(active, &two[active]).map_err(fl)?;
                    b.events.push(BoardEvent::MarkedValid {
                        slot: running.kind.to_string(),
                    });
                    // esp_ota_current_ota_is_workable: VALID is written first; then the eFuse
                    // update's error, if any, is what the call returns.
                    if b.boot_config.anti_rollback {
                        return b.raise_efuse(running);
                    }
                }
                Ok(())
            } else {
                if !b.check_rollback_possible(two) {
                    return Err(EspError::RollbackFailed);
                }
                two[active].ota_state = OtaImgState::Invalid.raw();
                b.write_otadata_sector(active, &two[active]).map_err(fl)?;
                b.events.push(BoardEvent::MarkedInvalid {
                    slot: running.kind.to_string(),
                });
                Ok(())
            }
        })
    }
}

/// Slot `kind` of `table`, if `image` fits it.
fn slot_for(table: &PartitionTable, kind: SlotKind, image: &[u8]) -> Result<Slot, SetupError> {
    let target = table
        .app_slots()
        .into_iter()
        .find(|s| s.kind == kind)
        .ok_or(SetupError::NoSlot(kind))?;
    if image.len() as u32 > target.size {
        return Err(SetupError::TooLarge {
            len: image.len(),
            slot: kind,
            size: target.size,
        });
    }
    Ok(target)
}

/// The index the bootloader counts the factory app as (OTA slots are 0..).
const FACTORY: i32 = -1;

/// Where `bootloader_utility_load_boot_image` starts looking, and whether otadata held
/// nothing yet (then what boots is recorded as `set_actual_ota_seq` does).
#[derive(Clone, Copy)]
struct Selected {
    start: i32,
    initial_contents: bool,
}

enum BootErr {
    Table(String),
    PowerLost,
}

impl Platform for Board {
    fn running_slot(&self) -> Slot {
        self.running.unwrap_or(Slot {
            kind: SlotKind::Factory,
            address: 0,
            size: 0,
        })
    }

    fn next_update_slot(&self) -> Option<Slot> {
        let running = self.running?;
        let mut default = None;
        let mut next_is_result = false;
        for n in 0..16 {
            let Some(p) = self.table.ota(n) else { continue };
            default.get_or_insert(p);
            if p == running {
                next_is_result = true;
            } else if next_is_result {
                return Some(p);
            }
        }
        default
    }

    /// `esp_ota_get_state_partition`: `ESP_ERR_NOT_SUPPORTED` for a partition that is not
    /// an OTA slot.
    fn slot_state(&mut self, slot: Slot) -> EspResult<Option<OtaImgState>> {
        if !Self::is_ota(slot) {
            return Err(EspError::NotSupported);
        }
        let two = self.read_otadata().map_err(fl)?;
        Ok(self.state_in(&two, slot))
    }

    fn ota_begin(&mut self, slot: Slot) -> EspResult<()> {
        self.with_phase(Phase::Begin, |b| {
            let running = b.running.ok_or(EspError::InvalidState)?;
            // esp_ota_begin: esp_partition_verify, then is_ota_partition.
            if b.table.slot_at(slot.address) != Some(slot) {
                return Err(EspError::NotFound);
            }
            if !Self::is_ota(slot) {
                return Err(EspError::InvalidArg);
            }
            if slot == running {
                return Err(EspError::PartitionConflict);
            }
            if b.boot_config.rollback {
                // Only an answer of ESP_OK counts (a factory app has no state).
                if b.slot_state(running) == Ok(Some(OtaImgState::PendingVerify)) {
                    return Err(EspError::RollbackInvalidState);
                }
                // esp_ota_invalidate_inactive_ota_data_slot (its result is ignored by ESP-IDF,
                // but a power cut is a power cut).
                let two = b.read_otadata().map_err(fl)?;
                let count = b.table.ota_count();
                if let Some(active) = otadata::active(&two).filter(|_| count != 0) {
                    let inactive = (!active) & 1;
                    let e = two[inactive];
                    if e.ota_seq != u32::MAX && e.crc == otadata::seq_crc(e.ota_seq) {
                        let last = e.slot(count).and_then(|n| b.table.ota(n));
                        if last.is_some_and(|s| s != running) {
                            let off = b.table.otadata().map(|p| p.offset).unwrap_or(0);
                            b.flash
                                .erase(off + inactive as u32 * SECTOR_SIZE, SECTOR_SIZE)
                                .map_err(fl)?;
                        }
                    }
                }
            }
            b.session = Some(OtaSession {
                slot,
                wrote: 0,
                need_erase: true,
            });
            b.events.push(BoardEvent::OtaBegin {
                slot: slot.kind.to_string(),
                resumed_at: None,
            });
            Ok(())
        })
    }

    fn ota_resume(&mut self, slot: Slot, offset: u32) -> EspResult<()> {
        self.with_phase(Phase::Begin, |b| {
            let running = b.running.ok_or(EspError::InvalidState)?;
            if offset > slot.size
                || !Self::is_ota(slot)
                || b.table.slot_at(slot.address) != Some(slot)
            {
                return Err(EspError::InvalidArg);
            }
            if slot == running {
                return Err(EspError::PartitionConflict);
            }
            b.session = Some(OtaSession {
                slot,
                wrote: offset,
                need_erase: true,
            });
            b.events.push(BoardEvent::OtaBegin {
                slot: slot.kind.to_string(),
                resumed_at: Some(offset),
            });
            Ok(())
        })
    }

    fn ota_write(&mut self, data: &[u8]) -> EspResult<()> {
        let Some(s) = self.session else {
            return Err(EspError::InvalidArg);
        };
        if data.is_empty() {
            return Ok(());
        }
        let reach = s.wrote.saturating_add(data.len() as u32);
        if let Some(i) = self
            .plans
            .iter()
            .position(|(p, _)| matches!(p, CutPlan::DownloadReaches { bytes } if reach >= *bytes))
        {
            let (_, seed) = self.plans[i];
            self.plans[i].0 = CutPlan::InPhase {
                phase: Phase::Download,
                nth: 0,
            };
            self.plans[i].1 = seed;
        }
        self.with_phase(Phase::Download, |b| {
            let size = data.len() as u32;
            if reach > s.slot.size {
                // esp_partition_write past the partition's end.
                return Err(EspError::InvalidSize);
            }
            if s.need_erase {
                let first = s.wrote / SECTOR_SIZE;
                let last = (s.wrote + size - 1) / SECTOR_SIZE;
                if s.wrote % SECTOR_SIZE == 0 {
                    b.flash
                        .erase(s.slot.address + s.wrote, (last - first + 1) * SECTOR_SIZE)
                        .map_err(fl)?;
                } else if first != last {
                    b.flash
                        .erase(
                            s.slot.address + (first + 1) * SECTOR_SIZE,
                            (last - first) * SECTOR_SIZE,
                        )
                        .map_err(fl)?;
                }
            }
            if s.wrote == 0 && data[0] != image::IMAGE_MAGIC {
                return Err(EspError::ValidateFailed);
            }
            b.flash
                .program(s.slot.address + s.wrote, data)
                .map_err(fl)?;
            if let Some(sess) = b.session.as_mut() {
                sess.wrote += size;
            }
            Ok(())
        })
    }

    fn ota_end(&mut self) -> EspResult<()> {
        let s = self.session.take().ok_or(EspError::NotFound)?;
        if s.wrote == 0 {
            return Err(EspError::InvalidArg);
        }
        self.verify_slot(s.slot)
            .map(|_| ())
            .map_err(|_| EspError::ValidateFailed)
    }

    fn ota_abort(&mut self) {
        self.session = None;
    }

    fn set_boot_partition(&mut self, slot: Slot) -> EspResult<()> {
        self.with_phase(Phase::SetBoot, |b| {
            if b.verify_slot(slot).is_err() {
                return Err(EspError::ValidateFailed);
            }
            match slot.kind {
                SlotKind::Factory => {
                    let p = b
                        .table
                        .otadata()
                        .map(|p| (p.offset, p.size))
                        .ok_or(EspError::NotFound)?;
                    b.flash.erase(p.0, p.1).map_err(fl)?;
                    b.events.push(BoardEvent::BootPartitionSet {
                        slot: slot.kind.to_string(),
                    });
                    Ok(())
                }
                SlotKind::Ota(n) => b.select_ota_slot(slot, n),
                // esp_rewrite_ota_data(ESP_PARTITION_SUBTYPE_APP_TEST): OTA_SLOT(0x20) is 0, so
                // ESP-IDF selects ota_0 for the next boot, not the test app.
                SlotKind::Test => b.select_ota_slot(slot, 0),
            }
        })
    }

    fn mark_app_valid_cancel_rollback(&mut self) -> EspResult<()> {
        self.with_phase(Phase::Confirm, |b| b.set_running_state(true))
    }

    fn mark_app_invalid_rollback(&mut self) -> EspResult<()> {
        self.with_phase(Phase::Confirm, |b| b.set_running_state(false))
    }

    /// The firmware's read-and-hash (the provided body), remembered per exact sectors.
    fn slot_sha256(&mut self, slot: Slot, len: u32) -> EspResult<[u8; 32]> {
        if len > slot.size {
            return Err(EspError::InvalidArg);
        }
        self.flash
            .memo_region("sha256", slot.address, len, |flash| {
                image::sha256_of(len, |off, buf| {
                    flash.read(slot.address + off, buf).map_err(fl)
                })
            })
    }

    /// `esp_image_verify` as the agent runs it, remembered per exact sectors like the
    /// bootloader's (see `Board::verify_slot`).
    fn slot_image(&mut self, slot: Slot) -> Result<ImageInfo, image::ImageError> {
        self.verify_slot(slot)
    }

    fn slot_read(&mut self, slot: Slot, offset: u32, buf: &mut [u8]) -> EspResult<()> {
        if offset
            .checked_add(buf.len() as u32)
            .is_none_or(|e| e > slot.size)
        {
            return Err(EspError::InvalidArg);
        }
        self.flash.read(slot.address + offset, buf).map_err(fl)
    }

    fn state_size(&self) -> u32 {
        self.agent_partition().1
    }

    fn state_read(&mut self, offset: u32, buf: &mut [u8]) -> EspResult<()> {
        let (base, size) = self.agent_partition();
        if offset
            .checked_add(buf.len() as u32)
            .is_none_or(|e| e > size)
        {
            return Err(EspError::InvalidArg);
        }
        self.flash.read(base + offset, buf).map_err(fl)
    }

    fn state_erase_sector(&mut self, offset: u32) -> EspResult<()> {
        let (base, size) = self.agent_partition();
        if offset + SECTOR_SIZE > size {
            return Err(EspError::InvalidArg);
        }
        self.with_phase(Phase::Journal, |b| {
            b.flash.erase(base + offset, SECTOR_SIZE).map_err(fl)
        })
    }

    fn state_write(&mut self, offset: u32, data: &[u8]) -> EspResult<()> {
        let (base, size) = self.agent_partition();
        if offset
            .checked_add(data.len() as u32)
            .is_none_or(|e| e > size)
        {
            return Err(EspError::InvalidArg);
        }
        self.with_phase(Phase::Journal, |b| {
            b.flash.program(base + offset, data).map_err(fl)
        })
    }

    fn efuse_secure_version(&mut self) -> u32 {
        self.efuse_secure_version
    }
}
