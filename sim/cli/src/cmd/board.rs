//! `otarig board --pty`: a virtual ESP32-S3 behind a pseudo-terminal.

use std::path::PathBuf;
use std::process::ExitCode;

use otarig_fleet::virtual_board::{self, BoardOptions};
use otarig_scenario::Scenario;
use otarig_server::keys::{fixture_dir, NamedKey};

/// Where `otarig board --pty` listens for reset and power commands unless told otherwise.
pub const DEFAULT_CONTROL: &str = otarig_hil::bench::VIRTUAL_BOARD_CONTROL;

#[derive(clap::Args)]
pub struct Args {
    /// Serve on a new pty (the only transport today).
    #[arg(long, required = true)]
    pty: bool,
    /// Control socket for reset, download mode and power (a pty has no DTR/RTS).
    #[arg(long, default_value = DEFAULT_CONTROL)]
    control: PathBuf,
    /// Take the firmware's build settings (device type, trusted keys, agent timeouts)
    /// from a scenario; without it, as the esp32s3 shell is built: otarig-devkit-s3, release
    /// keys ed25519-test and rsa-test, root key ed25519-root, timestamp key ed25519-timestamp.
    #[arg(long)]
    scenario: Option<PathBuf>,
}

pub fn run(a: Args) -> anyhow::Result<ExitCode> {
    let opts = match &a.scenario {
        Some(p) => virtual_board::options_for(&Scenario::load(p)?)?,
        None => {
            let load = |ids: &[&str]| -> anyhow::Result<Vec<_>> {
                ids.iter()
                    .map(|id| NamedKey::load(&fixture_dir(), id)?.trusted())
                    .collect()
            };
            let trusted_keys = load(&["ed25519-test", "rsa-test"])?;
            // As the esp32s3 shell is built: the fixture root and timestamp keys too.
            let mut agent = otarig_agent::Config::new("", "otarig-devkit-s3", trusted_keys.clone());
            agent.root_keys = load(&["ed25519-root"])?;
            agent.timestamp_keys = load(&["ed25519-timestamp"])?;
            BoardOptions {
                flash_size: 4 << 20,
                device_type: "otarig-devkit-s3".into(),
                trusted_keys,
                boot_config: otarig_esp32s3::board::BootConfig::default(),
                agent: Some(agent),
            }
        }
    };
    let rt = tokio::runtime::Runtime::new()?;
    rt.block_on(async {
        let b = virtual_board::start(opts, &a.control).await?;
        println!(
            "virtual ESP32-S3 on {} (control socket {}); blank flash: waiting in download mode",
            b.pty.display(),
            b.control.display()
        );
        println!(
            "run scenarios on it: just hil --port {} --control {} scenarios/full-update.toml",
            b.pty.display(),
            b.control.display()
        );
        tokio::signal::ctrl_c().await?;
        b.stop();
        anyhow::Ok(())
    })?;
    Ok(ExitCode::SUCCESS)
}
