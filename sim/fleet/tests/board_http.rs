//! A simulated board's HTTP handle keeps one connection, as an `esp_http_client` handle does:
//! the firmware server counts its TLS handshakes.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use http_body_util::BodyExt;
use otarig_fleet::board_http::{self, BoardHttp};
use otarig_server::pki::Pki;
use otarig_server::release_store::ReleaseStore;
use otarig_server::server::{Limits, Server};
use otarig_server::tls::{device_client, server_config, Client, ClientAuth};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// A firmware server over mutual TLS holding one 1 MiB blob, and a board's TLS configuration.
struct Bench {
    dir: tempfile::TempDir,
    tls: Arc<rustls::ServerConfig>,
    server: Server,
    blob: String,
    board: Arc<rustls::ClientConfig>,
}

async fn bench() -> Bench {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::init(&dir.path().join("pki"), true, 30).unwrap();
    let leaf = pki.server(&["127.0.0.1".into()], 30).unwrap();
    let auth = ClientAuth {
        ca_pem: pki.client_ca_pem(),
        crl_pem: None,
    };
    let tls = server_config(&pki.chain_pem(&leaf), &leaf.key_pem, Some(&auth)).unwrap();
    let store = Arc::new(ReleaseStore::open(&dir.path().join("store")).unwrap());
    let image: Vec<u8> = (0..1u32 << 20).map(|i| (i % 251) as u8).collect();
    let sha = store.put_blob(&image).unwrap();
    let server = serve(store, tls.clone(), Limits::default()).await;
    let blob = format!(
        "https://127.0.0.1:{}/blobs/{}?deviceId=dev-1",
        server.addr.port(),
        hex::encode(sha)
    );
    let board = device_client(&pki, "dev-1", 30, Client::Board).unwrap();
    Bench {
        dir,
        tls,
        server,
        blob,
        board,
    }
}

async fn serve(store: Arc<ReleaseStore>, tls: Arc<rustls::ServerConfig>, limits: Limits) -> Server {
    Server::start_tls(store, "127.0.0.1:0".parse().unwrap(), limits, tls)
        .await
        .unwrap()
}

impl Bench {
    fn url(&self, path: &str) -> String {
        format!("https://127.0.0.1:{}{path}", self.server.addr.port())
    }

    fn handshakes(&self) -> u64 {
        self.server.handshakes.summary().full
    }
}

/// One range of the blob, read to its end; its length.
async fn range(http: &BoardHttp, url: &str, first: u64, last: u64) -> usize {
    let resp = http.get(url, Some((first, last))).await.unwrap();
    assert_eq!(resp.status().as_u16(), 206);
    board_http::read_all(resp).await.unwrap().len()
}

/// What a board does in one boot of an update: the manifest poll, the image in four 256 KiB
/// ranges, an ack; each request right after the previous answer's end. One handshake, where
/// hyper-util's pooled client opened more (a request that found no idle connection started a
/// new one, finished in the background even when the old one came back first).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_boots_requests_share_one_connection() {
    let b = bench().await;
    let http = BoardHttp::with_tls(b.board.clone());
    for _ in 0..5 {
        let resp = http.get(&b.url("/healthz"), None).await.unwrap();
        assert_eq!(resp.status().as_u16(), 200);
        board_http::read_all(resp).await.unwrap();
        for i in 0..4u64 {
            let n = range(&http, &b.blob, i << 18, ((i + 1) << 18) - 1).await;
            assert_eq!(n, 1 << 18);
        }
        let st = http.post_json(&b.url("/ack"), "{}".into()).await.unwrap();
        assert_eq!(
            st.as_u16(),
            400,
            "an empty ack is refused, on the same connection"
        );
    }
    assert_eq!(b.handshakes(), 1);
}

/// Requests made at once (an ack and a poll as a board boots) take turns on the connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_made_at_once_take_turns() {
    let b = bench().await;
    let http = BoardHttp::with_tls(b.board.clone());
    let tasks: Vec<_> = (0..4u64)
        .map(|i| {
            let (http, url) = (http.clone(), b.blob.clone());
            tokio::spawn(async move { range(&http, &url, i << 18, ((i + 1) << 18) - 1).await })
        })
        .collect();
    for t in tasks {
        assert_eq!(t.await.unwrap(), 1 << 18);
    }
    assert_eq!(b.handshakes(), 1);
}

/// A board stops a download by dropping the answer: its connection closes, and the next
/// request opens a new one (as `esp_http_client` does after `esp_http_client_close`). A
/// reboot (a new handle) opens a new one too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_answer_or_a_reboot_costs_a_new_connection() {
    let b = bench().await;
    let http = BoardHttp::with_tls(b.board.clone());
    let mut resp = http.get(&b.blob, Some((0, (1 << 20) - 1))).await.unwrap();
    let first = resp.body_mut().frame().await.unwrap().unwrap();
    assert!(first.is_data());
    drop(resp);
    assert_eq!(range(&http, &b.blob, 0, 99).await, 100);
    assert_eq!(b.handshakes(), 2);
    drop(http);
    let rebooted = BoardHttp::with_tls(b.board.clone());
    assert_eq!(range(&rebooted, &b.blob, 0, 99).await, 100);
    assert_eq!(b.handshakes(), 3);
}

/// A request the server never answers, given up by its caller's timeout (as a fetch's) or
/// by the handle's own, does not hold the connection: the next request opens a new one and
/// is answered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_answer_given_up_frees_the_handle() {
    let stall = otarig_server::server::ServerFault::Stall;
    let waited = Duration::from_millis(300);
    for own_timeout in [false, true] {
        let b = bench().await;
        b.server.faults.set("dev-1", vec![(stall, Some(1))]);
        let mut http = BoardHttp::with_tls(b.board.clone());
        if own_timeout {
            http = http.answer_within(waited);
            let e = http.get(&b.blob, Some((0, 99))).await.err().unwrap();
            assert!(e.to_string().contains("no answer within 300ms"), "{e}");
        } else {
            let given_up = tokio::time::timeout(waited, http.get(&b.blob, Some((0, 99)))).await;
            assert!(given_up.is_err(), "the stalled request was answered");
        }
        let answered = tokio::time::timeout(Duration::from_secs(5), range(&http, &b.blob, 0, 99));
        assert_eq!(answered.await.expect("the next request hung"), 100);
        assert_eq!(b.handshakes(), 2);
    }
}

/// The server's `drop-after` fault cuts the connection in the middle of the answer: the board
/// gets the head and the body up to the cut, then an error, and resumes by Range from there.
/// (It used to fail before the answer's head reached the board, which a board takes for a
/// kept connection the server had closed, and sends again.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_connection_delivers_the_answer_up_to_the_cut() {
    let b = bench().await;
    let drop = otarig_server::server::ServerFault::DropAfterPercent(30);
    b.server.faults.set("dev-1", vec![(drop, Some(1))]);
    let http = BoardHttp::with_tls(b.board.clone());
    let resp = http
        .get(&b.blob, Some((0, (1 << 20) - 1)))
        .await
        .expect("an answer");
    assert_eq!(resp.status().as_u16(), 206);
    let mut body = resp.into_body();
    let mut got = 0;
    let end = loop {
        match board_http::next_chunk(&mut body).await {
            Ok(Some(chunk)) => got += chunk.len(),
            other => break other,
        }
    };
    assert!(end.is_err(), "the body ends in an error, not cleanly");
    assert_eq!(got, (1 << 20) * 30 / 100, "the body up to the cut");
    assert_eq!(
        range(&http, &b.blob, got as u64, (1 << 20) - 1).await,
        (1 << 20) - got
    );
}

/// The timeout runs from a request's turn, as `esp_http_client`'s does from the shell's
/// queue: a poll behind a slow download waits for it and is answered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_waits_its_turn_beyond_its_timeout() {
    let b = bench().await;
    let slow = otarig_server::server::ServerFault::Throttle(256 * 1024);
    b.server.faults.set("dev-1", vec![(slow, Some(1))]);
    let http = BoardHttp::with_tls(b.board.clone()).answer_within(Duration::from_millis(300));
    let started = std::time::Instant::now();
    let download = {
        let (http, url) = (http.clone(), b.blob.clone());
        tokio::spawn(async move { range(&http, &url, 0, (256 << 10) - 1).await })
    };
    tokio::time::sleep(Duration::from_millis(50)).await;
    let poll = http.get(&b.url("/healthz"), None).await.unwrap();
    assert_eq!(poll.status().as_u16(), 200);
    assert!(
        started.elapsed() > Duration::from_millis(600),
        "the download was not slow"
    );
    assert_eq!(download.await.unwrap(), 256 << 10);
    assert_eq!(b.handshakes(), 1);
}

/// A request to another server closes the connection and opens one there, as
/// `esp_http_client_set_url` does when the host changes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_server_gets_a_connection_of_its_own() {
    let b = bench().await;
    let store = Arc::new(ReleaseStore::open(&b.dir.path().join("other")).unwrap());
    let other = serve(store, b.tls.clone(), Limits::default()).await;
    let other_url = format!("https://127.0.0.1:{}/healthz", other.addr.port());
    let http = BoardHttp::with_tls(b.board.clone());
    for url in [
        b.url("/healthz"),
        other_url.clone(),
        other_url,
        b.url("/healthz"),
    ] {
        let resp = http.get(&url, None).await.unwrap();
        assert_eq!(resp.status().as_u16(), 200);
        board_http::read_all(resp).await.unwrap();
    }
    assert_eq!(
        b.handshakes(),
        2,
        "back to the first server: a new connection"
    );
    assert_eq!(other.handshakes.summary().full, 1);
}

/// A connection the server closed (idle past its header timeout) is replaced, not an error:
/// two handshakes, both requests answered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_the_server_closed_is_reopened() {
    let b = bench().await;
    let store = Arc::new(ReleaseStore::open(&b.dir.path().join("other")).unwrap());
    let limits = Limits {
        header_read: std::time::Duration::from_millis(200),
        ..Limits::default()
    };
    let server = serve(store, b.tls.clone(), limits).await;
    let url = format!("https://127.0.0.1:{}/healthz", server.addr.port());
    let http = BoardHttp::with_tls(b.board.clone());
    for _ in 0..2 {
        let resp = http.get(&url, None).await.unwrap();
        assert_eq!(resp.status().as_u16(), 200);
        board_http::read_all(resp).await.unwrap();
        tokio::time::sleep(std::time::Duration::from_millis(600)).await;
    }
    assert_eq!(server.handshakes.summary().full, 2);
}

/// What a plain HTTP server does with the second request on a connection (it answers the
/// first one, and every first one, with `200 ok`).
#[derive(Clone, Copy)]
enum Second {
    /// Read it and close: the server's idle timeout ended just as the request went out.
    Close,
    /// Never answer it.
    Stall,
}

/// Such a server on a loopback port: a URL on it, and how many connections it accepted.
async fn second_request(second: Second) -> (String, Arc<AtomicUsize>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/x", listener.local_addr().unwrap());
    let accepted = Arc::new(AtomicUsize::new(0));
    let count = accepted.clone();
    tokio::spawn(async move {
        while let Ok((mut tcp, _)) = listener.accept().await {
            count.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(async move {
                if read_head(&mut tcp).await {
                    let ok = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok";
                    tcp.write_all(ok).await.unwrap();
                }
                read_head(&mut tcp).await;
                if let Second::Stall = second {
                    tokio::time::sleep(Duration::from_secs(60)).await;
                }
            });
        }
    });
    (url, accepted)
}

/// Read up to the end of a request's head; false if the connection ended first.
async fn read_head(tcp: &mut tokio::net::TcpStream) -> bool {
    let mut head = Vec::new();
    let mut buf = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        match tcp.read(&mut buf).await {
            Ok(0) | Err(_) => return false,
            Ok(n) => head.extend_from_slice(&buf[..n]),
        }
    }
    true
}

/// A request the server closed the kept connection on, before any answer, is sent once more
/// on a new connection, as the shell's handle does; the board sees only the answer.
#[tokio::test]
async fn a_request_that_races_the_servers_close_is_sent_again() {
    let (url, accepted) = second_request(Second::Close).await;
    let http = BoardHttp::new();
    for _ in 0..2 {
        let resp = http.get(&url, None).await.expect("answered");
        assert_eq!(board_http::read_all(resp).await.unwrap().as_ref(), b"ok");
    }
    assert_eq!(
        accepted.load(Ordering::SeqCst),
        2,
        "the second on a new connection"
    );
}

/// A request that got no answer within its timeout is not sent again: a second try would
/// double the wait and hide the stall from the agent's count of failed fetches.
#[tokio::test]
async fn a_request_that_timed_out_is_not_sent_again() {
    let (url, accepted) = second_request(Second::Stall).await;
    let http = BoardHttp::new().answer_within(Duration::from_millis(300));
    let resp = http.get(&url, None).await.expect("answered");
    board_http::read_all(resp).await.unwrap();
    let e = http.get(&url, None).await.expect_err("timed out");
    assert!(e.to_string().contains("no answer within"), "{e:#}");
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(accepted.load(Ordering::SeqCst), 1, "no second connection");
}

/// A handle is for one scheme: a TLS board asked for a plain URL says so.
#[tokio::test]
async fn a_tls_handle_refuses_a_plain_url() {
    let b = bench().await;
    let http = BoardHttp::with_tls(b.board.clone());
    let url = format!("http://127.0.0.1:{}/healthz", b.server.addr.port());
    let e = http.get(&url, None).await.err().unwrap().to_string();
    assert!(e.contains("https"), "{e}");
    let e = BoardHttp::new()
        .get(&b.url("/healthz"), None)
        .await
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("http://"), "{e}");
}
