//! esp-idf-sys 0.37: the bindgen output for the ESP-IDF v5.5 headers the shell calls
//! (esp_ota_ops.h, esp_partition.h, esp_efuse.h, esp_tls.h, esp_http_client.h, esp_system.h)
//! and the crate's
//! own `EspError`, `esp!` and `link_patches` (src/error.rs, src/lib.rs). bindgen maps
//! `esp_err_t` (`int`) to `i32` and, through esp-idf-sys's `IntKind::I32` callback, every
//! `ESP_*` macro constant to `i32`; `uint32_t` to `u32`; `size_t` to `usize`.
#![allow(
    non_camel_case_types,
    non_upper_case_globals,
    clippy::missing_safety_doc
)]

use core::ffi::{c_char, c_void};

/// esp_err.h: `typedef int esp_err_t;`
pub type esp_err_t = i32;
pub const ESP_OK: esp_err_t = 0;
pub const ESP_FAIL: esp_err_t = -1;
pub const ESP_ERR_INVALID_ARG: esp_err_t = 0x102;
pub const ESP_ERR_INVALID_STATE: esp_err_t = 0x103;
pub const ESP_ERR_INVALID_SIZE: esp_err_t = 0x104;
pub const ESP_ERR_NOT_FOUND: esp_err_t = 0x105;
pub const ESP_ERR_NOT_SUPPORTED: esp_err_t = 0x106;
/// esp_ota_ops.h: `ESP_ERR_OTA_BASE` 0x1500 and the codes above it.
pub const ESP_ERR_OTA_PARTITION_CONFLICT: esp_err_t = 0x1501;
pub const ESP_ERR_OTA_SELECT_INFO_INVALID: esp_err_t = 0x1502;
pub const ESP_ERR_OTA_VALIDATE_FAILED: esp_err_t = 0x1503;
pub const ESP_ERR_OTA_SMALL_SEC_VER: esp_err_t = 0x1504;
pub const ESP_ERR_OTA_ROLLBACK_FAILED: esp_err_t = 0x1505;
pub const ESP_ERR_OTA_ROLLBACK_INVALID_STATE: esp_err_t = 0x1506;
/// esp_ota_ops.h: `#define OTA_WITH_SEQUENTIAL_WRITES 0xfffffffe` (a `u32` constant).
pub const OTA_WITH_SEQUENTIAL_WRITES: u32 = 0xffff_fffe;

/// esp_ota_ops.h: `typedef uint32_t esp_ota_handle_t;`
pub type esp_ota_handle_t = u32;
/// esp_flash_partitions.h: the `esp_ota_img_states_t` enum, a `u32` under bindgen.
pub type esp_ota_img_states_t = u32;
/// esp_partition.h: `esp_partition_type_t` and `esp_partition_subtype_t` enums (`u32`).
pub type esp_partition_type_t = u32;
pub type esp_partition_subtype_t = u32;
pub const esp_partition_type_t_ESP_PARTITION_TYPE_APP: esp_partition_type_t = 0;
pub const esp_partition_type_t_ESP_PARTITION_TYPE_DATA: esp_partition_type_t = 1;
pub const esp_partition_subtype_t_ESP_PARTITION_SUBTYPE_ANY: esp_partition_subtype_t = 0xff;

/// esp_partition.h: `esp_partition_t` (the fields the shell reads, in header order).
#[repr(C)]
pub struct esp_partition_t {
    pub flash_chip: *mut c_void,
    pub type_: esp_partition_type_t,
    pub subtype: esp_partition_subtype_t,
    pub address: u32,
    pub size: u32,
    pub erase_size: u32,
    pub label: [c_char; 17],
    pub encrypted: bool,
    pub readonly: bool,
}
/// esp_partition.h: `typedef struct esp_partition_iterator_opaque_* esp_partition_iterator_t;`
pub type esp_partition_iterator_t = *mut c_void;

/// esp_http_client.h: `typedef struct esp_http_client *esp_http_client_handle_t;` (bindgen
/// declares the opaque struct as a zero-sized `#[repr(C)]` one).
#[repr(C)]
pub struct esp_http_client {
    _unused: [u8; 0],
}
pub type esp_http_client_handle_t = *mut esp_http_client;

extern "C" {
    // esp_partition.h
    pub fn esp_partition_find(
        type_: esp_partition_type_t,
        subtype: esp_partition_subtype_t,
        label: *const c_char,
    ) -> esp_partition_iterator_t;
    pub fn esp_partition_find_first(
        type_: esp_partition_type_t,
        subtype: esp_partition_subtype_t,
        label: *const c_char,
    ) -> *const esp_partition_t;
    pub fn esp_partition_get(iterator: esp_partition_iterator_t) -> *const esp_partition_t;
    pub fn esp_partition_next(iterator: esp_partition_iterator_t) -> esp_partition_iterator_t;
    pub fn esp_partition_iterator_release(iterator: esp_partition_iterator_t);
    pub fn esp_partition_read(
        partition: *const esp_partition_t,
        src_offset: usize,
        dst: *mut c_void,
        size: usize,
    ) -> esp_err_t;
    pub fn esp_partition_write(
        partition: *const esp_partition_t,
        dst_offset: usize,
        src: *const c_void,
        size: usize,
    ) -> esp_err_t;
    pub fn esp_partition_erase_range(
        partition: *const esp_partition_t,
        offset: usize,
        size: usize,
    ) -> esp_err_t;
    // esp_ota_ops.h (v5.5)
    pub fn esp_ota_begin(
        partition: *const esp_partition_t,
        image_size: usize,
        out_handle: *mut esp_ota_handle_t,
    ) -> esp_err_t;
    pub fn esp_ota_resume(
        partition: *const esp_partition_t,
        erase_size: usize,
        image_offset: usize,
        out_handle: *mut esp_ota_handle_t,
    ) -> esp_err_t;
    pub fn esp_ota_write(handle: esp_ota_handle_t, data: *const c_void, size: usize) -> esp_err_t;
    pub fn esp_ota_end(handle: esp_ota_handle_t) -> esp_err_t;
    pub fn esp_ota_abort(handle: esp_ota_handle_t) -> esp_err_t;
    pub fn esp_ota_set_boot_partition(partition: *const esp_partition_t) -> esp_err_t;
    pub fn esp_ota_get_running_partition() -> *const esp_partition_t;
    pub fn esp_ota_get_next_update_partition(
        start_from: *const esp_partition_t,
    ) -> *const esp_partition_t;
    pub fn esp_ota_get_state_partition(
        partition: *const esp_partition_t,
        ota_state: *mut esp_ota_img_states_t,
    ) -> esp_err_t;
    pub fn esp_ota_mark_app_valid_cancel_rollback() -> esp_err_t;
    pub fn esp_ota_mark_app_invalid_rollback() -> esp_err_t;
    // esp_efuse.h
    pub fn esp_efuse_read_secure_version() -> u32;
    // esp_tls.h
    pub fn esp_tls_init_global_ca_store() -> esp_err_t;
    pub fn esp_tls_set_global_ca_store(
        cacert_pem_buf: *const u8,
        cacert_pem_bytes: u32,
    ) -> esp_err_t;
    // esp_http_client.h
    pub fn esp_http_client_delete_header(
        client: esp_http_client_handle_t,
        key: *const c_char,
    ) -> esp_err_t;
    // esp_system.h
    pub fn esp_restart() -> !;
}

/// esp-idf-sys src/error.rs: a non-`ESP_OK` `esp_err_t`.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct EspError(core::num::NonZeroI32);

impl EspError {
    /// esp-idf-sys src/error.rs: `pub fn from(error: esp_err_t) -> Option<Self>`.
    pub fn from(error: esp_err_t) -> Option<Self> {
        core::num::NonZeroI32::new(error).map(EspError)
    }

    /// esp-idf-sys src/error.rs: `pub fn code(&self) -> esp_err_t`.
    pub fn code(&self) -> esp_err_t {
        self.0.get()
    }
}

impl core::fmt::Display for EspError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(f, "ESP-IDF error {}", self.code())
    }
}

impl std::error::Error for EspError {}

/// esp-idf-sys src/error.rs: `esp!(expr)` is `EspError::convert(expr)`, `Result<(), EspError>`.
#[macro_export]
macro_rules! esp {
    ($err:expr) => {{
        match $crate::idf::sys::EspError::from($err) {
            None => Ok(()),
            Some(e) => Err(e),
        }
    }};
}
pub use crate::esp;

/// esp-idf-sys src/lib.rs: `pub fn link_patches()`.
pub fn link_patches() {}
