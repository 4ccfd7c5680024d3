//! The agent's `Platform` on the chip: one ESP-IDF call per method, through esp-idf-svc's
//! `sys` bindings (`EspOta` has no `esp_ota_resume` or offset access, which the agent needs to
//! continue a download after a power cut).

use core::ffi::c_void;
use core::ptr;

use crate::idf::sys::*;
use otarig_agent::{EspError, EspResult, OtaImgState, Platform, Slot, SlotKind};

/// ESP-IDF's `esp_err_t` as the agent names it. esp-idf-sys generates the `ESP_*` constants
/// as `i32`, the type of `esp_err_t` (its bindgen callback forces `IntKind::I32`), so they
/// are matched as they are, without a cast.
fn err(code: esp_err_t) -> EspError {
    match code {
        ESP_FAIL => EspError::Fail,
        ESP_ERR_INVALID_SIZE => EspError::InvalidSize,
        ESP_ERR_NOT_SUPPORTED => EspError::NotSupported,
        ESP_ERR_INVALID_ARG => EspError::InvalidArg,
        ESP_ERR_NOT_FOUND => EspError::NotFound,
        ESP_ERR_INVALID_STATE => EspError::InvalidState,
        ESP_ERR_OTA_PARTITION_CONFLICT => EspError::PartitionConflict,
        ESP_ERR_OTA_VALIDATE_FAILED => EspError::ValidateFailed,
        ESP_ERR_OTA_SMALL_SEC_VER => EspError::SmallSecVer,
        ESP_ERR_OTA_ROLLBACK_FAILED => EspError::RollbackFailed,
        ESP_ERR_OTA_ROLLBACK_INVALID_STATE => EspError::RollbackInvalidState,
        _ => EspError::FlashOpFail,
    }
}

fn ok(code: esp_err_t) -> EspResult<()> {
    if code == ESP_OK {
        Ok(())
    } else {
        Err(err(code))
    }
}

fn slot_of(p: *const esp_partition_t) -> Slot {
    // SAFETY: ESP-IDF's partition table entries live for the program's lifetime.
    let p = unsafe { &*p };
    let sub = p.subtype;
    let kind = match sub {
        0x00 => SlotKind::Factory,
        0x20 => SlotKind::Test,
        n => SlotKind::Ota((n - 0x10) as u8),
    };
    Slot {
        kind,
        address: p.address,
        size: p.size,
    }
}

/// The app partition at `slot.address`.
fn partition(slot: Slot) -> EspResult<*const esp_partition_t> {
    // SAFETY: iterator use as documented in esp_partition.h; released before returning.
    unsafe {
        let mut it = esp_partition_find(
            esp_partition_type_t_ESP_PARTITION_TYPE_APP,
            esp_partition_subtype_t_ESP_PARTITION_SUBTYPE_ANY,
            ptr::null(),
        );
        while !it.is_null() {
            let p = esp_partition_get(it);
            if (*p).address == slot.address {
                esp_partition_iterator_release(it);
                return Ok(p);
            }
            it = esp_partition_next(it);
        }
        Err(EspError::NotFound)
    }
}

pub struct EspPlatform {
    handle: Option<esp_ota_handle_t>,
    state: *const esp_partition_t,
}

impl EspPlatform {
    /// Finds the agent's data partition (label `otarig`, as in partitions.csv).
    pub fn new() -> Result<EspPlatform, &'static str> {
        // SAFETY: a NUL-terminated label; the result is a static table entry or NULL.
        let state = unsafe {
            esp_partition_find_first(
                esp_partition_type_t_ESP_PARTITION_TYPE_DATA,
                esp_partition_subtype_t_ESP_PARTITION_SUBTYPE_ANY,
                c"otarig".as_ptr(),
            )
        };
        if state.is_null() {
            return Err("no 'otarig' data partition: flash partitions.csv with the app");
        }
        Ok(EspPlatform {
            handle: None,
            state,
        })
    }
}

impl Platform for EspPlatform {
    fn running_slot(&self) -> Slot {
        // SAFETY: never NULL while an app runs.
        slot_of(unsafe { esp_ota_get_running_partition() })
    }

    fn next_update_slot(&self) -> Option<Slot> {
        // SAFETY: NULL start means "after the running partition".
        let p = unsafe { esp_ota_get_next_update_partition(ptr::null()) };
        (!p.is_null()).then(|| slot_of(p))
    }

    fn slot_state(&mut self, slot: Slot) -> EspResult<Option<OtaImgState>> {
        let p = partition(slot)?;
        let mut st: esp_ota_img_states_t = 0;
        // SAFETY: p is a table entry, st a valid out pointer.
        match unsafe { esp_ota_get_state_partition(p, &mut st) } {
            ESP_OK => Ok(Some(OtaImgState::from_raw(st))),
            ESP_ERR_NOT_FOUND => Ok(None),
            e => Err(err(e)),
        }
    }

    fn ota_begin(&mut self, slot: Slot) -> EspResult<()> {
        let p = partition(slot)?;
        let mut h: esp_ota_handle_t = 0;
        // SAFETY: OTA_WITH_SEQUENTIAL_WRITES erases sectors as writes reach them.
        ok(unsafe { esp_ota_begin(p, OTA_WITH_SEQUENTIAL_WRITES as usize, &mut h) })?;
        self.handle = Some(h);
        Ok(())
    }

    fn ota_resume(&mut self, slot: Slot, offset: u32) -> EspResult<()> {
        let p = partition(slot)?;
        let mut h: esp_ota_handle_t = 0;
        // SAFETY: as esp_ota_begin; keeps what is before `offset`.
        ok(unsafe {
            esp_ota_resume(
                p,
                OTA_WITH_SEQUENTIAL_WRITES as usize,
                offset as usize,
                &mut h,
            )
        })?;
        self.handle = Some(h);
        Ok(())
    }

    fn ota_write(&mut self, data: &[u8]) -> EspResult<()> {
        let h = self.handle.ok_or(EspError::InvalidState)?;
        // SAFETY: data is valid for its length.
        ok(unsafe { esp_ota_write(h, data.as_ptr() as *const c_void, data.len()) })
    }

    fn ota_end(&mut self) -> EspResult<()> {
        let h = self.handle.take().ok_or(EspError::InvalidState)?;
        // SAFETY: h came from esp_ota_begin/resume; ESP-IDF frees it whatever the result.
        ok(unsafe { esp_ota_end(h) })
    }

    fn ota_abort(&mut self) {
        if let Some(h) = self.handle.take() {
            // SAFETY: as above.
            unsafe { esp_ota_abort(h) };
        }
    }

    fn set_boot_partition(&mut self, slot: Slot) -> EspResult<()> {
        let p = partition(slot)?;
        // SAFETY: a table entry.
        ok(unsafe { esp_ota_set_boot_partition(p) })
    }

    fn mark_app_valid_cancel_rollback(&mut self) -> EspResult<()> {
        // SAFETY: no arguments.
        ok(unsafe { esp_ota_mark_app_valid_cancel_rollback() })
    }

    fn mark_app_invalid_rollback(&mut self) -> EspResult<()> {
        // SAFETY: no arguments; the agent asks for the restart itself.
        ok(unsafe { esp_ota_mark_app_invalid_rollback() })
    }

    fn slot_read(&mut self, slot: Slot, offset: u32, buf: &mut [u8]) -> EspResult<()> {
        let p = partition(slot)?;
        // SAFETY: buf is valid for its length.
        ok(unsafe {
            esp_partition_read(
                p,
                offset as usize,
                buf.as_mut_ptr() as *mut c_void,
                buf.len(),
            )
        })
    }

    fn state_size(&self) -> u32 {
        // SAFETY: checked non-NULL in new().
        unsafe { (*self.state).size }
    }

    fn state_read(&mut self, offset: u32, buf: &mut [u8]) -> EspResult<()> {
        // SAFETY: as slot_read.
        ok(unsafe {
            esp_partition_read(
                self.state,
                offset as usize,
                buf.as_mut_ptr() as *mut c_void,
                buf.len(),
            )
        })
    }

    fn state_erase_sector(&mut self, offset: u32) -> EspResult<()> {
        // SAFETY: one 4 KiB sector of the agent's own partition.
        ok(unsafe { esp_partition_erase_range(self.state, offset as usize, 4096) })
    }

    fn state_write(&mut self, offset: u32, data: &[u8]) -> EspResult<()> {
        // SAFETY: data is valid for its length.
        ok(unsafe {
            esp_partition_write(
                self.state,
                offset as usize,
                data.as_ptr() as *const c_void,
                data.len(),
            )
        })
    }

    fn efuse_secure_version(&mut self) -> u32 {
        // SAFETY: reads eFuse; no arguments.
        unsafe { esp_efuse_read_secure_version() }
    }
}
