//! The agent's only door to the board: a trait whose methods are ESP-IDF calls.
//!
//! Each method names the `esp_ota_ops.h` / `esp_partition.h` / `esp_efuse.h` function it stands
//! for and keeps its semantics, so the esp32s3 shell implements it as one call each, and the
//! simulator implements it on simulated flash exactly as ESP-IDF would behave there.

use core::fmt;

use crate::image::{self, ImageError, ImageInfo};

/// Kind of app partition (`esp_partition_subtype_t` for `ESP_PARTITION_TYPE_APP`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum SlotKind {
    /// `ESP_PARTITION_SUBTYPE_APP_FACTORY` (0x00).
    Factory,
    /// `ESP_PARTITION_SUBTYPE_APP_OTA_0 + n` (0x10 + n).
    Ota(u8),
    /// `ESP_PARTITION_SUBTYPE_APP_TEST` (0x20).
    Test,
}

impl fmt::Display for SlotKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SlotKind::Factory => f.write_str("factory"),
            SlotKind::Ota(n) => write!(f, "ota_{n}"),
            SlotKind::Test => f.write_str("test"),
        }
    }
}

/// An app partition (the parts of `esp_partition_t` the agent uses).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Slot {
    pub kind: SlotKind,
    pub address: u32,
    pub size: u32,
}

/// `esp_ota_img_states_t`, as stored in `esp_ota_select_entry_t::ota_state`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum OtaImgState {
    New,
    PendingVerify,
    Valid,
    Invalid,
    Aborted,
    Undefined,
}

impl OtaImgState {
    pub const fn from_raw(raw: u32) -> Self {
        match raw {
            0 => OtaImgState::New,
            1 => OtaImgState::PendingVerify,
            2 => OtaImgState::Valid,
            3 => OtaImgState::Invalid,
            4 => OtaImgState::Aborted,
            _ => OtaImgState::Undefined,
        }
    }

    pub const fn raw(self) -> u32 {
        match self {
            OtaImgState::New => 0,
            OtaImgState::PendingVerify => 1,
            OtaImgState::Valid => 2,
            OtaImgState::Invalid => 3,
            OtaImgState::Aborted => 4,
            OtaImgState::Undefined => 0xFFFF_FFFF,
        }
    }

    pub const fn name(self) -> &'static str {
        match self {
            OtaImgState::New => "new",
            OtaImgState::PendingVerify => "pending-verify",
            OtaImgState::Valid => "valid",
            OtaImgState::Invalid => "invalid",
            OtaImgState::Aborted => "aborted",
            OtaImgState::Undefined => "undefined",
        }
    }
}

/// The `esp_err_t` values these calls return, by meaning.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EspError {
    /// `ESP_ERR_INVALID_ARG`
    InvalidArg,
    /// `ESP_ERR_NOT_FOUND`
    NotFound,
    /// `ESP_ERR_INVALID_STATE`
    InvalidState,
    /// `ESP_ERR_OTA_PARTITION_CONFLICT`
    PartitionConflict,
    /// `ESP_ERR_OTA_VALIDATE_FAILED`
    ValidateFailed,
    /// `ESP_ERR_OTA_SMALL_SEC_VER`
    SmallSecVer,
    /// `ESP_ERR_OTA_ROLLBACK_FAILED`
    RollbackFailed,
    /// `ESP_ERR_OTA_ROLLBACK_INVALID_STATE`
    RollbackInvalidState,
    /// `ESP_ERR_FLASH_OP_FAIL` (and on the simulator: the power went away mid-operation).
    FlashOpFail,
    /// `ESP_FAIL`: e.g. marking the running app valid or invalid while the factory app runs.
    Fail,
    /// `ESP_ERR_INVALID_SIZE`: a write past the end of the partition.
    InvalidSize,
    /// `ESP_ERR_NOT_SUPPORTED`: e.g. the otadata state of a partition that is not an OTA slot.
    NotSupported,
}

impl fmt::Display for EspError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            EspError::InvalidArg => "ESP_ERR_INVALID_ARG",
            EspError::NotFound => "ESP_ERR_NOT_FOUND",
            EspError::InvalidState => "ESP_ERR_INVALID_STATE",
            EspError::PartitionConflict => "ESP_ERR_OTA_PARTITION_CONFLICT",
            EspError::ValidateFailed => "ESP_ERR_OTA_VALIDATE_FAILED",
            EspError::SmallSecVer => "ESP_ERR_OTA_SMALL_SEC_VER",
            EspError::RollbackFailed => "ESP_ERR_OTA_ROLLBACK_FAILED",
            EspError::RollbackInvalidState => "ESP_ERR_OTA_ROLLBACK_INVALID_STATE",
            EspError::FlashOpFail => "ESP_ERR_FLASH_OP_FAIL",
            EspError::Fail => "ESP_FAIL",
            EspError::InvalidSize => "ESP_ERR_INVALID_SIZE",
            EspError::NotSupported => "ESP_ERR_NOT_SUPPORTED",
        })
    }
}

pub type EspResult<T> = Result<T, EspError>;

/// The board as the agent sees it. One open OTA handle at a time, like the agent uses it.
pub trait Platform {
    /// `esp_ota_get_running_partition()`.
    fn running_slot(&self) -> Slot;

    /// `esp_ota_get_next_update_partition(NULL)`; `None` when the table has no OTA slot.
    fn next_update_slot(&self) -> Option<Slot>;

    /// `esp_ota_get_state_partition(slot)`; `Ok(None)` for `ESP_ERR_NOT_FOUND` (no otadata
    /// entry names this slot), `Err(NotSupported)` for a slot that is not an OTA slot
    /// (factory, test).
    fn slot_state(&mut self, slot: Slot) -> EspResult<Option<OtaImgState>>;

    /// `esp_ota_begin(slot, OTA_WITH_SEQUENTIAL_WRITES, &handle)`: sectors are erased as
    /// writes reach them. With rollback enabled this also erases the inactive otadata entry
    /// (`esp_ota_invalidate_inactive_ota_data_slot`), so the slot being overwritten can no
    /// longer be selected.
    fn ota_begin(&mut self, slot: Slot) -> EspResult<()>;

    /// `esp_ota_resume(slot, OTA_WITH_SEQUENTIAL_WRITES, offset, &handle)`: continue writing at
    /// `offset` without erasing what is before it.
    fn ota_resume(&mut self, slot: Slot, offset: u32) -> EspResult<()>;

    /// `esp_ota_write(handle, data, len)`: sequential; rejects a first byte other than 0xE9.
    fn ota_write(&mut self, data: &[u8]) -> EspResult<()>;

    /// `esp_ota_end(handle)`: `esp_image_verify` over the slot; `ValidateFailed` if it fails.
    fn ota_end(&mut self) -> EspResult<()>;

    /// `esp_ota_abort(handle)`.
    fn ota_abort(&mut self);

    /// `esp_ota_set_boot_partition(slot)`: validates the image, checks `secure_version` when
    /// anti-rollback is on, then writes the next otadata entry (state NEW with rollback).
    fn set_boot_partition(&mut self, slot: Slot) -> EspResult<()>;

    /// `esp_ota_mark_app_valid_cancel_rollback()`: running entry becomes VALID; with
    /// anti-rollback the eFuse secure version is raised to the running app's.
    fn mark_app_valid_cancel_rollback(&mut self) -> EspResult<()>;

    /// `esp_ota_mark_app_invalid_rollback()`: running entry becomes INVALID (without the
    /// restart that `…_and_reboot` adds; the agent asks for the reboot as an action).
    fn mark_app_invalid_rollback(&mut self) -> EspResult<()>;

    /// `esp_partition_read(slot, offset, buf, len)` on an app partition.
    fn slot_read(&mut self, slot: Slot, offset: u32, buf: &mut [u8]) -> EspResult<()>;

    /// Size of the agent's own data partition (label `otarig`, two or more 4 KiB sectors).
    fn state_size(&self) -> u32;

    /// `esp_partition_read` on the `otarig` data partition.
    fn state_read(&mut self, offset: u32, buf: &mut [u8]) -> EspResult<()>;

    /// `esp_partition_erase_range(otarig, offset, 4096)`.
    fn state_erase_sector(&mut self, offset: u32) -> EspResult<()>;

    /// `esp_partition_write` on the `otarig` data partition (erased bytes only).
    fn state_write(&mut self, offset: u32, data: &[u8]) -> EspResult<()>;

    /// `esp_efuse_read_secure_version()`.
    fn efuse_secure_version(&mut self) -> u32;

    /// SHA-256 of the first `len` bytes of `slot` as written: `esp_partition_read` in 1 KiB
    /// pieces into `mbedtls_sha256`, which is what the firmware runs (this provided body).
    /// A platform may answer otherwise only with the same function of the slot's bytes; the
    /// simulator shares one answer between boards whose slots hold the very same sectors.
    fn slot_sha256(&mut self, slot: Slot, len: u32) -> EspResult<[u8; 32]> {
        image::sha256_of(len, |off, buf| self.slot_read(slot, off, buf))
    }

    /// [`image::verify`] over `slot` through [`Platform::slot_read`]: the checks
    /// `esp_image_verify` makes, and the whole image's SHA-256. The same caveat as
    /// [`Platform::slot_sha256`] applies to overriding it.
    fn slot_image(&mut self, slot: Slot) -> Result<ImageInfo, ImageError> {
        image::verify(slot.size, |off, buf| {
            self.slot_read(slot, off, buf).map_err(|_| ())
        })
    }
}
