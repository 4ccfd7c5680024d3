//! esp-idf-svc 0.52 src/nvs.rs.

use super::sys::EspError;

pub struct NvsDefault(());

/// `pub type EspDefaultNvsPartition = EspNvsPartition<NvsDefault>;` (Clone).
#[derive(Clone)]
pub struct EspDefaultNvsPartition(());

impl EspDefaultNvsPartition {
    /// `pub fn take() -> Result<Self, EspError>`.
    pub fn take() -> Result<Self, EspError> {
        super::host_only()
    }
}

pub struct EspNvs<T>(core::marker::PhantomData<T>);

impl EspNvs<NvsDefault> {
    /// `pub fn new(partition: EspNvsPartition<T>, namespace: &str, read_write: bool)
    /// -> Result<Self, EspError>`.
    pub fn new(
        _partition: EspDefaultNvsPartition,
        _namespace: &str,
        _read_write: bool,
    ) -> Result<Self, EspError> {
        super::host_only()
    }
}

impl<T> EspNvs<T> {
    /// `pub fn get_str<'a>(&self, name: &str, buf: &'a mut [u8])
    /// -> Result<Option<&'a str>, EspError>`.
    pub fn get_str<'a>(
        &self,
        _name: &str,
        _buf: &'a mut [u8],
    ) -> Result<Option<&'a str>, EspError> {
        super::host_only()
    }

    /// `pub fn set_str(&self, name: &str, val: &str) -> Result<(), EspError>`.
    pub fn set_str(&self, _name: &str, _val: &str) -> Result<(), EspError> {
        super::host_only()
    }
}
