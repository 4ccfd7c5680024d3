//! The firmware server: a thin HTTP shell around the [`ReleaseStore`].
//!
//! | request | answer |
//! |---|---|
//! | `GET /firmware/latest?deviceType=T[&channel=C][&deviceId=D]` | the latest release for T/C (channel defaults to `stable`) as a [`ReleasePayload`](otarig_agent::protocol::ReleasePayload): the signed manifest, the store's key set and the device type's revocation list, and a timestamp signed now when the server has a timestamp key; 404 when there is none |
//! | `GET /blobs/<sha256>[?deviceId=D]` | an image or patch, with single `Range` (206; 416 past the end), strong `ETag` (the blob's SHA-256), `If-None-Match` (304), `If-Match` (412) and `If-Range` (a changed blob comes whole): a resume never mixes two blobs |
//! | `GET /ipfs/<cid>[?deviceId=D]` | the same blob by its IPFS CIDv1 (as `ipfs add --cid-version 1` names it), same headers and faults |
//! | `POST /ack` | a board's ack (the MQTT `ack` payload); 204, or 400 saying what is wrong |
//! | `POST /ota/check`, `GET /ota/chunk`, `POST /ota/verify`, `POST /ota/complete`, `GET /ota/status` | the chunked protocol ([`crate::chunked`]), once the server has a fleet key |
//! | `GET /healthz` | 200 `ok` |
//!
//! Errors are JSON `{"error": "…"}` that say what was wrong and what to send instead.
//!
//! Whatever clients do, the server stays up ([`Limits`]): a request head must arrive within
//! the header timeout (which also ends connections idle between requests), open connections
//! are capped below the descriptor limit, acks.jsonl has a quota, and per-device bookkeeping
//! is bounded in entries and key length, and each connection has a request-rate limit (429).
//! There is no global rate limit: it would hand a flooding client the fleet's budget;
//! per-client limits across connections need client identity (TLS).
//!
//! Fault injection ([`ServerFaults`]) lives here, so it works the same for simulated and real
//! boards: per device id, a blob request can fail with an HTTP status, never be answered,
//! ignore `Range`, have its connection dropped at a given point of the blob, or trickle at a
//! given rate.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::{DefaultBodyLimit, Path, Query, Request, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::json;

use crate::chunked::{ChunkFault, ChunkService};
use crate::release_store::{Blob, ReleaseStore};

mod ota;
use crate::statements::TimestampSigner;

/// A fault and how many more requests it applies to (None: all of them).
/// How the firmware server misbehaves on a blob request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ServerFault {
    /// The connection drops once the response reaches this percentage of the blob.
    DropAfterPercent(u32),
    /// Range is ignored: every answer is 200 with the whole blob.
    NoRange,
    /// The request fails with this HTTP status.
    Status(u16),
    /// No answer at all; the board's request times out.
    Stall,
    /// Bodies trickle at this many bytes per second (virtual time). Unlike the others, a
    /// throttle combines with another fault on the same request.
    Throttle(u32),
    /// Endless data: the answer is the blob from the range's start to its end, then junk that
    /// never stops (no Content-Length), as a malicious mirror would send.
    Endless,
    /// A chunk request of the chunked protocol is answered with another chunk
    /// ([`ChunkFault`]): a man in the middle.
    Chunk(ChunkFault),
}

impl ServerFault {
    /// Whether this fault decides the answer to a range request: all but
    /// [`ServerFault::Throttle`], which only paces it, and [`ServerFault::Chunk`], which is
    /// for the chunked protocol.
    pub fn shapes_range(self) -> bool {
        !matches!(self, ServerFault::Throttle(_) | ServerFault::Chunk(_))
    }

    /// Whether this fault decides the answer to a chunk request of the chunked protocol: an
    /// HTTP status, a stall, or a man in the middle's chunk.
    pub fn shapes_chunk(self) -> bool {
        matches!(
            self,
            ServerFault::Chunk(_) | ServerFault::Status(_) | ServerFault::Stall
        )
    }
}

pub type CountedFault = (ServerFault, Option<u32>);

/// Faults the server applies to blob requests, per device id.
#[derive(Default, Debug)]
pub struct ServerFaults {
    by_device: Mutex<HashMap<String, Vec<CountedFault>>>,
    /// Virtual time runs this many times faster than real time for the boards (the wire
    /// fleet's speedup; 0 means 1): a throttle of B/s virtual is B x speedup real.
    speedup: std::sync::atomic::AtomicU32,
    /// Blob bytes answered per device (by Content-Length: a response cut short counts whole),
    /// for at most [`Limits::tracked_devices`] ids of at most [`MAX_DEVICE_ID`] bytes: any
    /// client may name any `deviceId`.
    served: Mutex<HashMap<String, u64>>,
}

/// Longest device id the server keeps anything under.
pub const MAX_DEVICE_ID: usize = 128;

/// What the server allows any client, so none can take it down.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// A request head must arrive whole within this; hyper starts the clock whenever it waits
    /// for a request, so it is also how long a connection may sit idle between two.
    pub header_read: Duration,
    /// Connections open at once; more wait in the listen backlog until one closes.
    pub max_connections: usize,
    /// Size of acks.jsonl past which acks are refused (507).
    pub ack_log_bytes: u64,
    /// Devices whose served bytes are counted.
    pub tracked_devices: usize,
    /// Requests one connection may make per second (bursts of twice that); more are answered
    /// 429 with `Retry-After`. Per connection, not global: a global limit would hand a
    /// flooding client the fleet's budget, and connections are capped already. A real board
    /// makes a few requests a second at most (16 KiB ranges, a poll a minute); the default
    /// leaves room for simulated boards, whose clocks run fast.
    pub requests_per_second: u32,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            header_read: Duration::from_secs(10),
            max_connections: 16_384,
            ack_log_bytes: 64 << 20,
            tracked_devices: 65_536,
            requests_per_second: 1_000,
        }
    }
}

impl ServerFaults {
    /// Blob bytes the server answered to one device so far.
    pub fn served(&self, device: &str) -> u64 {
        let map = self.served.lock().unwrap_or_else(|p| p.into_inner());
        map.get(device).copied().unwrap_or(0)
    }

    /// How many devices' served bytes are being counted.
    pub fn tracked(&self) -> usize {
        self.served.lock().unwrap_or_else(|p| p.into_inner()).len()
    }

    /// Count served bytes for one more device, if it is tracked or there is room for `cap`.
    fn count_served(&self, device: &str, len: u64, cap: usize) {
        let mut served = self.served.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = served.get_mut(device) {
            *n += len;
        } else if device.len() <= MAX_DEVICE_ID && served.len() < cap {
            served.insert(device.to_string(), len);
        }
    }

    /// Pace throttled bodies for boards whose clock runs `speedup` times real time.
    pub fn set_speedup(&self, speedup: f64) {
        self.speedup.store(
            speedup.clamp(1.0, 1e6) as u32,
            std::sync::atomic::Ordering::Relaxed,
        );
    }

    fn real_rate(&self, bytes_per_s: u32) -> f64 {
        let s = self
            .speedup
            .load(std::sync::atomic::Ordering::Relaxed)
            .max(1);
        bytes_per_s as f64 * s as f64
    }

    /// Faults for one device: each applies `times` times (None: always), first match first.
    pub fn set(&self, device: &str, faults: Vec<CountedFault>) {
        self.by_device
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(device.to_string(), faults);
    }

    fn take(&self, device: &str, applies: impl Fn(ServerFault) -> bool) -> Option<ServerFault> {
        let mut map = self.by_device.lock().unwrap_or_else(|p| p.into_inner());
        let list = map.get_mut(device)?;
        let (fault, times) = list
            .iter_mut()
            .find(|(f, t)| t.is_none_or(|n| n > 0) && applies(*f))?;
        if let Some(n) = times {
            *n -= 1;
        }
        Some(*fault)
    }
}

/// A clock in Unix seconds, for servers that run on a scenario's calendar.
pub type UnixClock = Arc<dyn Fn() -> u64 + Send + Sync>;

/// Whether, with which key and on which clock the server signs a timestamp into its answers
/// (set after start, like the faults: a fleet's clock starts after its server).
#[derive(Default)]
pub struct Timestamps {
    signer: Mutex<Option<(Arc<TimestampSigner>, Option<UnixClock>)>>,
}

impl std::fmt::Debug for Timestamps {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Timestamps")
    }
}

impl Timestamps {
    /// Sign with `signer` from now on, at `clock`'s time (None: the system clock).
    pub fn sign_with(&self, signer: TimestampSigner, clock: Option<UnixClock>) {
        *self.signer.lock().unwrap_or_else(|p| p.into_inner()) = Some((Arc::new(signer), clock));
    }

    /// The signer and the time to sign at, if the server signs timestamps.
    pub fn now(&self) -> (Option<Arc<TimestampSigner>>, u64) {
        let guard = self.signer.lock().unwrap_or_else(|p| p.into_inner());
        let now = match guard.as_ref().and_then(|(_, c)| c.as_ref()) {
            Some(clock) => clock(),
            None => std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
        };
        (guard.as_ref().map(|(s, _)| s.clone()), now)
    }
}

/// TLS handshakes the server completed, and when the first and the last did: the scale
/// benchmark's handshakes per second.
#[derive(Debug, Default)]
pub struct Handshakes {
    inner: Mutex<HandshakeSummary>,
}

/// What [`Handshakes`] counted.
#[derive(Clone, Copy, Debug, Default)]
pub struct HandshakeSummary {
    /// Full handshakes: certificates checked both ways, a key exchange and a signature each.
    pub full: u64,
    /// Resumed sessions (a ticket instead of certificates); a stock board never resumes.
    pub resumed: u64,
    /// Handshakes, full or resumed, that settled on TLS 1.2 (a stock board's only version).
    pub tls12: u64,
    first: Option<std::time::Instant>,
    last: Option<std::time::Instant>,
}

impl HandshakeSummary {
    /// From the first handshake to the last.
    pub fn span(&self) -> Duration {
        match (self.first, self.last) {
            (Some(a), Some(b)) => b.duration_since(a),
            _ => Duration::ZERO,
        }
    }
}

impl Handshakes {
    fn record(&self, conn: &rustls::ServerConnection) {
        let now = std::time::Instant::now();
        let mut g = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        match conn.handshake_kind() {
            Some(rustls::HandshakeKind::Resumed) => g.resumed += 1,
            _ => g.full += 1,
        }
        if conn.protocol_version() == Some(rustls::ProtocolVersion::TLSv1_2) {
            g.tls12 += 1;
        }
        g.first.get_or_insert(now);
        g.last = Some(now);
    }

    /// What was counted so far.
    pub fn summary(&self) -> HandshakeSummary {
        *self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// What one device is answered instead of its channel's latest release.
#[derive(Clone, Debug)]
enum Offer {
    /// A signed manifest ahead of everyone else (a wave of a staged rollout), served with the
    /// statements and a fresh timestamp like any release.
    Manifest(Vec<u8>),
    /// A whole answer served as it is, however stale (None: 404): a frozen mirror (fault
    /// injection).
    Frozen(Option<Vec<u8>>),
}

/// Answers offered to single devices: the waves of a staged rollout, and frozen answers.
#[derive(Default, Debug)]
pub struct Offers {
    by_device: Mutex<HashMap<String, Offer>>,
}

impl Offers {
    pub fn offer(&self, device: &str, signed_manifest: Vec<u8>) {
        self.put(device, Offer::Manifest(signed_manifest));
    }

    /// Answer `device` with `answer` from now on, word for word (a mirror frozen in time).
    pub fn freeze(&self, device: &str, answer: Option<Vec<u8>>) {
        self.put(device, Offer::Frozen(answer));
    }

    fn put(&self, device: &str, offer: Offer) {
        self.by_device
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(device.to_string(), offer);
    }

    fn get(&self, device: &str) -> Option<Offer> {
        self.by_device
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(device)
            .cloned()
    }
}

#[derive(Clone)]
struct App {
    store: Arc<ReleaseStore>,
    faults: Arc<ServerFaults>,
    offers: Arc<Offers>,
    timestamps: Arc<Timestamps>,
    chunks: Arc<ChunkService>,
    ack_log_bytes: u64,
    tracked_devices: usize,
}

/// A refused request: its status and what to tell the client (an [`error`] answer).
struct Refusal(StatusCode, String);

impl Refusal {
    fn new(status: StatusCode, message: impl Into<String>) -> Refusal {
        Refusal(status, message.into())
    }
}

impl IntoResponse for Refusal {
    fn into_response(self) -> Response {
        error(self.0, self.1)
    }
}

fn error(status: StatusCode, message: impl Into<String>) -> Response {
    (status, Json(json!({ "error": message.into() }))).into_response()
}

#[derive(Deserialize)]
struct LatestQuery {
    #[serde(rename = "deviceType")]
    device_type: Option<String>,
    channel: Option<String>,
    #[serde(rename = "deviceId")]
    device_id: Option<String>,
}

async fn latest(
    State(App {
        store,
        offers,
        timestamps,
        ..
    }): State<App>,
    Query(q): Query<LatestQuery>,
) -> Response {
    let offer = q.device_id.as_deref().and_then(|d| offers.get(d));
    match offer {
        Some(Offer::Frozen(Some(answer))) => {
            return ([(header::CONTENT_TYPE, "application/json")], answer).into_response()
        }
        Some(Offer::Frozen(None)) => {
            return error(StatusCode::NOT_FOUND, "no release (a frozen mirror)")
        }
        _ => {}
    }
    let Some(device_type) = q.device_type else {
        return error(StatusCode::BAD_REQUEST, "missing query parameter deviceType (e.g. /firmware/latest?deviceType=otarig-devkit-s3)");
    };
    let channel = q.channel.unwrap_or_else(|| "stable".into());
    tracing::debug!(%device_type, %channel, device = q.device_id.as_deref().unwrap_or("-"), "latest manifest");
    let (dt, ch) = (device_type.clone(), channel.clone());
    let (signer, now_s) = timestamps.now();
    let answer = move || -> anyhow::Result<Option<Vec<u8>>> {
        let manifest = match offer {
            Some(Offer::Manifest(m)) => m,
            _ => match store.latest(&dt, &ch)? {
                Some(m) => m,
                None => return Ok(None),
            },
        };
        let statements = store.statements(&dt)?;
        let answer = statements
            .borrow()
            .answer(&manifest, signer.as_deref(), now_s)?;
        Ok(Some(answer))
    };
    match tokio::task::spawn_blocking(answer).await {
        Ok(Ok(Some(bytes))) => {
            ([(header::CONTENT_TYPE, "application/json")], bytes).into_response()
        }
        Ok(Ok(None)) => error(
            StatusCode::NOT_FOUND,
            format!("no release for device type '{device_type}' on channel '{channel}'"),
        ),
        Ok(Err(e)) => error(StatusCode::BAD_REQUEST, format!("{e:#}")),
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AckWire {
    v: u32,
    device: String,
    sequence: u64,
    version: String,
    outcome: String,
    #[serde(default)]
    detail: String,
}

async fn ack(
    State(app): State<App>,
    peer: Option<axum::Extension<Peer>>,
    body: axum::body::Bytes,
) -> Response {
    match read_ack(&body, peer.map(|p| p.0)) {
        Ok(wire) => store_ack(&app, &wire)
            .await
            .unwrap_or_else(IntoResponse::into_response),
        Err(e) => e.into_response(),
    }
}

/// An ack's body, checked: format, outcome, device id, and (over mutual TLS) that the
/// client certificate names the device it acks for.
fn read_ack(body: &[u8], peer: Option<Peer>) -> Result<AckWire, Refusal> {
    let wire: AckWire = serde_json::from_slice(body).map_err(|e| {
        Refusal::new(StatusCode::BAD_REQUEST, format!(
            "ack is not {{\"v\":1,\"device\":…,\"sequence\":…,\"version\":…,\"outcome\":…,\"detail\":…}}: {e}"
        ))
    })?;
    if wire.v != otarig_agent::protocol::VERSION {
        return Err(Refusal::new(
            StatusCode::BAD_REQUEST,
            format!("ack format v{}; this server reads v1", wire.v),
        ));
    }
    if !["installed", "refused", "rolled-back"].contains(&wire.outcome.as_str()) {
        return Err(Refusal::new(
            StatusCode::BAD_REQUEST,
            format!(
                "outcome '{}' is not installed, refused or rolled-back",
                wire.outcome
            ),
        ));
    }
    check_device_id(&wire.device)?;
    speaks_for(peer, &wire.device, "ack")?;
    Ok(wire)
}

/// A device id the server keeps things under: 1 to [`MAX_DEVICE_ID`] bytes.
fn check_device_id(device: &str) -> Result<(), Refusal> {
    if device.is_empty() || device.len() > MAX_DEVICE_ID {
        return Err(Refusal::new(
            StatusCode::BAD_REQUEST,
            format!("device must be 1 to {MAX_DEVICE_ID} characters"),
        ));
    }
    Ok(())
}

/// Over mutual TLS, a board speaks for itself only: `device` must be the one the client
/// certificate names.
fn speaks_for(peer: Option<Peer>, device: &str, what: &str) -> Result<(), Refusal> {
    match peer.and_then(|p| p.identity) {
        Some(id) if id != device => Err(Refusal::new(
            StatusCode::FORBIDDEN,
            format!("the client certificate names device '{id}'; it may not {what} for '{device}'"),
        )),
        _ => Ok(()),
    }
}

/// Append a checked ack to acks.jsonl (within its quota).
async fn store_ack(app: &App, wire: &AckWire) -> Result<Response, Refusal> {
    let record = json!({"v": wire.v, "device": wire.device, "sequence": wire.sequence,
        "version": wire.version, "outcome": wire.outcome, "detail": wire.detail});
    let (store, quota) = (app.store.clone(), app.ack_log_bytes);
    match tokio::task::spawn_blocking(move || store.record_ack(&record, quota)).await {
        Ok(Ok(true)) => Ok(StatusCode::NO_CONTENT.into_response()),
        Ok(Ok(false)) => Err(Refusal::new(
            StatusCode::INSUFFICIENT_STORAGE,
            format!("acks.jsonl reached its quota of {quota} bytes: the operator must rotate it; the ack was not stored"),
        )),
        Ok(Err(e)) => Err(Refusal::new(StatusCode::INTERNAL_SERVER_ERROR, format!("{e:#}"))),
        Err(e) => Err(Refusal::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string())),
    }
}

#[derive(Deserialize)]
struct BlobQuery {
    #[serde(rename = "deviceId")]
    device_id: Option<String>,
}

/// The byte range `[A, B+1)` of a single `Range: bytes=A-[B]` request (open end: `u64::MAX`).
fn range_of(req: &Request) -> Option<(u64, u64)> {
    let v = req.headers().get(header::RANGE)?.to_str().ok()?;
    let (a, b) = v.strip_prefix("bytes=")?.split_once('-')?;
    let start = a.trim().parse().ok()?;
    let end = match b.trim() {
        "" => u64::MAX,
        b => b.parse::<u64>().ok()?.saturating_add(1),
    };
    Some((start, end))
}

async fn blob(
    State(app): State<App>,
    Path(name): Path<String>,
    Query(q): Query<BlobQuery>,
    req: Request,
) -> Response {
    let mut key = [0u8; 32];
    if hex::decode_to_slice(&name, &mut key).is_err() {
        return error(
            StatusCode::NOT_FOUND,
            format!("'{name}' is not a SHA-256 (64 hex digits)"),
        );
    }
    serve_blob(app, key, q, req).await
}

async fn ipfs(
    State(app): State<App>,
    Path(cid): Path<String>,
    Query(q): Query<BlobQuery>,
    req: Request,
) -> Response {
    let cid = match crate::cid::canonical(&cid) {
        Ok(c) => c,
        Err(e) => return error(StatusCode::BAD_REQUEST, e),
    };
    let store = app.store.clone();
    let key = cid.clone();
    match tokio::task::spawn_blocking(move || store.sha_of_cid(&key)).await {
        Ok(Some(sha)) => serve_blob(app, sha, q, req).await,
        Ok(None) => error(
            StatusCode::NOT_FOUND,
            format!("no blob with CID {cid} in this store (publish it with `otarig release add`)"),
        ),
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    }
}

/// Serve the blob stored under `key` (a SHA-256), applying the device's faults.
async fn serve_blob(app: App, key: [u8; 32], q: BlobQuery, req: Request) -> Response {
    let blob = match load_blob(&app, key).await {
        Ok(b) => b,
        Err(e) => return e.into_response(),
    };
    let total = blob.bytes.len() as u64;
    let (start, end) = range_of(&req).unwrap_or((0, u64::MAX));
    let cut_of = |p: u32| total * p as u64 / 100;
    let fault = q.device_id.as_deref().and_then(|d| {
        app.faults.take(d, |f| match f {
            // A drop bites the response that would carry the byte where it happens.
            ServerFault::DropAfterPercent(p) => start < cut_of(p) && cut_of(p) < end.min(total),
            f => f.shapes_range(),
        })
    });
    let throttle = q.device_id.as_deref().and_then(|d| {
        match app
            .faults
            .take(d, |f| matches!(f, ServerFault::Throttle(_)))
        {
            Some(ServerFault::Throttle(bps)) => Some(app.faults.real_rate(bps)),
            _ => None,
        }
    });
    match fault {
        Some(ServerFault::Status(st)) => {
            let status = StatusCode::from_u16(st).unwrap_or(StatusCode::SERVICE_UNAVAILABLE);
            return error(status, "injected server fault");
        }
        Some(ServerFault::Stall) => {
            // Never answer; the board's own timeout ends the request.
            std::future::pending::<()>().await;
        }
        Some(ServerFault::Endless) => return endless(&blob, start),
        _ => {}
    }
    let honour_range = !matches!(fault, Some(ServerFault::NoRange));
    let resp = ranged(&blob, req.headers(), honour_range);
    // With `drop-after`: how much of this answer's body goes out before the connection drops.
    let cut = match fault {
        Some(ServerFault::DropAfterPercent(p)) => Some(cut_of(p).saturating_sub(start)),
        _ => None,
    };
    // The answer's head and the body up to the cut reach the board.
    let sent = resp
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok()?.parse::<u64>().ok())
        .map(|len| cut.map_or(len, |c| len.min(c)));
    if let (Some(d), Some(len)) = (q.device_id.as_deref(), sent) {
        app.faults.count_served(d, len, app.tracked_devices);
    }
    let resp = match throttle {
        Some(rate) => resp.map(|body| paced(body, rate)),
        None => resp,
    };
    let Some(keep) = cut else {
        return resp;
    };
    // Send the response only up to the cut, then fail the body: the connection drops in the
    // middle of the answer, as a network that fails mid-transfer drops it.
    let keep = usize::try_from(keep).unwrap_or(usize::MAX);
    let (parts, body) = resp.into_parts();
    let bytes = match axum::body::to_bytes(body, usize::MAX).await {
        Ok(b) => b,
        Err(e) => return error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    };
    Response::from_parts(
        parts,
        axum::body::Body::from_stream(cut_short(bytes.slice(..keep.min(bytes.len())))),
    )
}

/// A body of `sent`, then an error that drops the connection. Between the two the stream
/// waits once, which makes hyper flush what it holds: without it the error came while the
/// answer's head was still queued, and the board saw the connection fail before any answer.
fn cut_short(
    sent: axum::body::Bytes,
) -> impl futures_util::Stream<Item = Result<axum::body::Bytes, std::io::Error>> {
    use futures_util::StreamExt;
    let dropped = async {
        tokio::task::yield_now().await;
        Err(std::io::Error::new(
            std::io::ErrorKind::ConnectionReset,
            "injected: connection dropped",
        ))
    };
    futures_util::stream::once(std::future::ready(Ok(sent)))
        .chain(futures_util::stream::once(dropped))
}

/// The blob named `sha`, from the cache or the store; 404 when the store has none. Kept in
/// memory after the first read: a fleet asks for the same few blobs thousands of times, and
/// each answer is then a slice of one shared buffer.
async fn load_blob(app: &App, sha: [u8; 32]) -> Result<Blob, Refusal> {
    if let Some(b) = app.store.cached_blob(&sha) {
        return Ok(b);
    }
    let store = app.store.clone();
    match tokio::task::spawn_blocking(move || store.blob(&sha)).await {
        Ok(Ok(Some(b))) => Ok(b),
        Ok(Ok(None)) => Err(Refusal::new(
            StatusCode::NOT_FOUND,
            format!(
                "no blob {} in this store (publish it with `otarig release add`)",
                hex::encode(sha)
            ),
        )),
        Ok(Err(e)) => Err(Refusal::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("{e:#}"),
        )),
        Err(e) => Err(Refusal::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            e.to_string(),
        )),
    }
}

/// The answer to a GET of `blob` under conditional and range headers (RFC 9110): `If-Match`
/// that fails → 412; `If-None-Match` that matches → 304; one satisfiable `Range` (honoured
/// only while `If-Range` names this blob) → 206 with that slice; a range past the end → 416;
/// otherwise (no range, several ranges, or a server told to ignore them) → 200 with it all.
/// The ETag is the blob's SHA-256, strong: the same bytes always carry it, under any URL.
fn ranged(blob: &Blob, headers: &axum::http::HeaderMap, honour_range: bool) -> Response {
    use headers::{
        AcceptRanges, ContentLength, ContentRange, ContentType, ETag, HeaderMapExt, IfMatch,
        IfNoneMatch, IfRange, Range,
    };
    use std::ops::Bound;
    let len = blob.bytes.len() as u64;
    let Ok(etag) = format!("\"{}\"", hex::encode(blob.sha256)).parse::<ETag>() else {
        return error(StatusCode::INTERNAL_SERVER_ERROR, "cannot form the ETag");
    };
    let mut head = axum::http::HeaderMap::new();
    head.typed_insert(etag.clone());
    head.typed_insert(AcceptRanges::bytes());
    head.typed_insert(ContentType::octet_stream());
    if headers
        .typed_get::<IfMatch>()
        .is_some_and(|m| !m.precondition_passes(&etag))
    {
        let msg = format!(
            "If-Match names another blob; this one's ETag is {}: start the download again from byte 0",
            hex::encode(blob.sha256)
        );
        let mut resp = error(StatusCode::PRECONDITION_FAILED, msg);
        resp.headers_mut().typed_insert(etag);
        return resp;
    }
    if headers
        .typed_get::<IfNoneMatch>()
        .is_some_and(|m| !m.precondition_passes(&etag))
    {
        return (StatusCode::NOT_MODIFIED, head).into_response();
    }
    let range = headers.typed_get::<Range>().filter(|_| {
        honour_range
            && headers
                .typed_get::<IfRange>()
                .is_none_or(|r| !r.is_modified(Some(&etag), None))
    });
    // A spec whose last byte comes before its first is invalid, and RFC 9110 says to ignore
    // the whole header then.
    let one = range
        .map(|r| r.satisfiable_ranges(len).collect::<Vec<_>>())
        .filter(|specs| {
            !specs.iter().any(|spec| {
                matches!(spec, (Bound::Included(first), Bound::Included(last)) if last < first)
            })
        });
    let (start, end) = match one.as_deref() {
        Some([(first, last)]) => {
            let start = match *first {
                Bound::Included(s) => s,
                Bound::Excluded(s) => s.saturating_add(1),
                Bound::Unbounded => 0,
            };
            let end = match *last {
                Bound::Included(e) => e.saturating_add(1).min(len),
                Bound::Excluded(e) => e.min(len),
                Bound::Unbounded => len,
            };
            if start >= end {
                head.typed_insert(ContentRange::unsatisfied_bytes(len));
                return (StatusCode::RANGE_NOT_SATISFIABLE, head).into_response();
            }
            (start, end)
        }
        _ => (0, len),
    };
    let body = blob.bytes.slice(start as usize..end as usize);
    head.typed_insert(ContentLength(end - start));
    if (start, end) == (0, len) && one.as_ref().is_none_or(|r| r.len() != 1) {
        return (StatusCode::OK, head, body).into_response();
    }
    match ContentRange::bytes(start..end, len) {
        Ok(cr) => head.typed_insert(cr),
        Err(_) => {
            return error(
                StatusCode::INTERNAL_SERVER_ERROR,
                "cannot form Content-Range",
            )
        }
    }
    (StatusCode::PARTIAL_CONTENT, head, body).into_response()
}

/// `blob` from `start` to its end, then 4 KiB pieces of junk for ever, without a
/// Content-Length (HTTP/1.1 sends it chunked), under a 206 whose Content-Range claims the
/// rest of the blob: what a board must stop reading by itself.
fn endless(blob: &Blob, start: u64) -> Response {
    use futures_util::StreamExt;
    let len = blob.bytes.len() as u64;
    let from = start.min(len.saturating_sub(1)) as usize;
    let head = futures_util::stream::once(std::future::ready(Ok::<_, std::io::Error>(
        blob.bytes.slice(from..),
    )));
    let junk = axum::body::Bytes::from(vec![0xA5u8; 4096]);
    let tail = futures_util::stream::repeat_with(move || Ok(junk.clone()));
    let body = axum::body::Body::from_stream(head.chain(tail));
    let range = format!("bytes {from}-{}/{len}", len.saturating_sub(1));
    (
        StatusCode::PARTIAL_CONTENT,
        [
            (header::CONTENT_TYPE, "application/octet-stream".to_string()),
            (header::CONTENT_RANGE, range),
        ],
        body,
    )
        .into_response()
}

/// A body that yields its bytes no faster than `bytes_per_s`, in slices of about 50 ms.
fn paced(body: axum::body::Body, bytes_per_s: f64) -> axum::body::Body {
    use futures_util::StreamExt;
    let slice = ((bytes_per_s / 20.0) as usize).clamp(1, 64 * 1024);
    let start = tokio::time::Instant::now();
    let state = (body.into_data_stream(), 0u64, axum::body::Bytes::new());
    let stream =
        futures_util::stream::unfold(state, move |(mut inner, sent, mut pending)| async move {
            if pending.is_empty() {
                match inner.next().await? {
                    Ok(b) => pending = b,
                    Err(e) => return Some((Err(std::io::Error::other(e)), (inner, sent, pending))),
                }
            }
            let piece = pending.split_to(slice.min(pending.len()));
            let sent = sent + piece.len() as u64;
            tokio::time::sleep_until(
                start + std::time::Duration::from_secs_f64(sent as f64 / bytes_per_s),
            )
            .await;
            Some((Ok(piece), (inner, sent, pending)))
        });
    axum::body::Body::from_stream(stream)
}

/// The server's routes over a store.
pub fn router(
    store: Arc<ReleaseStore>,
    faults: Arc<ServerFaults>,
    offers: Arc<Offers>,
    limits: Limits,
    timestamps: Arc<Timestamps>,
    chunks: Arc<ChunkService>,
) -> Router {
    let small = || DefaultBodyLimit::max(otarig_agent::protocol::MAX_PAYLOAD);
    Router::new()
        .route("/firmware/latest", get(latest))
        .route(
            "/ack",
            post(ack).layer(DefaultBodyLimit::max(otarig_agent::protocol::MAX_PAYLOAD)),
        )
        .route("/healthz", get(|| async { "ok" }))
        .route("/blobs/{name}", get(blob))
        .route("/ipfs/{cid}", get(ipfs))
        .route("/ota/check", post(ota::check).layer(small()))
        .route("/ota/chunk", get(ota::chunk))
        .route("/ota/verify", post(ota::verify).layer(small()))
        .route("/ota/complete", post(ota::complete).layer(small()))
        .route("/ota/status", get(ota::status))
        .with_state(App {
            store,
            faults,
            offers,
            timestamps,
            chunks,
            ack_log_bytes: limits.ack_log_bytes,
            tracked_devices: limits.tracked_devices,
        })
}

/// A running server; dropping it does not stop it, [`Server::shutdown`] does.
pub struct Server {
    pub addr: SocketAddr,
    pub faults: Arc<ServerFaults>,
    pub offers: Arc<Offers>,
    pub timestamps: Arc<Timestamps>,
    /// The chunked protocol's sessions; off until given the fleet key.
    pub chunks: Arc<ChunkService>,
    /// TLS handshakes completed (HTTPS only).
    pub handshakes: Arc<Handshakes>,
    /// Serving HTTPS.
    tls: bool,
    stop: Option<tokio::sync::watch::Sender<bool>>,
    task: tokio::task::JoinHandle<()>,
}

impl Server {
    /// Bind `addr` (port 0: a free port, reported in `addr`) and serve in the background,
    /// with the default [`Limits`].
    pub async fn start(store: Arc<ReleaseStore>, addr: SocketAddr) -> anyhow::Result<Server> {
        Self::start_with(store, addr, Limits::default()).await
    }

    /// [`Server::start`] with other limits.
    pub async fn start_with(
        store: Arc<ReleaseStore>,
        addr: SocketAddr,
        limits: Limits,
    ) -> anyhow::Result<Server> {
        Self::start_on(store, addr, limits, None).await
    }

    /// HTTPS with `tls` ([`crate::tls::server_config`]). When it requires client
    /// certificates, an ack is accepted only for the device its certificate names.
    pub async fn start_tls(
        store: Arc<ReleaseStore>,
        addr: SocketAddr,
        limits: Limits,
        tls: Arc<rustls::ServerConfig>,
    ) -> anyhow::Result<Server> {
        Self::start_on(store, addr, limits, Some(tls)).await
    }

    async fn start_on(
        store: Arc<ReleaseStore>,
        addr: SocketAddr,
        limits: Limits,
        tls: Option<Arc<rustls::ServerConfig>>,
    ) -> anyhow::Result<Server> {
        let listener = tokio::net::TcpListener::bind(addr).await.map_err(|e| {
            anyhow::anyhow!("cannot listen on {addr}: {e} (is another server using the port?)")
        })?;
        let addr = listener.local_addr()?;
        let (stop, stopped) = tokio::sync::watch::channel(false);
        let faults = Arc::new(ServerFaults::default());
        let offers = Arc::new(Offers::default());
        let timestamps = Arc::new(Timestamps::default());
        let chunks = Arc::new(ChunkService::default());
        let app = router(
            store,
            faults.clone(),
            offers.clone(),
            limits,
            timestamps.clone(),
            chunks.clone(),
        );
        let secure = tls.is_some();
        let tls = tls.map(tokio_rustls::TlsAcceptor::from);
        let handshakes = Arc::new(Handshakes::default());
        let task = tokio::spawn(accept_loop(
            listener,
            app,
            limits,
            tls.map(|t| (t, handshakes.clone())),
            stopped,
        ));
        Ok(Server {
            addr,
            faults,
            offers,
            timestamps,
            chunks,
            handshakes,
            tls: secure,
            stop: Some(stop),
            task,
        })
    }

    pub fn url(&self) -> String {
        let scheme = if self.tls { "https" } else { "http" };
        format!("{scheme}://{}", self.addr)
    }

    /// Stop accepting, let open connections finish their request in flight, and return.
    pub async fn shutdown(mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(true);
        }
        let _ = (&mut self.task).await;
    }
}

/// Who is at the other end of a connection, as its requests see it (an extension).
#[derive(Clone, Debug, Default)]
pub struct Peer {
    /// The CN of the client certificate the TLS handshake verified (a device id).
    pub identity: Option<String>,
}

/// `app` behind a request-rate limit of its own (one per connection), with `peer` in every
/// request's extensions.
fn rate_limited(
    app: Router,
    per_second: u32,
    peer: Peer,
) -> impl tower::Service<
    Request<hyper::body::Incoming>,
    Response = Response,
    Error = std::convert::Infallible,
    Future = impl Send,
> + Clone {
    use governor::{Quota, RateLimiter};
    use tower::ServiceExt;
    let rate = std::num::NonZeroU32::new(per_second.max(1)).unwrap_or(std::num::NonZeroU32::MIN);
    let burst = rate.saturating_mul(std::num::NonZeroU32::new(2).unwrap_or(rate));
    let limiter = Arc::new(RateLimiter::direct(
        Quota::per_second(rate).allow_burst(burst),
    ));
    tower::service_fn(move |mut req: Request<hyper::body::Incoming>| {
        let (app, limiter) = (app.clone(), limiter.clone());
        req.extensions_mut().insert(peer.clone());
        async move {
            if limiter.check().is_err() {
                let mut r = error(
                    StatusCode::TOO_MANY_REQUESTS,
                    format!("more than {per_second} requests a second on this connection; retry after a second"),
                );
                r.headers_mut()
                    .insert(header::RETRY_AFTER, header::HeaderValue::from_static("1"));
                return Ok(r);
            }
            app.oneshot(req.map(axum::body::Body::new)).await
        }
    })
}

/// One connection served by hyper with the header timeout, until it ends or `stop`.
async fn serve_connection<S, T>(
    stream: S,
    service: T,
    limits: Limits,
    mut stop: tokio::sync::watch::Receiver<bool>,
    peer: SocketAddr,
) where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    T: tower::Service<
            Request<hyper::body::Incoming>,
            Response = Response,
            Error = std::convert::Infallible,
        > + Clone
        + Send
        + 'static,
    T::Future: Send + 'static,
{
    let service = hyper_util::service::TowerToHyperService::new(service);
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(limits.header_read);
    let conn = builder.serve_connection(hyper_util::rt::TokioIo::new(stream), service);
    tokio::pin!(conn);
    let ended = tokio::select! {
        r = conn.as_mut() => r,
        Ok(()) = stop.changed() => {
            conn.as_mut().graceful_shutdown();
            conn.await
        }
    };
    if let Err(e) = ended {
        tracing::debug!(%peer, "firmware server connection ended: {e}");
    }
}

/// Accept connections while fewer than `limits.max_connections` are open, each served by hyper
/// with the header timeout, until `stop`; then wait for the open ones to end gracefully.
/// axum's own `serve` cannot set hyper's header timeout, hence this loop.
async fn accept_loop(
    listener: tokio::net::TcpListener,
    app: Router,
    limits: Limits,
    tls: Option<(tokio_rustls::TlsAcceptor, Arc<Handshakes>)>,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    let slots = Arc::new(tokio::sync::Semaphore::new(limits.max_connections));
    let mut open = tokio::task::JoinSet::new();
    loop {
        let permit = tokio::select! {
            Ok(()) = stop.changed() => break,
            p = slots.clone().acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => break,
            },
        };
        let (stream, peer) = tokio::select! {
            Ok(()) = stop.changed() => break,
            a = listener.accept() => match a {
                Ok(a) => a,
                Err(e) => {
                    // Out of descriptors or a connection reset before accept: back off a
                    // little rather than spin.
                    tracing::warn!("firmware server: accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let (app, stop, tls) = (app.clone(), stop.clone(), tls.clone());
        open.spawn(async move {
            let _permit = permit;
            let Some((tls, handshakes)) = tls else {
                let service = rate_limited(app, limits.requests_per_second, Peer::default());
                return serve_connection(stream, service, limits, stop, peer).await;
            };
            // The handshake gets the same time as a request head.
            let stream = match tokio::time::timeout(limits.header_read, tls.accept(stream)).await {
                Ok(Ok(s)) => {
                    handshakes.record(s.get_ref().1);
                    s
                }
                Ok(Err(e)) => return tracing::debug!(%peer, "TLS handshake refused: {e}"),
                Err(_) => return tracing::debug!(%peer, "TLS handshake timed out"),
            };
            let identity = stream
                .get_ref()
                .1
                .peer_certificates()
                .and_then(|c| c.first())
                .and_then(|c| crate::pki::common_name(c));
            let service = rate_limited(app, limits.requests_per_second, Peer { identity });
            serve_connection(stream, service, limits, stop, peer).await
        });
        while open.try_join_next().is_some() {}
    }
    while open.join_next().await.is_some() {}
}
