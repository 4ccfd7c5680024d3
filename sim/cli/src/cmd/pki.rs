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
    /// Issue a device certificate (CN = ID): DIR/devices/ID/device.crt, device.key, ca_cert.pem.
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
    /// Revoke a device's certificate: add it to DIR/revoked.txt and sign DIR/crl.pem, which
    /// `otarig serve --crl` and the broker honour.
    Revoke {
        #[arg(long)]
        dir: PathBuf,
        id: String,
    },
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
            let crl = dir.join("crl.pem");
            let tls = otarig_fleet::mosquitto::MutualTls {
                cafile: dir.join("ca_cert.pem"),
                certfile: dir.join("server/server_chain.pem"),
                keyfile: dir.join("server/server.key"),
                crlfile: crl.exists().then_some(crl),
            };
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
