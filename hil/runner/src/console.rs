//! The board's serial console: lines in on a channel (a reader thread that survives the
//! port going away during a USB-Serial-JTAG reset), console-protocol commands out.

use std::io::{BufRead, BufReader, Write};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use otarig_agent::console::{self, HostCommand};
use tokio::sync::mpsc;

/// The serial console: lines in on a channel (a reader thread), commands out.
pub(crate) struct Console {
    pub(crate) lines: mpsc::UnboundedReceiver<String>,
    /// Replaced by the reader when it reopens the port.
    pub(crate) out: Arc<std::sync::Mutex<Box<dyn otarig_serial::serialport::SerialPort>>>,
    pub(crate) log: Vec<String>,
    /// Tells the reader thread to let go of the port (the next scenario flashes through it).
    pub(crate) stop: Arc<std::sync::atomic::AtomicBool>,
    pub(crate) reader: Option<std::thread::JoinHandle<()>>,
}

impl Drop for Console {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        if let Some(r) = self.reader.take() {
            let _ = r.join();
        }
    }
}

impl Console {
    pub(crate) fn open(port: &str) -> anyhow::Result<Console> {
        let open = |port: &str| {
            otarig_serial::serialport::new(port, 115_200)
                .timeout(Duration::from_millis(100))
                .open()
        };
        let p = open(port).with_context(|| format!("opening the console on {port}"))?;
        let out = Arc::new(std::sync::Mutex::new(
            p.try_clone().context("cloning the serial port")?,
        ));
        let (tx, rx) = mpsc::unbounded_channel();
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (halt, writer, name) = (stop.clone(), out.clone(), port.to_string());
        let reader = std::thread::spawn(move || {
            let mut r = BufReader::new(p);
            let mut buf = Vec::new();
            while !halt.load(std::sync::atomic::Ordering::Relaxed) {
                match r.read_until(b'\n', &mut buf) {
                    Ok(0) => break,
                    Ok(_) => {
                        if buf.ends_with(b"\n") {
                            let line = String::from_utf8_lossy(&buf).trim_end().to_string();
                            buf.clear();
                            if tx.send(line).is_err() {
                                break;
                            }
                        }
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::TimedOut => {}
                    Err(e) => {
                        // A reset through USB-Serial-JTAG takes the port away for a moment:
                        // reopen it for up to 10 s before giving up.
                        tracing::info!("console {name}: {e}; reopening");
                        let again = (0..50).find_map(|_| {
                            std::thread::sleep(Duration::from_millis(200));
                            if halt.load(std::sync::atomic::Ordering::Relaxed) {
                                return None;
                            }
                            open(&name).ok()
                        });
                        let Some(p) = again else { break };
                        if let (Ok(w), Ok(mut out)) = (p.try_clone(), writer.lock()) {
                            *out = w;
                        }
                        r = BufReader::new(p);
                    }
                }
            }
        });
        Ok(Console {
            lines: rx,
            out,
            log: Vec::new(),
            stop,
            reader: Some(reader),
        })
    }

    pub(crate) fn send(&mut self, cmd: &HostCommand) -> anyhow::Result<()> {
        let mut out = self.out.lock().unwrap_or_else(|p| p.into_inner());
        out.write_all(console::command_line(cmd).as_bytes())
            .context("writing to the console")?;
        out.flush()?;
        Ok(())
    }

    /// The last lines, for error messages.
    pub(crate) fn tail(&self) -> String {
        let n = self.log.len().saturating_sub(15);
        self.log[n..].join("\n    ")
    }
}
