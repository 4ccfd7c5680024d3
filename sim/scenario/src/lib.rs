//! # otarig-scenario
//!
//! Scenario files and everything that runs them without a socket:
//! - [`scenario`]: the file format (fleet, firmware, releases, faults, expectations), parsed
//!   with file, line and column in every error;
//! - [`runner`]: the deterministic in-process runner (agents on simulated boards, the server's
//!   core, a virtual clock, one seed);
//! - [`expect`]: the checker that judges any run's event stream, simulated or real;
//! - [`plr`]: the power-loss explorer (exhaustive and random cuts);
//! - [`summary`]: verdicts, event files and JUnit reports.
//!
//! Built on `otarig-esp32s3` (the boards) and `otarig-server` (releases). It must never depend
//! on sockets, the broker, the fleet or the HIL layer: those run scenarios from above.

pub mod expect;
pub mod plr;
pub mod runner;
pub mod scenario;
pub mod summary;

pub use scenario::Scenario;
