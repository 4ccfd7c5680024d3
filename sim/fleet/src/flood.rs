//! Strangers that try to take the fleet's infrastructure down from outside: what the
//! `flood` fault of a scenario and the broker and server tests throw at the embedded broker
//! and the firmware server. Each keeps at it until `stop` turns true.

use std::time::Duration;

use tokio::io::AsyncReadExt;
use tokio::sync::watch;

/// Strangers at a broker's door: `n` clients without credentials and `n` with a guessed
/// password, each reconnecting as fast as the broker turns it away, until `stop` turns true.
/// What the broker-flooding attack scenario and its test throw at the embedded broker.
pub fn broker(host: &str, port: u16, n: usize, stop: watch::Receiver<bool>) {
    for i in 0..2 * n {
        let id = format!("stranger-{}-{i}", std::process::id());
        let mut o = rumqttc::MqttOptions::new(id.clone(), host, port);
        if i >= n {
            o.set_credentials(id, "0".repeat(64));
        }
        let mut stop = stop.clone();
        tokio::spawn(async move {
            let (_client, mut events) = rumqttc::AsyncClient::new(o, 4);
            while !*stop.borrow() {
                tokio::select! {
                    _ = stop.changed() => break,
                    r = events.poll() => if r.is_err() {
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    },
                }
            }
        });
    }
}

/// Strangers at the firmware server at `url` (`http://` or `https://`): `n` connections that
/// send nothing (each reopened as soon as the server closes it), and `n` clients posting acks
/// under ever new device ids. The ack posters speak plain HTTP: to an HTTPS server they are
/// strangers without a certificate, refused at the handshake, as the broker's flood is. A
/// refused post waits a moment before the next, so a poster never spins on the runtime.
pub fn server(url: &str, n: usize, stop: watch::Receiver<bool>) {
    let Some(addr) = url
        .parse::<hyper::Uri>()
        .ok()
        .and_then(|u| u.authority().map(|a| a.to_string()))
    else {
        return tracing::warn!("flood: {url} names no server to flood");
    };
    for i in 0..n {
        let (to, mut quiet) = (addr.clone(), stop.clone());
        tokio::spawn(async move {
            while !*quiet.borrow() {
                let Ok(mut s) = tokio::net::TcpStream::connect(&to).await else {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                };
                let mut buf = [0u8; 64];
                tokio::select! {
                    _ = quiet.changed() => break,
                    _ = s.read(&mut buf) => {}
                }
            }
        });
        let (url, mut spam) = (format!("http://{addr}/ack"), stop.clone());
        tokio::spawn(async move {
            let http = crate::board_http::BoardHttp::new();
            for k in 0u64.. {
                let body = format!(
                    r#"{{"v":1,"device":"stranger-{i}-{k}","sequence":{k},"version":"6.6.6","outcome":"installed","detail":""}}"#
                );
                tokio::select! {
                    _ = spam.changed() => break,
                    posted = http.post_json(&url, body) => if posted.is_err() {
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    },
                }
                if *spam.borrow() {
                    break;
                }
            }
        });
    }
}
