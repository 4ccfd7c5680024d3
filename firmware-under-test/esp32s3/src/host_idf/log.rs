//! esp-idf-svc 0.52 src/log.rs.

pub struct EspLogger;

impl EspLogger {
    /// `pub fn initialize_default()`.
    pub fn initialize_default() {}
}
