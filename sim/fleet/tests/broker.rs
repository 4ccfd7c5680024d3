//! The embedded broker: starts on a free loopback port, two can run at once, and a retained
//! release announcement reaches a board that subscribes later.

use std::time::Duration;

use otarig_fleet::broker::EmbeddedBroker;
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};

async fn client(b: &EmbeddedBroker, id: &str) -> (AsyncClient, rumqttc::EventLoop) {
    let mut o = b.endpoint().options(id);
    o.set_keep_alive(Duration::from_secs(10));
    AsyncClient::new(o, 16)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retained_announcements_reach_late_subscribers() {
    let a = EmbeddedBroker::start(16).unwrap();
    let b = EmbeddedBroker::start(16).unwrap();
    assert_ne!(a.addr, b.addr, "each broker gets its own port");

    let topic = otarig_agent::protocol::release_topic("otarig", "demo", "stable");
    let (server, mut server_loop) = client(&a, "server").await;
    tokio::spawn(async move { while server_loop.poll().await.is_ok() {} });
    server
        .publish(
            &topic,
            QoS::AtLeastOnce,
            true,
            br#"{"v":1,"signed":{}}"#.to_vec(),
        )
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;

    let (board, mut board_loop) = client(&a, "board-1").await;
    board.subscribe(&topic, QoS::AtLeastOnce).await.unwrap();
    let got = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match board_loop.poll().await {
                Ok(Event::Incoming(Packet::Publish(p))) => return p,
                Ok(_) => {}
                Err(e) => panic!("board lost the broker: {e}"),
            }
        }
    })
    .await
    .expect("the retained announcement arrives");
    assert!(got.retain, "delivered as a retained message");
    assert_eq!(&got.payload[..], br#"{"v":1,"signed":{}}"#);
}

/// Broker takedown: strangers flood the broker with connections well past its connection cap
/// (without credentials, with a wrong password, with another client's credentials). rumqttd
/// 0.20 panicked past its cap and poisoned a mutex, after which nobody could connect; now it
/// refuses them all while reading CONNECT, and the fleet's own clients still get through.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn strangers_cannot_fill_or_crash_the_broker() {
    let b = tokio::task::spawn_blocking(|| EmbeddedBroker::start(4))
        .await
        .unwrap()
        .unwrap();
    let (host, port) = (b.addr.ip().to_string(), b.addr.port());
    let (_stop_tx, stop) = tokio::sync::watch::channel(false);
    otarig_fleet::flood::broker(&host, port, 20, stop);
    for i in 0..10 {
        // board-9's real password, presented under another client id.
        let mut o = MqttOptions::new(format!("impostor-{i}"), host.clone(), port);
        o.set_credentials("board-9", b.auth.password("board-9"));
        let (_c, mut events) = AsyncClient::new(o, 4);
        tokio::spawn(async move {
            let _keep = _c;
            loop {
                if events.poll().await.is_err() {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
        });
    }
    tokio::time::sleep(Duration::from_secs(2)).await;

    let topic = "otarig/device/board-1/cmd";
    let (board, mut board_loop) = client(&b, "board-1").await;
    board.subscribe(topic, QoS::AtLeastOnce).await.unwrap();
    let (server, mut server_loop) = client(&b, "server").await;
    tokio::spawn(async move { while server_loop.poll().await.is_ok() {} });
    let got = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match board_loop.poll().await {
                Ok(Event::Incoming(Packet::SubAck(_))) => {
                    server
                        .publish(topic, QoS::AtLeastOnce, false, b"hello".to_vec())
                        .await
                        .unwrap();
                }
                Ok(Event::Incoming(Packet::Publish(p))) => return p,
                Ok(_) => {}
                Err(e) => panic!("a board with credentials could not stay connected: {e}"),
            }
        }
    })
    .await
    .expect("the board's message arrives through the flooded broker");
    assert_eq!(&got.payload[..], b"hello");
    assert!(
        b.auth
            .accepts("board-1", "board-1", &b.auth.password("board-1"))
            && !b
                .auth
                .accepts("board-2", "board-1", &b.auth.password("board-1")),
        "a password opens its own client id only"
    );
}
