//! The firmware under test on a real ESP32-S3: the shared agent (`otarig-agent`) in an
//! esp-idf-svc shell. Everything the agent decides is the same code the simulator and the
//! virtual board run; this file only moves bytes between it and ESP-IDF:
//!
//! - console (UART0 or USB-Serial-JTAG): `@otarig` event lines out, `@otarig-cmd`
//!   provisioning in ([`otarig_agent::console`]); provisioning is kept in NVS;
//! - Wi-Fi station, MQTT (`EspMqttClient`), HTTP range requests (`EspHttpConnection`), trusting
//!   the bench's CA (built in from `OTARIG_BENCH_CA`) when the server runs TLS;
//! - the agent's platform calls ([`platform`]) and timers.
//!
//! Not compiled in this repository's CI (no Xtensa toolchain there); built on a bench with
//! `just fw-build`.

mod platform;

use std::sync::mpsc::{channel, RecvTimeoutError, Sender};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use esp_idf_svc::eventloop::EspSystemEventLoop;
use esp_idf_svc::hal::prelude::Peripherals;
use esp_idf_svc::http::client::{Configuration as HttpConfig, EspHttpConnection};
use esp_idf_svc::http::Method;
use esp_idf_svc::mqtt::client::{EspMqttClient, EventPayload, MqttClientConfiguration, QoS};
use esp_idf_svc::nvs::{EspDefaultNvsPartition, EspNvs, NvsDefault};
use esp_idf_svc::sntp::EspSntp;
use esp_idf_svc::wifi::{BlockingWifi, ClientConfiguration, Configuration, EspWifi};
use otarig_agent::console::{self, HostCommand};
use otarig_agent::manifest::{PublicKey, TrustedKey};
use otarig_agent::protocol::{self, Leaf};
use otarig_agent::{Action, Agent, Config, Input};

const DEVICE_TYPE: &str = "otarig-devkit-s3";
const PREFIX: &str = protocol::DEFAULT_PREFIX;
const TELEMETRY_MS: u64 = 1_000;
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
        esp_idf_svc::sys::esp!(esp_idf_svc::sys::esp_tls_init_global_ca_store())?;
        esp_idf_svc::sys::esp!(esp_idf_svc::sys::esp_tls_set_global_ca_store(
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

/// Everything that reaches the main loop.
enum Msg {
    Console(String),
    Connected,
    Publish(String, Vec<u8>),
    Manifest(Vec<u8>),
    Body(u32, Vec<u8>),
    BodyEnd,
    FetchFailed(String),
}

/// Provisioning, as stored in NVS namespace `otarig`.
struct Provisioning {
    device: String,
    broker: String,
    server: String,
    channel: String,
    ssid: String,
    password: String,
}

fn load(nvs: &EspNvs<NvsDefault>) -> Option<Provisioning> {
    let get = |k: &str| {
        let mut buf = [0u8; 256];
        nvs.get_str(k, &mut buf).ok().flatten().map(str::to_string)
    };
    Some(Provisioning {
        device: get("device")?,
        broker: get("broker")?,
        server: get("server")?,
        channel: get("channel").unwrap_or_else(|| "stable".into()),
        ssid: get("ssid").unwrap_or_default(),
        password: get("password").unwrap_or_default(),
    })
}

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

fn main() {
    esp_idf_svc::sys::link_patches();
    esp_idf_svc::log::EspLogger::initialize_default();
    if cfg!(feature = "crash-on-boot") {
        // The variant that dies before any app code runs: the bootloader must roll it back.
        panic!("crash-on-boot variant");
    }
    if let Err(e) = run() {
        log::error!("otarig: {e}");
        std::thread::sleep(Duration::from_secs(5));
        // SAFETY: no arguments; does not return.
        unsafe { esp_idf_svc::sys::esp_restart() };
    }
}

fn run() -> Result<(), Box<dyn std::error::Error>> {
    let booted = Instant::now();
    let peripherals = Peripherals::take()?;
    let sysloop = EspSystemEventLoop::take()?;
    let nvs_part = EspDefaultNvsPartition::take()?;
    let mut nvs = EspNvs::new(nvs_part.clone(), "otarig", true)?;
    let prov = load(&nvs);
    let device = prov
        .as_ref()
        .map_or("unprovisioned".to_string(), |p| p.device.clone());

    let (tx, rx) = channel::<Msg>();
    let console_tx = tx.clone();
    std::thread::Builder::new()
        .stack_size(8192)
        .spawn(move || {
            let stdin = std::io::stdin();
            let mut line = String::new();
            while stdin.read_line(&mut line).is_ok() {
                let _ = console_tx.send(Msg::Console(std::mem::take(&mut line)));
            }
        })?;

    let mut cfg = Config::new(&device, DEVICE_TYPE, trusted_keys());
    if let Some(p) = &prov {
        cfg.channel = p.channel.clone();
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
        let conf = MqttClientConfiguration {
            client_id: Some(&p.device),
            use_global_ca_store: !BENCH_CA.is_empty(),
            ..Default::default()
        };
        mqtt = Some(EspMqttClient::new_cb(
            &p.broker,
            &conf,
            move |ev| match ev.payload() {
                EventPayload::Connected(_) => {
                    let _ = mqtt_tx.send(Msg::Connected);
                }
                EventPayload::Received {
                    topic: Some(t),
                    data,
                    ..
                } => {
                    let _ = mqtt_tx.send(Msg::Publish(t.to_string(), data.to_vec()));
                }
                _ => {}
            },
        )?);
    }
    let server = prov.as_ref().map(|p| p.server.clone()).unwrap_or_default();

    let mut wake: Option<u64> = None;
    let mut next_telemetry = now() + TELEMETRY_MS;
    loop {
        while let Some(action) = agent.poll_action() {
            act(
                action, &mut agent, &mut board, &mut mqtt, &device, &server, &tx,
            )?;
        }
        // `act` hands the agent's latest WakeAt over (it replaces any earlier one).
        if let Some(w) = WAKE.with(|c| c.take()) {
            wake = Some(w);
        }
        let until = wake.unwrap_or(u64::MAX).min(next_telemetry);
        let wait = Duration::from_millis(until.saturating_sub(now()).min(60_000));
        let msg = match rx.recv_timeout(wait) {
            Ok(m) => Some(m),
            Err(RecvTimeoutError::Timeout) => None,
            Err(RecvTimeoutError::Disconnected) => return Err("input channel closed".into()),
        };
        let t = now();
        match msg {
            None => {
                if t >= next_telemetry {
                    next_telemetry = t + TELEMETRY_MS;
                    if let Some(c) = mqtt.as_mut() {
                        let up = booted.elapsed().as_millis() as u64;
                        let sample = protocol::telemetry_json(&device, t, up, &agent.telemetry());
                        let topic = protocol::device_topic(PREFIX, &device, Leaf::Telemetry);
                        let _ = c.enqueue(
                            &topic,
                            QoS::AtMostOnce,
                            false,
                            sample.to_string().as_bytes(),
                        );
                    }
                }
                if wake.is_some_and(|w| t >= w) {
                    wake = None;
                    agent.handle(&mut board, t, Input::Timer);
                }
            }
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
                    unsafe { esp_idf_svc::sys::esp_restart() };
                }
                Some(Ok(HostCommand::Report)) => {
                    let cmd = protocol::command("console", protocol::CommandKind::Report);
                    agent.handle(&mut board, t, Input::Command(cmd.as_bytes()));
                }
                // SAFETY: no arguments; does not return.
                Some(Ok(HostCommand::Reboot)) => unsafe { esp_idf_svc::sys::esp_restart() },
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
                    Input::Command(&data)
                } else {
                    Input::Announcement(&data)
                };
                agent.handle(&mut board, t, input);
            }
            Some(Msg::Manifest(m)) => agent.handle(&mut board, t, Input::Manifest(&m)),
            Some(Msg::Body(offset, data)) => agent.handle(
                &mut board,
                t,
                Input::Body {
                    offset,
                    data: &data,
                },
            ),
            Some(Msg::BodyEnd) => agent.handle(&mut board, t, Input::BodyEnd),
            Some(Msg::FetchFailed(reason)) => {
                agent.handle(&mut board, t, Input::FetchFailed { reason: &reason })
            }
        }
    }
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
    device: &str,
    server: &str,
    tx: &Sender<Msg>,
) -> Result<(), Box<dyn std::error::Error>> {
    let t = unix_ms();
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
            unsafe { esp_idf_svc::sys::esp_restart() };
        }
        Action::Report(e) => {
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
            let url = format!("{server}/ack");
            std::thread::Builder::new()
                .stack_size(12 * 1024)
                .spawn(move || {
                    let len = body.len().to_string();
                    let headers = [
                        ("Content-Type", "application/json"),
                        ("Content-Length", len.as_str()),
                    ];
                    let _ = http(
                        Method::Post,
                        &url,
                        &headers,
                        Some(body.as_bytes()),
                        &mut |_| true,
                    );
                })?;
        }
        Action::PollManifest => {
            let url =
                format!("{server}/firmware/latest?deviceType={DEVICE_TYPE}&deviceId={device}");
            let tx = tx.clone();
            std::thread::Builder::new()
                .stack_size(12 * 1024)
                .spawn(move || {
                    let mut body = Vec::new();
                    if http(Method::Get, &url, &[], None, &mut |chunk| {
                        body.extend_from_slice(chunk);
                        body.len() <= protocol::MAX_PAYLOAD
                    }) == Ok(200)
                    {
                        let _ = tx.send(Msg::Manifest(body));
                    }
                })?;
        }
        Action::Fetch {
            sha256,
            url,
            offset,
            len,
        } => {
            let hex: String = sha256.iter().map(|b| format!("{b:02x}")).collect();
            let url = url.unwrap_or_else(|| format!("{server}/blobs/{hex}?deviceId={device}"));
            let range = format!("bytes={}-{}", offset, offset as u64 + len as u64 - 1);
            let tx = tx.clone();
            std::thread::Builder::new()
                .stack_size(12 * 1024)
                .spawn(move || {
                    let mut pos = offset;
                    let status = http(
                        Method::Get,
                        &url,
                        &[("Range", &range)],
                        None,
                        &mut |chunk| {
                            let ok = tx.send(Msg::Body(pos, chunk.to_vec())).is_ok();
                            pos += chunk.len() as u32;
                            ok
                        },
                    );
                    let _ = tx.send(match status {
                        Ok(200 | 206) => Msg::BodyEnd,
                        Ok(s) => Msg::FetchFailed(format!("HTTP {s}")),
                        Err(e) => Msg::FetchFailed(e),
                    });
                })?;
        }
    }
    Ok(())
}

/// One HTTP exchange with esp_http_client; `sink` gets the body in 4 KiB pieces and may stop
/// it. Returns the status. A 200 to a range request means the server ignored Range: the
/// agent restarts from byte 0 (it checks offsets).
fn http(
    method: Method,
    url: &str,
    headers: &[(&str, &str)],
    body: Option<&[u8]>,
    sink: &mut dyn FnMut(&[u8]) -> bool,
) -> Result<u16, String> {
    let mut conn = EspHttpConnection::new(&HttpConfig {
        timeout: Some(Duration::from_secs(30)),
        buffer_size: Some(4096),
        use_global_ca_store: !BENCH_CA.is_empty(),
        ..Default::default()
    })
    .map_err(|e| e.to_string())?;
    conn.initiate_request(method, url, headers)
        .map_err(|e| e.to_string())?;
    if let Some(b) = body {
        use esp_idf_svc::io::Write;
        conn.write_all(b).map_err(|e| e.to_string())?;
    }
    conn.initiate_response().map_err(|e| e.to_string())?;
    let status = conn.status();
    let mut buf = [0u8; 4096];
    loop {
        match conn.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                if !sink(&buf[..n]) {
                    break;
                }
            }
            Err(e) => return Err(format!("body ended: {e}")),
        }
    }
    Ok(status)
}
