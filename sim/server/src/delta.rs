//! Host side of delta updates: making patches, applying them (with the agent's own applier,
//! so the host and the board cannot disagree), and importing BSDIFF40 patches as Python's
//! `bsdiff4` writes them.

use std::io::Read;

use anyhow::{bail, Context};
use otarig_agent::delta::{self, Applier, Header, Resume, Sink, SinkError, BLOCK_LOG2, HEADER_LEN};

use crate::store::sha256;

/// Wrap a raw bsdiff stream into the container: 4 KiB blocks, each LZ4-compressed (or stored
/// when that is not smaller).
pub fn container(old: &[u8], new: &[u8], raw: &[u8]) -> Vec<u8> {
    let block = 1usize << BLOCK_LOG2;
    let blocks = raw.len().div_ceil(block);
    let header = Header {
        block_size: block as u32,
        old_size: old.len() as u32,
        new_size: new.len() as u32,
        raw_size: raw.len() as u32,
        blocks: blocks as u32,
        old_sha256: sha256(old),
        new_sha256: sha256(new),
    };
    let mut out = header.encode().to_vec();
    for chunk in raw.chunks(block) {
        let c = lz4_flex::block::compress(chunk);
        if c.len() < chunk.len() {
            out.extend_from_slice(&(c.len() as u16).to_le_bytes());
            out.extend_from_slice(&c);
        } else {
            out.extend_from_slice(&(chunk.len() as u16 | 0x8000).to_le_bytes());
            out.extend_from_slice(chunk);
        }
    }
    out
}

/// Make a patch from `old` to `new`.
pub fn make(old: &[u8], new: &[u8]) -> Vec<u8> {
    let mut raw = Vec::new();
    // Writing into a Vec cannot fail.
    let _ = bsdiff::diff(old, new, &mut raw);
    container(old, new, &raw)
}

struct VecSink<'a> {
    old: &'a [u8],
    new: Vec<u8>,
    checkpoints: Vec<Resume>,
}

impl Sink for VecSink<'_> {
    fn read_old(&mut self, offset: u32, buf: &mut [u8]) -> Result<(), SinkError> {
        let src = self
            .old
            .get(offset as usize..offset as usize + buf.len())
            .ok_or(SinkError)?;
        buf.copy_from_slice(src);
        Ok(())
    }
    fn write_new(&mut self, data: &[u8]) -> Result<(), SinkError> {
        self.new.extend_from_slice(data);
        Ok(())
    }
    fn checkpoint(&mut self, at: Resume) {
        self.checkpoints.push(at);
    }
}

/// Apply a patch to `old` and check the result against the header's hashes.
pub fn apply(old: &[u8], patch: &[u8]) -> anyhow::Result<Vec<u8>> {
    let header = Header::parse(patch).map_err(|e| anyhow::anyhow!("{e}"))?;
    if sha256(old) != header.old_sha256 {
        bail!(
            "this patch applies to the image with SHA-256 {}, not to this one ({})",
            hex::encode(header.old_sha256),
            hex::encode(sha256(old))
        );
    }
    let (new, _) = apply_from(old, patch, None, 64 * 1024)?;
    if sha256(&new) != header.new_sha256 {
        bail!("the patched image does not have the SHA-256 the patch promises");
    }
    Ok(new)
}

/// Apply with the agent's applier, optionally resuming at a checkpoint; also returns the
/// checkpoints offered (every `interval` bytes of output).
pub fn apply_from(
    old: &[u8],
    patch: &[u8],
    resume: Option<Resume>,
    interval: u32,
) -> anyhow::Result<(Vec<u8>, Vec<Resume>)> {
    let mut sink = VecSink {
        old,
        new: Vec::new(),
        checkpoints: Vec::new(),
    };
    let mut a = match resume {
        Some(r) => Applier::resume(interval, r),
        None => Applier::new(interval),
    };
    // Feed in uneven pieces, the way network reads arrive.
    let mut guard = 0;
    while !a.is_done() {
        let at = a.next_offset() as usize;
        if at >= patch.len() {
            bail!("patch ended at byte {at} before the new image was complete");
        }
        let end = (at + 1500).min(patch.len());
        a.feed(&patch[at..end], &mut sink)
            .map_err(|e| anyhow::anyhow!("patch byte {at}: {e}"))?;
        guard += 1;
        if guard > patch.len() + 16 {
            bail!("patch makes no progress at byte {at}");
        }
    }
    Ok((sink.new, sink.checkpoints))
}

/// One 24-byte bsdiff control record of the raw stream: `mix_len`, `copy_len`, and `seek` in
/// sign-magnitude, each little-endian.
pub fn control_record(mix: u64, copy: u64, seek: i64) -> [u8; 24] {
    let seek = if seek < 0 {
        seek.unsigned_abs() | (1 << 63)
    } else {
        seek as u64
    };
    let mut rec = [0u8; 24];
    rec[..8].copy_from_slice(&mix.to_le_bytes());
    rec[8..16].copy_from_slice(&copy.to_le_bytes());
    rec[16..].copy_from_slice(&seek.to_le_bytes());
    rec
}

fn offtin(b: &[u8]) -> i64 {
    let mut w = [0u8; 8];
    w.copy_from_slice(&b[..8]);
    let y = u64::from_le_bytes(w);
    if y & (1 << 63) == 0 {
        y as i64
    } else {
        -((y & !(1 << 63)) as i64)
    }
}

/// Transcode a BSDIFF40 patch (Python `bsdiff4`, `qbsdiff`: header, then bzip2-compressed
/// control, diff and extra blocks) into our container. `old` is needed for the header's
/// hashes and to check the result.
pub fn import_bsdiff40(old: &[u8], patch: &[u8]) -> anyhow::Result<Vec<u8>> {
    if patch.len() < 32 || &patch[..8] != b"BSDIFF40" {
        bail!("not a BSDIFF40 patch (the first 8 bytes should be \"BSDIFF40\")");
    }
    let ctrl_len = offtin(&patch[8..16]);
    let diff_len = offtin(&patch[16..24]);
    let new_len = offtin(&patch[24..32]);
    if ctrl_len < 0
        || diff_len < 0
        || new_len < 0
        || 32 + ctrl_len as u64 + diff_len as u64 > patch.len() as u64
    {
        bail!("BSDIFF40 header lengths ({ctrl_len}, {diff_len}, {new_len}) do not fit a {}-byte patch", patch.len());
    }
    let (c0, d0) = (32usize, 32 + ctrl_len as usize);
    let e0 = d0 + diff_len as usize;
    let unbz = |b: &[u8], what: &str| -> anyhow::Result<Vec<u8>> {
        let mut out = Vec::new();
        bzip2::read::BzDecoder::new(b)
            .read_to_end(&mut out)
            .with_context(|| format!("BSDIFF40 {what} block is not valid bzip2"))?;
        Ok(out)
    };
    let ctrl = unbz(&patch[c0..d0], "control")?;
    let diff = unbz(&patch[d0..e0], "diff")?;
    let extra = unbz(&patch[e0..], "extra")?;
    let mut raw = Vec::with_capacity(new_len as usize + ctrl.len());
    let (mut di, mut ei) = (0usize, 0usize);
    for rec in ctrl.chunks(24) {
        if rec.len() != 24 {
            bail!("BSDIFF40 control block is not a whole number of 24-byte records");
        }
        let (mix, copy, seek) = (
            offtin(&rec[0..8]),
            offtin(&rec[8..16]),
            offtin(&rec[16..24]),
        );
        if mix < 0 || copy < 0 || di + mix as usize > diff.len() || ei + copy as usize > extra.len()
        {
            bail!("BSDIFF40 control record ({mix}, {copy}, {seek}) runs past its blocks");
        }
        raw.extend_from_slice(&control_record(mix as u64, copy as u64, seek));
        raw.extend_from_slice(&diff[di..di + mix as usize]);
        raw.extend_from_slice(&extra[ei..ei + copy as usize]);
        di += mix as usize;
        ei += copy as usize;
    }
    // Produce the new image once to fill in the header's hash and prove the transcoding.
    let mut new = Vec::new();
    bsdiff::patch(old, &mut raw.as_slice(), &mut new)
        .context("the transcoded patch does not apply to this old image")?;
    if new.len() as i64 != new_len {
        bail!(
            "BSDIFF40 patch promises {new_len} bytes but produces {}",
            new.len()
        );
    }
    Ok(container(old, &new, &raw))
}

/// Size of the container header, for reports.
pub const CONTAINER_HEADER: usize = HEADER_LEN;
pub use delta::DeltaError;

#[cfg(test)]
mod tests {
    use super::*;
    use otarig_esp32s3::appimage::{build, AppSpec};

    fn pair(size: u32) -> (Vec<u8>, Vec<u8>) {
        (
            build(&AppSpec::new("delta", "1.0.0", size)),
            build(&AppSpec::new("delta", "1.1.0", size + 3000)),
        )
    }

    #[test]
    fn make_then_apply_gives_the_new_image_and_the_patch_is_small() {
        let (a, b) = pair(300_000);
        let p = make(&a, &b);
        assert!(
            p.len() < b.len() / 10,
            "patch {} for image {}",
            p.len(),
            b.len()
        );
        assert_eq!(apply(&a, &p).unwrap(), b);
    }

    #[test]
    fn resuming_from_any_checkpoint_gives_the_same_image() {
        let (a, b) = pair(200_000);
        let p = make(&a, &b);
        let (full, cps) = apply_from(&a, &p, None, 4096).unwrap();
        assert_eq!(full, b);
        assert!(cps.len() > 40, "{} checkpoints", cps.len());
        for cp in cps.iter().step_by(7) {
            let (tail, _) = apply_from(&a, &p, Some(*cp), 4096).unwrap();
            assert_eq!(tail[..], b[cp.new_written as usize..], "resume at {cp:?}");
        }
    }

    /// A control record whose seek, added to the old position, passes `i64::MAX` or the end
    /// of the old image is refused (it overflowed, a panic with overflow checks on).
    #[test]
    fn a_seek_past_the_old_image_is_refused_not_an_overflow() {
        let (old, new) = (vec![7u8; 4096], vec![7u8; 4096]);
        for seek in [i64::MAX, old.len() as i64] {
            let mut raw = control_record(1, 0, seek).to_vec();
            raw.push(0);
            raw.extend(control_record(1, 0, 0));
            raw.push(0);
            let e = apply(&old, &container(&old, &new, &raw)).unwrap_err();
            assert!(e.to_string().contains("past the end"), "seek {seek}: {e}");
        }
    }

    #[test]
    fn a_patch_for_another_base_or_a_flipped_byte_is_rejected() {
        let (a, b) = pair(100_000);
        let p = make(&a, &b);
        let other = build(&AppSpec::new("delta", "0.9.0", 100_000));
        assert!(apply(&other, &p)
            .unwrap_err()
            .to_string()
            .contains("applies to the image"));
        let mut bad = p.clone();
        let n = bad.len();
        bad[n / 2] ^= 0x55;
        assert!(apply(&a, &bad).is_err());
    }
}
