//! From the file's shape ([`super::file`]) to a checked [`Scenario`]: names resolved, units
//! read, references checked, every error at the `file:line:column` of the value at fault.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde_spanned::Spanned;

use otarig_esp32s3::board::Phase;
use otarig_esp32s3::partition::PartitionTable;
use otarig_server::chunked::ChunkFault;
use otarig_server::rollout::RolloutPlan;

use super::file::{ExpectDef, FaultDef, FileDef, OneOrMany, ReleaseDef, ServerFaultDef, TamperDef};
use super::units::{parse_duration, parse_rate, parse_size};
use super::{
    Check, CommandFault, Expect, Fault, FaultKind, Firmware, PayloadTopic, PowerLoss, Release,
    Scenario, ScenarioError, Selector, ServerFault, Statement, StatementKind, Trust, WallClock,
    KNOWN_HAZARDS, OPERATOR_KEY, SLOT_STATES as STATES,
};

/// Where errors point: the file and its text (for line and column of a span).
struct Ctx<'a> {
    path: &'a Path,
    text: &'a str,
}

impl Ctx<'_> {
    fn at(&self, offset: usize, message: impl Into<String>) -> ScenarioError {
        let before = &self.text[..offset.min(self.text.len())];
        let line = before.matches('\n').count() + 1;
        let column = before.len() - before.rfind('\n').map(|i| i + 1).unwrap_or(0) + 1;
        ScenarioError {
            file: self.path.to_path_buf(),
            line,
            column,
            message: message.into(),
        }
    }

    fn span<T>(&self, s: &Spanned<T>, message: impl Into<String>) -> ScenarioError {
        self.at(s.span().start, message)
    }

    /// An error about the file as a whole (no one value is at fault).
    fn file(&self, message: impl Into<String>) -> ScenarioError {
        ScenarioError {
            file: self.path.to_path_buf(),
            line: 0,
            column: 0,
            message: message.into(),
        }
    }

    fn duration(&self, s: &Spanned<String>) -> Result<u64> {
        parse_duration(s.get_ref()).map_err(|m| self.span(s, m))
    }

    fn optional_duration(&self, s: &Option<Spanned<String>>, default: u64) -> Result<u64> {
        Ok(s.as_ref()
            .map(|s| self.duration(s))
            .transpose()?
            .unwrap_or(default))
    }
}

type Result<T> = std::result::Result<T, ScenarioError>;

/// Check a scenario given as text; `path` names it in errors and anchors relative paths.
pub(super) fn parse(path: &Path, text: &str) -> Result<Scenario> {
    let cx = Ctx { path, text };
    let raw: FileDef = toml::from_str(text).map_err(|e| {
        let offset = e.span().map(|s| s.start).unwrap_or(0);
        cx.at(offset, e.message().trim().to_string())
    })?;
    let devices = *raw.fleet.devices.get_ref();
    if devices == 0 || devices > 100_000 {
        return Err(cx.span(&raw.fleet.devices, "devices must be between 1 and 100000"));
    }
    let p = Parser {
        cx,
        raw: &raw,
        key_dir: otarig_server::keys::fixture_dir(),
        devices,
    };
    p.scenario()
}

/// One file being checked.
struct Parser<'a> {
    cx: Ctx<'a>,
    raw: &'a FileDef,
    /// Where key names are looked up.
    key_dir: PathBuf,
    devices: u32,
}

impl Parser<'_> {
    fn scenario(&self) -> Result<Scenario> {
        let (cx, raw) = (&self.cx, self.raw);
        let table = self.partition_table()?;
        let firmware = self.firmware(&table)?;
        let start_firmware = self.known_fw(&raw.fleet.firmware)?;
        let trusted_keys = match &raw.fleet.trusted_keys {
            None => vec!["ed25519-test".to_string(), "rsa-test".to_string()],
            Some(list) => list
                .iter()
                .map(|k| self.known_key(k))
                .collect::<Result<_>>()?,
        };
        let channel = raw.fleet.channel.clone().unwrap_or_else(|| "stable".into());
        let releases = raw
            .release
            .iter()
            .enumerate()
            .map(|(i, r)| self.release(i, r, &firmware, &channel))
            .collect::<Result<Vec<_>>>()?;
        let faults = raw
            .fault
            .iter()
            .map(|f| self.fault(f))
            .collect::<Result<Vec<_>>>()?;
        let expects = raw
            .expect
            .iter()
            .map(|e| self.expect(e))
            .collect::<Result<Vec<_>>>()?;
        if expects.is_empty() {
            return Err(cx.file(
                "the scenario has no [[expect]] block: a scenario that checks nothing cannot fail",
            ));
        }
        let trust = self.trust()?;
        let statements = self.statements(&trust)?;
        let duration_ms = match &raw.scenario.duration {
            Some(s) => cx.duration(s)?,
            None => {
                let last = statements.iter().map(|s| s.at_ms).max().unwrap_or(0);
                last_event(&releases, &faults).max(last) + 30 * 60_000
            }
        };
        let channel_of = self.channels()?;
        Ok(Scenario {
            path: cx.path.to_path_buf(),
            name: raw.scenario.name.clone(),
            description: raw.scenario.description.clone(),
            seed: raw.scenario.seed,
            duration_ms,
            devices: self.devices,
            device_type: raw.fleet.device_type.clone(),
            channel,
            channel_of,
            table,
            start_firmware,
            anti_rollback: raw.fleet.anti_rollback,
            wall: WallClock {
                set_at_ms: cx.optional_duration(&raw.fleet.clock_set_after, 0)?,
            },
            efuse_secure_version: self.secure_version(&raw.fleet.efuse_secure_version)?,
            trusted_keys,
            trust,
            transport: raw.fleet.transport,
            download: raw.fleet.download,
            wire_speedup: match &raw.fleet.wire_speedup {
                Some(x) if !(1.0..=100_000.0).contains(x.get_ref()) => {
                    let m = format!(
                        "wire-speedup = {} must be between 1 and 100000",
                        x.get_ref()
                    );
                    return Err(cx.span(x, m));
                }
                x => x.as_ref().map(|x| *x.get_ref()),
            },
            statements,
            poll_interval_ms: cx.optional_duration(&raw.fleet.poll_interval, 60_000)?,
            confirm_timeout_ms: cx.optional_duration(&raw.fleet.confirm_timeout, 120_000)?,
            range_size: self.range_size()?,
            firmware,
            releases,
            faults,
            expects,
            plr_known_hazards: self.known_hazards()?,
        })
    }

    /// Key names, or `default` when the list is not given.
    fn keys(&self, list: &Option<Vec<Spanned<String>>>, default: &str) -> Result<Vec<String>> {
        match list {
            None => Ok(vec![default.to_string()]),
            Some(list) => list.iter().map(|k| self.known_key(k)).collect(),
        }
    }

    /// `root-keys`, `timestamp-keys`, `require-timestamp`, `timestamp-valid-for`.
    fn trust(&self) -> Result<Trust> {
        let f = &self.raw.fleet;
        let timestamp_keys = self.keys(&f.timestamp_keys, "ed25519-timestamp")?;
        if timestamp_keys.is_empty() {
            return Err(self
                .cx
                .file("timestamp-keys is empty: the server signs timestamps with the first one"));
        }
        Ok(Trust {
            root_keys: self.keys(&f.root_keys, "ed25519-root")?,
            timestamp_keys,
            require_timestamp: f.require_timestamp,
            timestamp_valid_for_ms: self
                .cx
                .optional_duration(&f.timestamp_valid_for, 10 * 60_000)?,
        })
    }

    /// `[[keys]]` and `[[revoke]]`, in file order.
    fn statements(&self, trust: &Trust) -> Result<Vec<Statement>> {
        let mut out = Vec::new();
        for k in &self.raw.keys {
            let d = k.get_ref();
            if d.version == 0 {
                return Err(self.cx.span(
                    k,
                    "version 0 is the firmware's own keys; a key set starts at 1",
                ));
            }
            if d.release.is_empty() || d.release.len() > otarig_agent::trust::MAX_KEYS {
                return Err(self.cx.span(
                    k,
                    format!("release names 1 to {} keys", otarig_agent::trust::MAX_KEYS),
                ));
            }
            let known = |list: &[Spanned<String>]| -> Result<Vec<String>> {
                list.iter().map(|k| self.known_key(k)).collect()
            };
            out.push(Statement {
                at_ms: self.cx.duration(&d.at)?,
                signed_by: match &d.signed_by {
                    Some(s) => self.known_key(s)?,
                    None => trust.root_keys.first().cloned().unwrap_or_default(),
                },
                kind: StatementKind::KeySet {
                    version: d.version,
                    release: known(&d.release)?,
                    timestamp: match &d.timestamp {
                        Some(t) => known(t)?,
                        None => trust.timestamp_keys.clone(),
                    },
                    sequence_base: d.sequence_base,
                },
            });
        }
        for (i, r) in self.raw.revoke.iter().enumerate() {
            let d = r.get_ref();
            if d.sequences.len() > otarig_agent::trust::MAX_REVOKED {
                return Err(self.cx.span(
                    r,
                    format!(
                        "a revocation list holds at most {} sequences",
                        otarig_agent::trust::MAX_REVOKED
                    ),
                ));
            }
            out.push(Statement {
                at_ms: self.cx.duration(&d.at)?,
                signed_by: match &d.signed_by {
                    Some(s) => self.known_key(s)?,
                    None => "ed25519-test".into(),
                },
                kind: StatementKind::Revocations {
                    serial: d.serial.unwrap_or(i as u64 + 1),
                    sequences: d.sequences.clone(),
                },
            });
        }
        Ok(out)
    }

    /// A secure version the ESP32-S3's 16-bit `SECURE_VERSION` eFuse field can record
    /// (`esp_efuse_update_secure_version` refuses more).
    fn secure_version(&self, v: &Option<Spanned<u32>>) -> Result<u32> {
        let Some(v) = v else { return Ok(0) };
        let max = otarig_esp32s3::board::EFUSE_SECURE_VERSION_BITS;
        if *v.get_ref() > max {
            return Err(self.cx.span(v, format!(
                "secure version {} is above {max}: the ESP32-S3's SECURE_VERSION eFuse field has {max} bits, so anti-rollback cannot record it",
                v.get_ref()
            )));
        }
        Ok(*v.get_ref())
    }

    /// A firmware id this file defines.
    fn known_fw(&self, s: &Spanned<String>) -> Result<String> {
        if self.raw.firmware.contains_key(s.get_ref()) {
            return Ok(s.get_ref().clone());
        }
        let ids: Vec<&str> = self.raw.firmware.keys().map(String::as_str).collect();
        Err(self.cx.span(
            s,
            format!(
                "no firmware '{}' in this file (defined: {}); add a [firmware.{}] table",
                s.get_ref(),
                ids.join(", "),
                s.get_ref()
            ),
        ))
    }

    /// A key id with a PEM file in the key directory.
    fn known_key(&self, s: &Spanned<String>) -> Result<String> {
        let p = self.key_dir.join(format!("{}.pem", s.get_ref()));
        if p.is_file() {
            return Ok(s.get_ref().clone());
        }
        Err(self.cx.span(
            s,
            format!(
                "no key '{}' (looked for {}); keys are PEM files in fixtures/keys/",
                s.get_ref(),
                p.display()
            ),
        ))
    }

    /// A board selector, resolved for this fleet and checked against its size.
    fn selector(&self, s: &Option<Spanned<String>>) -> Result<Selector> {
        let Some(s) = s else {
            return Ok(Selector::all());
        };
        let devices = self.devices;
        let mut sel = Selector::parse(s.get_ref()).map_err(|m| self.cx.span(s, m))?;
        sel.resolve(devices);
        if let Some(m) = sel.max_index().filter(|m| *m >= devices) {
            return Err(self.cx.span(
                s,
                format!("selects board {m} but the fleet has {devices} (0..{devices})"),
            ));
        }
        Ok(sel)
    }

    fn partition_table(&self) -> Result<PartitionTable> {
        let table = match &self.raw.fleet.partition_table {
            None => PartitionTable::default_two_ota(),
            Some(s) if s.get_ref() == "default" => PartitionTable::default_two_ota(),
            Some(s) if s.get_ref() == "no-factory" => PartitionTable::no_factory(),
            Some(s) => {
                let dir = self.cx.path.parent().unwrap_or(Path::new("."));
                let csv = dir.join(s.get_ref());
                let body = std::fs::read_to_string(&csv).map_err(|e| {
                    self.cx.span(s, format!(
                        "cannot read partition table {}: {e} (use \"default\", \"no-factory\" or a path relative to the scenario)",
                        csv.display()
                    ))
                })?;
                PartitionTable::from_csv(&csv.display().to_string(), &body)
                    .map_err(|e| self.cx.span(s, format!("partition table: {e}")))?
            }
        };
        if table
            .find(otarig_esp32s3::partition::AGENT_LABEL)
            .is_none_or(|p| p.size < 0x2000)
        {
            return Err(self.cx.file("the partition table needs an `otarig` data partition of at least 0x2000 bytes for the agent's journal"));
        }
        Ok(table)
    }

    /// Every `[firmware.ID]`, each fitting the smallest app slot of `table`.
    fn firmware(&self, table: &PartitionTable) -> Result<BTreeMap<String, Firmware>> {
        let smallest_slot = table.app_slots().iter().map(|s| s.size).min().unwrap_or(0);
        let min = otarig_esp32s3::appimage::MIN_SIZE;
        let mut firmware = BTreeMap::new();
        for (id, f) in &self.raw.firmware {
            let size = parse_size(f.size.get_ref()).map_err(|m| self.cx.span(&f.size, m))?;
            if size < min as u64 || size > smallest_slot as u64 {
                return Err(self.cx.span(&f.size, format!(
                    "firmware '{id}' size {size} must be between {min} and the smallest app slot ({smallest_slot} bytes)"
                )));
            }
            firmware.insert(
                id.clone(),
                Firmware {
                    id: id.clone(),
                    version: f.version.clone(),
                    secure_version: self.secure_version(&f.secure_version)?,
                    size: size as u32,
                    self_test: f.self_test,
                    boot: f.boot,
                    network: f.network,
                    chip_id: f.chip_id.unwrap_or(otarig_agent::image::CHIP_ID_ESP32S3),
                },
            );
        }
        Ok(firmware)
    }

    /// `[[release]]` number `i` (its default sequence is `i + 1`).
    fn release(
        &self,
        i: usize,
        r: &ReleaseDef,
        firmware: &BTreeMap<String, Firmware>,
        channel: &str,
    ) -> Result<Release> {
        let cx = &self.cx;
        let expires_in_ms = self.signed_duration(&r.expires_in, 30 * 86_400_000)?;
        if let Some(t) = &r.tamper {
            self.check_tamper(t, r, &firmware[self.known_fw(&r.firmware)?.as_str()])?;
        }
        let rollout = r.rollout.as_ref().map(|ro| self.rollout(ro)).transpose()?;
        let encrypt = self.encrypt(r)?;
        Ok(Release {
            encrypt,
            announce: r.announce,
            firmware: self.known_fw(&r.firmware)?,
            at_ms: cx.optional_duration(&r.at, 0)?,
            signed_by: match &r.signed_by {
                Some(s) => self.known_key(s)?,
                None => "ed25519-test".into(),
            },
            device_type: r
                .device_type
                .clone()
                .unwrap_or_else(|| self.raw.fleet.device_type.clone()),
            channel: r.channel.clone().unwrap_or_else(|| channel.to_string()),
            signed_channel: r
                .signed_channel
                .clone()
                .or_else(|| r.channel.clone())
                .unwrap_or_else(|| channel.to_string()),
            sequence: r.sequence.unwrap_or(i as u64 + 1),
            expires_in_ms,
            tamper: r.tamper.as_ref().map(|t| *t.get_ref()),
            rollout,
            delta_from: r
                .delta_from
                .iter()
                .flatten()
                .map(|f| self.known_fw(f))
                .collect::<Result<_>>()?,
        })
    }

    /// `encrypt` and `image-key`: a known scheme, a key file that exists, no patches.
    fn encrypt(&self, r: &ReleaseDef) -> Result<Option<super::EncryptDef>> {
        use otarig_agent::cipher::Scheme;
        let Some(name) = &r.encrypt else {
            if let Some(k) = &r.image_key {
                return Err(self.cx.span(k, "`image-key` needs `encrypt`"));
            }
            return Ok(None);
        };
        let scheme = match name.get_ref().as_str() {
            "aes-256-cbc" => Scheme::Aes256Cbc,
            "esp-encrypted-img" => Scheme::EspEncryptedImg,
            other => {
                return Err(self.cx.span(name, format!(
                    "unknown encryption '{other}' (expected \"aes-256-cbc\" or \"esp-encrypted-img\")"
                )))
            }
        };
        if r.delta_from.as_ref().is_some_and(|v| !v.is_empty()) {
            return Err(self.cx.span(
                name,
                "an encrypted release offers no delta patches: leave out `delta-from`",
            ));
        }
        let def = super::EncryptDef {
            scheme,
            key: r.image_key.as_ref().map_or_else(
                || super::EncryptDef::default_key(scheme).to_string(),
                |k| k.get_ref().clone(),
            ),
        };
        let path = def.key_path(&otarig_server::keys::fixture_dir());
        if !path.is_file() {
            let at = r.image_key.as_ref().map_or(name, |k| k);
            return Err(self.cx.span(at, format!(
                "no image key {} (fixtures/keys holds the test keys; `otarig keys gen NAME --alg aes-256|rsa-3072 --dir fixtures/keys` makes one)",
                path.display()
            )));
        }
        Ok(Some(def))
    }

    /// A tampering lands inside the firmware, and a corrupt patch needs a patch.
    fn check_tamper(&self, t: &Spanned<TamperDef>, r: &ReleaseDef, fw: &Firmware) -> Result<()> {
        let (TamperDef::Truncate(n)
        | TamperDef::TruncateSigned(n)
        | TamperDef::CorruptByte(n)
        | TamperDef::CorruptPatch(n)) = *t.get_ref();
        if matches!(t.get_ref(), TamperDef::CorruptPatch(_))
            && r.delta_from.as_ref().is_none_or(|v| v.is_empty())
        {
            return Err(self.cx.span(
                t,
                "corrupt-patch needs `delta-from`: this release has no patch to corrupt",
            ));
        }
        if n as u64 >= fw.size as u64 {
            return Err(self.cx.span(
                t,
                format!(
                    "tamper offset {n} is past the end of firmware '{}' ({} bytes)",
                    fw.id, fw.size
                ),
            ));
        }
        Ok(())
    }

    fn rollout(&self, ro: &Spanned<super::file::RolloutDef>) -> Result<RolloutPlan> {
        let d = ro.get_ref();
        if d.waves.is_empty()
            || d.waves.windows(2).any(|w| w[0] >= w[1])
            || d.waves.iter().any(|w| *w == 0 || *w > 100)
        {
            return Err(self.cx.span(
                ro,
                "waves are increasing percentages between 1 and 100, e.g. [10, 50, 100]",
            ));
        }
        if d.halt_failure_rate > 100 {
            return Err(self
                .cx
                .span(ro, "halt-failure-rate is a percentage, 0 to 100"));
        }
        Ok(RolloutPlan {
            waves: d.waves.clone(),
            interval_ms: parse_duration(&d.interval).map_err(|m| self.cx.span(ro, m))?,
            halt_failure_rate: d.halt_failure_rate,
        })
    }

    /// One `[[fault]]`: exactly one of its kinds.
    fn fault(&self, f: &FaultDef) -> Result<Fault> {
        let devices = self.selector(&f.devices)?;
        let given = [
            f.power_loss.is_some(),
            f.force_install.is_some(),
            f.command.is_some(),
            f.payload.is_some(),
            f.server.is_some(),
            f.outage.is_some(),
            f.flood.is_some(),
            f.freeze.is_some(),
            f.tls.is_some(),
        ];
        if given.iter().filter(|g| **g).count() != 1 {
            return Err(self.cx.file("each [[fault]] needs exactly one of `power-loss`, `force-install`, `command`, `payload`, `server`, `outage`, `flood`, `freeze` or `tls`"));
        }
        let kind = if let Some(t) = &f.tls {
            self.tls_fault(t, &devices)?
        } else if let Some(at) = &f.freeze {
            FaultKind::Freeze {
                at_ms: self.cx.duration(at)?,
            }
        } else if let Some(sv) = &f.server {
            self.server_fault(sv)?
        } else if let Some(c) = &f.command {
            self.command(c)?
        } else if let Some(pd) = &f.payload {
            self.payload(pd)?
        } else if let Some(pl) = &f.power_loss {
            self.power_loss(pl)?
        } else if let Some(fi) = &f.force_install {
            self.force_install(fi)?
        } else if let Some(o) = &f.outage {
            self.outage(o)?
        } else if let Some(fl) = &f.flood {
            let d = fl.get_ref();
            if d.connections == 0 || d.connections > 10_000 {
                return Err(self.cx.span(fl, "connections is 1 to 10000"));
            }
            FaultKind::Flood {
                at_ms: parse_duration(&d.at).map_err(|m| self.cx.span(fl, m))?,
                connections: d.connections,
                target: d.target,
            }
        } else {
            return Err(self.cx.file("each [[fault]] needs one kind"));
        };
        Ok(Fault { devices, kind })
    }

    /// `tls = "..."`: only on a TLS run; a server-side break covers every board.
    fn tls_fault(&self, t: &Spanned<super::TlsFault>, devices: &Selector) -> Result<FaultKind> {
        if self.raw.fleet.transport != super::Transport::Tls {
            return Err(self
                .cx
                .span(t, "a tls fault needs transport = \"tls\" in [fleet]"));
        }
        let fault = *t.get_ref();
        if fault.server_side() && (0..self.devices).any(|i| !devices.contains(i)) {
            return Err(self.cx.span(
                t,
                format!(
                    "tls = \"{}\" breaks the firmware server, so every board at once: leave out `devices`",
                    fault.name()
                ),
            ));
        }
        Ok(FaultKind::Tls(fault))
    }

    fn outage(&self, o: &Spanned<super::file::OutageDef>) -> Result<FaultKind> {
        let d = o.get_ref();
        let fw = self.raw.firmware.get(&d.on_boot_of).ok_or_else(|| {
            self.cx
                .span(o, format!("no firmware '{}' in this file", d.on_boot_of))
        })?;
        Ok(FaultKind::Outage {
            version: fw.version.clone(),
            for_ms: parse_duration(&d.lasts).map_err(|m| self.cx.span(o, m))?,
        })
    }

    fn server_fault(&self, sv: &Spanned<ServerFaultDef>) -> Result<FaultKind> {
        let d = sv.get_ref();
        let mut kinds = Vec::new();
        if let Some(p) = &d.drop_after {
            let pct = p
                .strip_suffix('%')
                .and_then(|x| x.trim().parse::<u32>().ok())
                .filter(|p| *p > 0 && *p < 100);
            let pct = pct.ok_or_else(|| {
                self.cx.span(
                    sv,
                    format!("drop-after = '{p}' must be a percentage between 1% and 99%"),
                )
            })?;
            kinds.push(ServerFault::DropAfterPercent(pct));
        }
        if d.no_range {
            kinds.push(ServerFault::NoRange);
        }
        if let Some(st) = d.status {
            if !(400..=599).contains(&st) {
                return Err(self.cx.span(
                    sv,
                    format!("status {st} is not an HTTP error status (400-599)"),
                ));
            }
            kinds.push(ServerFault::Status(st));
        }
        if d.stall {
            kinds.push(ServerFault::Stall);
        }
        if d.endless {
            kinds.push(ServerFault::Endless);
        }
        if let Some(rate) = &d.throttle {
            kinds.push(ServerFault::Throttle(
                parse_rate(rate).map_err(|e| self.cx.span(sv, e))?,
            ));
        }
        if let Some(name) = &d.chunk {
            if self.raw.fleet.download != super::Download::Chunked {
                return Err(self
                    .cx
                    .span(sv, "a chunk fault needs download = \"chunked\" in [fleet]"));
            }
            let f = ChunkFault::from_name(name).ok_or_else(|| {
                self.cx.span(
                    sv,
                    format!("chunk = '{name}' is not reorder, other-session or other-device"),
                )
            })?;
            kinds.push(ServerFault::Chunk(f));
        }
        match kinds[..] {
            [fault] => Ok(FaultKind::Server {
                fault,
                times: d.times,
            }),
            _ => Err(self.cx.span(
                sv,
                "a server fault is exactly one of drop-after, no-range, status, stall, endless, throttle or chunk (give two [[fault]] tables to combine them)",
            )),
        }
    }

    /// A duration that may be negative ("-1h": in the past), or `default` ms.
    fn signed_duration(&self, v: &Option<Spanned<String>>, default: i64) -> Result<i64> {
        Ok(match v {
            None => default,
            Some(s) if s.get_ref().starts_with('-') => {
                let d = parse_duration(&s.get_ref()[1..]).map_err(|m| self.cx.span(s, m))?;
                -(d as i64)
            }
            Some(s) => self.cx.duration(s)? as i64,
        })
    }

    fn command(&self, c: &Spanned<super::file::CommandDef>) -> Result<FaultKind> {
        use otarig_agent::protocol::CommandKind;
        let d = c.get_ref();
        let cmd = match d.cmd.as_str() {
            "update-now" => CommandKind::UpdateNow,
            "reboot" => CommandKind::Reboot,
            "report" => CommandKind::Report,
            other => {
                return Err(self.cx.span(
                    c,
                    format!("unknown command '{other}' (update-now, reboot, report)"),
                ))
            }
        };
        Ok(FaultKind::Command(CommandFault {
            cmd,
            at_ms: parse_duration(&d.at).map_err(|m| self.cx.span(c, m))?,
            repeat: d.repeat.unwrap_or(1).max(1),
            signed_by: match &d.signed_by {
                Some(k) => self.known_key(k)?,
                None => OPERATOR_KEY.into(),
            },
            device: d.device.clone(),
            retained: d.retained,
            expires_in_ms: self.signed_duration(&d.expires_in, 5 * 60_000)?,
        }))
    }

    fn payload(&self, pd: &Spanned<super::file::PayloadDef>) -> Result<FaultKind> {
        let d = pd.get_ref();
        let topic = match d.topic.as_str() {
            "cmd" => PayloadTopic::Cmd,
            "release" => PayloadTopic::Release,
            other => {
                return Err(self
                    .cx
                    .span(pd, format!("unknown topic '{other}' (cmd, release)")))
            }
        };
        Ok(FaultKind::Payload {
            topic,
            text: d.text.clone(),
            at_ms: parse_duration(&d.at).map_err(|m| self.cx.span(pd, m))?,
        })
    }

    fn power_loss(&self, pl: &Spanned<super::file::PowerLossDef>) -> Result<FaultKind> {
        let d = pl.get_ref();
        if d.progress.is_some() && d.phase != Phase::Download {
            return Err(self
                .cx
                .span(pl, "`progress` applies only to phase = \"download\""));
        }
        if d.progress.is_some_and(|p| p > 100) {
            return Err(self.cx.span(pl, "`progress` is a percentage, 0 to 100"));
        }
        if d.progress.is_some() && d.op.is_some() {
            return Err(self.cx.span(pl, "give either `progress` or `op`, not both"));
        }
        let off_for_ms = match &d.off_for {
            Some(s) => parse_duration(s).map_err(|m| self.cx.span(pl, m))?,
            None => 1_000,
        };
        Ok(FaultKind::PowerLoss(PowerLoss {
            phase: d.phase,
            progress: d.progress,
            op: d.op,
            flash_op: d.flash_op,
            off_for_ms,
        }))
    }

    fn force_install(&self, fi: &Spanned<super::file::ForceDef>) -> Result<FaultKind> {
        let d = fi.get_ref();
        if !self.raw.firmware.contains_key(&d.firmware) {
            return Err(self
                .cx
                .span(fi, format!("no firmware '{}' in this file", d.firmware)));
        }
        Ok(FaultKind::ForceInstall {
            firmware: d.firmware.clone(),
            at_ms: parse_duration(&d.at).map_err(|m| self.cx.span(fi, m))?,
        })
    }

    /// One `[[expect]]` block: a check per key, at least one.
    fn expect(&self, e: &Spanned<ExpectDef>) -> Result<Expect> {
        let at = self.cx.span(e, "");
        let at = format!("{}:{}", at.file.display(), at.line);
        let d = e.get_ref();
        let devices = self.selector(&d.devices.clone().map(|s| Spanned::new(e.span(), s)))?;
        let checks = self.checks(d).map_err(|m| self.cx.span(e, m))?;
        if checks.is_empty() {
            return Err(self.cx.span(
                e,
                "this [[expect]] block checks nothing: add a key such as version = \"2.0.0\"",
            ));
        }
        Ok(Expect {
            devices,
            checks,
            at,
        })
    }

    /// The checks an `[[expect]]` block asks for, or what is wrong with one of them.
    fn checks(&self, d: &ExpectDef) -> std::result::Result<Vec<Check>, String> {
        let mut checks = Vec::new();
        if let Some(v) = &d.version {
            checks.push(Check::Version(v.clone()));
        }
        if let Some(v) = &d.running_state {
            if !STATES.contains(&v.as_str()) {
                return Err(format!(
                    "running-state '{v}' is not one of {}",
                    STATES.join(", ")
                ));
            }
            checks.push(Check::RunningState(v.clone()));
        }
        if let Some(v) = &d.update_slot_state {
            let list = match v {
                OneOrMany::One(s) => vec![s.clone()],
                OneOrMany::Many(l) => l.clone(),
            };
            if let Some(s) = list.iter().find(|s| !STATES.contains(&s.as_str())) {
                return Err(format!(
                    "update-slot-state '{s}' is not one of {}",
                    STATES.join(", ")
                ));
            }
            checks.push(Check::UpdateSlotState(list));
        }
        if let Some(n) = d.acks {
            checks.push(Check::Acks(n));
        }
        if let Some(v) = &d.ack_outcome {
            if !["installed", "refused", "rolled-back"].contains(&v.as_str()) {
                return Err(format!(
                    "ack-outcome '{v}' is not installed, refused or rolled-back"
                ));
            }
            checks.push(Check::AckOutcome(v.clone()));
        }
        if let Some(v) = &d.refused {
            if otarig_agent::Check::from_name(v).is_none() {
                let names: Vec<&str> = otarig_agent::Check::ALL.iter().map(|c| c.name()).collect();
                return Err(format!(
                    "refused = '{v}' is not a check the agent makes ({})",
                    names.join(", ")
                ));
            }
            checks.push(Check::Refused(v.clone()));
        }
        if let Some(v) = &d.bootloader_rejected {
            checks.push(Check::BootloaderRejected(v.clone()));
        }
        if let Some(v) = d.rolled_back {
            checks.push(Check::RolledBack(v));
        }
        if let Some(v) = d.max_fetch_ratio {
            if v.is_nan() || v <= 0.0 {
                return Err("max-fetch-ratio must be positive".into());
            }
            checks.push(Check::MaxFetchRatio(v));
        }
        let counts = [
            (d.resumed.map(Check::Resumed)),
            (d.power_cuts.map(Check::PowerCuts)),
            (d.boot_partition_set.map(Check::BootPartitionSet)),
            (d.reported_failure.clone().map(Check::ReportedFailure)),
            (d.bad_messages.map(Check::BadMessages)),
            (d.boots.map(Check::Boots)),
            (d.reports.map(Check::Reports)),
            (d.fetch_retries.map(Check::FetchRetries)),
            (d.keys_adopted.map(Check::KeysAdopted)),
        ];
        checks.extend(counts.into_iter().flatten());
        if let Some(t) = &d.min_download_time {
            let ms = parse_duration(t).map_err(|m| format!("min-download-time = '{t}': {m}"))?;
            checks.push(Check::MinDownloadMs(ms));
        }
        if let Some(t) = &d.download_starts_after {
            let ms =
                parse_duration(t).map_err(|m| format!("download-starts-after = '{t}': {m}"))?;
            checks.push(Check::DownloadStartsAfterMs(ms));
        }
        Ok(checks)
    }

    /// `[fleet.channels]`: channel name → the boards that follow it.
    fn channels(&self) -> Result<Vec<(String, Selector)>> {
        let mut channel_of = Vec::new();
        for (name, sel) in self.raw.fleet.channels.iter().flatten() {
            otarig_server::release_store::check_name("channel", name)
                .map_err(|e| self.cx.span(sel, e.to_string()))?;
            channel_of.push((name.clone(), self.selector(&Some(sel.clone()))?));
        }
        Ok(channel_of)
    }

    fn range_size(&self) -> Result<u32> {
        let Some(v) = &self.raw.fleet.range_size else {
            return Ok(16 * 1024);
        };
        parse_size(v.get_ref())
            .ok()
            .filter(|n| (4096..=16 * 1024 * 1024).contains(n))
            .map(|n| n as u32)
            .ok_or_else(|| {
                self.cx.span(
                    v,
                    "range-size must be a size from 4KiB to 16MiB, like \"256KiB\"",
                )
            })
    }

    fn known_hazards(&self) -> Result<Vec<String>> {
        self.raw
            .scenario
            .plr_known_hazards
            .iter()
            .map(|h| {
                if KNOWN_HAZARDS.contains(&h.get_ref().as_str()) {
                    Ok(h.get_ref().clone())
                } else {
                    Err(self.cx.span(
                        h,
                        format!(
                            "unknown hazard '{}' (known: {})",
                            h.get_ref(),
                            KNOWN_HAZARDS.join(", ")
                        ),
                    ))
                }
            })
            .collect()
    }
}

/// When the last release (with all its rollout waves) or timed fault happens.
fn last_event(releases: &[Release], faults: &[Fault]) -> u64 {
    releases
        .iter()
        .map(|r| {
            r.at_ms
                + r.rollout
                    .as_ref()
                    .map_or(0, |p| p.interval_ms * p.waves.len() as u64)
        })
        .chain(faults.iter().filter_map(|f| match f.kind {
            FaultKind::ForceInstall { at_ms, .. }
            | FaultKind::Command(CommandFault { at_ms, .. })
            | FaultKind::Payload { at_ms, .. }
            | FaultKind::Flood { at_ms, .. }
            | FaultKind::Freeze { at_ms } => Some(at_ms),
            _ => None,
        }))
        .max()
        .unwrap_or(0)
}
