//! Mosquitto, started from `PATH` on a free loopback port: plain (the scale benchmark's broker)
//! or with mutual TLS and per-device access rules, which the embedded rumqttd cannot enforce.
//!
//! rumqttd 0.20 verifies client certificates, but takes a client's identity from the
//! certificate's Organization (never its CN) and has no access control besides a
//! `/tenants/<O>/` topic prefix: it cannot keep board A from publishing as board B. Mosquitto
//! can: `require_certificate` + `use_identity_as_username` make the CN the username, and
//! `pattern` lines in an ACL file give each device its own topics only.

use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use otarig_agent::protocol::{Leaf, DEFAULT_PREFIX};

const LOOPBACK: std::net::IpAddr = std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST);

/// The CN of the operator's certificate: the one client allowed on every topic (release
/// announcements, commands, reading what boards report).
pub const OPERATOR_CN: &str = "otarig-operator";

/// Mutual TLS for a Mosquitto listener, from `otarig pki` files.
#[derive(Clone, Debug)]
pub struct MutualTls {
    /// The CAs (PEM file) clients' certificates must chain to: the root and the intermediate
    /// (`client_ca.pem`), since a device sends its certificate alone.
    pub cafile: PathBuf,
    /// The broker's chain and key (`server/server_chain.pem`, `server/server.key`).
    pub certfile: PathBuf,
    pub keyfile: PathBuf,
    /// Revoked client certificates (`crl.pem`), if any.
    pub crlfile: Option<PathBuf>,
}

impl MutualTls {
    /// The files of an `otarig pki` directory: its CA bundle (`client_ca.pem`, written by
    /// [`otarig_server::pki::Pki::open`] or [`otarig_server::pki::write_client_ca`]), its
    /// server certificate and key, and its CRL when something was revoked.
    pub fn of_pki(dir: &Path) -> MutualTls {
        let crl = dir.join("crl.pem");
        MutualTls {
            cafile: dir.join("client_ca.pem"),
            certfile: dir.join("server/server_chain.pem"),
            keyfile: dir.join("server/server.key"),
            crlfile: crl.exists().then_some(crl),
        }
    }
}

/// The access rules: a device (username = its certificate's CN) writes only its own
/// `status`, `ack` and `telemetry`, reads only its own `cmd` and the release announcements;
/// the operator may do anything under the prefix. `channels` narrows a device to its own
/// device type and channel's announcements (`(device id, device type, channel)`); without an
/// entry it reads every announcement.
pub fn acl(channels: &[(String, String, String)]) -> String {
    let p = DEFAULT_PREFIX;
    let mut acl = format!("user {OPERATOR_CN}\ntopic readwrite {p}/#\n\n");
    for (id, dt, ch) in channels {
        acl.push_str(&format!("user {id}\ntopic read {p}/release/{dt}/{ch}\n\n"));
    }
    for leaf in [Leaf::Status, Leaf::Ack, Leaf::Telemetry] {
        acl.push_str(&format!("pattern write {p}/device/%u/{}\n", leaf.name()));
    }
    acl.push_str(&format!(
        "pattern read {p}/device/%u/{}\n",
        Leaf::Cmd.name()
    ));
    if channels.is_empty() {
        acl.push_str(&format!("pattern read {p}/release/#\n"));
    }
    acl
}

/// `mosquitto.conf` for one listener on `bind`:`port`: anonymous and unlimited (the
/// benchmark's), or mutual TLS with the ACL file `acl_file`.
pub fn config(bind: &str, port: u16, tls: Option<(&MutualTls, &Path)>) -> String {
    let mut c = format!(
        "per_listener_settings false\npersistence false\nlog_dest stderr\nlog_type error\nlog_type warning\nmax_connections -1\nlistener {port} {bind}\n"
    );
    match tls {
        None => c.push_str("allow_anonymous true\n"),
        Some((t, acl_file)) => {
            c.push_str(&format!(
                "cafile {}\ncertfile {}\nkeyfile {}\nrequire_certificate true\nuse_identity_as_username true\nallow_anonymous false\nacl_file {}\n",
                t.cafile.display(),
                t.certfile.display(),
                t.keyfile.display(),
                acl_file.display()
            ));
            if let Some(crl) = &t.crlfile {
                c.push_str(&format!("crlfile {}\n", crl.display()));
            }
        }
    }
    // Started as root, Mosquitto drops to user `mosquitto` before reading the (0600) key.
    if running_as_root() {
        c.push_str("user root\n");
    }
    c
}

fn running_as_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            let uid = s.lines().find(|l| l.starts_with("Uid:"))?;
            uid.split_whitespace().nth(1).map(|u| u == "0")
        })
        .unwrap_or(false)
}

/// The Mosquitto executable, or an error that says how to install it.
pub fn executable() -> anyhow::Result<PathBuf> {
    ["mosquitto", "/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto"]
        .into_iter()
        .map(PathBuf::from)
        .find(|p| {
            Command::new(p)
                .arg("-h")
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_ok()
        })
        .context("`mosquitto` is not installed: run scripts/setup.sh (or apt install mosquitto), or pass --broker mqtt://HOST:PORT")
}

/// A Mosquitto broker in its own process, stopped when dropped.
pub struct Mosquitto {
    pub child: Child,
    pub host: std::net::IpAddr,
    pub port: u16,
    tls: bool,
    _dir: tempfile::TempDir,
}

impl Mosquitto {
    /// Anonymous, on a free loopback port.
    pub fn start() -> anyhow::Result<Mosquitto> {
        Self::launch(LOOPBACK, None, &[])
    }

    /// Mutual TLS with the ACL of [`acl`], on a free loopback port.
    pub fn start_tls(
        tls: &MutualTls,
        channels: &[(String, String, String)],
    ) -> anyhow::Result<Mosquitto> {
        Self::launch(LOOPBACK, Some(tls), channels)
    }

    /// [`Mosquitto::start_tls`] on `host` (a bench's address the board reaches).
    pub fn start_tls_on(
        host: std::net::IpAddr,
        tls: &MutualTls,
        channels: &[(String, String, String)],
    ) -> anyhow::Result<Mosquitto> {
        Self::launch(host, Some(tls), channels)
    }

    fn launch(
        host: std::net::IpAddr,
        tls: Option<&MutualTls>,
        channels: &[(String, String, String)],
    ) -> anyhow::Result<Mosquitto> {
        let exe = executable()?;
        let port = TcpListener::bind((host, 0))?.local_addr()?.port();
        let dir = tempfile::tempdir()?;
        let conf = dir.path().join("mosquitto.conf");
        let acl_file = dir.path().join("acl");
        std::fs::write(&acl_file, acl(channels))?;
        let tls = tls.map(|t| (t, acl_file.as_path()));
        std::fs::write(&conf, config(&host.to_string(), port, tls))?;
        // Its log goes to a file: a pipe nobody reads would stall it once full.
        let log_path = dir.path().join("mosquitto.log");
        let log = std::fs::File::create(&log_path)?;
        let mut child = Command::new(&exe)
            .arg("-c")
            .arg(&conf)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting {}", exe.display()))?;
        let deadline = Instant::now() + Duration::from_secs(10);
        while TcpStream::connect((host, port)).is_err() {
            if let Some(status) = child.try_wait()? {
                let err = std::fs::read_to_string(&log_path).unwrap_or_default();
                bail!(
                    "mosquitto exited ({status}) before accepting connections: {}",
                    err.trim()
                );
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                bail!("mosquitto did not accept connections on {host}:{port} within 10 s");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(Mosquitto {
            child,
            host,
            port,
            tls: tls.is_some(),
            _dir: dir,
        })
    }

    pub fn url(&self) -> String {
        let scheme = if self.tls { "mqtts" } else { "mqtt" };
        format!("{scheme}://{}:{}", self.host, self.port)
    }
}

impl Drop for Mosquitto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
