//! The bench file (`bench/bench.toml`; `bench/bench.example.toml` documents it) and how it,
//! the port and the environment become [`HilOptions`].

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::bail;
use otarig_serial::flasher::Target;
use otarig_serial::reset::ResetMethod;
use serde::Deserialize;

use crate::HilOptions;

/// Where `otarig board --pty` listens for reset and power commands unless told otherwise.
pub const VIRTUAL_BOARD_CONTROL: &str = "/tmp/otarig-board.sock";

/// A bench: the Wi-Fi the board joins, the address it reaches this PC on, how to reset it.
#[derive(Deserialize, Default, Debug)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct BenchFile {
    #[serde(default)]
    pub wifi: Option<BenchWifi>,
    pub host: Option<IpAddr>,
    /// `rts`, `command:CMD` (a power switch; `{state}` is on or off) or `control:PATH`.
    pub reset: Option<String>,
    pub firmware_dir: Option<PathBuf>,
    pub log_dir: Option<PathBuf>,
}

#[derive(Deserialize, Default, Debug)]
#[serde(deny_unknown_fields)]
pub struct BenchWifi {
    #[serde(default)]
    pub ssid: String,
    #[serde(default)]
    pub password: String,
}

impl BenchFile {
    /// Read a bench file. A virtual board (known by its control socket) needs none.
    pub fn load(path: &Path, virtual_board: bool) -> anyhow::Result<BenchFile> {
        match std::fs::read_to_string(path) {
            Ok(text) => toml::from_str(&text).map_err(|e| anyhow::anyhow!("{}: {e}", path.display())),
            Err(_) if virtual_board => Ok(BenchFile::default()),
            Err(e) => bail!(
                "{}: {e}. A real board needs a bench file: copy bench/bench.example.toml to bench/bench.toml and fill it in",
                path.display()
            ),
        }
    }
}

/// The control socket of a virtual board on `port`: the one given, or the default one when
/// the port is a pty and that socket exists.
pub fn control_for(port: &str, given: Option<PathBuf>) -> Option<PathBuf> {
    let default = Path::new(VIRTUAL_BOARD_CONTROL);
    given.or_else(|| {
        (port.starts_with("/dev/pts/") && default.exists()).then(|| default.to_path_buf())
    })
}

impl HilOptions {
    /// The options for a run on `port`: a virtual board when `control` is set (or the bench
    /// file's reset says `control:`), hardware otherwise. `OTARIG_WIFI_SSID` and
    /// `OTARIG_WIFI_PASSWORD` override the bench file's Wi-Fi. `bench_path` is for errors.
    pub fn for_bench(
        port: &str,
        control: Option<PathBuf>,
        bench: BenchFile,
        bench_path: &Path,
    ) -> anyhow::Result<HilOptions> {
        let (target, reset) = target_and_reset(control, bench.reset.as_deref(), bench_path)?;
        let wifi = bench.wifi.unwrap_or_default();
        let host = match (bench.host, target) {
            (Some(h), _) => h,
            (None, Target::Virtual) => std::net::Ipv4Addr::LOCALHOST.into(),
            (None, Target::Hardware) => bail!(
                "{}: set host = \"<this PC's address on the board's network>\" so the board can reach the broker and server",
                bench_path.display()
            ),
        };
        Ok(HilOptions {
            port: port.to_string(),
            target,
            reset,
            host,
            wifi_ssid: std::env::var("OTARIG_WIFI_SSID").unwrap_or(wifi.ssid),
            wifi_password: std::env::var("OTARIG_WIFI_PASSWORD").unwrap_or(wifi.password),
            step_timeout: Duration::from_secs(30),
            quiet: Duration::from_secs(5),
            idle_skip: Duration::from_secs(2),
            log_dir: bench.log_dir.or_else(|| Some(PathBuf::from("target/hil"))),
            progress: true,
            firmware_dir: bench.firmware_dir,
        })
    }
}

fn target_and_reset(
    control: Option<PathBuf>,
    reset: Option<&str>,
    bench_path: &Path,
) -> anyhow::Result<(Target, ResetMethod)> {
    Ok(match (control, reset) {
        (Some(c), _) => (Target::Virtual, ResetMethod::Control(c)),
        (None, Some(r)) if r.starts_with("control:") => (
            Target::Virtual,
            ResetMethod::Control(PathBuf::from(&r["control:".len()..])),
        ),
        (None, Some(r)) if r.starts_with("command:") => (
            Target::Hardware,
            ResetMethod::Command(r["command:".len()..].to_string()),
        ),
        (None, Some("rts") | None) => (Target::Hardware, ResetMethod::Rts),
        (None, Some(other)) => bail!(
            "{}: reset = \"{other}\" is not rts, command:CMD or control:PATH",
            bench_path.display()
        ),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_virtual_board_needs_no_bench_file_and_talks_on_loopback() {
        let bench = BenchFile::load(Path::new("/nonexistent/bench.toml"), true).unwrap();
        let o = HilOptions::for_bench(
            "/dev/pts/9",
            Some("/tmp/x.sock".into()),
            bench,
            Path::new("b.toml"),
        )
        .unwrap();
        assert_eq!(o.target, Target::Virtual);
        assert_eq!(o.host, IpAddr::from(std::net::Ipv4Addr::LOCALHOST));
    }

    #[test]
    fn a_real_board_without_a_bench_file_is_told_what_to_do() {
        let e = BenchFile::load(Path::new("/nonexistent/bench.toml"), false).unwrap_err();
        assert!(
            e.to_string().contains("copy bench/bench.example.toml"),
            "{e}"
        );
    }

    #[test]
    fn a_real_board_needs_the_host_address_and_a_known_reset() {
        let e = HilOptions::for_bench("COM9", None, BenchFile::default(), Path::new("b.toml"))
            .unwrap_err();
        assert!(e.to_string().contains("set host"), "{e}");
        let bench = BenchFile {
            reset: Some("dtr".into()),
            host: Some(std::net::Ipv4Addr::new(192, 0, 2, 1).into()),
            ..Default::default()
        };
        let e = HilOptions::for_bench("COM9", None, bench, Path::new("b.toml")).unwrap_err();
        assert!(
            e.to_string()
                .contains("is not rts, command:CMD or control:PATH"),
            "{e}"
        );
    }
}
