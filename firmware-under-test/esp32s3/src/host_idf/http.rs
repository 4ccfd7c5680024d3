//! esp-idf-svc 0.52 src/http.rs and src/http/client.rs.

/// embedded-svc's `http::Method` (re-exported as `esp_idf_svc::http::Method`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Method {
    Get,
    Post,
    Head,
}

pub mod client {
    use super::Method;
    use crate::idf::sys::EspError;

    /// src/http/client.rs: `pub struct Configuration` (the fields the shell sets; Default).
    #[derive(Default)]
    pub struct Configuration {
        pub buffer_size: Option<usize>,
        pub buffer_size_tx: Option<usize>,
        pub timeout: Option<core::time::Duration>,
        pub use_global_ca_store: bool,
        pub client_certificate: Option<crate::idf::tls::X509<'static>>,
        pub server_certificate: Option<crate::idf::tls::X509<'static>>,
        pub private_key: Option<crate::idf::tls::X509<'static>>,
        pub raw_request_body: bool,
        pub keep_alive_enable: bool,
    }

    pub struct EspHttpConnection(());

    impl EspHttpConnection {
        /// `pub fn new(configuration: &Configuration) -> Result<Self, EspError>`.
        pub fn new(_configuration: &Configuration) -> Result<Self, EspError> {
            crate::idf::host_only()
        }
        /// `pub fn initiate_request<'a>(&'a mut self, method: Method, uri: &'a str,
        /// headers: &'a [(&'a str, &'a str)]) -> Result<(), EspError>`.
        pub fn initiate_request<'a>(
            &'a mut self,
            _method: Method,
            _uri: &'a str,
            _headers: &'a [(&'a str, &'a str)],
        ) -> Result<(), EspError> {
            crate::idf::host_only()
        }
        /// `pub fn initiate_response(&mut self) -> Result<(), EspError>`.
        pub fn initiate_response(&mut self) -> Result<(), EspError> {
            crate::idf::host_only()
        }
        /// `pub fn status(&self) -> u16`.
        pub fn status(&self) -> u16 {
            crate::idf::host_only()
        }
        /// `pub fn header(&self, name: &str) -> Option<&str>`.
        pub fn header(&self, _name: &str) -> Option<&str> {
            crate::idf::host_only()
        }
        /// `pub fn read(&mut self, buf: &mut [u8]) -> Result<usize, EspError>`.
        pub fn read(&mut self, _buf: &mut [u8]) -> Result<usize, EspError> {
            crate::idf::host_only()
        }
    }

    /// src/http/client.rs: `impl RawHandle for EspHttpConnection` (the `esp_http_client`
    /// handle).
    impl crate::idf::handle::RawHandle for EspHttpConnection {
        type Handle = crate::idf::sys::esp_http_client_handle_t;
        fn handle(&self) -> Self::Handle {
            crate::idf::host_only()
        }
    }

    /// `impl embedded_svc::io::Write for EspHttpConnection` (`type Error = EspError`).
    impl crate::idf::io::Write for EspHttpConnection {
        type Error = EspError;
        fn write_all(&mut self, _buf: &[u8]) -> Result<(), EspError> {
            crate::idf::host_only()
        }
    }
}
