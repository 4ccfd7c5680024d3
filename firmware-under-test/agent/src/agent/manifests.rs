//! Manifests: the checks a signed manifest must pass, refusals, and polling.

use alloc::format;
use alloc::string::{String, ToString};

use super::*;

impl Agent {
    pub(super) fn poll(&mut self, now: u64) {
        self.out.push_back(Action::PollManifest);
        if self.cfg.poll_interval_ms > 0 {
            self.timers.poll = Some(now.saturating_add(self.cfg.poll_interval_ms));
        }
    }

    pub(super) fn on_manifest<P: Platform>(&mut self, p: &mut P, now: u64, bytes: &[u8]) {
        if !matches!(self.state, State::Ready | State::AwaitManifest) {
            return; // busy: a download, a self-test or a reboot is under way
        }
        let m = match manifest::open(bytes, &self.cfg.trusted_keys) {
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
        let rec = *self.record();
        if matches!(self.state, State::AwaitManifest)
            && m.sequence == rec.target_seq
            && sha == rec.sha256
        {
            if let Err((check, detail)) = self.evaluate(p, now, &m, &sha) {
                return self.refuse(m.sequence, &m.version, check, detail);
            }
            return self.resume(p, m, sha, rec);
        }
        match self.evaluate(p, now, &m, &sha) {
            Ok(()) => self.start(p, m, sha),
            Err((Check::AlreadyInstalled, _)) => {} // the steady state, nothing to say
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
