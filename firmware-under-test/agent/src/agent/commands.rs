//! Commands from the server (`update-now`, `reboot`, `report`), each acted on once.

use alloc::string::ToString;

use super::*;

impl Agent {
    pub(super) fn on_command(&mut self, now: u64, bytes: &[u8]) {
        use crate::protocol::CommandKind;
        let cmd = match crate::protocol::parse_command(bytes) {
            Ok(c) => c,
            Err(e) => {
                return self.emit(Event::BadMessage {
                    topic: "cmd",
                    reason: e.to_string(),
                })
            }
        };
        if self.seen_commands.contains(&cmd.id) {
            return; // duplicated or replayed
        }
        if self.seen_commands.len() == 16 {
            self.seen_commands.pop_front();
        }
        self.seen_commands.push_back(cmd.id);
        match cmd.kind {
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
            CommandKind::Report => {
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
    }
}
