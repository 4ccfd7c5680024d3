//! Telemetry on the wire: while a fleet updates, every board publishes a sample on its
//! `telemetry` topic at the configured period, and an outside subscriber (as a fleet
//! dashboard would be) sees boards download with progress and end on the new version. The
//! scenario throttles the server so the download spans several telemetry periods.

use std::collections::HashMap;
use std::path::Path;
use std::time::Duration;

use otarig_fleet::broker::EmbeddedBroker;
use otarig_fleet::fleet::{run_fleet, FleetOptions};
use otarig_scenario::scenario::Scenario;
use rumqttc::{AsyncClient, Event, Packet, QoS};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn boards_publish_telemetry_at_the_configured_period() {
    let broker = tokio::task::spawn_blocking(|| EmbeddedBroker::start(64))
        .await
        .unwrap()
        .unwrap();
    let path =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../scenarios/throttled-download.toml");
    let mut s = Scenario::load(&path).unwrap();
    s.set_devices(4);

    let mut o = broker.endpoint().options("dashboard");
    o.set_keep_alive(Duration::from_secs(30));
    let (client, mut events) = AsyncClient::new(o, 64);
    client
        .subscribe("otarig/device/+/telemetry", QoS::AtMostOnce)
        .await
        .unwrap();
    let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::<serde_json::Value>::new()));
    let sink = seen.clone();
    let collector = tokio::spawn(async move {
        while let Ok(e) = events.poll().await {
            if let Event::Incoming(Packet::Publish(p)) = e {
                let v = serde_json::from_slice(&p.payload).expect("telemetry is JSON");
                sink.lock().unwrap().push(v);
            }
        }
    });
    tokio::time::sleep(Duration::from_millis(300)).await;

    let period_ms = 2_000;
    let opts = FleetOptions {
        broker: Some(broker.endpoint()),
        speedup: 25.0,
        telemetry_ms: period_ms,
        ..Default::default()
    };
    let run = run_fleet(&s, &opts).await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    collector.abort();
    let samples = seen.lock().unwrap().clone();

    let mut by_device: HashMap<String, Vec<&serde_json::Value>> = HashMap::new();
    for v in &samples {
        assert_eq!(v["v"], 1, "versioned payload: {v}");
        by_device
            .entry(v["device"].as_str().unwrap().to_string())
            .or_default()
            .push(v);
    }
    assert_eq!(by_device.len(), 4, "every board publishes telemetry");
    for (device, list) in &by_device {
        // At least half the samples the period allows over the run (boots and reboots
        // restart the timer; QoS 0 may drop some under load).
        let expected = run.end_ms / period_ms;
        assert!(
            list.len() as u64 >= expected / 2,
            "{device}: {} samples over {} ms at one per {period_ms} ms",
            list.len(),
            run.end_ms
        );
        assert!(
            list.iter()
                .any(|v| v["activity"] == "downloading" && v["progress"].is_u64()),
            "{device} reports its download with progress"
        );
        let last = list.last().unwrap();
        assert_eq!(
            last["version"], "2.0.0",
            "{device} ends on the new version: {last}"
        );
        assert_eq!(last["activity"], "idle");
        let uptimes: Vec<u64> = list
            .iter()
            .map(|v| v["uptime_ms"].as_u64().unwrap())
            .collect();
        assert!(
            uptimes.windows(2).any(|w| w[1] < w[0]),
            "{device}'s uptime restarts after the update's reboot: {uptimes:?}"
        );
    }
}
