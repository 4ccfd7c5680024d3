//! A simulated board's HTTP client: its `esp_http_client` handle, one keep-alive connection
//! per boot, reading the socket through a small buffer.
//!
//! ESP-IDF's `esp_http_client` reads through a `buffer_size` buffer (512 bytes by default;
//! OTA code reads a few KiB per `esp_http_client_read`), so a board never holds more than a
//! few KiB of a download in RAM. hyper's default read buffer instead grows to about 400 KiB
//! per connection when the socket has that much waiting, which on loopback it always has:
//! ten thousand boards downloading at once would hold gigabytes in flight. Bounding it to
//! [`READ_BUFFER`] keeps a board's download in flight to that, at a few more reads.

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

/// The most a board's connection buffers from the socket at once.
pub const READ_BUFFER: usize = 16 * 1024;

/// One board's HTTP client. Cloning shares the connection (as tasks of one board do).
#[derive(Clone)]
pub struct BoardHttp {
    client: Inner,
}

/// Plain HTTP, or HTTPS with the board's TLS configuration (its CA and device certificate),
/// as `esp_http_client` with `cert_pem`, `client_cert_pem` and `client_key_pem`.
#[derive(Clone)]
enum Inner {
    Plain(Client<HttpConnector, Full<Bytes>>),
    Tls(Client<hyper_rustls::HttpsConnector<HttpConnector>, Full<Bytes>>),
}

impl Inner {
    async fn request(&self, req: Request<Full<Bytes>>) -> anyhow::Result<Response<Incoming>> {
        Ok(match self {
            Inner::Plain(c) => c.request(req).await?,
            Inner::Tls(c) => c.request(req).await?,
        })
    }
}

impl Default for BoardHttp {
    fn default() -> Self {
        Self::new()
    }
}

impl BoardHttp {
    pub fn new() -> BoardHttp {
        let client = Self::builder().build_http();
        BoardHttp {
            client: Inner::Plain(client),
        }
    }

    /// HTTPS only, with `tls` ([`otarig_server::tls::client_config`]).
    pub fn with_tls(tls: std::sync::Arc<rustls::ClientConfig>) -> BoardHttp {
        let https = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config((*tls).clone())
            .https_only()
            .enable_http1()
            .build();
        BoardHttp {
            client: Inner::Tls(Self::builder().build(https)),
        }
    }

    fn builder() -> hyper_util::client::legacy::Builder {
        let mut b = Client::builder(TokioExecutor::new());
        b.pool_max_idle_per_host(1).http1_max_buf_size(READ_BUFFER);
        b
    }

    /// `GET url`, with `Range: bytes=first-last` when given.
    pub async fn get(
        &self,
        url: &str,
        range: Option<(u64, u64)>,
    ) -> anyhow::Result<Response<Incoming>> {
        let mut req = Request::get(url);
        if let Some((first, last)) = range {
            req = req.header(hyper::header::RANGE, format!("bytes={first}-{last}"));
        }
        self.client.request(req.body(Full::default())?).await
    }

    /// `POST url` with a JSON body; the answer's status.
    pub async fn post_json(&self, url: &str, body: String) -> anyhow::Result<StatusCode> {
        let resp = self.post(url, body).await?;
        let status = resp.status();
        // Read the (short) answer so the connection can be reused.
        let _ = resp.into_body().collect().await;
        Ok(status)
    }

    /// `POST url` with a JSON body; the answer.
    pub async fn post(&self, url: &str, body: String) -> anyhow::Result<Response<Incoming>> {
        let req = Request::post(url)
            .header(hyper::header::CONTENT_TYPE, "application/json")
            .body(Full::new(Bytes::from(body)))?;
        self.client.request(req).await
    }
}

/// What the TLS stack said, if `e` (or an error under it) is a TLS failure: a handshake this
/// board refused (unknown CA, expired, another name) or the peer refused (an alert).
pub fn tls_failure(e: &(dyn std::error::Error + 'static)) -> Option<String> {
    let mut next = Some(e);
    while let Some(err) = next {
        if let Some(t) = err.downcast_ref::<rustls::Error>() {
            return Some(t.to_string());
        }
        if let Some(inner) = err
            .downcast_ref::<std::io::Error>()
            .and_then(|io| io.get_ref())
        {
            if let Some(found) = tls_failure(inner) {
                return Some(found);
            }
        }
        next = err.source();
    }
    None
}

/// The next piece of a body as it arrives (`None` at its end); trailers are skipped.
pub async fn next_chunk(body: &mut Incoming) -> Result<Option<Bytes>, hyper::Error> {
    while let Some(frame) = body.frame().await {
        if let Ok(data) = frame?.into_data() {
            return Ok(Some(data));
        }
    }
    Ok(None)
}

/// A whole body of at most `limit` bytes (what a board's fixed buffer holds); longer is an
/// error, and nothing past the limit is read.
pub async fn read_limited(resp: Response<Incoming>, limit: usize) -> Result<Bytes, String> {
    let body = http_body_util::Limited::new(resp.into_body(), limit);
    match body.collect().await {
        Ok(b) => Ok(b.to_bytes()),
        Err(e) => Err(format!("answer unreadable or over {limit} bytes: {e}")),
    }
}

/// A whole (small) body.
pub async fn read_all(resp: Response<Incoming>) -> Result<Bytes, hyper::Error> {
    Ok(resp.into_body().collect().await?.to_bytes())
}
