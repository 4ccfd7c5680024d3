//! The embedded broker: starts on a free loopback port, two can run at once, and a retained
//! release announcement reaches a board that subscribes later.

use std::time::Duration;

use otarig_fleet::broker::EmbeddedBroker;
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};

async fn client(b: &EmbeddedBroker, id: &str) -> (AsyncClient, rumqttc::EventLoop) {
    let mut o = MqttOptions::new(id, b.addr.ip().to_string(), b.addr.port());
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
