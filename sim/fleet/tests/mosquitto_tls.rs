//! Mosquitto with mutual TLS and the generated ACL: each device is held to its own topics,
//! and clients without a valid certificate never get in. Needs `mosquitto` (scripts/setup.sh
//! installs it); without it the test fails saying so.

use std::sync::Arc;
use std::time::Duration;

use otarig_fleet::mosquitto::{Mosquitto, MutualTls, OPERATOR_CN};
use otarig_server::pki::Pki;
use otarig_server::tls::{client_config, Client};
use rumqttc::{
    AsyncClient, Event, EventLoop, MqttOptions, Packet, QoS, TlsConfiguration, Transport,
};
use tokio::sync::mpsc;

/// What a client's connection delivers: a publish (topic, payload), or what ended it.
type Delivery = Result<(String, Vec<u8>), String>;

/// A client with `cfg`; its publishes received arrive on the returned channel, and a
/// connection error ends it (sent as `Err`).
fn client(
    id: &str,
    port: u16,
    cfg: Arc<rustls::ClientConfig>,
) -> (AsyncClient, mpsc::UnboundedReceiver<Delivery>) {
    let mut opts = MqttOptions::new(id, "127.0.0.1", port);
    opts.set_transport(Transport::tls_with_config(TlsConfiguration::Rustls(cfg)));
    let (c, events) = AsyncClient::new(opts, 16);
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(pump(events, tx));
    (c, rx)
}

async fn pump(mut events: EventLoop, tx: mpsc::UnboundedSender<Delivery>) {
    loop {
        match events.poll().await {
            Ok(Event::Incoming(Packet::Publish(p))) => {
                let _ = tx.send(Ok((p.topic, p.payload.to_vec())));
            }
            Ok(_) => {}
            Err(e) => {
                let _ = tx.send(Err(e.to_string()));
                return;
            }
        }
    }
}

/// The next publish, or what ended the connection.
async fn next(rx: &mut mpsc::UnboundedReceiver<Delivery>) -> Delivery {
    tokio::time::timeout(Duration::from_secs(10), rx.recv())
        .await
        .map_err(|_| "nothing within 10 s".to_string())?
        .unwrap_or_else(|| Err("closed".into()))
}

#[tokio::test(flavor = "multi_thread")]
async fn each_device_is_held_to_its_own_topics_and_strangers_stay_out() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::init(dir.path(), true, 30).unwrap();
    let server = pki
        .server(&["127.0.0.1".into(), "localhost".into()], 30)
        .unwrap();
    pki.write_server(&server).unwrap();
    let cfg = |id: &str, who: Client| {
        let d = pki.device(id, 30).unwrap();
        pki.write_device(id, &d).unwrap();
        client_config(who, pki.root_pem(), Some((&d.cert_pem, &d.key_pem))).unwrap()
    };
    let operator = cfg(OPERATOR_CN, Client::Host);
    let (dev1, dev3) = (cfg("dev-1", Client::Board), cfg("dev-3", Client::Board));
    pki.revoke_device("dev-3").unwrap();
    let tls = MutualTls::of_pki(dir.path());
    assert!(tls.crlfile.is_some(), "the CRL is loaded");
    let broker = Mosquitto::start_tls(&tls, &[]).expect("mosquitto with mutual TLS");
    let port = broker.port;

    let (op, mut op_rx) = client(OPERATOR_CN, port, operator);
    op.subscribe("otarig/device/+/status", QoS::AtLeastOnce)
        .await
        .unwrap();
    let (d1, mut d1_rx) = client("dev-1", port, dev1);
    d1.subscribe("otarig/device/dev-1/cmd", QoS::AtLeastOnce)
        .await
        .unwrap();
    // Granted, but the ACL filters at delivery: dev-1 never reads dev-2's commands.
    d1.subscribe("otarig/device/dev-2/cmd", QoS::AtLeastOnce)
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await; // subscriptions settle

    op.publish(
        "otarig/device/dev-2/cmd",
        QoS::AtLeastOnce,
        false,
        "for dev-2",
    )
    .await
    .unwrap();
    op.publish(
        "otarig/device/dev-1/cmd",
        QoS::AtLeastOnce,
        false,
        "for dev-1",
    )
    .await
    .unwrap();
    assert_eq!(
        next(&mut d1_rx).await.unwrap(),
        ("otarig/device/dev-1/cmd".into(), b"for dev-1".to_vec()),
        "dev-1 read another board's command"
    );
    // Impersonation: dev-1 publishes as dev-2 first, then as itself; only its own arrives.
    d1.publish(
        "otarig/device/dev-2/status",
        QoS::AtLeastOnce,
        false,
        "forged",
    )
    .await
    .unwrap();
    d1.publish(
        "otarig/device/dev-1/status",
        QoS::AtLeastOnce,
        false,
        "mine",
    )
    .await
    .unwrap();
    assert_eq!(
        next(&mut op_rx).await.unwrap(),
        ("otarig/device/dev-1/status".into(), b"mine".to_vec()),
        "dev-1 published in dev-2's name"
    );

    // No certificate, a revoked one, one from another CA: refused at the handshake.
    let other = tempfile::tempdir().unwrap();
    let stranger_pki = Pki::init(other.path(), false, 30).unwrap();
    let s = stranger_pki.device("dev-2", 30).unwrap();
    let root = pki.root_pem();
    let strangers = [
        (
            "no certificate",
            client_config(Client::Host, root, None).unwrap(),
        ),
        ("revoked certificate", dev3),
        (
            "certificate from another CA",
            client_config(Client::Board, root, Some((&s.cert_pem, &s.key_pem))).unwrap(),
        ),
    ];
    for (what, cfg) in strangers {
        let (c, mut rx) = client("intruder", port, cfg);
        let _ = c.subscribe("otarig/#", QoS::AtLeastOnce).await;
        assert!(next(&mut rx).await.is_err(), "{what}: connected");
    }
}
