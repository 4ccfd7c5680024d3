//! HTTPS with the fleet's PKI: who gets through the handshake, and whose acks count.

use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use otarig_server::pki::Pki;
use otarig_server::release_store::ReleaseStore;
use otarig_server::server::{Limits, Server};
use otarig_server::tls::{client_config, server_config, server_config_with, Client, ClientAuth};
use rustls_pki_types::ServerName;

/// One HTTPS request on a fresh connection; any TLS refusal is an error.
async fn request(
    addr: SocketAddr,
    cfg: Arc<rustls::ClientConfig>,
    host: &str,
    req: hyper::Request<Full<Bytes>>,
) -> anyhow::Result<(hyper::StatusCode, Bytes)> {
    let tcp = tokio::net::TcpStream::connect(addr).await?;
    let name = ServerName::try_from(host.to_string())?;
    let tls = tokio_rustls::TlsConnector::from(cfg)
        .connect(name, tcp)
        .await?;
    let (mut send, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tls)).await?;
    tokio::spawn(conn);
    let resp = send.send_request(req).await?;
    let status = resp.status();
    Ok((status, resp.into_body().collect().await?.to_bytes()))
}

fn get(path: &str) -> hyper::Request<Full<Bytes>> {
    hyper::Request::get(format!("https://localhost{path}"))
        .body(Full::default())
        .unwrap()
}

fn ack(device: &str) -> hyper::Request<Full<Bytes>> {
    let body = format!(
        r#"{{"v":1,"device":"{device}","sequence":1,"version":"1.0.0","outcome":"installed","detail":""}}"#
    );
    hyper::Request::post("https://localhost/ack")
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body)))
        .unwrap()
}

struct Bench {
    dir: tempfile::TempDir,
    root: String,
    server: Server,
}

/// A PKI with an intermediate, a server certificate valid `server_days`, and the server
/// requiring client certificates (with the CRL, once something was revoked).
async fn bench(server_days: u32, revoke: &[&str]) -> Bench {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::init(&dir.path().join("pki"), true, 30).unwrap();
    for id in ["dev-1", "dev-2"] {
        let d = pki.device(id, 30).unwrap();
        pki.write_device(id, &d).unwrap();
    }
    let mut crl = None; // the last CRL lists every revocation
    for id in revoke {
        crl = Some(pki.revoke_device(id).unwrap());
    }
    let s = pki
        .server(&["localhost".into(), "127.0.0.1".into()], server_days)
        .unwrap();
    let root = pki.root_pem().to_string();
    // What `otarig serve --client-ca DIR/client_ca.pem` reads: the root and the intermediate.
    let auth = ClientAuth {
        ca_pem: std::fs::read_to_string(dir.path().join("pki/client_ca.pem")).unwrap(),
        crl_pem: crl,
    };
    let tls = server_config(&pki.chain_pem(&s), &s.key_pem, Some(&auth)).unwrap();
    let server = serve_tls(&dir.path().join("store"), tls).await;
    Bench { dir, root, server }
}

/// A firmware server on a free loopback port with `tls`, over an empty store in `store`.
async fn serve_tls(store: &std::path::Path, tls: Arc<rustls::ServerConfig>) -> Server {
    let store = Arc::new(ReleaseStore::open(store).unwrap());
    Server::start_tls(
        store,
        "127.0.0.1:0".parse().unwrap(),
        Limits::default(),
        tls,
    )
    .await
    .unwrap()
}

impl Bench {
    /// A board's TLS configuration with device `id`'s files, as `otarig pki device` wrote them.
    fn board(&self, id: &str) -> Arc<rustls::ClientConfig> {
        let dir = self.dir.path().join("pki/devices").join(id);
        let read = |f: &str| std::fs::read_to_string(dir.join(f)).unwrap();
        let ca = read("ca_cert.pem");
        assert_eq!(ca, self.root);
        client_config(
            Client::Board,
            &ca,
            Some((&read("device.crt"), &read("device.key"))),
        )
        .unwrap()
    }
}

#[tokio::test]
async fn a_board_with_its_certificate_is_served_and_acks_only_for_itself() {
    let b = bench(30, &[]).await;
    assert!(b.server.url().starts_with("https://"));
    let cfg = b.board("dev-1");
    let (st, body) = request(b.server.addr, cfg.clone(), "localhost", get("/healthz"))
        .await
        .unwrap();
    assert_eq!((st.as_u16(), &body[..]), (200, &b"ok"[..]));
    // By IP too: the certificate has an IP SAN.
    let (st, _) = request(b.server.addr, cfg.clone(), "127.0.0.1", get("/healthz"))
        .await
        .unwrap();
    assert_eq!(st.as_u16(), 200);
    let (st, _) = request(b.server.addr, cfg.clone(), "localhost", ack("dev-1"))
        .await
        .unwrap();
    assert_eq!(st.as_u16(), 204);
    let (st, body) = request(b.server.addr, cfg, "localhost", ack("dev-2"))
        .await
        .unwrap();
    assert_eq!(st.as_u16(), 403, "{}", String::from_utf8_lossy(&body));
    assert!(String::from_utf8_lossy(&body).contains("names device 'dev-1'"));
}

/// The chunked protocol over mutual TLS: a board opens sessions, fetches chunks, verifies,
/// completes and reads status for the device its certificate names only.
#[tokio::test]
async fn the_chunked_protocol_speaks_only_for_the_certificates_device() {
    let b = bench(30, &[]).await;
    b.server.chunks.enable(b"tls fleet key");
    let cfg = b.board("dev-1");
    let post = |path: &str, body: String| {
        hyper::Request::post(format!("https://localhost{path}"))
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(body)))
            .unwrap()
    };
    let check = |device: &str| {
        post(
            "/ota/check",
            format!(
                r#"{{"v":1,"device":"{device}","sequence":1,"sha256":"{}"}}"#,
                "ab".repeat(32)
            ),
        )
    };
    let verify = post(
        "/ota/verify",
        r#"{"v":1,"device":"dev-2","sequence":1}"#.to_string(),
    );
    let complete = {
        let mut r = ack("dev-2");
        *r.uri_mut() = "https://localhost/ota/complete".parse().unwrap();
        r
    };
    let chunk = get(&format!(
        "/ota/chunk?device=dev-2&session={}&n=0",
        "00".repeat(16)
    ));
    for req in [
        check("dev-2"),
        verify,
        complete,
        chunk,
        get("/ota/status?device=dev-2"),
    ] {
        let what = req.uri().path().to_string();
        let (st, body) = request(b.server.addr, cfg.clone(), "localhost", req)
            .await
            .unwrap();
        let body = String::from_utf8_lossy(&body);
        assert_eq!(st.as_u16(), 403, "{what}: {body}");
        assert!(body.contains("names device 'dev-1'"), "{what}: {body}");
    }
    // Its own: past the identity check (no such blob, no session yet).
    let (st, _) = request(b.server.addr, cfg.clone(), "localhost", check("dev-1"))
        .await
        .unwrap();
    assert_eq!(st.as_u16(), 404);
    let (st, _) = request(b.server.addr, cfg, "localhost", get("/ota/status"))
        .await
        .unwrap();
    assert_eq!(st.as_u16(), 404, "no session for dev-1, and no one else's");
}

#[tokio::test]
async fn the_handshake_refuses_every_broken_trust() {
    let b = bench(30, &["dev-2"]).await;
    let addr = b.server.addr;
    let other = tempfile::tempdir().unwrap();
    let stranger = Pki::init(other.path(), false, 30).unwrap();
    let foreign = stranger.device("dev-1", 30).unwrap();
    let cases: Vec<(&str, Arc<rustls::ClientConfig>, &str)> = vec![
        ("revoked device certificate", b.board("dev-2"), "localhost"),
        (
            "no client certificate",
            client_config(Client::Host, &b.root, None).unwrap(),
            "localhost",
        ),
        (
            "device certificate from another CA",
            client_config(
                Client::Board,
                &b.root,
                Some((&foreign.cert_pem, &foreign.key_pem)),
            )
            .unwrap(),
            "localhost",
        ),
        (
            "board trusting another CA (wrong CA)",
            client_config(Client::Board, stranger.root_pem(), None).unwrap(),
            "localhost",
        ),
        ("hostname mismatch", b.board("dev-1"), "firmware.example"),
    ];
    for (what, cfg, host) in cases {
        let r = request(addr, cfg, host, get("/healthz")).await;
        assert!(r.is_err(), "{what}: served {r:?}");
    }
    // The same board, well configured, still gets through.
    let ok = request(addr, b.board("dev-1"), "localhost", get("/healthz")).await;
    assert_eq!(ok.unwrap().0.as_u16(), 200);
}

#[tokio::test]
async fn an_expired_server_certificate_is_refused_by_the_board() {
    let b = bench(0, &[]).await;
    let e = request(
        b.server.addr,
        b.board("dev-1"),
        "localhost",
        get("/healthz"),
    )
    .await
    .unwrap_err();
    assert!(format!("{e:#}").to_lowercase().contains("expired"), "{e:#}");
}

#[test]
fn private_keys_are_written_0600_and_a_ca_is_never_overwritten() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::init(dir.path(), true, 30).unwrap();
    let d = pki.device("dev-7", 30).unwrap();
    let out = pki.write_device("dev-7", &d).unwrap();
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        for key in [
            dir.path().join("ca_key.pem"),
            dir.path().join("intermediate_key.pem"),
            out.join("device.key"),
        ] {
            let mode = std::fs::metadata(&key).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600, "{}", key.display());
        }
    }
    assert_eq!(
        otarig_server::pki::serial_of(&std::fs::read_to_string(out.join("device.crt")).unwrap())
            .unwrap(),
        d.serial
    );
    let e = Pki::init(dir.path(), false, 30).err().unwrap().to_string();
    assert!(e.contains("already holds a CA"), "{e}");
}

/// A board opens every connection with a full handshake, as esp-tls does without
/// `CONFIG_ESP_TLS_CLIENT_SESSION_TICKETS` (and as any board does after a reboot): a
/// simulated board that resumed a session would skip the certificate checks a real one pays
/// for, on the server and at the broker.
#[tokio::test]
async fn a_board_resumes_no_tls_session() {
    let b = bench(30, &[]).await;
    let cfg = b.board("dev-1");
    for _ in 0..3 {
        let (st, _) = request(b.server.addr, cfg.clone(), "localhost", get("/healthz"))
            .await
            .unwrap();
        assert_eq!(st.as_u16(), 200);
    }
    let h = b.server.handshakes.summary();
    assert_eq!((h.full, h.resumed), (3, 0), "{h:?}");
}

/// A stock ESP-IDF board speaks TLS 1.2 only (mbedTLS without
/// `CONFIG_MBEDTLS_SSL_PROTO_TLS1_3`): the server settles on 1.2 with it, and a server that
/// dropped 1.2 locks it out. The simulated boards negotiated TLS 1.3 before.
#[tokio::test]
async fn a_board_speaks_tls_1_2_only() {
    let b = bench(30, &[]).await;
    let (st, _) = request(
        b.server.addr,
        b.board("dev-1"),
        "localhost",
        get("/healthz"),
    )
    .await
    .unwrap();
    assert_eq!(st.as_u16(), 200);
    let h = b.server.handshakes.summary();
    assert_eq!((h.full, h.tls12), (1, 1), "{h:?}");
    // A tool on a host still gets TLS 1.3 from the same server.
    let pki = Pki::open(&b.dir.path().join("pki")).unwrap();
    let operator = otarig_server::tls::device_client(&pki, "operator", 30, Client::Host).unwrap();
    request(b.server.addr, operator, "localhost", get("/healthz"))
        .await
        .unwrap();
    let h = b.server.handshakes.summary();
    assert_eq!((h.full, h.tls12), (2, 1), "{h:?}");

    // A TLS 1.3-only server: the board's handshake fails.
    let s = pki.server(&["localhost".into()], 30).unwrap();
    let only13 = server_config_with(
        &[&rustls::version::TLS13],
        &pki.chain_pem(&s),
        &s.key_pem,
        None,
    )
    .unwrap();
    let server = serve_tls(&b.dir.path().join("store13"), only13).await;
    let r = request(server.addr, b.board("dev-1"), "localhost", get("/healthz")).await;
    let e = r.expect_err("a TLS 1.3-only server served a stock board");
    // The words the simulator reports for `tls = "server-tls13-only"` (TlsFault::detail).
    assert!(
        format!("{e:#}").contains("received fatal alert: ProtocolVersion"),
        "{e:#}"
    );
}

/// A server requiring client certificates from `bundle` (a client CA file's text).
async fn serve_with(
    dir: &tempfile::TempDir,
    store: &str,
    server_pki: &Pki,
    bundle: String,
) -> Server {
    let s = server_pki.server(&["localhost".into()], 30).unwrap();
    let auth = ClientAuth {
        ca_pem: bundle,
        crl_pem: None,
    };
    let tls = server_config(&server_pki.chain_pem(&s), &s.key_pem, Some(&auth)).unwrap();
    serve_tls(&dir.path().join(store), tls).await
}

/// A board of `pki` presenting `cert_pem` (its certificate, or a chain).
fn board_presenting(pki: &Pki, cert_pem: &str, key_pem: &str) -> Arc<rustls::ClientConfig> {
    client_config(Client::Board, pki.root_pem(), Some((cert_pem, key_pem))).unwrap()
}

/// A device sends its certificate alone (`device.crt`); the server completes the chain from
/// the intermediate in its client CA file, and still takes a device that sends the chain.
#[tokio::test]
async fn a_device_certificate_sent_alone_chains_through_the_servers_intermediate() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::init(&dir.path().join("pki"), true, 30).unwrap();
    let d = pki.device("dev-1", 30).unwrap();
    let out = pki.write_device("dev-1", &d).unwrap();
    let sent = std::fs::read_to_string(out.join("device.crt")).unwrap();
    assert_eq!(sent.matches("BEGIN CERTIFICATE").count(), 1, "{sent}");
    let with_intermediate = serve_with(&dir, "bundle", &pki, pki.client_ca_pem()).await;
    let root_only = serve_with(&dir, "root", &pki, pki.root_pem().to_string()).await;
    let alone = board_presenting(&pki, &d.cert_pem, &d.key_pem);
    let chain = board_presenting(&pki, &pki.chain_pem(&d), &d.key_pem);
    for cfg in [&alone, &chain] {
        let (st, _) = request(
            with_intermediate.addr,
            cfg.clone(),
            "localhost",
            get("/healthz"),
        )
        .await
        .unwrap();
        assert_eq!(st.as_u16(), 200);
    }
    // Without the intermediate the server cannot build the chain: the handshake fails.
    request(root_only.addr, alone, "localhost", get("/healthz"))
        .await
        .expect_err("a certificate sent alone chained to a root-only CA file");
    let (st, _) = request(root_only.addr, chain, "localhost", get("/healthz"))
        .await
        .unwrap();
    assert_eq!(
        st.as_u16(),
        200,
        "a device sending the chain needs the root only"
    );
}

/// An intermediate in the client CA file is not trusted by itself: a chain through it must
/// still end at a root of that file, as with OpenSSL's `cafile`.
#[tokio::test]
async fn an_intermediate_in_the_client_ca_file_is_not_a_root() {
    let dir = tempfile::tempdir().unwrap();
    let ours = Pki::init(&dir.path().join("ours"), true, 30).unwrap();
    let other = Pki::init(&dir.path().join("other"), true, 30).unwrap();
    let other_intermediate =
        std::fs::read_to_string(dir.path().join("other/intermediate_cert.pem")).unwrap();
    let bundle = format!("{}{other_intermediate}", ours.client_ca_pem());
    let server = serve_with(&dir, "store", &ours, bundle).await;
    let d = other.device("dev-9", 30).unwrap();
    request(
        server.addr,
        board_presenting(&ours, &d.cert_pem, &d.key_pem),
        "localhost",
        get("/healthz"),
    )
    .await
    .expect_err("a device of another root was let in through its intermediate");
    let mine = ours.device("dev-1", 30).unwrap();
    let (st, _) = request(
        server.addr,
        board_presenting(&ours, &mine.cert_pem, &mine.key_pem),
        "localhost",
        get("/healthz"),
    )
    .await
    .unwrap();
    assert_eq!(st.as_u16(), 200, "our own device, sent alone");
}

#[test]
fn a_client_ca_file_without_a_root_is_refused_with_what_to_give() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::init(dir.path(), true, 30).unwrap();
    let s = pki.server(&["localhost".into()], 30).unwrap();
    let auth = ClientAuth {
        ca_pem: std::fs::read_to_string(dir.path().join("intermediate_cert.pem")).unwrap(),
        crl_pem: None,
    };
    let err = server_config(&pki.chain_pem(&s), &s.key_pem, Some(&auth))
        .expect_err("an intermediate alone accepted as the client CA");
    assert!(
        format!("{err:#}").contains("no root (self-signed)"),
        "{err:#}"
    );
}
