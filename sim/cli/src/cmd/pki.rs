//! `otarig pki`: the fleet's own certificate authority (files: [`otarig_server::pki`]).

use std::path::PathBuf;
use std::process::ExitCode;

use otarig_server::pki::Pki;

#[derive(clap::Subcommand)]
pub enum Cmd {
    /// Make a root CA (and an intermediate that issues the leaves) in DIR.
    Init {
        #[arg(long)]
        dir: PathBuf,
        /// Issue leaves from an intermediate CA signed by the root (the root key can then stay
        /// offline).
        #[arg(long)]
        intermediate: bool,
        #[arg(long, default_value_t = 3650)]
        days: u32,
    },
    /// Issue the firmware server's and broker's certificate: DIR/server/server.crt,
    /// server.key, server_chain.pem.
    Server {
        #[arg(long)]
        dir: PathBuf,
        /// DNS names and IP addresses it answers on (repeatable): localhost, 127.0.0.1, the
        /// bench host.
        #[arg(long = "name", required = true)]
        names: Vec<String>,
        /// Validity; 0 issues an already expired certificate (to test that boards refuse it).
        #[arg(long, default_value_t = 365)]
        days: u32,
    },
    /// Issue a device certificate (CN = ID): DIR/devices/ID/device.crt (the certificate alone:
    /// brokers and servers verify it with DIR/client_ca.pem), device.key, ca_cert.pem.
    Device {
        #[arg(long)]
        dir: PathBuf,
        /// Device ids (one certificate each).
        #[arg(required = true)]
        ids: Vec<String>,
        #[arg(long, default_value_t = 365)]
        days: u32,
    },
    /// Write a Mosquitto configuration for mutual TLS with this PKI: OUT/mosquitto.conf and
    /// OUT/acl (each device reads its own commands and the announcements, writes its own
    /// status, ack and telemetry; the operator certificate, CN otarig-operator, everything).
    /// Run it with `mosquitto -c OUT/mosquitto.conf`; issue the server certificate first.
    Mosquitto {
        #[arg(long)]
        dir: PathBuf,
        #[arg(long)]
        out: PathBuf,
        #[arg(long, default_value_t = 8883)]
        port: u16,
        /// Address to listen on (0.0.0.0 for a bench LAN).
        #[arg(long, default_value = "127.0.0.1")]
        bind: String,
    },
    /// Write a device's factory provisioning as an ESP-IDF NVS partition image (the format
    /// `nvs_partition_gen.py` writes), namespace `otarig`: device, broker, server, channel,
    /// ssid, password, and ca_cert, device_crt, device_key from DIR/devices/ID (issue the
    /// certificate first). Flash it at the `nvs` partition's offset.
    Nvs {
        #[arg(long)]
        dir: PathBuf,
        /// The device id (its certificate's CN).
        #[arg(long)]
        device: String,
        /// mqtts://HOST:8883
        #[arg(long)]
        broker: String,
        /// https://HOST:PORT
        #[arg(long)]
        server: String,
        #[arg(long, default_value = "stable")]
        channel: String,
        #[arg(long, default_value = "")]
        ssid: String,
        #[arg(long, default_value = "")]
        password: String,
        /// The `nvs` partition's size (0x6000 in ESP-IDF's default tables).
        #[arg(long, default_value = "0x6000", value_parser = parse_size)]
        size: usize,
        /// Image keys the board decrypts releases with (repeatable): NAME.hex (AES-256, NVS
        /// key `image_aes`) and the private NAME.pem (RSA-3072, `image_rsa`) from `otarig
        /// keys gen NAME --alg aes-256|rsa-3072`.
        #[arg(long)]
        image_key: Vec<PathBuf>,
        /// The chunked protocol's fleet key (`otarig keys gen NAME --alg psk`): the board gets
        /// only its own key, derived from it with the device id (NVS key `chunk_key`), and
        /// fetches by chunks.
        #[arg(long)]
        chunk_psk: Option<PathBuf>,
        #[arg(short, long)]
        out: PathBuf,
    },
    /// Revoke a device's certificate: add it to DIR/revoked.txt and sign DIR/crl.pem, which
    /// `otarig serve --crl` and the broker honour.
    Revoke {
        #[arg(long)]
        dir: PathBuf,
        id: String,
    },
}

fn parse_size(s: &str) -> Result<usize, String> {
    let n = match s.strip_prefix("0x") {
        Some(hex) => usize::from_str_radix(hex, 16),
        None => s.parse(),
    };
    n.map_err(|e| format!("'{s}' is not a size in bytes (0x6000 or 24576): {e}"))
}

/// The NVS image of one device's provisioning.
fn nvs_image(dir: &std::path::Path, p: &Provision<'_>, size: usize) -> anyhow::Result<Vec<u8>> {
    use otarig_esp32s3::nvs::NvsWriter;
    let files = dir.join("devices").join(p.device);
    let read = |f: &str| {
        std::fs::read_to_string(files.join(f)).map_err(|e| {
            anyhow::anyhow!(
                "{}: {e} (issue it with `otarig pki device --dir {} {}`)",
                files.join(f).display(),
                dir.display(),
                p.device
            )
        })
    };
    let mut w = NvsWriter::new(size)?;
    w.namespace("otarig")?;
    for (k, v) in [
        ("device", p.device),
        ("broker", p.broker),
        ("server", p.server),
        ("channel", p.channel),
        ("ssid", p.ssid),
        ("password", p.password),
        ("ca_cert", read("ca_cert.pem")?.as_str()),
        ("device_crt", read("device.crt")?.as_str()),
        ("device_key", read("device.key")?.as_str()),
    ] {
        w.string(k, v)?;
    }
    for path in p.image_keys {
        let (k, v) = image_key_entry(path)?;
        w.string(k, &v)?;
    }
    if let Some(path) = p.chunk_psk {
        let fleet = otarig_server::chunked::load_fleet_key(path)?;
        let key = otarig_agent::chunk::ChunkKey::derive(&fleet, p.device);
        w.string("chunk_key", &key.to_hex())?;
    }
    Ok(w.finish())
}

/// An image key file as the NVS entry the shell reads: `image_aes` (64 hex digits) or
/// `image_rsa` (the PEM private key).
fn image_key_entry(path: &std::path::Path) -> anyhow::Result<(&'static str, String)> {
    use otarig_server::encrypt::{load_board_rsa, ImageKey};
    // Loaded first: it bounds the file's size and says what is wrong with it.
    let key = ImageKey::load(path)?;
    let text = std::fs::read_to_string(path)
        .map_err(|e| anyhow::anyhow!("reading image key {}: {e}", path.display()))?;
    match key {
        ImageKey::Aes256(_) => Ok(("image_aes", text.trim().to_string())),
        ImageKey::Rsa(_) => {
            load_board_rsa(path).map_err(|_| {
                anyhow::anyhow!(
                    "{} is a public key: the board needs the private NAME.pem to decrypt",
                    path.display()
                )
            })?;
            Ok(("image_rsa", text))
        }
    }
}

/// What a board is provisioned with.
struct Provision<'a> {
    image_keys: &'a [PathBuf],
    chunk_psk: Option<&'a std::path::Path>,
    device: &'a str,
    broker: &'a str,
    server: &'a str,
    channel: &'a str,
    ssid: &'a str,
    password: &'a str,
}

pub fn run(cmd: Cmd) -> anyhow::Result<ExitCode> {
    match cmd {
        Cmd::Init {
            dir,
            intermediate,
            days,
        } => {
            Pki::init(&dir, intermediate, days)?;
            println!(
                "root CA in {} (ca_cert.pem; ca_key.pem is 0600: keep it offline){}",
                dir.display(),
                if intermediate {
                    "; leaves are issued by intermediate_cert.pem"
                } else {
                    ""
                }
            );
        }
        Cmd::Server { dir, names, days } => {
            let pki = Pki::open(&dir)?;
            let issued = pki.server(&names, days)?;
            let out = pki.write_server(&issued)?;
            println!(
                "server certificate for {} (serial {}) in {}",
                names.join(", "),
                issued.serial,
                out.display()
            );
        }
        Cmd::Device { dir, ids, days } => {
            let pki = Pki::open(&dir)?;
            for id in &ids {
                let issued = pki.device(id, days)?;
                let out = pki.write_device(id, &issued)?;
                println!(
                    "device certificate CN={id} (serial {}) in {}",
                    issued.serial,
                    out.display()
                );
            }
        }
        Cmd::Mosquitto {
            dir,
            out,
            port,
            bind,
        } => {
            let abs = |p: PathBuf| std::path::absolute(&p).unwrap_or(p);
            let dir = abs(dir);
            for f in [
                "ca_cert.pem",
                "server/server_chain.pem",
                "server/server.key",
            ] {
                if !dir.join(f).exists() {
                    anyhow::bail!(
                        "{} is missing: run `otarig pki init` and `otarig pki server` first",
                        dir.join(f).display()
                    );
                }
            }
            // The broker needs the intermediate: devices send their certificate alone.
            otarig_server::pki::write_client_ca(&dir)?;
            let tls = otarig_fleet::mosquitto::MutualTls::of_pki(&dir);
            std::fs::create_dir_all(&out)?;
            let out = abs(out);
            let acl = out.join("acl");
            std::fs::write(&acl, otarig_fleet::mosquitto::acl(&[]))?;
            std::fs::write(
                out.join("mosquitto.conf"),
                otarig_fleet::mosquitto::config(&bind, port, Some((&tls, &acl))),
            )?;
            println!(
                "wrote {0}/mosquitto.conf and {0}/acl: mosquitto -c {0}/mosquitto.conf; the operator needs a certificate with CN {1} (`otarig pki device --dir {2} {1}`)",
                out.display(),
                otarig_fleet::mosquitto::OPERATOR_CN,
                dir.display()
            );
        }
        Cmd::Nvs {
            dir,
            device,
            broker,
            server,
            channel,
            ssid,
            password,
            size,
            image_key,
            chunk_psk,
            out,
        } => {
            let p = Provision {
                image_keys: &image_key,
                chunk_psk: chunk_psk.as_deref(),
                device: &device,
                broker: &broker,
                server: &server,
                channel: &channel,
                ssid: &ssid,
                password: &password,
            };
            let image = nvs_image(&dir, &p, size)?;
            // It holds the device's private key.
            otarig_server::keys::write_private(&out, &image)?;
            println!(
                "wrote {} ({size:#x} bytes, NVS namespace otarig, mode 0600): flash it at the nvs partition's offset (0x9000 in ESP-IDF's default table)",
                out.display()
            );
        }
        Cmd::Revoke { dir, id } => {
            Pki::open(&dir)?.revoke_device(&id)?;
            println!(
                "revoked {id}; {} now lists it: restart `otarig serve --crl` and the broker to load it",
                dir.join("crl.pem").display()
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;
    use otarig_esp32s3::nvs::{read, NvsValue};

    /// The factory image carries the provisioning and the device's identity, as the shell
    /// reads them back (namespace `otarig`).
    /// Devices send their certificate alone, so the broker's `cafile` must hold the
    /// intermediate too; a directory made before `client_ca.pem` existed gets one.
    #[test]
    fn the_mosquitto_configuration_verifies_devices_through_the_intermediate() {
        let dir = tempfile::tempdir().unwrap();
        let pki = Pki::init(dir.path(), true, 30).unwrap();
        pki.write_server(&pki.server(&["localhost".into()], 30).unwrap())
            .unwrap();
        std::fs::remove_file(dir.path().join("client_ca.pem")).unwrap();
        let out = dir.path().join("mq");
        run(Cmd::Mosquitto {
            dir: dir.path().to_path_buf(),
            out: out.clone(),
            port: 8883,
            bind: "127.0.0.1".into(),
        })
        .unwrap();
        let conf = std::fs::read_to_string(out.join("mosquitto.conf")).unwrap();
        let cafile = conf
            .lines()
            .find_map(|l| l.strip_prefix("cafile "))
            .expect("a cafile line");
        assert!(cafile.ends_with("client_ca.pem"), "{conf}");
        let bundle = std::fs::read_to_string(cafile).unwrap();
        let intermediate =
            std::fs::read_to_string(dir.path().join("intermediate_cert.pem")).unwrap();
        assert_eq!(bundle, format!("{}{intermediate}", pki.root_pem()));
    }

    #[test]
    fn the_nvs_image_holds_the_devices_identity() {
        let dir = tempfile::tempdir().unwrap();
        let pki = Pki::init(dir.path(), true, 30).unwrap();
        let d = pki.device("dev-9", 30).unwrap();
        pki.write_device("dev-9", &d).unwrap();
        let keys = otarig_server::keys::fixture_dir();
        let image_keys = [
            keys.join("aes-256-image.hex"),
            keys.join("rsa-3072-image.pem"),
        ];
        let psk = keys.join(otarig_server::chunked::FIXTURE_FLEET_KEY);
        let p = Provision {
            image_keys: &image_keys,
            chunk_psk: Some(&psk),
            device: "dev-9",
            broker: "mqtts://10.0.0.2:8883",
            server: "https://10.0.0.2:8443",
            channel: "beta",
            ssid: "bench",
            password: "secret",
        };
        let image = nvs_image(dir.path(), &p, 0x6000).unwrap();
        assert_eq!(image.len(), 0x6000);
        let values = read(&image);
        let get = |k: &str| match values.get(&("otarig".to_string(), k.to_string())) {
            Some(NvsValue::Str(s)) => s.clone(),
            other => panic!("{k}: {other:?}"),
        };
        assert_eq!(get("device"), "dev-9");
        assert_eq!(get("channel"), "beta");
        assert_eq!(get("device_key"), d.key_pem);
        assert_eq!(get("device_crt"), d.cert_pem);
        assert_eq!(get("ca_cert"), pki.root_pem());
        let aes = std::fs::read_to_string(&image_keys[0]).unwrap();
        assert_eq!(get("image_aes"), aes.trim());
        assert!(get("image_rsa").starts_with("-----BEGIN PRIVATE KEY-----"));
        // The board's own chunk key, not the fleet's.
        let fleet = otarig_server::chunked::load_fleet_key(&psk).unwrap();
        let own = otarig_agent::chunk::ChunkKey::derive(&fleet, "dev-9");
        assert_eq!(get("chunk_key"), own.to_hex());
        assert_ne!(get("chunk_key"), hex::encode(&fleet));
        // The release host's public half is no use to a board.
        use rsa::pkcs8::{EncodePublicKey, LineEnding};
        let private = otarig_server::encrypt::load_board_rsa(&image_keys[1]).unwrap();
        let public = dir.path().join("img.pub.pem");
        let pem = private
            .to_public_key()
            .to_public_key_pem(LineEnding::LF)
            .unwrap();
        std::fs::write(&public, pem).unwrap();
        let e = image_key_entry(&public).unwrap_err().to_string();
        assert!(e.contains("public key"), "{e}");
        let missing = Provision {
            device: "dev-10",
            ..p
        };
        let e = nvs_image(dir.path(), &missing, 0x6000)
            .unwrap_err()
            .to_string();
        assert!(e.contains("otarig pki device"), "{e}");
    }
}
