//! Staged rollouts on the wire, and release announcements.

use std::collections::HashSet;
use std::sync::Arc;

use otarig_agent::protocol::{self, Leaf};
use otarig_scenario::runner::{SignedRelease, What};
use otarig_server::release_store::ReleaseStore;
use rumqttc::{AsyncClient, QoS};

use super::board::Shared;
use super::PREFIX;

/// Make a signed manifest the retained release announcement of a device type and channel,
/// with the key set and revocation list of `store` (the embedded server's; none for an
/// external server, whose answers to polls carry them).
pub(super) async fn announce(
    control: &AsyncClient,
    store: Option<&ReleaseStore>,
    device_type: &str,
    channel: &str,
    signed: &[u8],
) -> anyhow::Result<()> {
    let statements = match store {
        Some(store) => store.statements(device_type)?,
        None => Default::default(),
    };
    let payload = statements.borrow().announcement(signed)?;
    let topic = protocol::release_topic(PREFIX, device_type, channel);
    control
        .publish(topic, QoS::AtLeastOnce, true, payload)
        .await?;
    Ok(())
}

/// What a rollout task needs besides the shared run state.
pub(super) struct RolloutCtx {
    pub(super) release: SignedRelease,
    pub(super) signed: Vec<u8>,
    /// Device id of every board, by index.
    pub(super) ids: Vec<String>,
    pub(super) offers: Arc<otarig_server::server::Offers>,
    pub(super) store: Arc<ReleaseStore>,
    pub(super) control: AsyncClient,
    /// Signs the `update-now` commands.
    pub(super) operator: Arc<otarig_server::keys::NamedKey>,
}

/// Drive one staged rollout: offer each wave to its boards (and tell them to look now), judge
/// it after the interval from the acks, then grow, halt or finish.
pub(super) async fn run_rollout(
    sh: Arc<Shared>,
    mut r: otarig_server::rollout::Rollout,
    cx: RolloutCtx,
) -> anyhow::Result<()> {
    let SignedRelease {
        device_type: dt,
        channel: ch,
        sequence: seq,
        ..
    } = cx.release.clone();
    let id = |b: u32| cx.ids[b as usize].clone();
    let mut wave = r.start();
    loop {
        sh.record(
            u32::MAX,
            What::Rollout {
                sequence: seq,
                message: format!("wave {} starts: {} board(s)", r.wave() + 1, wave.len()),
            },
        );
        for b in &wave {
            cx.offers.offer(&id(*b), cx.signed.clone());
            let issued_ms = otarig_scenario::runner::EPOCH_MS + sh.clock.now();
            let cmd = otarig_scenario::scenario::signed_command(
                &cx.operator,
                &id(*b),
                protocol::CommandKind::UpdateNow,
                (issued_ms, otarig_scenario::scenario::ROLLOUT_SOURCE),
                r.plan().interval_ms as i64,
            );
            cx.control
                .publish(
                    protocol::device_topic(PREFIX, &id(*b), Leaf::Cmd),
                    QoS::AtLeastOnce,
                    false,
                    cmd,
                )
                .await?;
        }
        let until = sh.clock.now() + r.plan().interval_ms;
        sh.clock.sleep_until(until).await;
        let failed: HashSet<String> = {
            let records = sh.records.lock().unwrap_or_else(|p| p.into_inner());
            records
                .iter()
                .filter_map(|rec| match &rec.what {
                    What::Ack { ack, .. }
                        if ack.sequence == seq
                            && ack.outcome != otarig_agent::Outcome::Installed =>
                    {
                        Some(id(rec.device))
                    }
                    _ => None,
                })
                .collect()
        };
        match r.check(|b| failed.contains(&id(b))) {
            otarig_server::rollout::Step::Next(boards) => wave = boards,
            otarig_server::rollout::Step::Halted {
                wave,
                failed,
                members,
            } => {
                sh.record(
                    u32::MAX,
                    What::Rollout {
                        sequence: seq,
                        message: format!(
                            "halted after wave {}: {failed} of {members} board(s) failed",
                            wave + 1
                        ),
                    },
                );
                return Ok(());
            }
            otarig_server::rollout::Step::Done => {
                cx.store.set_latest(&dt, &ch, &cx.signed)?;
                announce(&cx.control, Some(&cx.store), &dt, &ch, &cx.signed).await?;
                sh.record(
                    u32::MAX,
                    What::Rollout {
                        sequence: seq,
                        message: "complete".into(),
                    },
                );
                return Ok(());
            }
        }
    }
}
