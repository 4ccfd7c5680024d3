//! Commands from the server (`update-now`, `reboot`, `report`): each acts once, and only if
//! it is authentic whatever the broker let through.

use alloc::format;
use alloc::string::ToString;

use crate::protocol::{Command, CommandError, CommandKind};

use super::*;

impl Agent {
    pub(super) fn on_command<P: Platform>(
        &mut self,
        p: &mut P,
        now: u64,
        payload: &[u8],
        retained: bool,
    ) {
        if retained {
            // A retained command would be delivered again at every connection.
            return self.refuse_command(
                0,
                Check::Retained,
                "retained message on the command topic",
            );
        }
        let cmd = match crate::protocol::parse_command(payload, self.release_keys()) {
            Ok(c) => c,
            Err(CommandError::Payload(e)) => {
                return self.emit(Event::BadMessage {
                    topic: "cmd",
                    reason: e.to_string(),
                })
            }
            Err(CommandError::Envelope(e)) => {
                return self.refuse_command(0, Check::Signature, &e.to_string())
            }
        };
        if let Err((check, detail)) = self.check_command(now, &cmd) {
            return self.refuse_command(cmd.id, check, &detail);
        }
        // Remembered before acting, so a reboot command cannot act again after the reboot.
        // If the journal cannot be written the command still acts: on a board whose storage
        // fails, `reboot` is the way out.
        let rec = *self.record();
        let _ = self.store(
            p,
            Record {
                last_command: cmd.id,
                ..rec
            },
        );
        self.act_on(now, cmd.kind);
    }

    /// Everything after the signature: addressed here, unexpired, not acted on before.
    fn check_command(&self, now: u64, cmd: &Command) -> Result<(), (Check, alloc::string::String)> {
        if cmd.device != self.cfg.device_id {
            return Err((
                Check::Device,
                format!("command for device '{}'", cut(&cmd.device)),
            ));
        }
        // Without a set clock the expiry cannot be checked; the id still refuses replays.
        if self.clock_is_set(now) && now / 1000 > cmd.expires_at {
            return Err((
                Check::Expired,
                format!("command expired at {} (now {})", cmd.expires_at, now / 1000),
            ));
        }
        let last = self.record().last_command;
        if cmd.id <= last {
            return Err((
                Check::Replayed,
                format!(
                    "command id {} is not above {last}, the last acted on",
                    cmd.id
                ),
            ));
        }
        Ok(())
    }

    fn refuse_command(&mut self, id: u64, check: Check, detail: &str) {
        self.emit(Event::CommandRefused {
            id,
            check,
            detail: detail.to_string(),
        });
    }

    fn act_on(&mut self, now: u64, kind: CommandKind) {
        match kind {
            CommandKind::UpdateNow => {
                if self.online && matches!(self.state, State::Ready | State::AwaitManifest) {
                    self.poll(now);
                }
            }
            CommandKind::Reboot => {
                // Safe at any point: everything that must survive is in the journal.
                self.timers = Timers::default();
                self.state = State::Rebooting;
                self.out.push_back(Action::Reboot);
            }
            CommandKind::Report => self.report_status(),
        }
    }

    /// Publish a `report` event: what the agent is doing. Also what a shell calls for a
    /// request that needs no authority (the serial console's `report`).
    pub fn report_status(&mut self) {
        let state = match &self.state {
            State::Off => "off",
            State::SelfTest => "self-test",
            State::AwaitNetwork => "await-network",
            State::Ready => "ready",
            State::AwaitManifest => "await-manifest",
            State::Downloading(_) => "downloading",
            State::Backoff(_) => "backoff",
            State::Rebooting => "rebooting",
            State::Halted => "halted",
        };
        let version = self.running_version();
        self.emit(Event::Report { state, version });
    }
}

/// A device id from an untrusted-length field, cut for an event.
fn cut(s: &str) -> &str {
    let end = s.char_indices().nth(64).map_or(s.len(), |(i, _)| i);
    &s[..end]
}
