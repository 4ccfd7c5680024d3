//! The board's HTTP client: one `esp_http_client` handle per boot, on a thread of its own,
//! whose connection stays open between requests.
//!
//! ESP-IDF keeps a handle's connection unless the server closes it ("Persistent
//! Connections", docs/en/api-reference/protocols/esp_http_client.rst: make as many requests
//! as possible with the same handle), and a TLS handshake costs an ESP32-S3 far more than a
//! request. So the manifest poll, the ranges of an image and the ack share one connection and
//! one handshake; requests take turns on it, in the order the agent asked for them. The
//! simulated boards do the same (`otarig_fleet::board_http`).
//!
//! An `EspHttpConnection` is not `Send`: the handle lives on its thread, and requests reach
//! it as jobs.

use std::sync::mpsc::{sync_channel, SyncSender, TrySendError};
use std::time::Duration;

use crate::idf;
use crate::idf::handle::RawHandle;
use crate::idf::http::client::{Configuration as HttpConfig, EspHttpConnection};
use crate::idf::http::Method;
use crate::Identity;
use otarig_esp32s3::retry_on_new_connection;

/// A request for the handle's thread.
type Job = Box<dyn FnOnce(&mut Handle) + Send>;

/// Requests waiting for the handle at most. The agent has one fetch out at a time and the
/// shell queues one poll at a time ([`crate::POLL_QUEUED`]), so a full queue means the
/// handle is stuck far longer than its timeouts allow.
const WAITING: usize = 8;

/// Where requests for the handle go. Cloning shares the handle.
#[derive(Clone)]
pub struct Http {
    jobs: SyncSender<Job>,
}

impl Http {
    /// Start the handle's thread. With an identity the handle does mutual TLS with it;
    /// without one it trusts ESP-TLS's global store when `global_ca` (the bench CA).
    pub fn start(identity: Option<Identity>, global_ca: bool) -> std::io::Result<Http> {
        let (jobs, queue) = sync_channel::<Job>(WAITING);
        std::thread::Builder::new()
            .stack_size(12 * 1024)
            .spawn(move || {
                let mut handle = Handle {
                    identity,
                    global_ca,
                    open: None,
                };
                for job in queue {
                    job(&mut handle);
                }
            })?;
        Ok(Http { jobs })
    }

    /// Run `job` on the handle once the requests before it are done. Never blocks: an
    /// error if the queue is full (the caller restarts the board, a safe state) or the
    /// handle's thread has stopped.
    pub fn queue(&self, job: impl FnOnce(&mut Handle) + Send + 'static) -> std::io::Result<()> {
        self.jobs.try_send(Box::new(job)).map_err(|e| match e {
            TrySendError::Full(_) => std::io::Error::other(format!(
                "{WAITING} HTTP requests already wait for the server: the connection is stuck"
            )),
            TrySendError::Disconnected(_) => {
                std::io::Error::other("the HTTP client's thread has stopped")
            }
        })
    }
}

/// The `esp_http_client` handle and how it connects.
pub struct Handle {
    identity: Option<Identity>,
    global_ca: bool,
    /// The connection kept from the last request that ended cleanly.
    open: Option<EspHttpConnection>,
}

/// One request: what a caller gives `esp_http_client` before the answer.
#[derive(Clone, Copy)]
pub struct Request<'a> {
    pub method: Method,
    pub url: &'a str,
    pub headers: &'a [(&'a str, &'a str)],
    pub body: Option<&'a [u8]>,
}

/// Why a request failed: before any answer came (with the `esp_err_t`, which decides whether
/// it is tried again: [`otarig_esp32s3::retry_on_new_connection`]), or after.
enum Failed {
    BeforeAnswer {
        code: idf::sys::esp_err_t,
        reason: String,
    },
    InAnswer(String),
}

impl Handle {
    /// One HTTP exchange; `sink` gets the status and the body in 4 KiB pieces and may stop
    /// it (the connection is then closed). Returns the status.
    pub fn request(
        &mut self,
        req: Request<'_>,
        sink: &mut dyn FnMut(u16, &[u8]) -> bool,
    ) -> Result<u16, String> {
        let kept = self.open.is_some();
        match self.exchange(req, sink) {
            Err(Failed::BeforeAnswer { code, .. }) if retry_on_new_connection(kept, code) => {
                self.exchange(req, sink).map_err(Failed::into_reason)
            }
            other => other.map_err(Failed::into_reason),
        }
    }

    fn exchange(
        &mut self,
        req: Request<'_>,
        sink: &mut dyn FnMut(u16, &[u8]) -> bool,
    ) -> Result<u16, Failed> {
        let Request {
            method,
            url,
            headers,
            body,
        } = req;
        let before = |e: idf::sys::EspError| Failed::BeforeAnswer {
            code: e.code(),
            reason: e.to_string(),
        };
        let mut conn = match self.open.take() {
            Some(conn) => conn,
            None => self.connect().map_err(before)?,
        };
        conn.initiate_request(method, url, headers)
            .map_err(before)?;
        if let Some(b) = body {
            use idf::io::Write;
            conn.write_all(b).map_err(before)?;
        }
        conn.initiate_response().map_err(before)?;
        let status = conn.status();
        let mut buf = [0u8; 4096];
        loop {
            match conn.read(&mut buf) {
                Ok(0) => break,
                Ok(n) if sink(status, &buf[..n]) => {}
                // Stopped early: the rest of the answer is not read, so the connection goes.
                Ok(_) => return Ok(status),
                Err(e) => return Err(Failed::InAnswer(format!("body ended: {e}"))),
            }
        }
        if forget_headers(&conn, headers) {
            self.open = Some(conn);
        }
        Ok(status)
    }

    fn connect(&self) -> Result<EspHttpConnection, idf::sys::EspError> {
        let id = self.identity;
        EspHttpConnection::new(&HttpConfig {
            timeout: Some(Duration::from_secs(30)),
            buffer_size: Some(4096),
            use_global_ca_store: id.is_none() && self.global_ca,
            server_certificate: id.map(|i| i.ca),
            client_certificate: id.map(|i| i.cert),
            private_key: id.map(|i| i.key),
            ..Default::default()
        })
    }
}

impl Failed {
    fn into_reason(self) -> String {
        match self {
            Failed::BeforeAnswer { reason, .. } | Failed::InAnswer(reason) => reason,
        }
    }
}

/// Remove the headers a request set: `esp_http_client_set_header` keeps them on the handle
/// for every later request (a range would follow the ack). `Content-Length` is not one of
/// them (esp-idf-svc passes it to `esp_http_client_open`). False if one could not be
/// removed: the connection is then not kept.
fn forget_headers(conn: &EspHttpConnection, headers: &[(&str, &str)]) -> bool {
    headers
        .iter()
        .filter(|(name, _)| !name.eq_ignore_ascii_case("Content-Length"))
        .all(|(name, _)| {
            let Ok(key) = std::ffi::CString::new(*name) else {
                return false;
            };
            // SAFETY: the handle is alive (`conn` is borrowed) and `key` is a C string that
            // outlives the call, which copies nothing from it.
            let rc =
                unsafe { idf::sys::esp_http_client_delete_header(conn.handle(), key.as_ptr()) };
            rc == idf::sys::ESP_OK
        })
}
