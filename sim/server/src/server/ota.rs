//! The chunked protocol's endpoints (`/ota/*`) over the server's [`ChunkService`]; the
//! protocol itself is [`crate::chunked`].

use super::*;
use crate::chunked::ChunkServiceError;

/// A refusal of the chunked protocol as an HTTP answer.
fn refused(e: ChunkServiceError) -> Refusal {
    let status = match &e {
        ChunkServiceError::Disabled | ChunkServiceError::NoSession { .. } => StatusCode::NOT_FOUND,
        ChunkServiceError::BadRequest(_) => StatusCode::BAD_REQUEST,
        ChunkServiceError::PastEnd { .. } => StatusCode::RANGE_NOT_SATISFIABLE,
        ChunkServiceError::Full(_) => StatusCode::SERVICE_UNAVAILABLE,
    };
    Refusal::new(status, e.to_string())
}

/// A JSON body, or 400 saying what it should have been.
fn body<T: serde::de::DeserializeOwned>(bytes: &[u8], shape: &str) -> Result<T, Refusal> {
    serde_json::from_slice(bytes)
        .map_err(|e| Refusal::new(StatusCode::BAD_REQUEST, format!("body is not {shape}: {e}")))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CheckWire {
    v: u32,
    device: String,
    sequence: u64,
    sha256: String,
    #[serde(default)]
    from: u32,
}

const CHECK_SHAPE: &str =
    r#"{"v":1,"device":…,"sequence":…,"sha256":"<64 hex digits of the blob>","from":<chunk>}"#;

/// `POST /ota/check`: open the device's session for a release's blob.
pub(super) async fn check(
    State(app): State<App>,
    peer: Option<axum::Extension<Peer>>,
    bytes: axum::body::Bytes,
) -> Response {
    let answer = async {
        let wire: CheckWire = body(&bytes, CHECK_SHAPE)?;
        check_device_id(&wire.device)?;
        speaks_for(peer.map(|p| p.0), &wire.device, "open a session")?;
        let mut sha = [0u8; 32];
        if wire.v != otarig_agent::protocol::VERSION
            || hex::decode_to_slice(&wire.sha256, &mut sha).is_err()
        {
            return Err(Refusal::new(
                StatusCode::BAD_REQUEST,
                format!("body is not {CHECK_SHAPE}"),
            ));
        }
        let blob = load_blob(&app, sha).await?;
        let answer = app
            .chunks
            .open(
                &wire.device,
                wire.sequence,
                sha,
                blob.bytes.len() as u64,
                wire.from,
            )
            .map_err(refused)?;
        Ok(([(header::CONTENT_TYPE, "application/json")], answer).into_response())
    };
    answer.await.unwrap_or_else(IntoResponse::into_response)
}

#[derive(Deserialize)]
pub(super) struct ChunkQuery {
    device: String,
    session: String,
    n: u32,
}

/// `GET /ota/chunk?device=…&session=…&n=…`: one frame, or the device's injected fault.
pub(super) async fn chunk(
    State(app): State<App>,
    peer: Option<axum::Extension<Peer>>,
    Query(q): Query<ChunkQuery>,
) -> Response {
    let answer = async {
        speaks_for(peer.map(|p| p.0), &q.device, "fetch chunks")?;
        let found = app.chunks.lookup(&q.device, &q.session).map_err(refused)?;
        let fault = app.faults.take(&q.device, ServerFault::shapes_chunk);
        let chunk_fault = match fault {
            Some(ServerFault::Status(st)) => {
                let status = StatusCode::from_u16(st).unwrap_or(StatusCode::SERVICE_UNAVAILABLE);
                return Err(Refusal::new(status, "injected server fault"));
            }
            Some(ServerFault::Stall) => std::future::pending().await,
            Some(ServerFault::Chunk(f)) => Some(f),
            _ => None,
        };
        let blob = load_blob(&app, found.sha256).await?;
        let frame = app
            .chunks
            .frame(&q.device, q.n, &blob.bytes, chunk_fault)
            .map_err(refused)?;
        app.faults
            .count_served(&q.device, frame.len() as u64, app.tracked_devices);
        Ok(([(header::CONTENT_TYPE, "application/octet-stream")], frame).into_response())
    };
    answer.await.unwrap_or_else(|e: Refusal| e.into_response())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct VerifyWire {
    v: u32,
    device: String,
    sequence: u64,
}

/// `POST /ota/verify`: the board verified the release in its slot.
pub(super) async fn verify(
    State(app): State<App>,
    peer: Option<axum::Extension<Peer>>,
    bytes: axum::body::Bytes,
) -> Response {
    let answer = || -> Result<Response, Refusal> {
        let shape = r#"{"v":1,"device":…,"sequence":…}"#;
        let wire: VerifyWire = body(&bytes, shape)?;
        if wire.v != otarig_agent::protocol::VERSION {
            return Err(Refusal::new(
                StatusCode::BAD_REQUEST,
                format!("body is not {shape}"),
            ));
        }
        check_device_id(&wire.device)?;
        speaks_for(peer.map(|p| p.0), &wire.device, "verify")?;
        app.chunks
            .verified(&wire.device, wire.sequence)
            .map_err(refused)?;
        Ok(StatusCode::NO_CONTENT.into_response())
    };
    answer().unwrap_or_else(IntoResponse::into_response)
}

/// `POST /ota/complete`: the board's ack, recorded as `POST /ack` records it; the session
/// ends with its outcome (a board whose session was replaced still has its ack kept).
pub(super) async fn complete(
    State(app): State<App>,
    peer: Option<axum::Extension<Peer>>,
    bytes: axum::body::Bytes,
) -> Response {
    let wire = match read_ack(&bytes, peer.map(|p| p.0)) {
        Ok(w) => w,
        Err(e) => return e.into_response(),
    };
    let stored = store_ack(&app, &wire).await;
    if let Err(e) = app
        .chunks
        .completed(&wire.device, wire.sequence, &wire.outcome)
    {
        tracing::debug!(device = %wire.device, "complete without a session: {e}");
    }
    stored.unwrap_or_else(IntoResponse::into_response)
}

#[derive(Deserialize)]
pub(super) struct StatusQuery {
    device: Option<String>,
}

/// `GET /ota/status[?device=…]`. Over mutual TLS a board reads its own session only.
pub(super) async fn status(
    State(app): State<App>,
    peer: Option<axum::Extension<Peer>>,
    Query(q): Query<StatusQuery>,
) -> Response {
    if !app.chunks.is_enabled() {
        return refused(ChunkServiceError::Disabled).into_response();
    }
    let identity = peer.and_then(|p| p.0.identity);
    let device = match (q.device, identity) {
        (Some(d), Some(id)) if d != id => {
            return Refusal::new(
                StatusCode::FORBIDDEN,
                format!(
                    "the client certificate names device '{id}'; it may read only its own status"
                ),
            )
            .into_response()
        }
        (d, id) => d.or(id),
    };
    match device {
        Some(d) => match app.chunks.status(&d) {
            Some(st) => Json(st).into_response(),
            None => error(
                StatusCode::NOT_FOUND,
                format!(
                    "no session for device '{}'",
                    d.chars().take(MAX_DEVICE_ID).collect::<String>()
                ),
            ),
        },
        None => Json(app.chunks.statuses()).into_response(),
    }
}
