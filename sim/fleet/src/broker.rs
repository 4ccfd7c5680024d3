//! The embedded MQTT broker (rumqttd), started by the code that needs it, on a free loopback
//! port, and declared started only once a real client got a CONNACK from it.
//!
//! rumqttd pitfalls handled here (see NOTES): `Broker::start` blocks forever, so it runs on a
//! thread of its own; `RouterConfig::default()` allows zero connections; a port already in use
//! makes `start` log an error and return `Ok`, so a free port is picked, then verified by an
//! MQTT handshake. rumqttd has no shutdown: the broker lives until the process ends.
//!
//! Only authenticated clients get in ([`BrokerAuth`]): rumqttd checks credentials while it reads
//! CONNECT, before the client takes a router slot, so no number of strangers can fill the
//! connection cap or reach the cap's panic (rumqtt #991) and the mutex it poisons (#1062).

use std::collections::HashMap;
use std::net::{SocketAddr, TcpListener};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use hmac::{Hmac, Mac};
use rumqttd::{Config, ConnectionSettings, RouterConfig, ServerSettings};
use sha2::Sha256;
use subtle::ConstantTimeEq;

/// Largest MQTT packet the broker accepts: manifests and events are a few KiB.
pub const MAX_PACKET: usize = 64 * 1024;

/// A running embedded broker.
#[derive(Debug, Clone)]
pub struct EmbeddedBroker {
    pub addr: SocketAddr,
    /// The credentials every client must present.
    pub auth: BrokerAuth,
}

/// Who may connect: a per-broker secret from which each client's password derives
/// (HMAC-SHA256 of the client id under the secret). The username must equal the client id,
/// so one board's credentials never connect as another board and take its session over.
#[derive(Clone)]
pub struct BrokerAuth {
    secret: [u8; 32],
}

impl std::fmt::Debug for BrokerAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("BrokerAuth { secret: <hidden> }")
    }
}

impl BrokerAuth {
    /// A fresh secret from the operating system's generator.
    pub fn random() -> BrokerAuth {
        use rand::RngCore;
        let mut secret = [0u8; 32];
        rand::rngs::OsRng.fill_bytes(&mut secret);
        BrokerAuth { secret }
    }

    /// The password of client `id`.
    pub fn password(&self, id: &str) -> String {
        hex::encode(self.mac(id))
    }

    fn mac(&self, id: &str) -> [u8; 32] {
        // A 32-byte key is always a valid HMAC key.
        let mut m = <Hmac<Sha256> as Mac>::new_from_slice(&self.secret)
            .unwrap_or_else(|_| unreachable!("HMAC takes keys of any length"));
        m.update(b"otarig/mqtt-password/v1\0");
        m.update(id.as_bytes());
        m.finalize().into_bytes().into()
    }

    /// Whether a CONNECT with these fields may proceed.
    pub fn accepts(&self, client_id: &str, user: &str, pass: &str) -> bool {
        let mut given = [0u8; 32];
        let valid_hex = hex::decode_to_slice(pass, &mut given).is_ok();
        let right: bool = self.mac(user)[..].ct_eq(&given[..]).into();
        client_id == user && valid_hex && right
    }

    /// Present client `id`'s credentials on a connection.
    pub fn apply(&self, o: &mut rumqttc::MqttOptions, id: &str) {
        o.set_credentials(id, self.password(id));
    }

    fn handler(&self) -> rumqttd::AuthHandler {
        let auth = self.clone();
        std::sync::Arc::new(move |client_id, user, pass| {
            let ok = auth.accepts(&client_id, &user, &pass);
            if !ok {
                tracing::debug!(client_id, user, "MQTT connection refused: bad credentials");
            }
            Box::pin(std::future::ready(ok))
        })
    }
}

/// How a client logs in to a broker.
#[derive(Clone, Debug)]
pub enum Login {
    /// The embedded broker: each client's own password, derived from the broker's secret.
    Derived(BrokerAuth),
    /// Credentials from the broker's URL (`mqtt://user:pass@host:port`), the same for every
    /// client of this process (a bench's board gets its own URL).
    Fixed {
        user: String,
        pass: String,
    },
    Anonymous,
    /// Mutual TLS (Mosquitto): a board presents its own device certificate, found by its
    /// client id; the harness's own clients (the operator) present the operator's.
    Certificates {
        devices:
            std::sync::Arc<std::collections::HashMap<String, std::sync::Arc<rustls::ClientConfig>>>,
        operator: std::sync::Arc<rustls::ClientConfig>,
    },
}

/// Where a broker is and how to log in to it.
#[derive(Clone, Debug)]
pub struct BrokerEndpoint {
    pub host: String,
    pub port: u16,
    pub login: Login,
}

impl BrokerEndpoint {
    /// `mqtt://[user:pass@]HOST[:PORT]` (or `tcp://`, or bare `HOST[:PORT]`; port 1883 when
    /// left out), or `mqtts://HOST[:PORT]` (port 8883; the login is then the client's
    /// certificate, which the caller sets: [`Login::Certificates`]).
    pub fn parse(url: &str) -> Result<BrokerEndpoint, String> {
        let default_port = if url.starts_with("mqtts://") {
            "8883"
        } else {
            "1883"
        };
        let rest = url
            .strip_prefix("mqtt://")
            .or_else(|| url.strip_prefix("mqtts://"))
            .or_else(|| url.strip_prefix("tcp://"))
            .unwrap_or(url)
            .trim_end_matches('/');
        let (login, hostport) = match rest.rsplit_once('@') {
            Some((userinfo, hostport)) => {
                let (user, pass) = userinfo.split_once(':').unwrap_or((userinfo, ""));
                let login = Login::Fixed {
                    user: user.to_string(),
                    pass: pass.to_string(),
                };
                (login, hostport)
            }
            None => (Login::Anonymous, rest),
        };
        let (host, port) = hostport
            .rsplit_once(':')
            .unwrap_or((hostport, default_port));
        let port = port
            .parse()
            .map_err(|_| format!("broker URL '{url}': port '{port}' is not a number"))?;
        if host.is_empty() {
            return Err(format!(
                "broker URL '{url}' has no host (expected mqtt://HOST:PORT)"
            ));
        }
        Ok(BrokerEndpoint {
            host: host.to_string(),
            port,
            login,
        })
    }

    /// Connection options for client `id`, with its credentials.
    pub fn options(&self, id: &str) -> rumqttc::MqttOptions {
        let mut o = rumqttc::MqttOptions::new(id, self.host.clone(), self.port);
        match &self.login {
            Login::Derived(auth) => auth.apply(&mut o, id),
            Login::Fixed { user, pass } => {
                o.set_credentials(user.clone(), pass.clone());
            }
            Login::Anonymous => {}
            Login::Certificates { devices, operator } => {
                let tls = devices.get(id).unwrap_or(operator).clone();
                o.set_transport(rumqttc::Transport::tls_with_config(
                    rumqttc::TlsConfiguration::Rustls(tls),
                ));
            }
        }
        o
    }

    /// The URL a board is provisioned with: its own credentials in it, as esp-mqtt reads
    /// them from `broker.address.uri`.
    pub fn url_for(&self, id: &str) -> String {
        let (host, port) = (&self.host, self.port);
        match &self.login {
            Login::Derived(auth) => format!("mqtt://{id}:{}@{host}:{port}", auth.password(id)),
            Login::Fixed { user, pass } => format!("mqtt://{user}:{pass}@{host}:{port}"),
            Login::Anonymous => format!("mqtt://{host}:{port}"),
            Login::Certificates { .. } => format!("mqtts://{host}:{port}"),
        }
    }
}

fn config(addr: SocketAddr, max_connections: usize, auth: &BrokerAuth) -> Config {
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
            external_auth: Some(auth.handler()),
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

/// Connect with a throwaway client (credentials from `auth`, if the broker wants them) and
/// wait for the broker's CONNACK.
pub fn handshake(
    addr: SocketAddr,
    auth: Option<&BrokerAuth>,
    within: Duration,
) -> anyhow::Result<()> {
    let started = Instant::now();
    let id = format!("otarig-probe-{}", addr.port());
    let mut opts = rumqttc::MqttOptions::new(id.clone(), addr.ip().to_string(), addr.port());
    opts.set_keep_alive(Duration::from_secs(5));
    if let Some(auth) = auth {
        auth.apply(&mut opts, &id);
    }
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
    /// Start a broker on a free loopback port for up to `max_connections` clients (it keeps
    /// room for 8 more: operator, probes, a board reconnecting before its old session ends).
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
            let auth = BrokerAuth::random();
            let cfg = config(addr, max_connections + 8, &auth);
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
            let probe_auth = auth.clone();
            let probe = std::thread::spawn(move || {
                handshake(addr, Some(&probe_auth), Duration::from_secs(5))
            });
            let result = probe
                .join()
                .map_err(|_| anyhow::anyhow!("the broker probe panicked"))?;
            match result {
                Ok(()) => {
                    tracing::info!("embedded MQTT broker listening on {addr}");
                    return Ok(EmbeddedBroker { addr, auth });
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

    /// This broker as clients reach it, logging in with their derived passwords.
    pub fn endpoint(&self) -> BrokerEndpoint {
        BrokerEndpoint {
            host: self.addr.ip().to_string(),
            port: self.addr.port(),
            login: Login::Derived(self.auth.clone()),
        }
    }
}
