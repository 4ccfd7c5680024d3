//! The embedded MQTT broker (rumqttd), started by the code that needs it, on a free loopback
//! port, and declared started only once a real client got a CONNACK from it.
//!
//! rumqttd pitfalls handled here (see NOTES): `Broker::start` blocks forever, so it runs on a
//! thread of its own; `RouterConfig::default()` allows zero connections; a port already in use
//! makes `start` log an error and return `Ok`, so a free port is picked, then verified by an
//! MQTT handshake. rumqttd has no shutdown: the broker lives until the process ends.

use std::collections::HashMap;
use std::net::{SocketAddr, TcpListener};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use rumqttd::{Config, ConnectionSettings, RouterConfig, ServerSettings};

/// Largest MQTT packet the broker accepts: manifests and events are a few KiB.
pub const MAX_PACKET: usize = 64 * 1024;

/// A running embedded broker.
#[derive(Debug, Clone)]
pub struct EmbeddedBroker {
    pub addr: SocketAddr,
}

fn config(addr: SocketAddr, max_connections: usize) -> Config {
    let server = ServerSettings {
        name: "v4-loopback".into(),
        listen: addr,
        tls: None,
        next_connection_delay_ms: 0,
        connections: ConnectionSettings {
            connection_timeout_ms: 60_000,
            max_payload_size: MAX_PACKET,
            max_inflight_count: 256,
            auth: None,
            external_auth: None,
            dynamic_filters: true,
        },
    };
    Config {
        id: 0,
        router: RouterConfig {
            max_connections,
            max_outgoing_packet_count: 512,
            max_segment_size: 16 * 1024 * 1024,
            max_segment_count: 8,
            custom_segment: None,
            initialized_filters: None,
            shared_subscriptions_strategy: Default::default(),
        },
        v4: Some(HashMap::from([("v4-loopback".to_string(), server)])),
        v5: None,
        ws: None,
        cluster: None,
        console: None,
        bridge: None,
        prometheus: None,
        metrics: None,
    }
}

fn free_port(ip: std::net::IpAddr) -> anyhow::Result<SocketAddr> {
    let l = TcpListener::bind(SocketAddr::new(ip, 0))
        .with_context(|| format!("finding a free port on {ip}"))?;
    Ok(l.local_addr()?)
}

/// Connect with a throwaway client and wait for the broker's CONNACK.
pub fn handshake(addr: SocketAddr, within: Duration) -> anyhow::Result<()> {
    let started = Instant::now();
    let mut opts = rumqttc::MqttOptions::new(
        format!("otarig-probe-{}", addr.port()),
        addr.ip().to_string(),
        addr.port(),
    );
    opts.set_keep_alive(Duration::from_secs(5));
    let (client, mut conn) = rumqttc::Client::new(opts, 4);
    while started.elapsed() < within {
        match conn.recv_timeout(Duration::from_millis(200)) {
            Ok(Ok(rumqttc::Event::Incoming(rumqttc::Packet::ConnAck(_)))) => {
                let _ = client.disconnect();
                return Ok(());
            }
            Ok(Ok(_)) | Err(_) => {}
            Ok(Err(_)) => std::thread::sleep(Duration::from_millis(50)),
        }
    }
    bail!("no MQTT CONNACK from {addr} within {within:?}")
}

impl EmbeddedBroker {
    /// Start a broker on a free loopback port for up to `max_connections` clients.
    pub fn start(max_connections: usize) -> anyhow::Result<EmbeddedBroker> {
        Self::start_on(std::net::Ipv4Addr::LOCALHOST.into(), max_connections)
    }

    /// Start a broker on a free port of `ip` (a bench PC's LAN address, for a real board).
    pub fn start_on(
        ip: std::net::IpAddr,
        max_connections: usize,
    ) -> anyhow::Result<EmbeddedBroker> {
        let mut last = None;
        for _ in 0..5 {
            let addr = free_port(ip)?;
            let cfg = config(addr, max_connections + 8);
            std::thread::Builder::new()
                .name(format!("mqtt-broker-{}", addr.port()))
                .spawn(move || {
                    let mut broker = rumqttd::Broker::new(cfg);
                    if let Err(e) = broker.start() {
                        tracing::error!("embedded MQTT broker on {addr} stopped: {e}");
                    }
                })
                .context("starting the broker thread")?;
            // On a thread of its own: rumqttc's blocking client runs its own runtime, which
            // cannot start inside a caller's tokio runtime.
            let probe = std::thread::spawn(move || handshake(addr, Duration::from_secs(5)));
            let result = probe
                .join()
                .map_err(|_| anyhow::anyhow!("the broker probe panicked"))?;
            match result {
                Ok(()) => {
                    tracing::info!("embedded MQTT broker listening on {addr}");
                    return Ok(EmbeddedBroker { addr });
                }
                // Another process took the port between our check and the broker's bind.
                Err(e) => last = Some(e),
            }
        }
        Err(last.unwrap_or_else(|| anyhow::anyhow!("no attempt made"))).context(
            "the embedded MQTT broker did not come up on a free loopback port after 5 tries",
        )
    }

    pub fn url(&self) -> String {
        format!("mqtt://{}", self.addr)
    }
}
