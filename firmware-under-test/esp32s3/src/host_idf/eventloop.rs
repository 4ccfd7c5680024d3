//! esp-idf-svc 0.52 src/eventloop.rs.

use super::sys::EspError;

/// `pub type EspSystemEventLoop = EspEventLoop<System>;` (Clone).
#[derive(Clone)]
pub struct EspSystemEventLoop(());

impl EspSystemEventLoop {
    /// `pub fn take() -> Result<Self, EspError>`.
    pub fn take() -> Result<Self, EspError> {
        super::host_only()
    }
}
