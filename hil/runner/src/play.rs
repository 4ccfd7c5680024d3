//! Playing a scenario's timeline to one board in real time, with idle time skipped, and
//! cutting its power at a download progress point.

use std::time::{Duration, Instant};

use anyhow::bail;
use otarig_agent::protocol::{self, Leaf};
use otarig_scenario::runner::Prepared;
use otarig_scenario::scenario::{FaultKind, PayloadTopic, Scenario, StatementKind, Step};
use rumqttc::{AsyncClient, QoS};

use crate::console::Console;
use crate::observed::Observed;
use crate::{HilOptions, Services, DEVICE};

const PREFIX: &str = protocol::DEFAULT_PREFIX;

/// Play the timeline and read the console until the board settles: what it said, how many
/// power cuts it took, and the scenario time at the end. Scenario time 0 is `t0`.
pub(crate) async fn play(
    t0: Instant,
    s: &Scenario,
    prep: &Prepared,
    services: &Services,
    con: &mut Console,
    cut_at: Option<u32>,
    opts: &HilOptions,
) -> anyhow::Result<(Observed, u32, u64)> {
    let mut o = services
        .broker
        .endpoint()
        .options(&format!("otarig-hil-{}", std::process::id()));
    o.set_max_packet_size(
        otarig_fleet::broker::MAX_PACKET,
        otarig_fleet::broker::MAX_PACKET,
    );
    let (control, mut control_loop) = AsyncClient::new(o, 64);
    let control_task = tokio::spawn(async move { while control_loop.poll().await.is_ok() {} });
    let mut player = Player {
        s,
        prep,
        services,
        control: &control,
        t0,
        skew: 0,
        seen: Observed::default(),
        cuts: 0,
        cut_at,
    };
    let result = player.run(con, opts).await;
    let _ = control.disconnect().await;
    control_task.abort();
    result?;
    let end_ms = player.now_ms();
    Ok((player.seen, player.cuts, end_ms))
}

struct Player<'a> {
    s: &'a Scenario,
    prep: &'a Prepared,
    services: &'a Services,
    control: &'a AsyncClient,
    t0: Instant,
    /// ms of idle time skipped so far.
    skew: u64,
    seen: Observed,
    cuts: u32,
    /// Cut power once the download reaches this percentage.
    cut_at: Option<u32>,
}

impl Player<'_> {
    /// Scenario time: real time since the start plus the idle time skipped.
    fn now_ms(&self) -> u64 {
        self.t0.elapsed().as_millis() as u64 + self.skew
    }

    async fn run(&mut self, con: &mut Console, opts: &HilOptions) -> anyhow::Result<()> {
        let steps = self.s.timeline();
        let mut next = 0usize;
        let mut last_step = Instant::now();
        let hard_deadline = Instant::now() + opts.step_timeout * 20;
        loop {
            if let Some((at, step)) = steps.get(next) {
                // Quiet since its last line and since the last step: the board had time to act.
                let quiet = self
                    .seen
                    .last_line_at
                    .is_none_or(|l| l.elapsed() >= opts.idle_skip)
                    && last_step.elapsed() >= opts.idle_skip;
                let t = self.now_ms();
                if *at > t && quiet {
                    self.skew += at - t;
                }
                if *at <= self.now_ms() {
                    self.take_step(step).await?;
                    next += 1;
                    last_step = Instant::now();
                    continue;
                }
            } else if !self.seen.busy
                && self
                    .seen
                    .last_line_at
                    .is_some_and(|l| l.elapsed() >= opts.quiet)
            {
                return Ok(());
            }
            if Instant::now() > hard_deadline {
                bail!(
                    "{}: the scenario did not settle within {:?}; last console lines:\n    {}",
                    self.s.name,
                    opts.step_timeout * 20,
                    con.tail()
                );
            }
            self.read_console(con, opts).await?;
        }
    }

    async fn take_step(&self, step: &Step) -> anyhow::Result<()> {
        let id = self.s.device_id(DEVICE);
        match step {
            Step::Release(k) => {
                let r = &self.prep.releases[*k];
                self.services
                    .store
                    .set_latest(&r.device_type, &r.channel, &r.manifest)?;
                // An unannounced release is found by the board's next poll.
                if self.s.releases[*k].announce {
                    self.announce(&r.device_type, &r.channel, &r.manifest)
                        .await?;
                }
            }
            Step::Statement(n) => {
                let store = &self.services.store;
                match self.s.statements[*n].kind {
                    StatementKind::KeySet { .. } => store.set_keys(&self.prep.statements[*n])?,
                    StatementKind::Revocations { .. } => {
                        store.set_revocations(&self.s.device_type, &self.prep.statements[*n])?
                    }
                }
                // Renew the retained announcement with the new statement (not announcing a
                // release that was not).
                let (dt, ch) = (&self.s.device_type, self.s.channel_for(DEVICE));
                let at = self.s.statements[*n].at_ms;
                let latest = if self.s.latest_is_announced(ch, at) {
                    store.latest(dt, ch)?
                } else {
                    None
                };
                if let Some(m) = latest {
                    self.announce(dt, ch, &m).await?;
                }
            }
            Step::Fault(n) => match &self.s.faults[*n].kind {
                FaultKind::Command(c) => {
                    // One board: its one payload.
                    let payload = c.payloads(*n, [id.as_str()])?.concat();
                    for _ in 0..c.repeat {
                        let topic = protocol::device_topic(PREFIX, &id, Leaf::Cmd);
                        self.control
                            .publish(topic, QoS::AtLeastOnce, c.retained, payload.clone())
                            .await?;
                    }
                }
                FaultKind::Payload { topic, text, .. } => {
                    let topic = match topic {
                        PayloadTopic::Cmd => protocol::device_topic(PREFIX, &id, Leaf::Cmd),
                        PayloadTopic::Release => {
                            protocol::release_topic(PREFIX, &self.s.device_type, &self.s.channel)
                        }
                    };
                    self.control
                        .publish(topic, QoS::AtLeastOnce, false, text.clone().into_bytes())
                        .await?;
                }
                _ => {}
            },
        }
        Ok(())
    }

    /// Publish the retained announcement of `manifest`, with the store's statements.
    async fn announce(&self, dt: &str, ch: &str, manifest: &[u8]) -> anyhow::Result<()> {
        let statements = self.services.store.statements(dt)?;
        let payload = statements.borrow().announcement(manifest)?;
        let topic = protocol::release_topic(PREFIX, dt, ch);
        self.control
            .publish(topic, QoS::AtLeastOnce, true, payload)
            .await?;
        Ok(())
    }

    /// Wait up to 100 ms for a console line; take it, and cut power if the download reached
    /// the cut point.
    async fn read_console(&mut self, con: &mut Console, opts: &HilOptions) -> anyhow::Result<()> {
        let Ok(Some(l)) = tokio::time::timeout(Duration::from_millis(100), con.lines.recv()).await
        else {
            return Ok(());
        };
        con.log.push(l.clone());
        if let Err(e) = self.seen.take(self.now_ms(), &l) {
            tracing::warn!("console line not understood ({e}): {l}");
        }
        if self.cut_at.is_none_or(|pct| self.seen.progress_pct < pct) {
            return Ok(());
        }
        self.cut_at = None;
        self.cuts += 1;
        tracing::info!("power cut at {}% of the download", self.seen.progress_pct);
        let (out, reset) = (con.out.clone(), opts.reset.clone());
        tokio::task::spawn_blocking(move || {
            let mut port = out.lock().unwrap_or_else(|p| p.into_inner());
            reset.power_cut(&mut **port, Duration::from_millis(300))
        })
        .await??;
        Ok(())
    }
}
