//! Manifests: the checks a signed manifest must pass, refusals, and polling.

use alloc::format;
use alloc::string::{String, ToString};

use super::trust::Vouch;
use super::*;

impl Agent {
    pub(super) fn poll(&mut self, now: u64) {
        self.out.push_back(Action::PollManifest);
        if self.cfg.poll_interval_ms > 0 {
            self.timers.poll = Some(now.saturating_add(self.cfg.poll_interval_ms));
        }
    }

    /// A release payload from a poll answer or (`announced`) the release topic: adopt its key
    /// set, verify the manifest and its statements, then install, resume or refuse.
    pub(super) fn on_release<P: Platform>(
        &mut self,
        p: &mut P,
        now: u64,
        bytes: &[u8],
        announced: bool,
    ) {
        if !matches!(self.state, State::Ready | State::AwaitManifest) {
            return; // busy: a download, a self-test or a reboot is under way
        }
        let r = match crate::protocol::parse_release(bytes) {
            Ok(r) => r,
            Err(e) if announced => {
                return self.emit(Event::BadMessage {
                    topic: "release",
                    reason: e.to_string(),
                })
            }
            Err(e) => return self.refuse(0, "?", Check::Malformed, e.to_string()),
        };
        match self.adopt_keys(p, r.keys.as_ref()) {
            Ok(()) => {}
            Err(None) => return, // halted on a storage error
            Err(Some(detail)) => return self.refuse(0, "?", Check::Keys, detail),
        }
        let m = match manifest::open_parsed(&r.signed, self.release_keys()) {
            Ok(m) => m,
            Err(e) => {
                let check = if e.is_signature() {
                    Check::Signature
                } else {
                    Check::Malformed
                };
                return self.refuse(0, "?", check, e.to_string());
            }
        };
        let Some(sha) = m.sha256_bytes() else { return };
        let vouch = match self.open_statements(&r, announced) {
            Ok(v) => v,
            Err((check, detail)) => return self.refuse(m.sequence, &m.version, check, detail),
        };
        drop(r); // the download's buffers come next: keep the peak heap down
        if let Err(e) = self.note_revocations(p, &vouch) {
            return self.halt("writing the journal", e);
        }
        let rec = *self.record();
        let resuming = matches!(self.state, State::AwaitManifest)
            && m.sequence == rec.target_seq
            && sha == rec.sha256;
        let verdict = self.evaluate(p, now, &m, &sha, &vouch);
        let (pending, timestamp_at) = (vouch.timestamp_pending, vouch.timestamp_at());
        drop(vouch);
        match verdict {
            // A retained announcement without a timestamp, on a board that requires one:
            // everything else passed, so ask the server for the answer it vouches for.
            Ok(()) if pending => self.poll(now),
            Ok(()) if resuming => self.resume(p, m, sha, rec, timestamp_at),
            Ok(()) => self.start(p, m, sha, timestamp_at),
            Err((Check::AlreadyInstalled, _)) if !resuming => {} // the steady state
            Err((check, detail)) => self.refuse(m.sequence, &m.version, check, detail),
        }
    }

    /// The checks a signed manifest must pass, in order. The signature was checked already.
    pub(super) fn evaluate<P: Platform>(
        &self,
        p: &mut P,
        now: u64,
        m: &Manifest,
        sha: &[u8; 32],
        vouch: &Vouch,
    ) -> Result<(), (Check, String)> {
        let rec = self.record();
        let running = self.running.as_ref();
        if m.device_type != self.cfg.device_type {
            return Err((
                Check::DeviceType,
                format!(
                    "manifest is for '{}', this board is '{}'",
                    m.device_type, self.cfg.device_type
                ),
            ));
        }
        if m.channel != self.cfg.channel {
            return Err((
                Check::Channel,
                format!(
                    "manifest is signed for channel '{}', this board follows '{}'",
                    m.channel, self.cfg.channel
                ),
            ));
        }
        if !self.clock_is_set(now) {
            return Err((
                Check::Clock,
                format!(
                    "the board's clock is not set (it reads {} s after 1970): the manifest's expiry cannot be checked; waiting for the time",
                    now / 1000
                ),
            ));
        }
        if m.expires_at.saturating_mul(1000) < now {
            return Err((
                Check::Expired,
                format!(
                    "manifest expired at {} (unix s), now is {}",
                    m.expires_at,
                    now / 1000
                ),
            ));
        }
        if running.is_some_and(|r| &r.sha256 == sha) {
            return Err((
                Check::AlreadyInstalled,
                format!("{} is already running", m.version),
            ));
        }
        self.check_vouch(now, m, sha, vouch)?;
        if m.sequence <= rec.highest_seq {
            return Err((
                Check::Sequence,
                format!(
                    "sequence {} is not above {} already installed (replayed or stale manifest)",
                    m.sequence, rec.highest_seq
                ),
            ));
        }
        if m.sequence - rec.highest_seq > self.cfg.max_sequence_step {
            return Err((
                Check::Sequence,
                format!(
                    "sequence {} jumps more than {} above {} already installed (fast-forward)",
                    m.sequence, self.cfg.max_sequence_step, rec.highest_seq
                ),
            ));
        }
        let fuse = p.efuse_secure_version();
        if m.secure_version < fuse {
            return Err((
                Check::SecureVersion,
                format!(
                    "secure_version {} is below the eFuse anti-rollback counter {fuse}",
                    m.secure_version
                ),
            ));
        }
        if rec.known_bad.contains(sha) {
            return Err((
                Check::KnownBad,
                format!(
                    "{} already failed on this board and was rolled back or refused",
                    m.version
                ),
            ));
        }
        if rec.phase == Phase::Idle
            && rec.target_seq == m.sequence
            && rec.attempts >= self.cfg.max_attempts
        {
            return Err((
                Check::KnownBad,
                format!(
                    "gave up on sequence {} after {} failed attempts",
                    m.sequence, rec.attempts
                ),
            ));
        }
        if let Some(enc) = &m.encryption {
            cipher::check(enc, m.size, &self.cfg.image_keys)
                .map_err(|e| (Check::Decrypt, e.to_string()))?;
        }
        let slot = p
            .next_update_slot()
            .ok_or((Check::TooLarge, "no OTA slot".to_string()))?;
        if m.size > slot.size || (m.size as usize) < image::HEADER_LEN {
            return Err((
                Check::TooLarge,
                format!(
                    "image is {} bytes, slot {} holds {}",
                    m.size, slot.kind, slot.size
                ),
            ));
        }
        Ok(())
    }

    pub(super) fn refuse(&mut self, sequence: u64, version: &str, check: Check, detail: String) {
        if self.reported.contains(&(sequence, check)) {
            return;
        }
        self.reported.push((sequence, check));
        self.emit(Event::Refused {
            sequence,
            version: version.to_string(),
            check,
            detail: detail.clone(),
        });
        // One ack per release: a known-bad release had its outcome acked when it failed, an
        // envelope that did not verify carries no sequence number worth believing, and an unset
        // clock passes by itself.
        if sequence != 0 && !matches!(check, Check::KnownBad | Check::Clock) {
            self.ack(sequence, version, Outcome::Refused { check, detail });
        }
    }
}
