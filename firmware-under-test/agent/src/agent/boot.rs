//! Boot, self-test and confirmation, and finishing what the journal says was under way.

use alloc::format;
use alloc::string::{String, ToString};

use super::*;

impl Agent {
    pub(super) fn on_boot<P: Platform>(&mut self, p: &mut P, now: u64) {
        if !matches!(self.state, State::Off) {
            return;
        }
        let journal = match Journal::load(p) {
            Ok(j) => j,
            Err(e) => return self.halt("reading the journal", e),
        };
        self.journal = Some(journal);
        let slot = p.running_slot();
        let (version, sha256) = match p.slot_image(slot) {
            Ok(info) => (info.version().to_string(), info.sha256),
            // The bootloader verified this image a moment ago; failing here means flash reads
            // are failing, which a later step reports.
            Err(_) => ("unknown".to_string(), [0; 32]),
        };
        let state = match slot.kind {
            SlotKind::Ota(_) => match p.slot_state(slot) {
                Ok(s) => s,
                Err(e) => return self.halt("reading otadata", e),
            },
            _ => None,
        };
        self.running = Some(Running {
            slot,
            version: version.clone(),
            sha256,
        });
        self.emit(Event::Booted {
            version,
            slot: slot.kind,
            sha256,
            state,
        });
        // On probation: the bootloader says PENDING_VERIFY, or the journal says this image was
        // just installed and nothing has marked it valid yet. The second case covers a power
        // cut while the bootloader rewrote the NEW entry in place: the torn entry can come
        // back valid but UNDEFINED, which the bootloader would never roll back.
        let rec = *self.record();
        let just_installed = rec.phase == Phase::Installed
            && rec.sha256 == sha256
            && matches!(state, Some(OtaImgState::Undefined | OtaImgState::New));
        if state == Some(OtaImgState::PendingVerify) || just_installed {
            if rec.unreachable {
                // A power cut between noting an outage and rolling back: this boot judges
                // the image afresh.
                if let Err(e) = self.store(
                    p,
                    Record {
                        unreachable: false,
                        ..rec
                    },
                ) {
                    return self.halt("writing the journal", e);
                }
            }
            self.state = State::SelfTest;
            self.timers.confirm = Some(now.saturating_add(self.cfg.confirm_timeout_ms));
            self.out.push_back(Action::RunSelfTest);
        } else {
            self.reconcile(p, now);
        }
    }

    pub(super) fn on_self_test<P: Platform>(
        &mut self,
        p: &mut P,
        now: u64,
        passed: bool,
        detail: &str,
    ) {
        if !matches!(self.state, State::SelfTest) {
            return;
        }
        self.emit(Event::SelfTest {
            passed,
            detail: detail.to_string(),
        });
        if !passed {
            return self.roll_back_self(p, format!("self-test failed: {detail}"));
        }
        if self.cfg.confirm_requires_network && !self.online {
            self.state = State::AwaitNetwork;
        } else {
            self.confirm(p, now);
        }
    }

    pub(super) fn on_online<P: Platform>(&mut self, p: &mut P, now: u64) {
        self.online = true;
        match self.state {
            State::AwaitNetwork => self.confirm(p, now),
            State::Ready | State::AwaitManifest => self.poll(now),
            _ => {}
        }
    }

    pub(super) fn confirm<P: Platform>(&mut self, p: &mut P, now: u64) {
        self.timers.confirm = None;
        if let Err(e) = p.mark_app_valid_cancel_rollback() {
            return self.halt("marking the app valid", e);
        }
        let version = self.running_version();
        self.emit(Event::Confirmed { version });
        self.reconcile(p, now);
    }

    /// The running image failed before it was confirmed: mark it invalid and reboot into the
    /// previous one (`esp_ota_mark_app_invalid_rollback_and_reboot`).
    pub(super) fn roll_back_self<P: Platform>(&mut self, p: &mut P, reason: String) {
        self.timers = Timers::default();
        let version = self.running_version();
        self.emit(Event::RollingBack { version, reason });
        match p.mark_app_invalid_rollback() {
            Ok(()) => {
                self.state = State::Rebooting;
                self.out.push_back(Action::Reboot);
            }
            // ESP_ERR_OTA_ROLLBACK_FAILED: no other bootable app; keep running this one.
            Err(e) => self.halt("rolling back", e),
        }
    }

    /// The running image passed its self-test but never reached the network: say so in the
    /// journal before rolling back, so the previous image retries the release rather than
    /// marking it known-bad (an outage of Wi-Fi or the broker is not the image's fault, as
    /// far as one board can tell). Best effort: if the write fails, the rollback still happens
    /// and the release counts as failed.
    pub(super) fn note_unreachable<P: Platform>(&mut self, p: &mut P) {
        let rec = *self.record();
        let running = self.running.as_ref().map(|r| r.sha256);
        if rec.phase == Phase::Installed && Some(rec.sha256) == running {
            let _ = self.store(
                p,
                Record {
                    unreachable: true,
                    ..rec
                },
            );
        }
    }

    /// After boot (and confirmation): finish whatever the journal says was under way.
    pub(super) fn reconcile<P: Platform>(&mut self, p: &mut P, now: u64) {
        let rec = *self.record();
        let running = self.running.clone();
        let Some(running) = running else { return };
        match rec.phase {
            Phase::Idle => self.state = State::Ready,
            Phase::Downloading => {
                let slot_ok = p
                    .next_update_slot()
                    .is_some_and(|s| s.address == rec.slot_addr);
                if rec.sha256 == running.sha256 || !slot_ok {
                    // Stale: the image already runs, or the layout changed under it.
                    let idle = Record {
                        phase: Phase::Idle,
                        ..rec
                    };
                    if let Err(e) = self.store(p, idle) {
                        return self.halt("writing the journal", e);
                    }
                    self.state = State::Ready;
                } else {
                    self.state = State::AwaitManifest;
                }
            }
            Phase::Installed => self.reconcile_installed(p, rec, &running),
        }
        if self.online && matches!(self.state, State::Ready | State::AwaitManifest) {
            self.poll(now);
        }
    }

    pub(super) fn reconcile_installed<P: Platform>(
        &mut self,
        p: &mut P,
        rec: Record,
        running: &Running,
    ) {
        let version = image::heapless_str::Str32::from_c(&rec.version)
            .as_str()
            .to_string();
        if running.sha256 == rec.sha256 {
            // The new image runs and is confirmed: the release is done.
            let idle = Record {
                phase: Phase::Idle,
                attempts: 0,
                installs: 0,
                highest_seq: rec.highest_seq.max(rec.target_seq),
                ..rec
            };
            self.ack(rec.target_seq, &version, Outcome::Installed);
            if let Err(e) = self.store(p, idle) {
                return self.halt("writing the journal", e);
            }
            self.state = State::Ready;
            return;
        }
        let target = p.next_update_slot().filter(|s| s.address == rec.slot_addr);
        let state = match target.map(|s| p.slot_state(s)) {
            Some(Ok(s)) => s,
            Some(Err(e)) => return self.halt("reading otadata", e),
            None => None,
        };
        // An image the bootloader found unconfirmed (ABORTED) either crashed or hung — or lost
        // power while `esp_ota_mark_app_valid_cancel_rollback` rewrote its otadata entry in
        // place, which leaves the entry PENDING_VERIFY and looks exactly the same. So it gets
        // `UNCONFIRMED_RETRIES` more boots before it is declared bad. An image that marked
        // itself INVALID said so itself and is not retried.
        let unconfirmed = matches!(
            state,
            Some(OtaImgState::Aborted | OtaImgState::PendingVerify)
        );
        let retry_unconfirmed = unconfirmed && rec.installs < UNCONFIRMED_RETRIES;
        if state == Some(OtaImgState::Invalid) && rec.unreachable {
            return self.rolled_back_offline(p, rec, &version);
        }
        match (target, state) {
            (
                _,
                Some(
                    s @ (OtaImgState::Invalid | OtaImgState::Aborted | OtaImgState::PendingVerify),
                ),
            ) if !retry_unconfirmed => {
                let detail = match s {
                    OtaImgState::Invalid => {
                        format!(
                            "{version} marked itself invalid (self-test or confirmation failed)"
                        )
                    }
                    _ => format!(
                        "{version} never confirmed (crashed or hung); the bootloader rolled back"
                    ),
                };
                let idle = Record {
                    phase: Phase::Idle,
                    known_bad: rec.known_bad.with(&rec.sha256),
                    ..rec
                };
                self.ack(rec.target_seq, &version, Outcome::RolledBack { detail });
                if let Err(e) = self.store(p, idle) {
                    return self.halt("writing the journal", e);
                }
                self.state = State::Ready;
            }
            (Some(slot), _) if rec.installs < 3 => {
                // The switch to the new image did not land (power cut while otadata was being
                // written, or before), or it never got confirmed (see above): check the image
                // again and switch again.
                let ok = self.slot_matches(p, slot, rec.size, &rec.sha256);
                if !ok {
                    let again = Record {
                        phase: Phase::Downloading,
                        checkpoint: 0,
                        ..rec
                    };
                    if let Err(e) = self.store(p, again) {
                        return self.halt("writing the journal", e);
                    }
                    self.state = State::AwaitManifest;
                    return;
                }
                let retry = Record {
                    installs: rec.installs + 1,
                    ..rec
                };
                if let Err(e) = self.store(p, retry) {
                    return self.halt("writing the journal", e);
                }
                self.switch_boot(p, slot, rec.target_seq, &version, rec);
            }
            _ => {
                let detail =
                    "the boot partition could not be switched after 3 attempts".to_string();
                let idle = Record {
                    phase: Phase::Idle,
                    known_bad: rec.known_bad.with(&rec.sha256),
                    ..rec
                };
                self.refuse(rec.target_seq, &version, Check::BootPartition, detail);
                if let Err(e) = self.store(p, idle) {
                    return self.halt("writing the journal", e);
                }
                self.state = State::Ready;
            }
        }
    }

    /// The image of `rec` rolled itself back because it never reached the network. Unless
    /// that happened [`OFFLINE_ROLLBACKS`] times (then the image's own network stack is the
    /// likelier culprit: it is acked rolled-back and known-bad), the release is neither
    /// known-bad nor acked yet: the journal goes idle with the outage counted, and the next
    /// poll that reaches the server installs it again.
    fn rolled_back_offline<P: Platform>(&mut self, p: &mut P, rec: Record, version: &str) {
        let outages = rec.outages.saturating_add(1);
        let give_up = outages >= OFFLINE_ROLLBACKS;
        let detail = if give_up {
            format!(
                "{version} never reached the network after {outages} installs; marked known-bad"
            )
        } else {
            format!(
                "{version} could not reach the network before its confirmation deadline \
                 ({outages} of {OFFLINE_ROLLBACKS}); retried when the network is back"
            )
        };
        let idle = Record {
            phase: Phase::Idle,
            outages,
            unreachable: false,
            known_bad: if give_up {
                rec.known_bad.with(&rec.sha256)
            } else {
                rec.known_bad
            },
            ..rec
        };
        if give_up {
            self.ack(rec.target_seq, version, Outcome::RolledBack { detail });
        } else {
            self.emit(Event::Retrying {
                sequence: rec.target_seq,
                version: version.to_string(),
                detail,
            });
        }
        if let Err(e) = self.store(p, idle) {
            return self.halt("writing the journal", e);
        }
        self.state = State::Ready;
    }
}
