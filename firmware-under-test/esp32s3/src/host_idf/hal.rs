//! esp-idf-hal 0.46 (re-exported as `esp_idf_svc::hal`).

pub mod prelude {
    pub use super::peripherals::Peripherals;
}

pub mod modem {
    /// src/modem.rs: `pub struct Modem` (a `WifiModemPeripheral`).
    pub struct Modem(());
}

pub mod peripherals {
    use crate::idf::sys::EspError;

    /// src/peripherals.rs: `pub struct Peripherals { pub modem: Modem, .. }`.
    pub struct Peripherals {
        pub modem: super::modem::Modem,
    }

    impl Peripherals {
        /// `pub fn take() -> Result<Self, EspError>`.
        pub fn take() -> Result<Self, EspError> {
            crate::idf::host_only()
        }
    }
}
