//! esp-idf-svc 0.52 src/wifi.rs, with embedded-svc 0.29's `wifi::{Configuration,
//! ClientConfiguration}` it re-exports.

use super::eventloop::EspSystemEventLoop;
use super::hal::modem::Modem;
use super::nvs::EspDefaultNvsPartition;
use super::sys::EspError;

/// heapless 0.8 `String<N>`, as embedded-svc's configuration fields hold text
/// (`TryFrom<&str>` fails past N bytes).
#[derive(Clone, Debug, Default)]
pub struct HString<const N: usize>(String);

impl<const N: usize> TryFrom<&str> for HString<N> {
    type Error = ();
    fn try_from(s: &str) -> Result<Self, ()> {
        if s.len() <= N {
            Ok(HString(s.to_string()))
        } else {
            Err(())
        }
    }
}

/// embedded-svc src/wifi.rs: `pub struct ClientConfiguration { pub ssid: heapless::String<32>,
/// .., pub password: heapless::String<64>, .. }` (Default).
#[derive(Clone, Debug, Default)]
pub struct ClientConfiguration {
    pub ssid: HString<32>,
    pub bssid: Option<[u8; 6]>,
    pub password: HString<64>,
    pub channel: Option<u8>,
}

/// embedded-svc src/wifi.rs: `pub enum Configuration { None, Client(ClientConfiguration), .. }`.
pub enum Configuration {
    None,
    Client(ClientConfiguration),
}

pub struct EspWifi<'d>(core::marker::PhantomData<&'d ()>);

impl<'d> EspWifi<'d> {
    /// `pub fn new<M: WifiModemPeripheral + 'd>(modem: M, sysloop: EspSystemEventLoop,
    /// nvs: Option<EspDefaultNvsPartition>) -> Result<Self, EspError>`.
    pub fn new(
        _modem: Modem,
        _sysloop: EspSystemEventLoop,
        _nvs: Option<EspDefaultNvsPartition>,
    ) -> Result<Self, EspError> {
        super::host_only()
    }
}

pub struct BlockingWifi<T>(T);

impl<T> BlockingWifi<T> {
    /// `pub fn wrap(wifi: T, event_loop: EspSystemEventLoop) -> Result<Self, EspError>`.
    pub fn wrap(_wifi: T, _event_loop: EspSystemEventLoop) -> Result<Self, EspError> {
        super::host_only()
    }
    /// `pub fn set_configuration(&mut self, conf: &Configuration) -> Result<(), EspError>`.
    pub fn set_configuration(&mut self, _conf: &Configuration) -> Result<(), EspError> {
        super::host_only()
    }
    /// `pub fn start(&mut self) -> Result<(), EspError>`.
    pub fn start(&mut self) -> Result<(), EspError> {
        super::host_only()
    }
    /// `pub fn connect(&mut self) -> Result<(), EspError>`.
    pub fn connect(&mut self) -> Result<(), EspError> {
        super::host_only()
    }
    /// `pub fn wait_netif_up(&self) -> Result<(), EspError>`.
    pub fn wait_netif_up(&self) -> Result<(), EspError> {
        super::host_only()
    }
}
