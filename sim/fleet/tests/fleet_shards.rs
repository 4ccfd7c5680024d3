//! A fleet split over shards (as the scale benchmark runs it, one per process) is the same
//! fleet: each shard runs its own boards, shard 0 alone announces the release, and on one
//! shared timeline every board of every shard installs it and confirms.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use otarig_agent::Event;
use otarig_fleet::broker::EmbeddedBroker;
use otarig_fleet::fleet::{run_fleet, BrokerConnects, FleetOptions, Shard};
use otarig_scenario::runner::{self, What};
use otarig_scenario::scenario::Scenario;
use otarig_server::release_store::ReleaseStore;
use otarig_server::server::Server;
use rumqttc::{AsyncClient, Packet, QoS};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shards_together_update_the_whole_fleet_once() {
    let broker = tokio::task::spawn_blocking(|| EmbeddedBroker::start(64))
        .await
        .unwrap()
        .unwrap();
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../scenarios/full-update.toml");
    let mut s = Scenario::load(&path).unwrap();
    s.set_devices(7);
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(ReleaseStore::open(dir.path()).unwrap());
    runner::prepare(&s).unwrap().stage_into(&store).unwrap();
    let server = Server::start(store, SocketAddr::from(([127, 0, 0, 1], 0)))
        .await
        .unwrap();

    // An operator's view of the release topics: how many announcements were published.
    let mut o = broker.endpoint().options("observer");
    o.set_keep_alive(Duration::from_secs(30));
    let (observer, mut events) = AsyncClient::new(o, 16);
    observer
        .subscribe(
            format!("{}/release/#", otarig_agent::protocol::DEFAULT_PREFIX),
            QoS::AtLeastOnce,
        )
        .await
        .unwrap();
    let announcements = Arc::new(AtomicUsize::new(0));
    let count = announcements.clone();
    let watcher = tokio::spawn(async move {
        while let Ok(e) = events.poll().await {
            if let rumqttc::Event::Incoming(Packet::Publish(p)) = e {
                if !p.payload.is_empty() {
                    count.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
    });
    tokio::time::sleep(Duration::from_millis(300)).await;

    let epoch = SystemTime::now() + Duration::from_millis(1500);
    let connects = Arc::new(BrokerConnects::default());
    let opts = |index| FleetOptions {
        broker: Some(broker.endpoint()),
        server: Some(server.url()),
        speedup: 25.0,
        quiet_ms: 60_000,
        shard: Some(Shard { index, count: 3 }),
        epoch: Some(epoch),
        broker_connects: Some(connects.clone()),
        ..Default::default()
    };
    let (o0, o1, o2) = (opts(0), opts(1), opts(2));
    let (a, b, c) = tokio::join!(run_fleet(&s, &o0), run_fleet(&s, &o1), run_fleet(&s, &o2));
    let runs = [a.unwrap(), b.unwrap(), c.unwrap()];
    server.shutdown().await;
    watcher.abort();
    assert_eq!(
        announcements.load(Ordering::Relaxed),
        1,
        "shard 0 alone announces the release"
    );

    let mut all = BTreeSet::new();
    for (index, run) in runs.iter().enumerate() {
        let mine: BTreeSet<u32> = run.devices.iter().map(|d| d.index).collect();
        let expected: BTreeSet<u32> = (0..7).filter(|i| i % 3 == index as u32).collect();
        assert_eq!(mine, expected, "shard {index} runs its own boards");
        assert!(all.is_disjoint(&mine), "no board runs in two shards");
        all.extend(mine);
        let failures = otarig_scenario::expect::judge(run, None);
        assert!(failures.is_empty(), "shard {index}: {failures:#?}");
        for d in &run.devices {
            assert_eq!(
                d.version.as_deref(),
                Some("2.0.0"),
                "board {} of shard {index}",
                d.index
            );
            let confirmed = run
                .records
                .iter()
                .filter(|r| r.device == d.index)
                .filter(|r| matches!(r.what, What::Agent(Event::Confirmed { .. })))
                .count();
            assert_eq!(confirmed, 1, "board {} confirmed once", d.index);
        }
    }
    assert_eq!(all, (0..7).collect(), "the shards are the whole fleet");
    // Each board connected at boot and again after the reboot into v2, counted once across
    // the shards, the first before the release (5 s) and the last after it.
    let (n, span) = connects.summary();
    assert_eq!(n, 14, "broker connections across the shards");
    let (first, last) = span.unwrap();
    assert!(first < 5_000 && last > 5_000, "{first}..{last} ms");
}

#[tokio::test]
async fn a_shard_refuses_to_run_without_an_external_broker_and_server() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../scenarios/full-update.toml");
    let s = Scenario::load(&path).unwrap();
    let opts = FleetOptions {
        shard: Some(Shard { index: 0, count: 2 }),
        ..Default::default()
    };
    let err = run_fleet(&s, &opts)
        .await
        .err()
        .expect("refused")
        .to_string();
    assert!(err.contains("--broker"), "{err}");
}
