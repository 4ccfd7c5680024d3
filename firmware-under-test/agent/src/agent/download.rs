//! Downloading: full images and delta patches into the update slot, checkpoints, retries,
//! verification and the switch of the boot partition.

use alloc::format;
use alloc::string::{String, ToString};

use super::*;
use crate::chunk::{self, CHUNK_SIZE};
use crate::cipher::{Decryptor, FeedError};
use alloc::boxed::Box;

#[derive(Debug)]
pub(super) struct Download {
    pub(super) manifest: Manifest,
    sha256: [u8; 32],
    pub(super) slot: Slot,
    /// Bytes of the new image in the slot.
    pub(super) written: u32,
    /// End of the current range request (in the image, or in the patch for a delta).
    pub(super) requested_end: u32,
    pub(super) consecutive_failures: u32,
    pub(super) next_progress_pct: u32,
    pub(super) delta: Option<DeltaDownload>,
    /// An encrypted image: ciphertext in, plaintext to the slot.
    decrypt: Option<Box<Decryptor>>,
    /// Bytes taken since the current transfer-rate window began.
    window_bytes: u64,
    /// The chunked protocol's open session (none until `/ota/check` answered; dropped at
    /// every failure, so a retry opens a new one).
    session: Option<chunk::Session>,
    /// The check that refused the last chunk, until a chunk is taken: a download given up
    /// after refused chunks names it rather than `download`.
    chunk_refusal: Option<Check>,
}

/// A delta being applied: patch bytes in, new image bytes out.
pub(super) struct DeltaDownload {
    pub(super) applier: alloc::boxed::Box<Applier>,
    patch_sha256: [u8; 32],
    pub(super) patch_size: u32,
    pub(super) url: Option<String>,
    /// The running slot, where old bytes are read.
    pub(super) old: Slot,
}

impl core::fmt::Debug for DeltaDownload {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("DeltaDownload")
            .field("next", &self.applier.next_offset())
            .finish()
    }
}

impl Download {
    /// Where the next range starts and where the thing being fetched ends.
    pub(super) fn fetch_window(&self) -> (u32, u32) {
        match (&self.delta, &self.decrypt) {
            (Some(d), _) => (d.applier.next_offset() as u32, d.patch_size),
            (None, Some(d)) => (d.next_offset(), d.total()),
            (None, None) => (self.written, self.manifest.size),
        }
    }

    /// Everything to fetch has been taken.
    fn fetched_all(&self) -> bool {
        match (&self.delta, &self.decrypt) {
            (Some(d), _) => d.applier.is_done(),
            (None, Some(d)) => d.next_offset() >= d.total(),
            (None, None) => self.written >= self.manifest.size,
        }
    }
}

/// Write image bytes at the download's position in steps that end at each checkpoint
/// boundary, making every boundary durable at once (unless `checkpoints` is off: a stream
/// that cannot resume): one response may carry the whole image (a server that ignores Range),
/// and a cut in the middle of it must still resume near where it was. A failed write aborts
/// the OTA handle; a failed journal write leaves it (the caller halts either way).
fn write_checkpointed<P: Platform>(
    p: &mut P,
    journal: &mut Option<Journal>,
    dl: &mut Download,
    interval: u32,
    checkpoints: bool,
    mut data: &[u8],
) -> Result<(), (&'static str, EspError)> {
    while !data.is_empty() {
        let n = core::cmp::min(data.len(), (interval - dl.written % interval) as usize);
        if let Err(e) = p.ota_write(&data[..n]) {
            p.ota_abort();
            return Err(("esp_ota_write", e));
        }
        dl.written += n as u32;
        data = &data[n..];
        let boundary = dl.written.is_multiple_of(interval) && dl.written < dl.manifest.size;
        if let Some(j) = journal.as_mut().filter(|_| boundary && checkpoints) {
            let rec = Record {
                checkpoint: dl.written,
                ..*j.record()
            };
            j.store(p, rec).map_err(|e| ("writing the journal", e))?;
        }
    }
    Ok(())
}

/// What the applier needs from the board while patching: old bytes, the update slot, and
/// the journal, where each checkpoint is made durable the moment it is offered (one range of
/// patch can produce the whole image, so waiting for the range to end would be too late).
pub(super) struct PatchSink<'a, P: Platform> {
    pub(super) p: &'a mut P,
    pub(super) journal: &'a mut Option<Journal>,
    pub(super) old: Slot,
    /// A journal write failed: the board's own storage, not the patch, is at fault.
    pub(super) journal_error: Option<EspError>,
}

/// A failed read of the running image or write of the new one ends the patch (the applier
/// says `DeltaError::Io`), and the agent falls back to the full image: a patch whose header
/// or seeks point outside the slot must not stop the board from updating.
impl<P: Platform> delta::Sink for PatchSink<'_, P> {
    fn read_old(&mut self, offset: u32, buf: &mut [u8]) -> Result<(), delta::SinkError> {
        self.p
            .slot_read(self.old, offset, buf)
            .map_err(|_| delta::SinkError)
    }
    fn write_new(&mut self, data: &[u8]) -> Result<(), delta::SinkError> {
        self.p.ota_write(data).map_err(|_| delta::SinkError)
    }
    fn checkpoint(&mut self, at: Resume) {
        if self.journal_error.is_some() {
            return;
        }
        let Some(j) = self.journal.as_mut() else {
            return;
        };
        let rec = Record {
            checkpoint: at.new_written,
            resume: at,
            ..*j.record()
        };
        if let Err(e) = j.store(self.p, rec) {
            self.journal_error = Some(e);
        }
    }
}

impl Agent {
    pub(super) fn start<P: Platform>(
        &mut self,
        p: &mut P,
        m: Manifest,
        sha: [u8; 32],
        timestamp_at: u64,
    ) {
        let Some(slot) = p.next_update_slot() else {
            return;
        };
        let rec = *self.record();
        let same = rec.target_seq == m.sequence;
        let (attempts, outages) = if same {
            (rec.attempts, rec.outages)
        } else {
            (0, 0)
        };
        let patch = self.pick_delta(&m).filter(|_| attempts == 0);
        let next = Record {
            phase: Phase::Downloading,
            attempts,
            installs: 0,
            outages,
            unreachable: false,
            target_seq: m.sequence,
            size: m.size,
            checkpoint: 0,
            slot_addr: slot.address,
            sha256: sha,
            version: image::heapless_str::Str32::new(&m.version).field(),
            delta: patch.is_some(),
            patch_sha256: patch.as_ref().map_or([0; 32], |d| d.patch_sha256),
            resume: Resume::default(),
            timestamp_at: rec.timestamp_at.max(timestamp_at),
            ..rec
        };
        // Journal first: a cut inside esp_ota_begin then resumes at 0, which re-erases.
        if let Err(e) = self.store(p, next) {
            return self.halt("writing the journal", e);
        }
        if let Err(e) = p.ota_begin(slot) {
            return self.halt("esp_ota_begin", e);
        }
        self.begin_download(m, sha, slot, 0, patch);
    }

    /// The manifest's delta for the running image, if any (and deltas are enabled).
    pub(super) fn pick_delta(&self, m: &Manifest) -> Option<DeltaDownload> {
        let running = self.running.as_ref()?;
        // Deltas of encrypted releases are not applied: a patch against plaintext would give
        // the plaintext away, and the release store makes none for them.
        if !self.cfg.use_deltas || m.encryption.is_some() {
            return None;
        }
        let d = m
            .deltas
            .iter()
            .find(|d| d.from_bytes() == Some(running.sha256))?;
        Some(DeltaDownload {
            applier: alloc::boxed::Box::new(Applier::new(self.cfg.checkpoint_interval.max(SECTOR))),
            patch_sha256: d.sha256_bytes()?,
            patch_size: d.size,
            url: d.url.clone(),
            old: running.slot,
        })
    }

    pub(super) fn resume<P: Platform>(
        &mut self,
        p: &mut P,
        m: Manifest,
        sha: [u8; 32],
        rec: Record,
        timestamp_at: u64,
    ) {
        let Some(slot) = p.next_update_slot() else {
            return;
        };
        if m.encryption
            .as_ref()
            .is_some_and(|e| !cipher::resumable(e.scheme))
        {
            // AES-GCM's running hash was in RAM: the image is fetched again from byte 0.
            return self.start(p, m, sha, timestamp_at);
        }
        let mut patch = None;
        if rec.delta {
            match self
                .pick_delta(&m)
                .filter(|d| d.patch_sha256 == rec.patch_sha256)
            {
                Some(mut d) => {
                    if rec.checkpoint > 0 {
                        let iv = self.cfg.checkpoint_interval.max(SECTOR);
                        d.applier = alloc::boxed::Box::new(Applier::resume(iv, rec.resume));
                    }
                    patch = Some(d);
                }
                // The patch is no longer offered: start over with the full image.
                None => return self.start(p, m, sha, timestamp_at),
            }
        }
        let from = rec.checkpoint - rec.checkpoint % SECTOR;
        let res = if from == 0 {
            p.ota_begin(slot)
        } else {
            p.ota_resume(slot, from)
        };
        if let Err(e) = res {
            return self.halt("esp_ota_resume", e);
        }
        self.begin_download(m, sha, slot, from, patch);
    }

    pub(super) fn begin_download(
        &mut self,
        m: Manifest,
        sha: [u8; 32],
        slot: Slot,
        from: u32,
        delta: Option<DeltaDownload>,
    ) {
        self.timers.poll = None;
        self.emit(Event::Downloading {
            sequence: m.sequence,
            version: m.version.clone(),
            size: m.size,
            resumed_from: from,
            delta: delta.is_some(),
        });
        let pct = (from as u64 * 100 / m.size.max(1) as u64) as u32;
        let decrypt = match &m.encryption {
            Some(enc) => match Decryptor::new(enc, m.size, &self.cfg.image_keys, from) {
                Ok(d) => Some(Box::new(d)),
                Err(e) => {
                    // Checked when the manifest was accepted; only a corrupt journal gets here.
                    self.state = State::Ready;
                    return self.refuse(m.sequence, &m.version, Check::Decrypt, e.to_string());
                }
            },
            None => None,
        };
        let dl = Download {
            manifest: m,
            sha256: sha,
            slot,
            written: from,
            requested_end: 0,
            consecutive_failures: 0,
            next_progress_pct: (pct / 10 + 1) * 10,
            delta,
            decrypt,
            window_bytes: 0,
            session: None,
            chunk_refusal: None,
        };
        self.state = State::Downloading(dl);
        self.timers.rate = None;
        self.request_next();
    }

    /// The end of a transfer-rate window: a download that took less than
    /// [`Config::min_rate`] on average over it gives the request up as failed (its
    /// connection dropped); otherwise the next window begins.
    fn check_rate<P: Platform>(&mut self, p: &mut P, now: u64) {
        let State::Downloading(dl) = &mut self.state else {
            return;
        };
        let window = self.cfg.rate_window_ms;
        let needed = (self.cfg.min_rate as u64).saturating_mul(window) / 1000;
        let got = core::mem::take(&mut dl.window_bytes);
        if got >= needed {
            self.timers.rate = Some(now.saturating_add(window));
            return;
        }
        self.out.push_back(Action::CancelFetch);
        let reason = format!(
            "{got} bytes in {} s, slower than the {} B/s this board accepts (slow retrieval)",
            window / 1000,
            self.cfg.min_rate
        );
        self.on_fetch_failed(p, now, &reason);
    }

    pub(super) fn request_next(&mut self) {
        let State::Downloading(dl) = &mut self.state else {
            return;
        };
        let (at, total) = dl.fetch_window();
        if at >= total {
            return;
        }
        let len = core::cmp::min(self.cfg.chunk_size, total - at);
        dl.requested_end = at + len;
        if self.timers.rate.is_none() && self.cfg.min_rate > 0 {
            // The window runs across back-to-back ranges; a backoff ends it.
            let now = self.last_now.unwrap_or(0);
            self.timers.rate = Some(now.saturating_add(self.cfg.rate_window_ms));
            dl.window_bytes = 0;
        }
        let blob = dl
            .manifest
            .encryption
            .as_ref()
            .and_then(cipher::blob_sha256);
        let (sha256, url) = match &dl.delta {
            Some(d) => (d.patch_sha256, d.url.clone()),
            None => (blob.unwrap_or(dl.sha256), dl.manifest.url.clone()),
        };
        if self.cfg.fetch.is_chunked() {
            // One chunk per request; a position inside a chunk (AES-CBC resumes one block
            // back) asks for the chunk that holds it.
            let index = at / CHUNK_SIZE;
            dl.requested_end =
                core::cmp::min(index.saturating_add(1).saturating_mul(CHUNK_SIZE), total);
            let action = match dl.session.as_mut() {
                Some(s) => {
                    s.next = index;
                    Action::FetchChunk {
                        session: s.id,
                        index,
                    }
                }
                None => Action::OpenSession {
                    sequence: dl.manifest.sequence,
                    sha256,
                    size: total,
                    from: index,
                },
            };
            return self.out.push_back(action);
        }
        self.out.push_back(Action::Fetch {
            sha256,
            url,
            offset: at,
            len,
            total,
        });
    }

    pub(super) fn on_body<P: Platform>(&mut self, p: &mut P, now: u64, offset: u32, data: &[u8]) {
        let State::Downloading(dl) = &mut self.state else {
            return;
        };
        let (at, total) = dl.fetch_window();
        let end = offset.saturating_add(data.len() as u32);
        if offset > at || end <= at {
            return; // a gap (re-requested at BodyEnd) or bytes we already have
        }
        let skip = (at - offset) as usize;
        // Contiguous bytes past the requested range are taken too: a server that ignores Range
        // answers with the whole blob, and throwing it away would only fetch it again. What is
        // written is hash-checked before anything switches. Bytes past the blob's end are
        // not: the answer is cut there (endless data), and the blob is complete.
        let take = core::cmp::min(end, total) - at;
        let endless = end > total;
        if take > 0 {
            dl.window_bytes = dl.window_bytes.saturating_add(take as u64);
            self.take_piece(p, &data[skip..skip + take as usize]);
        }
        if endless && matches!(self.state, State::Downloading(_)) {
            self.out.push_back(Action::CancelFetch);
            self.on_body_end(p, now);
        }
    }

    pub(super) fn chunked(&self) -> bool {
        self.cfg.fetch.is_chunked()
    }

    /// The answer to `/ota/check`: the session the chunks will come in.
    pub(super) fn on_session<P: Platform>(&mut self, p: &mut P, now: u64, answer: &[u8]) {
        let chunked = self.chunked();
        let State::Downloading(dl) = &mut self.state else {
            return;
        };
        if dl.session.is_some() || !chunked {
            return; // not asked for
        }
        let (at, total) = dl.fetch_window();
        match chunk::open_session(answer, dl.manifest.sequence, total, at / CHUNK_SIZE) {
            Ok(s) => {
                dl.session = Some(s);
                self.request_next();
            }
            Err(e) => self.on_fetch_failed(p, now, &e),
        }
    }

    /// A chunk frame: written only if its tag verifies under this board's key and it is the
    /// chunk asked for; otherwise refused (`chunk-mac`, `chunk-sequence`) like a failed
    /// request, and the retry opens a new session.
    pub(super) fn on_chunk<P: Platform>(&mut self, p: &mut P, now: u64, frame: &[u8]) {
        let FetchMode::Chunked(key) = &self.cfg.fetch else {
            return;
        };
        let State::Downloading(dl) = &mut self.state else {
            return;
        };
        let Some(session) = dl.session.as_mut() else {
            return;
        };
        let (index, id) = (session.next, session.id);
        match session.take(key, &self.cfg.device_id, frame) {
            Ok(data) => {
                dl.chunk_refusal = None;
                self.on_body(p, now, index.saturating_mul(CHUNK_SIZE), data);
                // The chunk is the whole answer: ask for the next, unless taking it ended the
                // download or started it over (a decrypt failure, a patch that does not
                // apply), which asked for what comes next itself.
                let same = matches!(&self.state, State::Downloading(d)
                    if d.session.as_ref().is_some_and(|s| s.id == id));
                if same {
                    self.on_body_end(p, now);
                }
            }
            Err(e) => {
                dl.chunk_refusal = Some(e.check());
                self.emit(Event::TransportRefused {
                    peer: Peer::Server.name(),
                    check: e.check(),
                    detail: e.to_string(),
                });
                self.on_fetch_failed(p, now, &e.to_string());
            }
        }
    }

    /// Bytes at the download's position: into the slot, or through the patch applier.
    fn take_piece<P: Platform>(&mut self, p: &mut P, piece: &[u8]) {
        let State::Downloading(dl) = &mut self.state else {
            return;
        };
        if let Some(d) = dl.delta.as_mut() {
            let mut sink = PatchSink {
                p: &mut *p,
                journal: &mut self.journal,
                old: d.old,
                journal_error: None,
            };
            let res = d.applier.feed(piece, &mut sink);
            let err = sink.journal_error;
            dl.written = d.applier.new_written() as u32;
            match (res, err) {
                (_, Some(e)) => {
                    p.ota_abort();
                    return self.halt("writing the journal", e);
                }
                (Ok(_), None) => {}
                (Err(e), None) => return self.delta_failed(p, e),
            }
        } else if let Some(mut d) = dl.decrypt.take() {
            let (journal, interval) = (&mut self.journal, self.cfg.checkpoint_interval.max(SECTOR));
            let resumable = dl
                .manifest
                .encryption
                .as_ref()
                .is_some_and(|e| cipher::resumable(e.scheme));
            let res = d.feed(piece, &mut |plain: &[u8]| {
                write_checkpointed(p, journal, dl, interval, resumable, plain)
            });
            dl.decrypt = Some(d);
            match res {
                Ok(()) => {}
                Err(FeedError::Sink((during, e))) => return self.halt(during, e),
                Err(FeedError::Decrypt(e)) => {
                    self.out.push_back(Action::CancelFetch);
                    return self.download_corrupt(p, Check::Decrypt, e.to_string());
                }
            }
        } else {
            let interval = self.cfg.checkpoint_interval.max(SECTOR);
            if let Err((during, e)) =
                write_checkpointed(p, &mut self.journal, dl, interval, true, piece)
            {
                return self.halt(during, e);
            }
        }
        // A request succeeded once its whole range came; bytes alone do not count, or a
        // server trickling a few bytes per try would never be given up on.
        if dl.fetch_window().0 >= dl.requested_end {
            dl.consecutive_failures = 0;
        }
        let (seq, written, size) = (dl.manifest.sequence, dl.written, dl.manifest.size);
        let mut progress = None;
        if written as u64 * 100 >= dl.next_progress_pct as u64 * size as u64 {
            dl.next_progress_pct = (written as u64 * 100 / size as u64) as u32 / 10 * 10 + 10;
            progress = Some(Event::Progress {
                sequence: seq,
                written,
                size,
            });
        }
        if let Some(ev) = progress {
            self.emit(ev);
        }
    }

    /// The patch could not be applied: fall back to the full image.
    pub(super) fn delta_failed<P: Platform>(&mut self, p: &mut P, e: delta::DeltaError) {
        let State::Downloading(dl) = core::mem::replace(&mut self.state, State::Ready) else {
            return;
        };
        p.ota_abort();
        self.emit(Event::DeltaFailed {
            sequence: dl.manifest.sequence,
            reason: e.to_string(),
        });
        let rec = *self.record();
        let full = Record {
            phase: Phase::Downloading,
            delta: false,
            checkpoint: 0,
            resume: Resume::default(),
            ..rec
        };
        self.start_over(p, dl, full);
    }

    /// Download `dl`'s full image again from byte 0: `rec` is journaled first (a cut then
    /// starts over too), then `esp_ota_begin` erases the slot again.
    fn start_over<P: Platform>(&mut self, p: &mut P, dl: Download, rec: Record) {
        if let Err(e) = self.store(p, rec) {
            return self.halt("writing the journal", e);
        }
        if let Err(e) = p.ota_begin(dl.slot) {
            return self.halt("esp_ota_begin", e);
        }
        self.begin_download(dl.manifest, dl.sha256, dl.slot, 0, None);
    }

    pub(super) fn on_body_end<P: Platform>(&mut self, p: &mut P, now: u64) {
        let State::Downloading(dl) = &self.state else {
            return;
        };
        if dl.fetched_all() {
            return self.finish(p);
        }
        let (at, total) = dl.fetch_window();
        if dl.delta.is_some() && at >= total {
            return self.delta_failed(p, delta::DeltaError::Truncated);
        }
        if at >= dl.requested_end {
            return self.request_next();
        }
        self.on_fetch_failed(p, now, &format!("response ended early at byte {at}"));
    }

    pub(super) fn on_fetch_failed<P: Platform>(&mut self, p: &mut P, now: u64, reason: &str) {
        let State::Downloading(mut dl) = core::mem::replace(&mut self.state, State::Ready) else {
            return;
        };
        self.timers.rate = None;
        dl.session = None;
        dl.consecutive_failures += 1;
        if dl.consecutive_failures >= self.cfg.max_fetch_failures {
            // Stop retrying this release (a new release, with a higher sequence, starts over);
            // the old image keeps running untouched.
            p.ota_abort();
            let rec = *self.record();
            let gave_up = Record {
                phase: Phase::Idle,
                attempts: self.cfg.max_attempts,
                ..rec
            };
            if let Err(e) = self.store(p, gave_up) {
                return self.halt("writing the journal", e);
            }
            let detail = format!(
                "{} consecutive requests failed at byte {}; last: {reason}",
                dl.consecutive_failures, dl.written
            );
            return self.refuse(
                dl.manifest.sequence,
                &dl.manifest.version,
                dl.chunk_refusal.unwrap_or(Check::Download),
                detail,
            );
        }
        let exp = core::cmp::min(dl.consecutive_failures - 1, 16);
        let base = self.cfg.retry_base_ms.saturating_mul(1u64 << exp);
        // Spread retries of a fleet that failed together (same server hiccup) over time,
        // deterministically per device so a run replays exactly.
        let jitter = device_hash(&self.cfg.device_id, dl.consecutive_failures) % (base / 4 + 1);
        let delay = core::cmp::min(base.saturating_add(jitter), self.cfg.retry_max_ms);
        self.emit(Event::FetchFailed {
            sequence: dl.manifest.sequence,
            offset: dl.written,
            reason: reason.to_string(),
            retry_in_ms: delay,
        });
        self.timers.retry = Some(now.saturating_add(delay));
        self.state = State::Backoff(dl);
    }

    pub(super) fn on_timer<P: Platform>(&mut self, p: &mut P, now: u64) {
        if self.timers.confirm.is_some_and(|t| t <= now) {
            self.timers.confirm = None;
            if matches!(self.state, State::SelfTest | State::AwaitNetwork) {
                let what = if matches!(self.state, State::SelfTest) {
                    "self-test"
                } else {
                    "network"
                };
                let reason = format!(
                    "not confirmed within {} s (waiting for {what})",
                    self.cfg.confirm_timeout_ms / 1000
                );
                if matches!(self.state, State::AwaitNetwork) {
                    self.note_unreachable(p);
                }
                return self.roll_back_self(p, reason);
            }
        }
        if self.timers.rate.is_some_and(|t| t <= now) {
            self.timers.rate = None;
            self.check_rate(p, now);
        }
        if self.timers.retry.is_some_and(|t| t <= now) {
            self.timers.retry = None;
            if let State::Backoff(dl) = core::mem::replace(&mut self.state, State::Ready) {
                self.state = State::Downloading(dl);
                self.request_next();
            }
        }
        if self.timers.poll.is_some_and(|t| t <= now) {
            self.timers.poll = None;
            if self.online && matches!(self.state, State::Ready | State::AwaitManifest) {
                self.poll(now);
            }
        }
    }

    /// All bytes are in the slot: check them, validate the image, switch the boot partition.
    pub(super) fn finish<P: Platform>(&mut self, p: &mut P) {
        let State::Downloading(dl) = core::mem::replace(&mut self.state, State::Ready) else {
            return;
        };
        let (seq, version) = (dl.manifest.sequence, dl.manifest.version.clone());
        let mut dl = dl;
        if let Some(d) = dl.decrypt.take() {
            let interval = self.cfg.checkpoint_interval.max(SECTOR);
            let journal = &mut self.journal;
            let res = d.finish(&mut |tail: &[u8]| {
                write_checkpointed(p, journal, &mut dl, interval, false, tail)
            });
            match res {
                Ok(()) => {}
                Err(FeedError::Sink((during, e))) => return self.halt(during, e),
                Err(FeedError::Decrypt(e)) => {
                    self.state = State::Downloading(dl);
                    return self.download_corrupt(p, Check::Decrypt, e.to_string());
                }
            }
        }
        if !self.slot_matches(p, dl.slot, dl.manifest.size, &dl.sha256) {
            if dl.delta.is_some() {
                self.state = State::Downloading(dl);
                return self.delta_failed(
                    p,
                    delta::DeltaError::BadControl {
                        reason: "the patched image does not match the manifest's SHA-256",
                    },
                );
            }
            let (check, what) = match dl.manifest.encryption {
                Some(_) => (Check::Decrypt, "SHA-256 of the decrypted image does not match the manifest (altered ciphertext or the wrong key)"),
                None => (Check::Hash, "SHA-256 of the downloaded image does not match the manifest"),
            };
            self.state = State::Downloading(dl);
            return self.download_corrupt(p, check, what.to_string());
        }
        let rec = *self.record();
        match p.ota_end() {
            Ok(()) => {}
            Err(EspError::ValidateFailed) => {
                return self.give_up(p, rec, seq, &version, Check::ImageValidation,
                    "esp_ota_end: image validation failed (truncated, corrupt or not an ESP32-S3 app)".to_string());
            }
            Err(e) => return self.halt("esp_ota_end", e),
        }
        self.emit(Event::Verified { sequence: seq });
        let installed = Record {
            phase: Phase::Installed,
            installs: 0,
            checkpoint: rec.size,
            ..rec
        };
        if let Err(e) = self.store(p, installed) {
            return self.halt("writing the journal", e);
        }
        self.switch_boot(p, dl.slot, seq, &version, installed);
    }

    /// What was downloaded is not the image (`check`: a hash or decryption failure): fetch it
    /// again from byte 0, or give the release up after [`Config::max_attempts`].
    fn download_corrupt<P: Platform>(&mut self, p: &mut P, check: Check, what: String) {
        let State::Downloading(dl) = core::mem::replace(&mut self.state, State::Ready) else {
            return;
        };
        let (seq, version) = (dl.manifest.sequence, dl.manifest.version.clone());
        p.ota_abort();
        let rec = *self.record();
        let attempts = rec.attempts.saturating_add(1);
        if attempts >= self.cfg.max_attempts {
            let idle = Record {
                phase: Phase::Idle,
                attempts,
                ..rec
            };
            if let Err(e) = self.store(p, idle) {
                return self.halt("writing the journal", e);
            }
            return self.refuse(
                seq,
                &version,
                check,
                format!("{what} ({attempts} attempts)"),
            );
        }
        self.emit(Event::FetchFailed {
            sequence: seq,
            offset: dl.written,
            reason: format!("{what}: downloading again from byte 0"),
            retry_in_ms: 0,
        });
        let again = Record {
            phase: Phase::Downloading,
            attempts,
            checkpoint: 0,
            ..rec
        };
        self.start_over(p, dl, again);
    }

    pub(super) fn switch_boot<P: Platform>(
        &mut self,
        p: &mut P,
        slot: Slot,
        seq: u64,
        version: &str,
        rec: Record,
    ) {
        match p.set_boot_partition(slot) {
            Ok(()) => {
                self.emit(Event::BootSet {
                    sequence: seq,
                    slot: slot.kind,
                });
                self.timers = Timers::default();
                self.state = State::Rebooting;
                self.out.push_back(Action::Reboot);
            }
            Err(e @ (EspError::SmallSecVer | EspError::ValidateFailed)) => {
                self.give_up(
                    p,
                    rec,
                    seq,
                    version,
                    Check::BootPartition,
                    format!("esp_ota_set_boot_partition refused the image: {e}"),
                );
            }
            Err(e) => self.halt("esp_ota_set_boot_partition", e),
        }
    }

    pub(super) fn give_up<P: Platform>(
        &mut self,
        p: &mut P,
        rec: Record,
        seq: u64,
        version: &str,
        check: Check,
        detail: String,
    ) {
        let idle = Record {
            phase: Phase::Idle,
            known_bad: rec.known_bad.with(&rec.sha256),
            ..rec
        };
        if let Err(e) = self.store(p, idle) {
            return self.halt("writing the journal", e);
        }
        self.state = State::Ready;
        self.refuse(seq, version, check, detail);
    }

    /// Hash what is in the slot, as written, against the manifest.
    pub(super) fn slot_matches<P: Platform>(
        &self,
        p: &mut P,
        slot: Slot,
        size: u32,
        sha: &[u8; 32],
    ) -> bool {
        p.slot_sha256(slot, size).is_ok_and(|got| &got == sha)
    }
}
