//! esp-idf-svc 0.52 src/handle.rs.

/// `pub trait RawHandle`: the ESP-IDF handle under a driver.
pub trait RawHandle {
    type Handle;

    /// `fn handle(&self) -> Self::Handle`.
    fn handle(&self) -> Self::Handle;
}
