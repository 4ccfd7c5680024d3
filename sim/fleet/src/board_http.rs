//! A simulated board's HTTP client: its `esp_http_client` handle, one keep-alive connection
//! per boot, one request at a time, reading the socket through a small buffer.
//!
//! ESP-IDF's `esp_http_client` keeps its handle's connection open between requests unless
//! the server closes it ("Persistent Connections", docs/en/api-reference/protocols/
//! esp_http_client.rst; `esp_http_client_open` connects only when the handle is not
//! connected), and a handle serves one request at a time. The esp32s3 shell uses one handle
//! per boot that way, so a board makes one TLS handshake per boot unless its connection
//! breaks. hyper-util's pooled client does not model this: a request that finds no idle
//! connection starts a new one and finishes it in the background even when the previous
//! connection comes back first, which made boards open 3 to 3.6 connections per update
//! where the shell opens 2 (a test in `tests/board_http.rs` counts them).
//!
//! `esp_http_client` reads through a `buffer_size` buffer (512 bytes by default; OTA code
//! reads a few KiB per `esp_http_client_read`), so a board never holds more than a few KiB of
//! a download in RAM. hyper's default read buffer instead grows to about 400 KiB per
//! connection when the socket has that much waiting, which on loopback it always has: ten
//! thousand boards downloading at once would hold gigabytes in flight. Bounding it to
//! [`READ_BUFFER`] keeps a board's download in flight to that, at a few more reads.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::client::conn::http1;
use hyper::{Request, Response, StatusCode, Uri};
use hyper_util::rt::TokioIo;
use rustls::pki_types::ServerName;
use tokio::net::TcpStream;

/// The most a board's connection buffers from the socket at once.
pub const READ_BUFFER: usize = 16 * 1024;

/// One board's HTTP client handle. Cloning shares it (as tasks of one board do): their
/// requests take turns on its one connection.
#[derive(Clone)]
pub struct BoardHttp {
    handle: Arc<Handle>,
    /// How long a request may take, once its turn has come, to connect if it must and get
    /// its answer's head: `esp_http_client`'s `timeout_ms`, which bounds every request of the
    /// shell's handle (its queue of requests is not). `None`: no limit.
    answer_within: Option<Duration>,
}

/// How the handle reaches the server: plain TCP, or TLS with the board's configuration (its
/// CA and device certificate), as `esp_http_client` with `cert_pem`, `client_cert_pem` and
/// `client_key_pem`.
enum Transport {
    Plain,
    Tls(tokio_rustls::TlsConnector),
}

impl Transport {
    /// The URL scheme this transport speaks and its default port.
    fn scheme(&self) -> (&'static str, u16) {
        match self {
            Transport::Plain => ("http", 80),
            Transport::Tls(_) => ("https", 443),
        }
    }
}

struct Handle {
    transport: Transport,
    /// The open connection: taken by the request being sent, put back as soon as it is
    /// sent. The next request waits until the connection is ready again (the previous answer
    /// read to its end), or opens a new one if it was closed (by the server, or because an
    /// answer was dropped before its end, which is how a board stops a download).
    connection: tokio::sync::Mutex<Option<Open>>,
}

/// An open connection and the server (host and port) it goes to.
struct Open {
    server: String,
    sender: http1::SendRequest<Full<Bytes>>,
}

impl Default for BoardHttp {
    fn default() -> Self {
        Self::new()
    }
}

impl BoardHttp {
    pub fn new() -> BoardHttp {
        Self::over(Transport::Plain)
    }

    /// HTTPS only, with `tls` ([`otarig_server::tls::client_config`]).
    pub fn with_tls(tls: Arc<rustls::ClientConfig>) -> BoardHttp {
        Self::over(Transport::Tls(tokio_rustls::TlsConnector::from(tls)))
    }

    fn over(transport: Transport) -> BoardHttp {
        BoardHttp {
            handle: Arc::new(Handle {
                transport,
                connection: tokio::sync::Mutex::new(None),
            }),
            answer_within: None,
        }
    }

    /// Give up a request whose answer's head has not come within `timeout` of its turn.
    /// Without it, a request nobody answers would hold the handle, and every request after
    /// it, for good.
    pub fn answer_within(mut self, timeout: Duration) -> BoardHttp {
        self.answer_within = Some(timeout);
        self
    }

    /// Send a request to `url` on the handle's connection; the answer's head. The request
    /// line carries the path (origin form) and `Host` the server, as `esp_http_client` sends
    /// them.
    async fn request(
        &self,
        url: &str,
        req: hyper::http::request::Builder,
        body: Full<Bytes>,
    ) -> anyhow::Result<Response<Incoming>> {
        let uri: Uri = url.parse().with_context(|| format!("not a URL: {url}"))?;
        self.handle.check_scheme(&uri)?;
        let host = uri
            .authority()
            .with_context(|| format!("no host in {url}"))?;
        let path = uri.path_and_query().map_or("/", |p| p.as_str());
        let req = req
            .uri(path)
            .header(hyper::header::HOST, host.as_str())
            .body(body)?;
        self.handle.send(&uri, req, self.answer_within).await
    }

    /// `GET url`, with `Range: bytes=first-last` when given.
    pub async fn get(
        &self,
        url: &str,
        range: Option<(u64, u64)>,
    ) -> anyhow::Result<Response<Incoming>> {
        let mut req = Request::get("/");
        if let Some((first, last)) = range {
            req = req.header(hyper::header::RANGE, format!("bytes={first}-{last}"));
        }
        self.request(url, req, Full::default()).await
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
        let req = Request::post("/").header(hyper::header::CONTENT_TYPE, "application/json");
        self.request(url, req, Full::new(Bytes::from(body))).await
    }
}

impl Handle {
    /// A TLS handle speaks HTTPS only and a plain one HTTP only: a board provisioned with
    /// a CA never falls back to plain text, and a plain board cannot speak TLS.
    fn check_scheme(&self, uri: &Uri) -> anyhow::Result<()> {
        let (wanted, _) = self.transport.scheme();
        match uri.scheme_str() {
            Some(s) if s == wanted => Ok(()),
            _ => anyhow::bail!(
                "{uri}: this board's HTTP client speaks {wanted} only; give it a {wanted}:// URL"
            ),
        }
    }

    /// Send `req` on the open connection to `uri`'s server once it is ready (the previous
    /// answer read to its end), or on a new one if there is none, it closed, or it goes to
    /// another server (`esp_http_client_set_url` closes the connection when the host or port
    /// changes). From then on, connecting and the answer's head take at most `timeout`.
    ///
    /// A request that fails before its answer's head on a kept connection, other than by the
    /// timeout, is sent once more on a new one, as the shell's handle does
    /// (`otarig_esp32s3::retry_on_new_connection` in the firmware): the server may have
    /// closed the connection, idle past its header timeout, just as the request went out.
    async fn send(
        &self,
        uri: &Uri,
        req: Request<Full<Bytes>>,
        timeout: Option<Duration>,
    ) -> anyhow::Result<Response<Incoming>> {
        let (head, body) = req.into_parts();
        let copy = || {
            let mut req = Request::new(body.clone());
            *req.method_mut() = head.method.clone();
            *req.uri_mut() = head.uri.clone();
            *req.version_mut() = head.version;
            *req.headers_mut() = head.headers.clone();
            req
        };
        match self.send_once(uri, copy(), timeout).await {
            Err(Attempt::KeptConnectionFailed(e)) => {
                tracing::debug!("{uri}: {e:#}; trying once more on a new connection");
                self.send_once(uri, copy(), timeout)
                    .await
                    .map_err(Attempt::into_error)
            }
            other => other.map_err(Attempt::into_error),
        }
    }

    async fn send_once(
        &self,
        uri: &Uri,
        req: Request<Full<Bytes>>,
        timeout: Option<Duration>,
    ) -> Result<Response<Incoming>, Attempt> {
        let server = uri
            .authority()
            .map(|a| a.as_str().to_ascii_lowercase())
            .unwrap_or_default();
        let mut slot = self.connection.lock().await;
        let reusable = match slot.take() {
            Some(mut open) if open.server == server => {
                open.sender.ready().await.ok().map(|()| open.sender)
            }
            _ => None,
        };
        let kept = reusable.is_some();
        let deadline = timeout.map(|t| (tokio::time::Instant::now() + t, t));
        let mut sender = match reusable {
            Some(sender) => sender,
            None => within(deadline, uri, self.connect(uri))
                .await
                .map_err(Attempt::Failed)?,
        };
        let answer = sender.send_request(req);
        *slot = Some(Open { server, sender });
        drop(slot);
        // The outer error is the timeout's, the inner one the connection's.
        within(deadline, uri, async { Ok(answer.await) })
            .await
            .map_err(Attempt::Failed)?
            .map_err(|e| Attempt::failed(kept, e))
    }

    /// A new connection to `uri`'s host: TCP, then the TLS handshake if the handle speaks
    /// TLS, then HTTP/1.1 with the bounded read buffer. Its driving task ends when the
    /// connection closes or the handle is dropped (a reboot).
    async fn connect(&self, uri: &Uri) -> anyhow::Result<http1::SendRequest<Full<Bytes>>> {
        let host = uri.host().with_context(|| format!("no host in {uri}"))?;
        // An IPv6 literal comes bracketed, as URLs write it.
        let host = host.trim_matches(['[', ']']);
        let port = uri.port_u16().unwrap_or(self.transport.scheme().1);
        let tcp = TcpStream::connect((host, port)).await?;
        tcp.set_nodelay(true)?;
        let mut builder = http1::Builder::new();
        builder.max_buf_size(READ_BUFFER);
        match &self.transport {
            Transport::Plain => Self::start(&builder, tcp).await,
            Transport::Tls(tls) => {
                let name = ServerName::try_from(host.to_string())?;
                let stream = tls.connect(name, tcp).await?;
                Self::start(&builder, stream).await
            }
        }
    }

    async fn start<S>(
        builder: &http1::Builder,
        stream: S,
    ) -> anyhow::Result<http1::SendRequest<Full<Bytes>>>
    where
        S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    {
        let (sender, connection) = builder.handshake(TokioIo::new(stream)).await?;
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::debug!("board HTTP connection ended: {e}");
            }
        });
        Ok(sender)
    }
}

/// How one attempt at a request failed.
enum Attempt {
    /// Before the answer's head, on a connection kept from an earlier request, not by the
    /// timeout: worth one more try on a new connection.
    KeptConnectionFailed(anyhow::Error),
    Failed(anyhow::Error),
}

impl Attempt {
    fn failed(kept: bool, e: hyper::Error) -> Attempt {
        if kept {
            Attempt::KeptConnectionFailed(e.into())
        } else {
            Attempt::Failed(e.into())
        }
    }

    fn into_error(self) -> anyhow::Error {
        match self {
            Attempt::KeptConnectionFailed(e) | Attempt::Failed(e) => e,
        }
    }
}

/// `work`'s result, or an error naming `uri` if the deadline (and the timeout it ends)
/// comes first.
async fn within<T>(
    deadline: Option<(tokio::time::Instant, Duration)>,
    uri: &Uri,
    work: impl std::future::Future<Output = anyhow::Result<T>>,
) -> anyhow::Result<T> {
    let Some((at, timeout)) = deadline else {
        return work.await;
    };
    match tokio::time::timeout_at(at, work).await {
        Ok(result) => result,
        Err(_) => {
            anyhow::bail!("{uri}: no answer within {timeout:?} (the board's request timeout)")
        }
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
