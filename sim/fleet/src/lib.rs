//! # otarig-fleet
//!
//! Simulated boards on real sockets:
//! - [`broker`]: the embedded MQTT broker (rumqttd) on a free loopback port;
//! - [`board_http`]: each board's own HTTP connection, bounded like `esp_http_client`;
//! - [`fleet`]: a scenario with every board on the wire (its own MQTT and HTTP connections),
//!   sharded across processes for large fleets;
//! - [`bench`](mod@bench): the scale benchmark (`otarig bench fleet`);
//! - [`virtual_board`]: one board behind a pty, answering the ROM serial loader and running
//!   the fleet's board task, for the HIL runner without hardware.
//!
//! Built on the scenario engine, the server, the simulated chip and `otarig-serial`. It must
//! never depend on the HIL runner or the CLI.

pub mod bench;
pub mod board_http;
pub mod broker;
pub mod fleet;
pub mod flood;
pub mod mosquitto;
pub mod virtual_board;
