//! The firmware under test on a real ESP32-S3: the shared agent (`otarig-agent`) in an
//! esp-idf-svc shell. Everything the agent decides is the same code the simulator and the
//! virtual board run; this file only moves bytes between it and ESP-IDF:
//!
//! - console (UART0 or USB-Serial-JTAG): `@otarig` event lines out, `@otarig-cmd`
//!   provisioning in ([`otarig_agent::console`]); provisioning is kept in NVS;
//! - Wi-Fi station, MQTT (`EspMqttClient`), HTTP requests on one kept-alive connection
//!   ([`http`]), trusting the bench's CA (built in from `OTARIG_BENCH_CA`) when the server
//!   runs TLS;
//! - the agent's platform calls ([`platform`]) and timers.
//!
//! Built on a bench with `just fw-build` (Xtensa toolchain). On the host, `cargo test`
//! type-checks it against [`host_idf`], declarations with esp-idf-svc's and esp-idf-sys's
//! paths and signatures; the host binary does nothing.

// On the host only `main` below is built to run; the shell is there to be type-checked.
#![cfg_attr(not(target_os = "espidf"), allow(dead_code))]

mod http;
mod platform;

#[cfg(target_os = "espidf")]
use esp_idf_svc as idf;
#[cfg(not(target_os = "espidf"))]
#[allow(dead_code)]
mod host_idf;
#[cfg(not(target_os = "espidf"))]
use host_idf as idf;

use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::mpsc::{sync_channel, RecvTimeoutError, SyncSender};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use idf::eventloop::EspSystemEventLoop;
use idf::hal::prelude::Peripherals;
use idf::http::Method;
use idf::mqtt::client::{Details, EspMqttClient, EventPayload, MqttClientConfiguration, QoS};
use idf::nvs::{EspDefaultNvsPartition, EspNvs, NvsDefault};
use idf::sntp::EspSntp;
use idf::tls::X509;
use idf::wifi::{BlockingWifi, ClientConfiguration, Configuration, EspWifi};
use otarig_agent::chunk::ChunkKey;
use otarig_agent::cipher::ImageKeys;
use otarig_agent::console::{self, HostCommand};
use otarig_agent::manifest::{PublicKey, TrustedKey};
use otarig_agent::protocol::{self, Leaf};
use otarig_agent::{Action, Agent, Config, Event, FetchMode, Input};
use otarig_esp32s3::{body_window, read_line_capped, Clocks, Piece, Reassembly};

const DEVICE_TYPE: &str = "otarig-devkit-s3";
const PREFIX: &str = protocol::DEFAULT_PREFIX;
const TELEMETRY_MS: u64 = 1_000;
/// Messages in flight to the main loop at most: a fast network waits for the agent.
const QUEUE: usize = 16;
/// The bench CA (PEM) from `OTARIG_BENCH_CA` at build time; empty without TLS.
const BENCH_CA: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/bench_ca.pem"));

/// Put the bench CA in ESP-TLS's global store, which the HTTP and MQTT clients then trust.
fn install_bench_ca() -> Result<(), Box<dyn std::error::Error>> {
    if BENCH_CA.is_empty() {
        return Ok(());
    }
    let mut pem = BENCH_CA.to_vec();
    pem.push(0); // mbedTLS wants the PEM NUL-terminated, length included
                 // SAFETY: ESP-TLS copies the certificate; `pem` outlives the call.
    unsafe {
        idf::sys::esp!(idf::sys::esp_tls_init_global_ca_store())?;
        idf::sys::esp!(idf::sys::esp_tls_set_global_ca_store(
            pem.as_ptr(),
            pem.len() as u32
        ))?;
    }
    Ok(())
}

/// Keys compiled in (the public halves of fixtures/keys, TEST ONLY; `otarig keys export`).
fn trusted_keys() -> Vec<TrustedKey> {
    let mut keys = Vec::new();
    if let Ok(k) = PublicKey::ed25519(include_bytes!("../keys/ed25519-test.ed25519")) {
        keys.push(TrustedKey {
            id: "ed25519-test".into(),
            key: k,
        });
    }
    if let Ok(k) = PublicKey::rsa_pkcs1_der(include_bytes!("../keys/rsa-test.rsa.der")) {
        keys.push(TrustedKey {
            id: "rsa-test".into(),
            key: k,
        });
    }
    keys
}

/// The root key that signs key sets (key rotation) and the server's timestamp key, compiled in
/// like the release keys (TEST ONLY fixtures).
fn root_and_timestamp_keys() -> (Vec<TrustedKey>, Vec<TrustedKey>) {
    let one = |id: &str, raw: &[u8; 32]| {
        PublicKey::ed25519(raw)
            .map(|key| TrustedKey { id: id.into(), key })
            .into_iter()
            .collect()
    };
    (
        one(
            "ed25519-root",
            include_bytes!("../keys/ed25519-root.ed25519"),
        ),
        one(
            "ed25519-timestamp",
            include_bytes!("../keys/ed25519-timestamp.ed25519"),
        ),
    )
}

/// Everything that reaches the main loop.
enum Msg {
    Console(String),
    Connected,
    Publish(String, Vec<u8>),
    Manifest(Vec<u8>),
    /// The answer to fetch number `.0` (see [`CANCELLED`]).
    Body(u32, u32, Vec<u8>),
    BodyEnd(u32),
    /// The chunked protocol's answers (`/ota/check`, `/ota/chunk`) to fetch number `.0`.
    Session(u32, Vec<u8>),
    Chunk(u32, Vec<u8>),
    FetchFailed(u32, String),
}

/// Fetches the agent cancelled (`Action::CancelFetch`). A fetch thread remembers the count it
/// started under: once the count moves on it stops reading, which closes its connection, and
/// its messages still queued are dropped.
static CANCELLED: AtomicU32 = AtomicU32::new(0);

/// A manifest poll waits in the HTTP queue: another is not queued behind it (a broker that
/// keeps reconnecting while the server is unreachable would otherwise fill the queue).
static POLL_QUEUED: AtomicBool = AtomicBool::new(false);

/// Whether a fetch's answer still counts.
fn current(fetch: u32) -> bool {
    CANCELLED.load(Ordering::Relaxed) == fetch
}

/// Provisioning, as stored in NVS namespace `otarig` (by the console's `provision`, or by a
/// factory image from `otarig pki nvs`).
struct Provisioning {
    device: String,
    broker: String,
    server: String,
    channel: String,
    ssid: String,
    password: String,
    /// The fleet's root CA and this device's certificate and key, when provisioned.
    identity: Option<Identity>,
    /// Keys for encrypted releases (`image_aes`, `image_rsa`; `otarig pki nvs --image-key`).
    image_keys: ImageKeys,
    /// This board's chunk key (`chunk_key`; `otarig pki nvs --chunk-psk`): with one, the
    /// board fetches by the chunked protocol.
    chunk_key: Option<ChunkKey>,
}

/// What ESP-TLS needs for mutual TLS, as esp-mqtt and esp_http_client take it: the root that
/// verifies the server and broker (`cert_pem`), the device's certificate (`client_cert_pem`;
/// `otarig pki` provisions it alone, a chain works too) and key (`client_key_pem`).
#[derive(Clone, Copy)]
struct Identity {
    ca: X509<'static>,
    cert: X509<'static>,
    key: X509<'static>,
}

fn load(nvs: &EspNvs<NvsDefault>) -> Option<Provisioning> {
    let get = |k: &str| {
        // A PEM chain fits: NVS strings are at most 4000 bytes.
        let mut buf = vec![0u8; 4096];
        nvs.get_str(k, &mut buf).ok().flatten().map(str::to_string)
    };
    // Kept for the life of the firmware (ESP-TLS reads them at every handshake).
    let pem = |k: &str| -> Option<X509<'static>> {
        let c = std::ffi::CString::new(get(k)?).ok()?;
        Some(X509::pem(Box::leak(c.into_boxed_c_str())))
    };
    let identity = match (pem("ca_cert"), pem("device_crt"), pem("device_key")) {
        (Some(ca), Some(cert), Some(key)) => Some(Identity { ca, cert, key }),
        _ => None,
    };
    Some(Provisioning {
        device: get("device")?,
        broker: get("broker")?,
        server: get("server")?,
        channel: get("channel").unwrap_or_else(|| "stable".into()),
        ssid: get("ssid").unwrap_or_default(),
        password: get("password").unwrap_or_default(),
        identity,
        // Without keys in NVS, the TEST ONLY fixture keys the simulated boards hold, so the
        // encrypted scenarios run on a bench provisioned over the console.
        image_keys: image_keys(
            get("image_aes").or_else(|| Some(TEST_IMAGE_AES.trim().to_string())),
            get("image_rsa").or_else(|| Some(TEST_IMAGE_RSA.to_string())),
        ),
        chunk_key: get("chunk_key").and_then(|hex| {
            let key = ChunkKey::from_hex(&hex);
            if key.is_none() {
                log::error!("otarig: NVS chunk_key is not 64 hex digits; fetching by ranges");
            }
            key
        }),
    })
}

/// TEST ONLY image keys (fixtures/keys), as every simulated board holds them.
const TEST_IMAGE_AES: &str = include_str!("../../../fixtures/keys/aes-256-image.hex");
const TEST_IMAGE_RSA: &str = include_str!("../../../fixtures/keys/rsa-3072-image.pem");

/// The image keys from their NVS strings ([`ImageKeys::from_nvs`]); one that does not parse
/// is logged and left out. Decryption itself is the agent's RustCrypto code: AES and GHASH run
/// in software (the ESP32-S3's AES accelerator sits behind mbedTLS, which the agent does not
/// link).
fn image_keys(aes_hex: Option<String>, rsa_pem: Option<String>) -> ImageKeys {
    let (keys, ignored) = ImageKeys::from_nvs(aes_hex.as_deref(), rsa_pem.as_deref());
    for key in ignored {
        log::error!("otarig: NVS {key} does not parse; ignored");
    }
    keys
}

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

#[cfg(not(target_os = "espidf"))]
fn main() {
    eprintln!("the otarig firmware runs on an ESP32-S3: build it with `just fw-build`");
}

#[cfg(target_os = "espidf")]
fn main() {
    idf::sys::link_patches();
    idf::log::EspLogger::initialize_default();
    if cfg!(feature = "crash-on-boot") {
        // The variant that dies before any app code runs: the bootloader must roll it back.
        panic!("crash-on-boot variant");
    }
    if let Err(e) = run() {
        log::error!("otarig: {e}");
        std::thread::sleep(std::time::Duration::from_secs(5));
        // SAFETY: no arguments; does not return.
        unsafe { idf::sys::esp_restart() };
    }
}

fn run() -> Result<(), Box<dyn std::error::Error>> {
    let booted = Instant::now();
    let peripherals = Peripherals::take()?;
    let sysloop = EspSystemEventLoop::take()?;
    let nvs_part = EspDefaultNvsPartition::take()?;
    let nvs = EspNvs::new(nvs_part.clone(), "otarig", true)?;
    let prov = load(&nvs);
    let device = prov
        .as_ref()
        .map_or("unprovisioned".to_string(), |p| p.device.clone());

    let (tx, rx) = sync_channel::<Msg>(QUEUE);
    let console_tx = tx.clone();
    std::thread::Builder::new()
        .stack_size(8192)
        .spawn(move || {
            let mut stdin = std::io::stdin().lock();
            let mut line = Vec::new();
            while let Ok(true) = read_line_capped(&mut stdin, &mut line) {
                let text = String::from_utf8_lossy(&line).into_owned();
                if console_tx.send(Msg::Console(text)).is_err() {
                    break;
                }
            }
        })?;

    let mut cfg = Config::new(&device, DEVICE_TYPE, trusted_keys());
    (cfg.root_keys, cfg.timestamp_keys) = root_and_timestamp_keys();
    if let Some(p) = &prov {
        cfg.channel = p.channel.clone();
        cfg.image_keys = p.image_keys.clone();
        if let Some(key) = &p.chunk_key {
            cfg.fetch = FetchMode::Chunked(key.clone());
        }
    }
    let mut agent = Agent::new(cfg);
    let mut board = platform::EspPlatform::new()?;
    let now = || unix_ms();
    agent.handle(&mut board, now(), Input::Boot);

    // The network, once provisioned (a variant without it never gets there).
    let mut mqtt: Option<EspMqttClient<'static>> = None;
    let mut _wifi = None;
    let mut _sntp = None;
    if let (Some(p), false) = (&prov, cfg!(feature = "no-network")) {
        let mut wifi = BlockingWifi::wrap(
            EspWifi::new(peripherals.modem, sysloop.clone(), Some(nvs_part))?,
            sysloop,
        )?;
        wifi.set_configuration(&Configuration::Client(ClientConfiguration {
            ssid: p
                .ssid
                .as_str()
                .try_into()
                .map_err(|_| "SSID longer than 32 bytes")?,
            password: p
                .password
                .as_str()
                .try_into()
                .map_err(|_| "password longer than 64 bytes")?,
            ..Default::default()
        }))?;
        wifi.start()?;
        wifi.connect()?;
        wifi.wait_netif_up()?;
        _sntp = Some(EspSntp::new_default()?);
        install_bench_ca()?;
        _wifi = Some(wifi);
        let mqtt_tx = tx.clone();
        let id = p.identity;
        let conf = MqttClientConfiguration {
            client_id: Some(&p.device),
            use_global_ca_store: id.is_none() && !BENCH_CA.is_empty(),
            server_certificate: id.map(|i| i.ca),
            client_certificate: id.map(|i| i.cert),
            private_key: id.map(|i| i.key),
            ..Default::default()
        };
        let mut pieces = Reassembly::default();
        mqtt = Some(EspMqttClient::new_cb(
            &p.broker,
            &conf,
            move |ev| match ev.payload() {
                EventPayload::Connected(_) => {
                    let _ = mqtt_tx.send(Msg::Connected);
                }
                EventPayload::Received {
                    topic,
                    data,
                    details,
                    ..
                } => {
                    let piece = match details {
                        Details::Complete => Piece::Whole,
                        Details::InitialChunk(c) => Piece::First {
                            total: c.total_data_size,
                        },
                        Details::SubsequentChunk(c) => Piece::Next {
                            offset: c.current_data_offset,
                            total: c.total_data_size,
                        },
                    };
                    if let Some((t, whole)) = pieces.take(topic, data, piece) {
                        let _ = mqtt_tx.send(Msg::Publish(t, whole));
                    }
                }
                _ => {}
            },
        )?);
    }
    let net = Net {
        device: device.clone(),
        server: prov.as_ref().map(|p| p.server.clone()).unwrap_or_default(),
        channel: prov
            .as_ref()
            .map_or("stable".to_string(), |p| p.channel.clone()),
        chunked: prov.as_ref().is_some_and(|p| p.chunk_key.is_some()),
        http: http::Http::start(prov.as_ref().and_then(|p| p.identity), !BENCH_CA.is_empty())?,
    };

    let mut clocks = Clocks::new(now(), TELEMETRY_MS);
    // A message taken while the agent's timer was due waits for the next turn: the agent
    // gets one input per turn, and its actions are carried out in between.
    let mut held: Option<Msg> = None;
    loop {
        while let Some(action) = agent.poll_action() {
            act(action, &mut agent, &mut board, &mut mqtt, &net, &tx)?;
        }
        // `act` hands the agent's latest WakeAt over (it replaces any earlier one).
        if let Some(w) = WAKE.with(|c| c.take()) {
            clocks.wake = Some(w);
        }
        let msg = match held.take() {
            Some(m) => Some(m),
            None => match rx.recv_timeout(clocks.wait(now())) {
                Ok(m) => Some(m),
                Err(RecvTimeoutError::Timeout) => None,
                Err(RecvTimeoutError::Disconnected) => return Err("input channel closed".into()),
            },
        };
        let t = now();
        let due = clocks.due(t);
        if due.telemetry {
            if let Some(c) = mqtt.as_mut() {
                let up = booted.elapsed().as_millis() as u64;
                let sample = protocol::telemetry_json(&device, t, up, &agent.telemetry());
                let topic = protocol::device_topic(PREFIX, &device, Leaf::Telemetry);
                let _ = c.enqueue(&topic, QoS::AtMostOnce, false, sample.as_bytes());
            }
        }
        if due.timer {
            agent.handle(&mut board, t, Input::Timer);
            held = msg;
            continue;
        }
        match msg {
            None => {}
            Some(Msg::Console(line)) => match console::parse_command_line(&line) {
                None => {}
                Some(Err(e)) => print!(
                    "{}",
                    console::notice_line(&device, "console-error", &e.to_string())
                ),
                Some(Ok(HostCommand::Provision {
                    device: d,
                    broker,
                    server,
                    channel,
                    wifi_ssid,
                    wifi_password,
                })) => {
                    for (k, v) in [
                        ("device", d.as_str()),
                        ("broker", &broker),
                        ("server", &server),
                        ("channel", channel.as_deref().unwrap_or("stable")),
                        ("ssid", &wifi_ssid),
                        ("password", &wifi_password),
                    ] {
                        nvs.set_str(k, v)?;
                    }
                    print!(
                        "{}",
                        console::notice_line(&d, "provisioned", "stored; restarting")
                    );
                    // SAFETY: no arguments; does not return.
                    unsafe { idf::sys::esp_restart() };
                }
                // Read-only, from the console (physical access): no signed command needed.
                Some(Ok(HostCommand::Report)) => agent.report_status(),
                // SAFETY: no arguments; does not return.
                Some(Ok(HostCommand::Reboot)) => unsafe { idf::sys::esp_restart() },
            },
            Some(Msg::Connected) => {
                if let Some(c) = mqtt.as_mut() {
                    let ch = prov.as_ref().map_or("stable", |p| p.channel.as_str());
                    c.subscribe(
                        &protocol::release_topic(PREFIX, DEVICE_TYPE, ch),
                        QoS::AtLeastOnce,
                    )?;
                    c.subscribe(
                        &protocol::device_topic(PREFIX, &device, Leaf::Cmd),
                        QoS::AtLeastOnce,
                    )?;
                }
                agent.handle(&mut board, t, Input::Online);
            }
            Some(Msg::Publish(topic, data)) => {
                let input = if topic.ends_with("/cmd") {
                    // embedded-svc's `EventPayload::Received` does not carry the retain flag;
                    // a retained command redelivered at a reconnection is still refused, as
                    // `replayed`, by its id.
                    Input::Command {
                        payload: &data,
                        retained: false,
                    }
                } else {
                    Input::Announcement(&data)
                };
                agent.handle(&mut board, t, input);
            }
            Some(Msg::Manifest(m)) => agent.handle(&mut board, t, Input::Manifest(&m)),
            Some(
                Msg::Body(n, ..)
                | Msg::BodyEnd(n)
                | Msg::Session(n, _)
                | Msg::Chunk(n, _)
                | Msg::FetchFailed(n, _),
            ) if !current(n) => {}
            Some(Msg::Session(_, answer)) => agent.handle(&mut board, t, Input::Session(&answer)),
            Some(Msg::Chunk(_, frame)) => agent.handle(&mut board, t, Input::Chunk(&frame)),
            Some(Msg::Body(_, offset, data)) => agent.handle(
                &mut board,
                t,
                Input::Body {
                    offset,
                    data: &data,
                },
            ),
            Some(Msg::BodyEnd(_)) => agent.handle(&mut board, t, Input::BodyEnd),
            Some(Msg::FetchFailed(_, reason)) => {
                agent.handle(&mut board, t, Input::FetchFailed { reason: &reason })
            }
        }
    }
}

/// Where the board talks: its id, the firmware server, the channel it follows, and whether
/// it fetches by the chunked protocol.
struct Net {
    device: String,
    server: String,
    channel: String,
    chunked: bool,
    /// The boot's HTTP handle: every request to the server goes through it.
    http: http::Http,
}

thread_local! {
    /// The agent's last `WakeAt`, handed from `act` to the loop.
    static WAKE: core::cell::Cell<Option<u64>> = const { core::cell::Cell::new(None) };
}

fn act(
    action: Action,
    agent: &mut Agent,
    board: &mut platform::EspPlatform,
    mqtt: &mut Option<EspMqttClient<'static>>,
    net: &Net,
    tx: &SyncSender<Msg>,
) -> Result<(), Box<dyn std::error::Error>> {
    let t = unix_ms();
    let (device, server) = (net.device.as_str(), net.server.as_str());
    match action {
        Action::RunSelfTest => {
            // The application's own checks would go here; the variant fails on purpose.
            let passed = !cfg!(feature = "selftest-fail");
            let detail = if passed {
                "all checks passed"
            } else {
                "self-test reported failure"
            };
            agent.handle(board, t, Input::SelfTestDone { passed, detail });
        }
        Action::WakeAt(w) => WAKE.with(|c| c.set(Some(w))),
        Action::Reboot => {
            // SAFETY: no arguments; does not return.
            unsafe { idf::sys::esp_restart() };
        }
        Action::Report(e) => {
            if let (Event::Verified { sequence }, true) = (&e, net.chunked) {
                let body = format!(r#"{{"v":1,"device":"{device}","sequence":{sequence}}}"#);
                post_json(&net.http, format!("{server}/ota/verify"), body)?;
            }
            print!("{}", console::event_line(device, t, &e));
            if let Some(c) = mqtt.as_mut() {
                let topic = protocol::device_topic(PREFIX, device, Leaf::Status);
                let _ = c.enqueue(
                    &topic,
                    QoS::AtMostOnce,
                    false,
                    protocol::event_json(device, t, &e).to_string().as_bytes(),
                );
            }
        }
        Action::Ack(ack) => {
            print!("{}", console::ack_line(device, t, &ack));
            let body = protocol::ack_json(device, &ack).to_string();
            if let Some(c) = mqtt.as_mut() {
                let topic = protocol::device_topic(PREFIX, device, Leaf::Ack);
                let _ = c.enqueue(&topic, QoS::AtLeastOnce, false, body.as_bytes());
            }
            // The chunked protocol takes the ack as its `complete`.
            let leaf = if net.chunked { "ota/complete" } else { "ack" };
            post_json(&net.http, format!("{server}/{leaf}"), body)?;
        }
        Action::PollManifest => {
            let url = format!(
                "{server}/firmware/latest?deviceType={DEVICE_TYPE}&channel={}&deviceId={device}",
                net.channel
            );
            if !POLL_QUEUED.swap(true, Ordering::Relaxed) {
                let tx = tx.clone();
                net.http.queue(move |h| {
                    POLL_QUEUED.store(false, Ordering::Relaxed);
                    if let Ok(body) = exchange(h, Method::Get, &url, None, protocol::MAX_PAYLOAD) {
                        let _ = tx.send(Msg::Manifest(body));
                    }
                })?;
            }
        }
        Action::Fetch {
            sha256,
            url,
            offset,
            len,
            total,
        } => {
            let url =
                url.unwrap_or_else(|| format!("{server}/blobs/{}?deviceId={device}", hex(&sha256)));
            let range = format!("bytes={}-{}", offset, offset as u64 + len as u64 - 1);
            let tx = tx.clone();
            let n = CANCELLED.load(Ordering::Relaxed);
            net.http
                .queue(move |h| fetch(h, n, &url, &range, (offset, len, total), &tx))?;
        }
        Action::OpenSession {
            sequence,
            sha256,
            from,
            ..
        } => {
            let body = format!(
                r#"{{"v":1,"device":"{device}","sequence":{sequence},"sha256":"{}","from":{from}}}"#,
                hex(&sha256)
            );
            let url = format!("{server}/ota/check");
            chunked(
                &net.http,
                url,
                Some(body),
                protocol::MAX_PAYLOAD,
                Msg::Session,
                tx,
            )?;
        }
        Action::FetchChunk { session, index } => {
            let url = format!(
                "{server}/ota/chunk?device={device}&session={}&n={index}",
                hex(&session)
            );
            chunked(
                &net.http,
                url,
                None,
                otarig_agent::chunk::MAX_FRAME,
                Msg::Chunk,
                tx,
            )?;
        }
        Action::CancelFetch => {
            CANCELLED.fetch_add(1, Ordering::Relaxed);
        }
    }
    Ok(())
}

/// Lower-case hex, as the server names blobs and sessions.
fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// `POST url` with a JSON body, queued on the HTTP handle; the answer is not waited for.
fn post_json(http: &http::Http, url: String, body: String) -> std::io::Result<()> {
    http.queue(move |h| {
        let _ = exchange(h, Method::Post, &url, Some(body.as_bytes()), 0);
    })
}

/// One request of the chunked protocol (a POST when it has a body), queued on the HTTP handle:
/// its whole answer, at most `limit` bytes (the board's buffer), reaches the agent as `wrap`
/// makes it, under the current fetch number; anything else as a failed fetch.
fn chunked(
    http: &http::Http,
    url: String,
    body: Option<String>,
    limit: usize,
    wrap: fn(u32, Vec<u8>) -> Msg,
    tx: &SyncSender<Msg>,
) -> std::io::Result<()> {
    let (tx, n) = (tx.clone(), CANCELLED.load(Ordering::Relaxed));
    let method = if body.is_some() {
        Method::Post
    } else {
        Method::Get
    };
    http.queue(move |h| {
        let msg = match exchange(h, method, &url, body.as_deref().map(str::as_bytes), limit) {
            Ok(answer) => wrap(n, answer),
            Err(e) => Msg::FetchFailed(n, e),
        };
        let _ = tx.send(msg);
    })
}

/// A whole exchange with a short answer: the body (JSON when there is one) is sent, and a
/// success (2xx) answer of at most `limit` bytes is returned; anything else is an error that
/// says what came.
fn exchange(
    h: &mut http::Handle,
    method: Method,
    url: &str,
    body: Option<&[u8]>,
    limit: usize,
) -> Result<Vec<u8>, String> {
    let len = body.map_or(0, <[u8]>::len).to_string();
    let headers = [
        ("Content-Type", "application/json"),
        ("Content-Length", len.as_str()),
    ];
    let headers = if body.is_some() { &headers[..] } else { &[] };
    let mut answer = Vec::new();
    let req = http::Request {
        method,
        url,
        headers,
        body,
    };
    let status = h.request(req, &mut |_, piece| {
        answer.extend_from_slice(piece);
        answer.len() <= limit
    })?;
    match status {
        200..=299 if answer.len() <= limit => Ok(answer),
        200..=299 => Err(format!("answer over {limit} bytes: refused")),
        s => Err(format!("HTTP {s}")),
    }
}

/// One range of a blob into the agent. A `206` body is the range; a `200` means the server
/// ignored `Range`, so the body is the whole blob from byte 0 and is fed from there (the agent
/// takes what it needs by offset). A body that runs past what it can hold (the range, or the
/// blob's `total` size) is endless data: it is cut off and the request counts as failed.
/// `n` is the fetch's number ([`CANCELLED`]); `window` its offset, length and the blob's size.
fn fetch(
    h: &mut http::Handle,
    n: u32,
    url: &str,
    range: &str,
    window: (u32, u32, u32),
    tx: &SyncSender<Msg>,
) {
    if !current(n) {
        return; // cancelled while it waited for its turn on the connection
    }
    let (offset, len, total) = window;
    let mut pos = None;
    let mut overran = None;
    let req = http::Request {
        method: Method::Get,
        url,
        headers: &[("Range", range)],
        body: None,
    };
    let status = h.request(req, &mut |status, chunk| {
        if !current(n) {
            return false; // cancelled: stop reading, the connection closes
        }
        let (start, end) = body_window(status, offset, len, total);
        let at = *pos.get_or_insert(start);
        if at + chunk.len() as u64 > end {
            overran = Some(end);
            return false;
        }
        pos = Some(at + chunk.len() as u64);
        tx.send(Msg::Body(n, at as u32, chunk.to_vec())).is_ok()
    });
    let _ = tx.send(match (status, overran) {
        (Ok(_), Some(end)) => Msg::FetchFailed(
            n,
            format!("the answer ran past byte {end} of the blob (endless data): cut off"),
        ),
        (Ok(200 | 206), None) => Msg::BodyEnd(n),
        (Ok(s), None) => Msg::FetchFailed(n, format!("HTTP {s}")),
        (Err(e), _) => Msg::FetchFailed(n, e),
    });
}
