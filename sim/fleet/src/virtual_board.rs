//! A simulated ESP32-S3 behind a pseudo-terminal: the board a HIL run uses when there is no
//! hardware, through exactly the code a real board gets (espflash, the console protocol, the
//! broker and firmware server over TCP).
//!
//! - **Download mode**: the ESP32-S3 ROM serial loader ([`otarig_serial::rom`]) on the pty, over
//!   the board's simulated flash. Entered at power-on when the flash holds no partition table,
//!   or on the control socket's `download` (what GPIO0 held low at reset does on hardware).
//!   `FLASH_END` with "reboot" leaves it, as on the chip.
//! - **App mode**: the simulated bootloader boots what is in flash (partition table read from
//!   0x8000) and runs the shared agent, printing ESP-IDF-like boot lines and console-protocol
//!   events on the pty; it reads `@otarig-cmd` lines (provisioning, `report`, `reboot`).
//!   Provisioning lives in memory and survives resets, as NVS would.
//! - **Control socket** (a Unix socket; a pty has no DTR/RTS): `reset`, `download`,
//!   `power-off`, `power-on`, each answered `ok`.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use otarig_agent::console::{self, HostCommand};
use otarig_agent::{Config, TrustedKey};
use otarig_serial::pty::Pty;
use otarig_serial::rom::{slip_encode, After, FlashMemory, RomLoader, SlipFrames};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;

use crate::fleet::{board_task, Ctl, Shared};
use otarig_esp32s3::board::{Board, BootConfig};
use otarig_esp32s3::flash::{Flash, SECTOR_SIZE};
use otarig_scenario::runner::Dev;

/// How the virtual board is built (what its firmware was compiled with).
#[derive(Clone, Debug)]
pub struct BoardOptions {
    pub flash_size: u32,
    pub device_type: String,
    /// Keys the firmware trusts (compiled in on a real board).
    pub trusted_keys: Vec<TrustedKey>,
    pub boot_config: BootConfig,
    /// The agent's configuration otherwise (chunk size, timeouts).
    pub agent: Option<Config>,
}

/// A running virtual board.
pub struct VirtualBoard {
    pub pty: PathBuf,
    pub control: PathBuf,
    task: JoinHandle<()>,
    _pty: Arc<Pty>,
}

impl VirtualBoard {
    /// Stop the board (the process owning it would just exit).
    pub fn stop(self) {
        self.task.abort();
    }
}

/// The simulated flash as the ROM loader sees it.
struct RomFlash<'a>(&'a mut Flash);

impl FlashMemory for RomFlash<'_> {
    fn size(&self) -> u32 {
        self.0.size()
    }
    fn erase(&mut self, addr: u32, len: u32) -> Result<(), String> {
        let start = addr - addr % SECTOR_SIZE;
        self.0
            .erase(
                start,
                (addr + len).div_ceil(SECTOR_SIZE) * SECTOR_SIZE - start,
            )
            .map_err(|e| e.to_string())
    }
    fn write(&mut self, addr: u32, data: &[u8]) -> Result<(), String> {
        self.0.program(addr, data).map_err(|e| e.to_string())
    }
    fn read(&self, addr: u32, buf: &mut [u8]) {
        self.0.peek(addr, buf);
    }
}

enum Control {
    Reset,
    Download,
    PowerOff,
    PowerOn,
}

#[derive(Clone)]
struct Provisioned {
    device: String,
    channel: String,
    broker: crate::broker::BrokerEndpoint,
    server: String,
    /// Mutual TLS with the identity a factory NVS image carries.
    tls: Option<Arc<rustls::ClientConfig>>,
    /// Image keys from the NVS image (`image_aes`, `image_rsa`), when it holds any.
    image_keys: Option<otarig_agent::cipher::ImageKeys>,
    /// The board's chunk key (`chunk_key`): it then fetches by the chunked protocol.
    chunk_key: Option<otarig_agent::chunk::ChunkKey>,
}

impl Provisioned {
    /// What a factory NVS image (`otarig pki nvs`) in the board's `nvs` partition says, as
    /// the esp32s3 shell reads it at boot (namespace `otarig`); None without one.
    fn from_nvs(board: &Board) -> Option<Provisioned> {
        use otarig_esp32s3::nvs::{read, NvsValue};
        let part = board.table().find("nvs")?;
        let mut image = vec![0u8; part.size as usize];
        board.flash.peek(part.offset, &mut image);
        let values = read(&image);
        let get = |k: &str| match values.get(&("otarig".to_string(), k.to_string())) {
            Some(NvsValue::Str(s)) => Some(s.clone()),
            _ => None,
        };
        let device = get("device")?;
        let mut broker = crate::broker::BrokerEndpoint::parse(&get("broker")?).ok()?;
        let tls = match (get("ca_cert"), get("device_crt"), get("device_key")) {
            (Some(ca), Some(crt), Some(key)) => {
                use otarig_server::tls::{client_config, Client};
                client_config(Client::Board, &ca, Some((&crt, &key))).ok()
            }
            _ => None,
        };
        if let Some(t) = &tls {
            broker.login = crate::broker::Login::Certificates {
                devices: Arc::new([(device.clone(), t.clone())].into()),
                operator: t.clone(),
            };
        }
        let (aes, rsa) = (get("image_aes"), get("image_rsa"));
        let image_keys = (aes.is_some() || rsa.is_some()).then(|| {
            let (keys, ignored) =
                otarig_agent::cipher::ImageKeys::from_nvs(aes.as_deref(), rsa.as_deref());
            for key in ignored {
                tracing::error!("virtual board: NVS {key} does not parse; ignored");
            }
            keys
        });
        let chunk_key = get("chunk_key").and_then(|hex| {
            let key = otarig_agent::chunk::ChunkKey::from_hex(&hex);
            if key.is_none() {
                tracing::error!(
                    "virtual board: NVS chunk_key is not 64 hex digits; fetching by ranges"
                );
            }
            key
        });
        Some(Provisioned {
            device,
            channel: get("channel").unwrap_or_else(|| "stable".into()),
            broker,
            server: get("server")?,
            tls,
            image_keys,
            chunk_key,
        })
    }
}

enum Mode {
    Download {
        loader: RomLoader,
        frames: SlipFrames,
    },
    Off,
    App {
        stop: watch::Sender<bool>,
        ctl: mpsc::Sender<Ctl>,
        task: JoinHandle<Dev>,
    },
}

/// Start a virtual board on a new pty with its control socket at `control`.
pub async fn start(opts: BoardOptions, control: &Path) -> anyhow::Result<VirtualBoard> {
    let pty = Arc::new(Pty::open()?);
    let mut reader = pty.master()?;
    let writer = Arc::new(Mutex::new(pty.master()?));
    let (bytes_tx, bytes_rx) = mpsc::unbounded_channel::<Vec<u8>>();
    std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        while let Ok(n) = reader.read(&mut buf) {
            if n == 0 || bytes_tx.send(buf[..n].to_vec()).is_err() {
                break;
            }
        }
    });
    let _ = std::fs::remove_file(control);
    let listener = tokio::net::UnixListener::bind(control)
        .map_err(|e| anyhow::anyhow!("control socket {}: {e}", control.display()))?;
    let (ctl_tx, ctl_rx) = mpsc::unbounded_channel::<(Control, oneshot::Sender<String>)>();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let tx = ctl_tx.clone();
            tokio::spawn(async move {
                let (r, mut w) = stream.into_split();
                let mut lines = BufReader::new(r).lines();
                while let Ok(Some(line)) = lines.next_line().await {
                    let c = match line.trim() {
                        "reset" => Control::Reset,
                        "download" => Control::Download,
                        "power-off" => Control::PowerOff,
                        "power-on" => Control::PowerOn,
                        other => {
                            let msg = format!(
                                "unknown '{other}' (reset, download, power-off, power-on)\n"
                            );
                            let _ = w.write_all(msg.as_bytes()).await;
                            continue;
                        }
                    };
                    let (done, answer) = oneshot::channel();
                    if tx.send((c, done)).is_err() {
                        break;
                    }
                    let reply = answer.await.unwrap_or_else(|_| "board stopped".into());
                    let _ = w.write_all(format!("{reply}\n").as_bytes()).await;
                }
            });
        }
    });
    let (console_tx, console_rx) = mpsc::unbounded_channel::<String>();
    let w2 = writer.clone();
    tokio::spawn(async move {
        let mut rx = console_rx;
        while let Some(line) = rx.recv().await {
            let mut w = w2.lock().unwrap_or_else(|p| p.into_inner());
            let _ = w.write_all(line.as_bytes());
        }
    });
    let path = pty.path().to_path_buf();
    let mac = factory_mac(control);
    let task = tokio::spawn(run(opts, mac, bytes_rx, ctl_rx, writer, console_tx));
    Ok(VirtualBoard {
        pty: path,
        control: control.to_path_buf(),
        task,
        _pty: pty,
    })
}

/// The board's life: serial bytes go to the ROM loader or the app's console, control
/// commands reset it, power it or put it in download mode.
async fn run(
    opts: BoardOptions,
    mac: [u8; 6],
    mut bytes: mpsc::UnboundedReceiver<Vec<u8>>,
    mut control: mpsc::UnboundedReceiver<(Control, oneshot::Sender<String>)>,
    writer: Arc<Mutex<std::fs::File>>,
    console: mpsc::UnboundedSender<String>,
) {
    let mut chip = Chip {
        flash: Some(Flash::new(opts.flash_size)),
        opts,
        mac,
        provisioned: None,
        line: Vec::new(),
        mode: Mode::Off,
        writer,
        console,
    };
    // Power-on: a blank chip has nothing to boot, so it waits in the ROM loader.
    if chip.blank() {
        chip.download_mode();
    } else {
        chip.start_app();
    }
    loop {
        tokio::select! {
            Some(chunk) = bytes.recv() => chip.on_serial(&chunk).await,
            Some((c, done)) = control.recv() => {
                chip.on_control(c).await;
                let _ = done.send("ok".into());
            }
            else => break,
        }
    }
}

/// The virtual chip: its flash (held here while no app runs), what it was provisioned with,
/// and what runs on it.
struct Chip {
    opts: BoardOptions,
    /// The factory MAC in its eFuses.
    mac: [u8; 6],
    flash: Option<Flash>,
    provisioned: Option<Provisioned>,
    /// The console line being received.
    line: Vec<u8>,
    mode: Mode,
    writer: Arc<Mutex<std::fs::File>>,
    console: mpsc::UnboundedSender<String>,
}

impl Chip {
    fn raw_write(&self, bytes: &[u8]) {
        let mut w = self.writer.lock().unwrap_or_else(|p| p.into_inner());
        let _ = w.write_all(bytes);
    }

    /// No partition table at 0x8000: nothing to boot.
    fn blank(&self) -> bool {
        self.flash.as_ref().is_none_or(|f| {
            let mut b = [0u8; 2];
            f.peek(0x8000, &mut b);
            b == [0xFF, 0xFF]
        })
    }

    fn download_mode(&mut self) {
        self.raw_write(otarig_esp32s3::boot_log::DOWNLOAD_BANNER.as_bytes());
        self.mode = Mode::Download {
            loader: RomLoader::new(self.opts.flash_size, self.mac),
            frames: SlipFrames::default(),
        };
    }

    /// Boot what is in flash and run the agent on it with the provisioned network (none:
    /// offline). A partition table the bootloader cannot load leaves the chip off.
    fn start_app(&mut self) {
        self.mode = self.app().unwrap_or(Mode::Off);
    }

    fn app(&mut self) -> Option<Mode> {
        let f = self.flash.take()?;
        let board = match Board::from_flash(f, self.opts.boot_config, 0) {
            Ok(b) => b,
            Err(bad) => {
                let (f, why) = *bad;
                let _ = self.console.send(format!(
                    "ESP-ROM:esp32s3-20210327\r\nE (0) boot: {why}\r\nE (0) boot: load partition table error!\r\n"
                ));
                self.flash = Some(f);
                return None;
            }
        };
        // A factory image in NVS first, as the shell reads it; else the console's.
        let prov = Provisioned::from_nvs(&board).or_else(|| self.provisioned.clone());
        let (id, channel) = prov.as_ref().map_or_else(
            || ("unprovisioned".to_string(), "stable".to_string()),
            |p| (p.device.clone(), p.channel.clone()),
        );
        let opts = &self.opts;
        let mut cfg = opts
            .agent
            .clone()
            .unwrap_or_else(|| Config::new(&id, &opts.device_type, opts.trusted_keys.clone()));
        cfg.device_id = id.clone();
        cfg.device_type = opts.device_type.clone();
        cfg.trusted_keys = opts.trusted_keys.clone();
        if let Some(keys) = prov.as_ref().and_then(|p| p.image_keys.clone()) {
            cfg.image_keys = keys;
        }
        if let Some(key) = prov.as_ref().and_then(|p| p.chunk_key.clone()) {
            cfg.fetch = otarig_agent::FetchMode::Chunked(key);
        }
        let network = prov.as_ref().map(|p| (p.broker.clone(), p.server.clone()));
        let tls = prov.and_then(|p| p.tls);
        let sh = match Shared::for_virtual_board(cfg, network, tls, self.console.clone()) {
            Ok(s) => Arc::new(s),
            Err(e) => {
                tracing::error!("virtual board: {e:#}");
                return None;
            }
        };
        let dev = Dev::for_board(&id, &channel, board);
        let (stop, stop_rx) = watch::channel(false);
        let (ctl, ctl_rx) = mpsc::channel(8);
        let task = tokio::spawn(board_task(0, dev, sh, stop_rx, ctl_rx));
        Some(Mode::App { stop, ctl, task })
    }

    /// Take the flash back from a running app (a reset or power cut between flash
    /// operations); the chip is off.
    async fn halt(&mut self) {
        if let Mode::App { stop, task, .. } = std::mem::replace(&mut self.mode, Mode::Off) {
            let _ = stop.send(true);
            if let Ok(dev) = task.await {
                self.flash = Some(dev.board.into_flash());
            }
        }
    }

    async fn on_control(&mut self, c: Control) {
        self.halt().await;
        match c {
            Control::Reset | Control::PowerOn => self.start_app(),
            Control::PowerOff => {}
            Control::Download => self.download_mode(),
        }
    }

    async fn on_serial(&mut self, chunk: &[u8]) {
        match &mut self.mode {
            Mode::Download { loader, frames } => {
                let mut run_app = false;
                let mut out = Vec::new();
                for f in frames.push(chunk) {
                    let Some(fl) = self.flash.as_mut() else { break };
                    let (replies, after) = loader.handle(&f, &mut RomFlash(fl));
                    out.extend(replies.iter().map(|r| slip_encode(r)));
                    run_app |= after == After::RunApp;
                }
                for r in out {
                    self.raw_write(&r);
                }
                if run_app {
                    self.start_app();
                }
            }
            Mode::Off => {}
            Mode::App { .. } => {
                for &b in chunk {
                    if b != b'\n' {
                        if self.line.len() < console::MAX_LINE + 16 {
                            self.line.push(b);
                        }
                        continue;
                    }
                    let text = String::from_utf8_lossy(&self.line).trim_end().to_string();
                    self.line.clear();
                    self.on_console_line(&text).await;
                }
            }
        }
    }

    /// A console-protocol command from the bench.
    async fn on_console_line(&mut self, text: &str) {
        let device = self
            .provisioned
            .as_ref()
            .map_or("unprovisioned", |p| p.device.as_str())
            .to_string();
        match console::parse_command_line(text) {
            None => {}
            Some(Err(e)) => {
                let _ = self.console.send(console::notice_line(
                    &device,
                    "console-error",
                    &e.to_string(),
                ));
            }
            Some(Ok(HostCommand::Provision {
                device,
                broker,
                server,
                channel,
                ..
            })) => match crate::broker::BrokerEndpoint::parse(&broker) {
                Ok(b) => {
                    let _ = self.console.send(console::notice_line(
                        &device,
                        "provisioned",
                        "stored; restarting",
                    ));
                    let channel = channel.unwrap_or_else(|| "stable".into());
                    self.provisioned = Some(Provisioned {
                        device,
                        channel,
                        broker: b,
                        server,
                        tls: None,
                        // Console provisioning carries no keys: the firmware's own.
                        image_keys: None,
                        chunk_key: None,
                    });
                    self.halt().await;
                    self.start_app();
                }
                Err(e) => {
                    let _ = self
                        .console
                        .send(console::notice_line(&device, "console-error", &e));
                }
            },
            Some(Ok(HostCommand::Report)) => {
                if let Mode::App { ctl, .. } = &self.mode {
                    let _ = ctl.send(Ctl::Report).await;
                }
            }
            Some(Ok(HostCommand::Reboot)) => {
                self.halt().await;
                self.start_app();
            }
        }
    }
}

/// A virtual board's factory MAC: Espressif's OUI 7C:DF:A1 and three bytes from its control
/// socket's path, so the same board keeps its MAC across runs.
fn factory_mac(control: &Path) -> [u8; 6] {
    use sha2::{Digest, Sha256};
    let h = Sha256::digest(control.as_os_str().as_encoded_bytes());
    [0x7C, 0xDF, 0xA1, h[0], h[1], h[2]]
}

/// The virtual board a scenario's firmware makes: its device type, the keys and agent
/// configuration the firmware is built with, its partition table's flash size, its
/// bootloader configuration.
pub fn options_for(s: &otarig_scenario::scenario::Scenario) -> anyhow::Result<BoardOptions> {
    let agent = otarig_scenario::runner::agent_config(s)?;
    Ok(BoardOptions {
        flash_size: s.table.flash_size().max(4 << 20),
        device_type: s.device_type.clone(),
        trusted_keys: agent.trusted_keys.clone(),
        boot_config: otarig_scenario::runner::boot_config(s),
        agent: Some(agent),
    })
}
