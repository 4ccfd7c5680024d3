//! What the runner knows of the board, from its console: the bootloader's log lines and the
//! agent's console-protocol events and acks become the same records a simulated run has.

use std::collections::HashSet;
use std::time::Instant;

use otarig_agent::console::{self, BoardLine};
use otarig_agent::{Event, OtaImgState};
use otarig_esp32s3::board::BoardEvent;
use otarig_scenario::runner::{DeviceReport, Record, What};

use crate::DEVICE;

/// What the runner knows of the board, from its console.
#[derive(Default)]
pub(crate) struct Observed {
    pub(crate) records: Vec<Record>,
    pub(crate) acks: HashSet<(u64, &'static str)>,
    pub(crate) last_booted: Option<Event>,
    pub(crate) confirmed_since_boot: bool,
    pub(crate) bricked: Option<String>,
    pub(crate) image_size: u64,
    pub(crate) last_line_at: Option<Instant>,
    pub(crate) progress_pct: u32,
    /// A release is being worked on (between its first download event and its ack): silence
    /// then is a timeout or a backoff, not the end.
    pub(crate) busy: bool,
}

impl Observed {
    /// Take one console line said at `t_ms` (scenario time).
    pub(crate) fn take(&mut self, t_ms: u64, line: &str) -> Result<(), String> {
        self.last_line_at = Some(Instant::now());
        let mut push = |what| {
            self.records.push(Record {
                t_ms,
                device: DEVICE,
                what,
            })
        };
        if line.starts_with("ESP-ROM:") {
            return Ok(());
        }
        if let Some(rest) = line
            .split_once("boot: Loaded app from partition ")
            .map(|(_, r)| r)
        {
            // "ota_0: version 2.0.0, sha256 …" (virtual) or "at offset 0x10000" (ESP-IDF).
            let (slot, version) = match rest.split_once(": version ") {
                Some((s, v)) => (s.to_string(), v.split(',').next().unwrap_or("").to_string()),
                None => (rest.to_string(), String::new()),
            };
            self.bricked = None;
            push(What::Board(BoardEvent::BootloaderStarted {
                slot,
                version,
                secure_version: 0,
                sha256: String::new(),
                otadata_valid: 0,
            }));
            return Ok(());
        }
        if line.contains("No bootable app partitions") {
            self.bricked = Some(line.to_string());
            return Ok(());
        }
        if line.contains("marked ABORTED, rolling back") {
            let slot = line.split_whitespace().nth(3).unwrap_or("").to_string();
            push(What::Board(BoardEvent::BootloaderAborted { slot }));
            return Ok(());
        }
        match console::parse_board_line(line)? {
            BoardLine::Event { event, .. } => {
                match &event {
                    Event::Booted { .. } => {
                        self.last_booted = Some(event.clone());
                        self.confirmed_since_boot = false;
                        self.progress_pct = 0;
                    }
                    Event::Confirmed { .. } => self.confirmed_since_boot = true,
                    Event::Downloading { size, .. } => {
                        self.image_size = *size as u64;
                        self.busy = true;
                    }
                    Event::Progress { written, size, .. } => {
                        self.progress_pct = (*written as u64 * 100 / (*size).max(1) as u64) as u32
                    }
                    Event::BootSet { slot, .. } => {
                        push(What::Board(BoardEvent::BootPartitionSet {
                            slot: slot.to_string(),
                        }))
                    }
                    _ => {}
                }
                push(What::Agent(event));
            }
            BoardLine::Ack { ack, .. } => {
                self.busy = false;
                let fresh = self.acks.insert((ack.sequence, ack.outcome.name()));
                push(What::Ack {
                    ack,
                    duplicate: !fresh,
                });
            }
            BoardLine::Notice { .. } | BoardLine::Log => {}
        }
        Ok(())
    }

    /// The board as its console last described it.
    pub(crate) fn report(&self, id: &str, fetched: u64, cuts: u32) -> DeviceReport {
        let (version, slot, state, sha) = match &self.last_booted {
            Some(Event::Booted {
                version,
                slot,
                sha256,
                state,
            }) => (
                Some(version.clone()),
                Some(slot.to_string()),
                if self.confirmed_since_boot {
                    OtaImgState::Valid.name().to_string()
                } else {
                    state.map_or("none", |s| s.name()).to_string()
                },
                Some(*sha256),
            ),
            _ => (None, None, "none".to_string(), None),
        };
        DeviceReport {
            index: DEVICE,
            id: id.to_string(),
            version: if self.bricked.is_some() {
                None
            } else {
                version
            },
            running_slot: slot,
            running_state: state,
            update_slot_state: None,
            bricked: self.bricked.clone(),
            crash_loop: None,
            fetched_bytes: fetched,
            image_size: self.image_size,
            power_cuts: cuts,
            running_sha256: sha,
            efuse: 0,
            flash_ops: 0,
        }
    }
}
