//! Resetting a board and cutting its power, the hardware way of a power-loss fault.
//!
//! - `rts`: pulse RTS, wired to EN (reset) on UART-bridge boards (ESP32-S3-DevKitC's CP2102N
//!   or CH343): EN low for 100 ms, then high, with DTR (IO0) high so the chip boots the app.
//!   On the USB-Serial-JTAG port (no external bridge) the same lines reach the chip's USB
//!   reset logic, as espflash's reset uses them.
//! - `command`: a shell command that switches the board's power (a switchable USB hub such as
//!   one driven by `uhubctl`, or a relay); `{state}` in it becomes `off` or `on`.
//! - `control`: the virtual board's control socket, which takes `reset`, `download`,
//!   `power-off` and `power-on` lines.

use std::io::{BufRead, BufReader, Write};
use std::path::PathBuf;
use std::time::Duration;

/// How power and reset reach the board.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ResetMethod {
    Rts,
    Command(String),
    Control(PathBuf),
}

#[derive(Debug, thiserror::Error)]
pub enum ResetError {
    #[error("toggling RTS on {port}: {source}")]
    Serial {
        port: String,
        source: serialport::Error,
    },
    #[error("power command `{command}` failed: {detail}")]
    Command { command: String, detail: String },
    #[error("virtual board control socket {path}: {detail}")]
    Control { path: String, detail: String },
}

impl ResetMethod {
    /// A power cut: the board is off for `off_for`, then boots again. With `rts` it is an EN
    /// pulse of 100 ms through `console`, the port the runner already holds open (exclusively:
    /// opening it again would fail), DTR (IO0) high so the chip boots the app.
    pub fn power_cut(
        &self,
        console: &mut dyn serialport::SerialPort,
        off_for: Duration,
    ) -> Result<(), ResetError> {
        match self {
            ResetMethod::Rts => {
                let name = console.name().unwrap_or_else(|| "the console".into());
                let serr = |source| ResetError::Serial {
                    port: name.clone(),
                    source,
                };
                console.write_data_terminal_ready(false).map_err(serr)?;
                console.write_request_to_send(true).map_err(serr)?;
                std::thread::sleep(Duration::from_millis(100));
                console.write_request_to_send(false).map_err(serr)
            }
            ResetMethod::Command(_) | ResetMethod::Control(_) => {
                self.power(false)?;
                std::thread::sleep(off_for);
                self.power(true)
            }
        }
    }

    /// Cut (false) or restore (true) the board's power through the command or the control
    /// socket (`rts` has no "off" state: see [`ResetMethod::power_cut`]).
    fn power(&self, on: bool) -> Result<(), ResetError> {
        match self {
            ResetMethod::Rts => Ok(()),
            ResetMethod::Command(cmd) => {
                let line = cmd.replace("{state}", if on { "on" } else { "off" });
                let out = std::process::Command::new(if cfg!(windows) { "cmd" } else { "sh" })
                    .args(if cfg!(windows) {
                        ["/C", &line]
                    } else {
                        ["-c", &line]
                    })
                    .output()
                    .map_err(|e| ResetError::Command {
                        command: line.clone(),
                        detail: e.to_string(),
                    })?;
                if !out.status.success() {
                    return Err(ResetError::Command {
                        command: line,
                        detail: String::from_utf8_lossy(&out.stderr).trim().to_string(),
                    });
                }
                Ok(())
            }
            ResetMethod::Control(_) => self.control(if on { "power-on" } else { "power-off" }),
        }
    }

    /// Reset the virtual board out of the loader into its app, as a real board's hard reset
    /// after flashing does (espflash does that one itself).
    pub fn reset_into_app(&self) -> Result<(), ResetError> {
        match self {
            ResetMethod::Control(_) => self.control("reset"),
            _ => Ok(()),
        }
    }

    /// Put the board in ROM download mode (the virtual board only; real boards get there
    /// through espflash's reset sequence).
    pub fn download_mode(&self) -> Result<(), ResetError> {
        match self {
            ResetMethod::Control(_) => self.control("download"),
            _ => Ok(()),
        }
    }

    #[cfg(unix)]
    fn control(&self, line: &str) -> Result<(), ResetError> {
        let ResetMethod::Control(path) = self else {
            return Ok(());
        };
        let err = |detail: String| ResetError::Control {
            path: path.display().to_string(),
            detail,
        };
        let mut s = std::os::unix::net::UnixStream::connect(path)
            .map_err(|e| err(format!("{e} (is `otarig board --pty` running?)")))?;
        s.set_read_timeout(Some(Duration::from_secs(10)))
            .map_err(|e| err(e.to_string()))?;
        writeln!(s, "{line}").map_err(|e| err(e.to_string()))?;
        let mut answer = String::new();
        BufReader::new(&s)
            .read_line(&mut answer)
            .map_err(|e| err(format!("no answer to '{line}': {e}")))?;
        match answer.trim() {
            "ok" => Ok(()),
            other => Err(err(format!("'{line}' answered '{other}'"))),
        }
    }

    #[cfg(not(unix))]
    fn control(&self, _line: &str) -> Result<(), ResetError> {
        Err(ResetError::Control {
            path: String::new(),
            detail: "the virtual board runs on Linux only".into(),
        })
    }
}
