//! A board's HTTP requests to the firmware server: the manifest poll and blob ranges, each
//! waiting for the network no longer than `esp_http_client`'s `timeout_ms` would.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use hyper::body::Incoming;
use otarig_scenario::runner;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use super::board::Shared;
use crate::board_http::{self, BoardHttp};

/// What a board's HTTP requests deliver to its task. Fetch answers carry the number of the
/// fetch (the board's count of them), so the answer of one the agent cancelled is dropped.
pub(super) enum Io {
    Manifest(Vec<u8>),
    /// A range's answer arrived; its body is read by the board task itself (straight from
    /// the connection into the agent, no copy and no hop through another task).
    Response {
        offset: u32,
        body: Incoming,
        fetch: u64,
    },
    /// The chunked protocol's answers (`/ota/check`, `/ota/chunk`), whole.
    Session(Vec<u8>, u64),
    Chunk(Vec<u8>, u64),
    FetchFailed(String, u64),
    /// A request failed its TLS handshake (what the TLS stack said).
    TlsFailed(String),
}

/// A body being read into the agent: where its next byte goes, and when waiting for it
/// stops (each read has its own timeout, like `esp_http_client`'s `timeout_ms`).
pub(super) struct Reading {
    body: Incoming,
    pos: u32,
    timeout: Duration,
    deadline: tokio::time::Instant,
}

impl Reading {
    pub(super) fn new(body: Incoming, pos: u32, timeout: Duration) -> Reading {
        Reading {
            body,
            pos,
            timeout,
            deadline: tokio::time::Instant::now() + timeout,
        }
    }
}

/// Why a fetch ended when the network went quiet.
fn no_data() -> String {
    format!("no data within {} s", runner::FETCH_TIMEOUT_MS / 1000)
}

/// Ask the server for the latest manifest of the board's device type and channel.
pub(super) fn spawn_poll(
    sh: Arc<Shared>,
    http: BoardHttp,
    tx: mpsc::Sender<Io>,
    device: String,
    channel: String,
) -> JoinHandle<()> {
    tokio::spawn(async move {
        let url = format!(
            "{}/firmware/latest?deviceType={}&channel={}&deviceId={device}",
            sh.server, sh.cfg.device_type, channel
        );
        match http.get(&url, None).await {
            Ok(r) if r.status().is_success() => {
                if let Ok(b) = board_http::read_all(r).await {
                    let _ = tx.send(Io::Manifest(b.to_vec())).await;
                }
            }
            Ok(_) => {}
            Err(e) => {
                if let Some(detail) = board_http::tls_failure(e.as_ref()) {
                    let _ = tx.send(Io::TlsFailed(detail)).await;
                }
            }
        }
    })
}

/// One range of a blob a board asks for, under its fetch number (see [`Io`]).
pub(super) struct RangeRequest {
    pub(super) sha: [u8; 32],
    pub(super) offset: u32,
    pub(super) len: u32,
    pub(super) fetch: u64,
}

/// Ask the server for one range of a blob; the answer's body is read by the board task.
pub(super) fn spawn_fetch(
    sh: Arc<Shared>,
    http: BoardHttp,
    tx: mpsc::Sender<Io>,
    device: String,
    req: RangeRequest,
) -> JoinHandle<()> {
    let RangeRequest {
        sha,
        offset,
        len,
        fetch,
    } = req;
    tokio::spawn(async move {
        let url = format!("{}/blobs/{}?deviceId={device}", sh.server, hex::encode(sha));
        let range = (offset as u64, offset as u64 + len as u64 - 1);
        // Like esp_http_client's `timeout_ms`, the timeout bounds each wait for the network
        // (the answer's head, then every read), not the whole transfer: a slow but moving
        // download is not cut off.
        let timeout = sh.clock.real(runner::FETCH_TIMEOUT_MS);
        let resp = match tokio::time::timeout(timeout, http.get(&url, Some(range))).await {
            Ok(Ok(r)) => r,
            Ok(Err(e)) => {
                if let Some(detail) = board_http::tls_failure(e.as_ref()) {
                    let _ = tx.send(Io::TlsFailed(detail)).await;
                }
                let _ = tx
                    .send(Io::FetchFailed(format!("request failed: {e}"), fetch))
                    .await;
                return;
            }
            Err(_) => {
                let _ = tx.send(Io::FetchFailed(no_data(), fetch)).await;
                return;
            }
        };
        let status = resp.status();
        if status.as_u16() != 206 && status.as_u16() != 200 {
            let _ = tx
                .send(Io::FetchFailed(format!("HTTP {status}"), fetch))
                .await;
            return;
        }
        // A server without Range support answers 200 with the whole blob from byte 0.
        let offset = if status.as_u16() == 200 { 0 } else { offset };
        let _ = tx
            .send(Io::Response {
                offset,
                body: resp.into_body(),
                fetch,
            })
            .await;
    })
}

/// A request of the chunked protocol, under the board's fetch number (see [`Io`]).
pub(super) enum ChunkedRequest {
    /// `POST /ota/check`.
    Open {
        sequence: u64,
        sha: [u8; 32],
        from: u32,
    },
    /// `GET /ota/chunk`.
    Chunk {
        session: [u8; otarig_agent::chunk::SESSION_LEN],
        index: u32,
    },
}

/// Send one chunked-protocol request; its whole answer (bounded by what a board's buffer
/// holds) comes back as [`Io::Session`] or [`Io::Chunk`].
pub(super) fn spawn_chunked(
    sh: Arc<Shared>,
    http: BoardHttp,
    tx: mpsc::Sender<Io>,
    device: String,
    (req, fetch): (ChunkedRequest, u64),
) -> JoinHandle<()> {
    tokio::spawn(async move {
        let timeout = sh.clock.real(runner::FETCH_TIMEOUT_MS);
        let (sent, limit) = match &req {
            ChunkedRequest::Open {
                sequence,
                sha,
                from,
            } => {
                let body = serde_json::json!({"v": 1, "device": device, "sequence": sequence,
                    "sha256": hex::encode(sha), "from": from});
                let url = format!("{}/ota/check", sh.server);
                let sent = tokio::time::timeout(timeout, http.post(&url, body.to_string()));
                (sent.await, otarig_agent::protocol::MAX_PAYLOAD)
            }
            ChunkedRequest::Chunk { session, index } => {
                let url = format!(
                    "{}/ota/chunk?device={device}&session={}&n={index}",
                    sh.server,
                    hex::encode(session)
                );
                let sent = tokio::time::timeout(timeout, http.get(&url, None));
                (sent.await, otarig_agent::chunk::MAX_FRAME)
            }
        };
        let io = match sent {
            Ok(Ok(r)) if r.status().is_success() => {
                match tokio::time::timeout(timeout, board_http::read_limited(r, limit)).await {
                    Ok(Ok(b)) => match req {
                        ChunkedRequest::Open { .. } => Io::Session(b.to_vec(), fetch),
                        ChunkedRequest::Chunk { .. } => Io::Chunk(b.to_vec(), fetch),
                    },
                    Ok(Err(e)) => Io::FetchFailed(e, fetch),
                    Err(_) => Io::FetchFailed(no_data(), fetch),
                }
            }
            Ok(Ok(r)) => Io::FetchFailed(format!("HTTP {}", r.status()), fetch),
            Ok(Err(e)) => {
                if let Some(detail) = board_http::tls_failure(e.as_ref()) {
                    let _ = tx.send(Io::TlsFailed(detail)).await;
                }
                Io::FetchFailed(format!("request failed: {e}"), fetch)
            }
            Err(_) => Io::FetchFailed(no_data(), fetch),
        };
        let _ = tx.send(io).await;
    })
}

/// The next piece of the body being read and the offset it goes to; `Ok(None)` at its end,
/// `Err` with the reason when it broke or its read timed out (the reading is over then).
/// Never ready when nothing is being read. Cancel-safe: nothing changes before the read is.
pub(super) async fn read_next(
    reading: &mut Option<Reading>,
) -> Result<Option<(u32, Bytes)>, String> {
    let Some(r) = reading.as_mut() else {
        return std::future::pending().await;
    };
    let next = match tokio::time::timeout_at(r.deadline, board_http::next_chunk(&mut r.body)).await
    {
        Ok(Ok(Some(data))) => {
            let offset = r.pos;
            r.pos += data.len() as u32;
            r.deadline = tokio::time::Instant::now() + r.timeout;
            return Ok(Some((offset, data)));
        }
        Ok(Ok(None)) => Ok(None),
        Ok(Err(e)) => Err(format!("body ended: {e}")),
        Err(_) => Err(no_data()),
    };
    *reading = None;
    next
}
