//! `otarig`: run scenarios on the simulator, the wire fleet and real boards; explore power
//! loss; build, sign and serve releases.
//!
//! One module per subcommand under [`cmd`], each holding its arguments and a thin body that
//! calls the library crates: nothing a test would want to call lives only here.

use std::process::ExitCode;

use clap::{Parser, Subcommand};

mod cmd;

#[derive(Parser)]
#[command(
    name = "otarig",
    version,
    about = "OTA update test rig for ESP32-S3 fleets"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run scenarios on the deterministic simulator and check their expectations.
    Run(cmd::run::Args),
    /// A virtual ESP32-S3 behind a pseudo-terminal, for the HIL runner (Linux).
    Board(cmd::board::Args),
    /// Run scenarios on one board over its serial port (a real ESP32-S3, or `otarig board`).
    Hil(cmd::hil::Args),
    /// Run scenarios with every board on the wire: an MQTT connection to the broker (embedded,
    /// or --broker) and HTTP to the firmware server, both on loopback.
    Fleet(cmd::fleet::Args),
    /// Check scenario files without running them.
    Check(cmd::check::Args),
    /// Power-loss explorer: cut power at flash operations and check the board recovers.
    Plr(cmd::plr::Args),
    /// Delta patches: make, apply, inspect, import BSDIFF40.
    Delta {
        #[command(subcommand)]
        cmd: cmd::delta::Cmd,
    },
    /// Benchmarks (run with --release): `plr` explorer rates, `delta` sizes and throughput,
    /// `fleet` scale.
    Bench {
        #[command(subcommand)]
        cmd: cmd::bench::Cmd,
    },
    /// Run the firmware server over a release store directory.
    Serve(cmd::serve::Args),
    /// Publish releases into a store directory and inspect its release log.
    Release {
        #[command(subcommand)]
        cmd: cmd::release::Cmd,
    },
    /// The fleet's certificate authority: root, intermediate, server and device
    /// certificates, revocation.
    Pki {
        #[command(subcommand)]
        cmd: cmd::pki::Cmd,
    },
    /// Signing keys.
    Keys {
        #[command(subcommand)]
        cmd: cmd::keys::Cmd,
    },
    /// ESP-IDF app images for simulated firmware.
    Image {
        #[command(subcommand)]
        cmd: cmd::image::Cmd,
    },
    /// Signed release manifests.
    Manifest {
        #[command(subcommand)]
        cmd: cmd::manifest::Cmd,
    },
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                // Simulated power cuts and reboots drop MQTT connections mid-packet, even
                // mid-CONNECT; rumqttd's router and server log each as an error. RUST_LOG
                // overrides this default (RUST_LOG=rumqttd=info shows the broker).
                .unwrap_or_else(|_| {
                    tracing_subscriber::EnvFilter::new(
                        "warn,rumqttd::router=off,rumqttd::server=off",
                    )
                }),
        )
        .with_writer(std::io::stderr)
        .init();
    let result = match Cli::parse().cmd {
        Cmd::Run(a) => cmd::run::run(a),
        Cmd::Board(a) => cmd::board::run(a),
        Cmd::Hil(a) => cmd::hil::run(a),
        Cmd::Fleet(a) => cmd::fleet::run(a),
        Cmd::Check(a) => cmd::check::run(a),
        Cmd::Plr(a) => cmd::plr::run(a),
        Cmd::Delta { cmd } => cmd::delta::run(cmd),
        Cmd::Bench { cmd } => cmd::bench::run(cmd),
        Cmd::Serve(a) => cmd::serve::run(a),
        Cmd::Release { cmd } => cmd::release::run(cmd),
        Cmd::Keys { cmd } => cmd::keys::run(cmd),
        Cmd::Pki { cmd } => cmd::pki::run(cmd),
        Cmd::Image { cmd } => cmd::image::run(cmd),
        Cmd::Manifest { cmd } => cmd::manifest::run(cmd),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(2)
        }
    }
}
