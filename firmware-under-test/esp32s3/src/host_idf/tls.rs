//! esp-idf-svc 0.52 src/tls.rs.

use std::ffi::CStr;

/// `#[derive(Copy, Clone, Eq, PartialEq)] pub struct X509<'a>(&'a [u8]);`
#[derive(Copy, Clone, Debug, Eq, PartialEq)]
pub struct X509<'a>(&'a [u8]);

impl<'a> X509<'a> {
    /// `pub fn pem(cstr: &'a CStr) -> Self`: the PEM with its NUL, as mbedTLS wants it.
    pub fn pem(cstr: &'a CStr) -> Self {
        X509(cstr.to_bytes_with_nul())
    }

    /// `pub fn data(&self) -> &[u8]`.
    pub fn data(&self) -> &[u8] {
        self.0
    }
}
