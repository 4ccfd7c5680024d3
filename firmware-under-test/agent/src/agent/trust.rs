//! Key sets, revocation lists and timestamps as the agent uses them ([`crate::trust`] has
//! their formats): which keys are current, and whether a manifest is withdrawn or stale.

use alloc::format;
use alloc::string::String;

use super::*;
use crate::protocol::ReleasePayload;
use crate::trust::{self as statements, RevocationsBody, TimestampBody};

/// The statements served with a manifest, their signatures verified.
#[derive(Debug, Default)]
pub(super) struct Vouch {
    revocations: Option<RevocationsBody>,
    timestamp: Option<TimestampBody>,
    /// A retained announcement without a timestamp on a board that requires one: judged on
    /// everything else, then polled for.
    pub(super) timestamp_pending: bool,
}

impl Vouch {
    /// When the timestamp an install starts under was issued (0: none), for the journal's
    /// high-water mark. The revocation list's serial is kept as soon as it is seen
    /// ([`Agent::note_revocations`]), so it needs nothing here.
    pub(super) fn timestamp_at(&self) -> u64 {
        self.timestamp.as_ref().map_or(0, |t| t.issued_at)
    }
}

impl Agent {
    /// Keys that sign manifests, revocation lists and commands now: the adopted key set's,
    /// or the firmware's own while the board never adopted one. None while the board adopted
    /// a set in an earlier boot and no answer brought it again yet.
    pub(super) fn release_keys(&self) -> &[TrustedKey] {
        match &self.keys {
            Some(k) => &k.release,
            None if self.record().keys_version == 0 => &self.cfg.trusted_keys,
            None => &[],
        }
    }

    fn timestamp_keys(&self) -> &[TrustedKey] {
        match &self.keys {
            Some(k) => &k.timestamp,
            None => &self.cfg.timestamp_keys,
        }
    }

    /// Take the key set an answer carries. A newer version than the journal's is adopted and
    /// persisted (with its `sequence_base`, if any); an older one, or another set under the
    /// same version, is refused. `Err(None)`: the journal could not be written (halted).
    pub(super) fn adopt_keys<P: Platform>(
        &mut self,
        p: &mut P,
        env: Option<&crate::SignedManifest>,
    ) -> Result<(), Option<String>> {
        let rec = *self.record();
        let Some(env) = env else {
            if rec.keys_version > 0 && self.keys.is_none() {
                return Err(Some(format!(
                    "this board adopted key set v{} and the answer carries no key set, so it cannot tell which keys sign releases",
                    rec.keys_version
                )));
            }
            return Ok(());
        };
        let ks = statements::open_keyset(env, &self.cfg.root_keys)
            .map_err(|e| Some(format!("key set: {e}")))?;
        if ks.version == 0 {
            return Err(Some(
                "key set v0: version 0 is the firmware's own keys; a key set starts at 1".into(),
            ));
        }
        if ks.version < rec.keys_version {
            return Err(Some(format!(
                "key set v{} is older than v{} this board adopted (replayed, or signed before a key was rotated out)",
                ks.version, rec.keys_version
            )));
        }
        if ks.version == rec.keys_version && ks.digest != rec.keys_digest {
            return Err(Some(format!(
                "key set v{} differs from the v{} this board adopted: two sets were signed with one version",
                ks.version, rec.keys_version
            )));
        }
        if ks.version > rec.keys_version {
            let next = Record {
                keys_version: ks.version,
                keys_digest: ks.digest,
                highest_seq: ks.sequence_base.unwrap_or(rec.highest_seq),
                // Lists signed by a rotated-out key no longer count: one that pushed the
                // serial to the top would otherwise make every later list look stale.
                revocations_serial: 0,
                ..rec
            };
            if let Err(e) = self.store(p, next) {
                self.halt("writing the journal", e);
                return Err(None);
            }
            self.emit(Event::KeysAdopted {
                version: ks.version,
            });
        }
        self.keys = Some(ks);
        Ok(())
    }

    /// Verify the revocation list and timestamp an answer carries; what they say is judged in
    /// [`Agent::check_vouch`], once the manifest is known not to be the running image.
    pub(super) fn open_statements(
        &self,
        r: &ReleasePayload,
        announced: bool,
    ) -> Result<Vouch, (Check, String)> {
        let refuse = |what: &str, e: statements::StatementError| {
            let check = match &e {
                statements::StatementError::Envelope(e) if e.is_signature() => Check::Signature,
                _ => Check::Malformed,
            };
            (check, format!("{what}: {e}"))
        };
        let revocations = r
            .revocations
            .as_ref()
            .map(|env| statements::open_revocations(env, self.release_keys()))
            .transpose()
            .map_err(|e| refuse("revocation list", e))?;
        let timestamp = r
            .timestamp
            .as_ref()
            .map(|env| statements::open_timestamp(env, self.timestamp_keys()))
            .transpose()
            .map_err(|e| refuse("timestamp", e))?;
        Ok(Vouch {
            timestamp_pending: announced && timestamp.is_none() && self.cfg.require_timestamp,
            revocations,
            timestamp,
        })
    }

    /// Keep a newer revocation list's serial in the journal (one write per list), so an older
    /// list, or none, is refused from now on. `Err` when the journal could not be written.
    pub(super) fn note_revocations<P: Platform>(
        &mut self,
        p: &mut P,
        v: &Vouch,
    ) -> Result<(), EspError> {
        let rec = *self.record();
        match &v.revocations {
            Some(list)
                if list.device_type == self.cfg.device_type
                    && list.serial > rec.revocations_serial =>
            {
                self.store(
                    p,
                    Record {
                        revocations_serial: list.serial,
                        ..rec
                    },
                )
            }
            _ => Ok(()),
        }
    }

    /// Whether the revocation list withdraws the release, and whether what vouches for it is
    /// current enough.
    pub(super) fn check_vouch(
        &self,
        now: u64,
        m: &Manifest,
        sha: &[u8; 32],
        v: &Vouch,
    ) -> Result<(), (Check, String)> {
        let rec = self.record();
        let serial = match &v.revocations {
            Some(list) => {
                if list.device_type != self.cfg.device_type {
                    return Err((
                        Check::Freshness,
                        format!(
                            "the revocation list is for '{}', this board is '{}'",
                            list.device_type, self.cfg.device_type
                        ),
                    ));
                }
                if list.serial < rec.revocations_serial {
                    return Err((
                        Check::Freshness,
                        format!(
                            "revocation list {} is older than list {} this board has seen (a stale answer)",
                            list.serial, rec.revocations_serial
                        ),
                    ));
                }
                if list.revokes(m.sequence, sha) {
                    return Err((
                        Check::Revoked,
                        format!(
                            "sequence {} ({}) is withdrawn by revocation list {}",
                            m.sequence, m.version, list.serial
                        ),
                    ));
                }
                list.serial
            }
            None if rec.revocations_serial > 0 => {
                return Err((
                    Check::Freshness,
                    format!(
                        "the answer carries no revocation list; this board has seen list {}",
                        rec.revocations_serial
                    ),
                ))
            }
            None => 0,
        };
        match &v.timestamp {
            Some(ts) => self.check_timestamp(now, m, serial, ts),
            None if self.cfg.require_timestamp && !v.timestamp_pending => Err((
                Check::Freshness,
                "no timestamp vouches for this manifest, and this board requires one (a frozen or stripped answer)".into(),
            )),
            None => Ok(()),
        }
    }

    fn check_timestamp(
        &self,
        now: u64,
        m: &Manifest,
        serial: u64,
        ts: &TimestampBody,
    ) -> Result<(), (Check, String)> {
        let stale = |detail: String| Err((Check::Freshness, detail));
        if ts.device_type != m.device_type
            || ts.channel != m.channel
            || ts.sequence != m.sequence
            || !ts.sha256.eq_ignore_ascii_case(&m.sha256)
        {
            return stale(format!(
                "the timestamp vouches for sequence {} of {}/{} as current, not this manifest's sequence {} (a frozen or mixed answer)",
                ts.sequence, ts.device_type, ts.channel, m.sequence
            ));
        }
        if ts.expires_at.saturating_mul(1000) < now {
            return stale(format!(
                "the timestamp expired at {} (unix s), now is {}: the answer is frozen, or the server's clock is off",
                ts.expires_at,
                now / 1000
            ));
        }
        if ts.issued_at < self.record().timestamp_at {
            return stale(format!(
                "the timestamp was issued at {}, before the one of {} this board already installed under",
                ts.issued_at,
                self.record().timestamp_at
            ));
        }
        if ts.revocations != serial {
            return stale(format!(
                "the timestamp names revocation list {}, the answer carries list {serial}",
                ts.revocations
            ));
        }
        Ok(())
    }
}
