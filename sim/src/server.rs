//! The firmware server: a thin HTTP shell around the [`ReleaseStore`].
//!
//! | request | answer |
//! |---|---|
//! | `GET /firmware/latest?deviceType=T[&channel=C][&deviceId=D]` | the latest signed manifest for T/C (channel defaults to `stable`); 404 when there is none |
//! | `GET /blobs/<sha256>` | an image or patch, with single `Range` (206), strong `ETag`, `If-None-Match` (304) and `If-Match` (412): a resume sends `If-Match` so it never mixes two blobs |
//! | `POST /ack` | a board's ack (the MQTT `ack` payload); 204, or 400 saying what is wrong |
//! | `GET /healthz` | 200 `ok` |
//!
//! Errors are JSON `{"error": "…"}` that say what was wrong and what to send instead.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::extract::{DefaultBodyLimit, Query, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::json;
use tower_http::services::ServeDir;

use crate::release_store::ReleaseStore;

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

async fn latest(State(store): State<Arc<ReleaseStore>>, Query(q): Query<LatestQuery>) -> Response {
    let Some(device_type) = q.device_type else {
        return error(StatusCode::BAD_REQUEST, "missing query parameter deviceType (e.g. /firmware/latest?deviceType=otarig-devkit-s3)");
    };
    let channel = q.channel.unwrap_or_else(|| "stable".into());
    tracing::debug!(%device_type, %channel, device = q.device_id.as_deref().unwrap_or("-"), "latest manifest");
    let store2 = store.clone();
    let (dt, ch) = (device_type.clone(), channel.clone());
    match tokio::task::spawn_blocking(move || store2.latest(&dt, &ch)).await {
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

async fn ack(State(store): State<Arc<ReleaseStore>>, body: axum::body::Bytes) -> Response {
    let wire: AckWire = match serde_json::from_slice(&body) {
        Ok(w) => w,
        Err(e) => {
            return error(StatusCode::BAD_REQUEST, format!(
                "ack is not {{\"v\":1,\"device\":…,\"sequence\":…,\"version\":…,\"outcome\":…,\"detail\":…}}: {e}"
            ))
        }
    };
    if wire.v != otarig_agent::protocol::VERSION {
        return error(
            StatusCode::BAD_REQUEST,
            format!("ack format v{}; this server reads v1", wire.v),
        );
    }
    if !["installed", "refused", "rolled-back"].contains(&wire.outcome.as_str()) {
        return error(
            StatusCode::BAD_REQUEST,
            format!(
                "outcome '{}' is not installed, refused or rolled-back",
                wire.outcome
            ),
        );
    }
    if wire.device.is_empty() || wire.device.len() > 128 {
        return error(
            StatusCode::BAD_REQUEST,
            "device must be 1 to 128 characters",
        );
    }
    let record = json!({"v": wire.v, "device": wire.device, "sequence": wire.sequence,
        "version": wire.version, "outcome": wire.outcome, "detail": wire.detail});
    match tokio::task::spawn_blocking(move || store.record_ack(&record)).await {
        Ok(Ok(())) => StatusCode::NO_CONTENT.into_response(),
        Ok(Err(e)) => error(StatusCode::INTERNAL_SERVER_ERROR, format!("{e:#}")),
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    }
}

/// The server's routes over a store.
pub fn router(store: Arc<ReleaseStore>) -> Router {
    let blobs = ServeDir::new(store.blob_dir());
    Router::new()
        .route("/firmware/latest", get(latest))
        .route(
            "/ack",
            post(ack).layer(DefaultBodyLimit::max(otarig_agent::protocol::MAX_PAYLOAD)),
        )
        .route("/healthz", get(|| async { "ok" }))
        .nest_service("/blobs", blobs)
        .with_state(store)
}

/// A running server; dropping it does not stop it, [`Server::shutdown`] does.
pub struct Server {
    pub addr: SocketAddr,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<()>,
}

impl Server {
    /// Bind `addr` (port 0: a free port, reported in `addr`) and serve in the background.
    pub async fn start(store: Arc<ReleaseStore>, addr: SocketAddr) -> anyhow::Result<Server> {
        let listener = tokio::net::TcpListener::bind(addr).await.map_err(|e| {
            anyhow::anyhow!("cannot listen on {addr}: {e} (is another server using the port?)")
        })?;
        let addr = listener.local_addr()?;
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let app = router(store);
        let task = tokio::spawn(async move {
            let serve = axum::serve(listener, app).with_graceful_shutdown(async {
                let _ = stopped.await;
            });
            if let Err(e) = serve.await {
                tracing::error!("firmware server stopped: {e}");
            }
        });
        Ok(Server {
            addr,
            stop: Some(stop),
            task,
        })
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub async fn shutdown(mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        let _ = (&mut self.task).await;
    }
}
