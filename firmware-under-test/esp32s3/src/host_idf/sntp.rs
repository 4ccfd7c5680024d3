//! esp-idf-svc 0.52 src/sntp.rs.

use super::sys::EspError;

pub struct EspSntp<'a>(core::marker::PhantomData<&'a ()>);

impl EspSntp<'static> {
    /// `pub fn new_default() -> Result<Self, EspError>`.
    pub fn new_default() -> Result<Self, EspError> {
        super::host_only()
    }
}
