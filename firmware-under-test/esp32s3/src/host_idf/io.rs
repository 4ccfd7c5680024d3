//! esp-idf-svc 0.52 src/io.rs re-exports embedded-svc's (embedded-io's) traits.

/// embedded-io `Write`: `fn write_all(&mut self, buf: &[u8]) -> Result<(), Self::Error>`.
pub trait Write {
    type Error: core::fmt::Debug + core::fmt::Display;
    fn write_all(&mut self, buf: &[u8]) -> Result<(), Self::Error>;
}
