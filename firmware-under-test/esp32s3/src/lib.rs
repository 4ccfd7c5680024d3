//! The firmware shell's logic that needs no ESP-IDF, kept here so that it is unit-tested on
//! the host (the binary is built for the chip): the bounds on what the shell reads, when its
//! HTTP handle tries a request again, and its main loop's clocks.

use std::io::BufRead;
use std::time::Duration;

/// Which piece of an MQTT message an `MQTT_EVENT_DATA` carries (esp-mqtt's
/// `current_data_offset` / `total_data_len`, as embedded-svc's `Details` reports them).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Piece {
    Whole,
    First { total: usize },
    Next { offset: usize, total: usize },
}

/// Where a range's body goes and where it must end: a `206` is the range asked for; a `200`
/// means the server ignored `Range` and sends the whole blob from byte 0 (fed from there, as
/// the fleet's board does); nothing may run past the end (endless data).
pub fn body_window(status: u16, offset: u32, len: u32, total: u32) -> (u64, u64) {
    match status {
        200 => (0, total as u64),
        _ => (offset as u64, offset as u64 + len as u64),
    }
}

/// esp_http_client.h: `ESP_ERR_HTTP_BASE` (0x7000) + 7, "mapping of errno EAGAIN".
pub const ESP_ERR_HTTP_EAGAIN: i32 = 0x7007;

/// Whether the HTTP handle tries a request once more, on a new connection, after it failed
/// with `esp_err_t` `code` before any answer came. Only on a kept connection, which the server
/// may have closed while idle (after its header timeout); and not when no answer came within
/// the request timeout: `esp_http_client_fetch_headers` returns `-ESP_ERR_HTTP_EAGAIN` then
/// ("Connection timed out before data was ready!"; esp-idf-svc's ESP-IDF v4 workaround,
/// `ESP_ERR_HTTP_EAGAIN`), and a second try would double the wait and hide a stalled server
/// from the agent, which counts its failed fetches and backs off.
pub fn retry_on_new_connection(kept: bool, code: i32) -> bool {
    kept && code.unsigned_abs() != ESP_ERR_HTTP_EAGAIN.unsigned_abs()
}

/// The main loop's two clocks (ms): the agent's timer (its last `Action::WakeAt`) and the
/// telemetry period.
///
/// Both are looked at after every wait for a message, not only when the wait timed out: a
/// download keeps the loop's queue full (the reader thread is faster than `esp_ota_write`),
/// and clocks read only on a timeout stood still until the queue ran dry, so a board sent no
/// telemetry while it downloaded and the agent's timer fired late.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Clocks {
    /// When the agent wants `Input::Timer`.
    pub wake: Option<u64>,
    next_telemetry: u64,
    period: u64,
}

/// What [`Clocks::due`] found due.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Due {
    pub telemetry: bool,
    pub timer: bool,
}

impl Clocks {
    /// The first telemetry one `period` after `now`; no timer yet.
    pub fn new(now: u64, period: u64) -> Clocks {
        Clocks {
            wake: None,
            next_telemetry: now.saturating_add(period),
            period,
        }
    }

    /// How long to wait for a message at most: until the next clock, and a minute at most.
    pub fn wait(&self, now: u64) -> Duration {
        let until = self.wake.unwrap_or(u64::MAX).min(self.next_telemetry);
        Duration::from_millis(until.saturating_sub(now).min(60_000))
    }

    /// What is due at `now`; each due clock is consumed (the telemetry one re-armed a period
    /// from `now`, the agent's timer cleared until its next `WakeAt`).
    pub fn due(&mut self, now: u64) -> Due {
        let telemetry = now >= self.next_telemetry;
        if telemetry {
            self.next_telemetry = now.saturating_add(self.period);
        }
        let timer = self.wake.is_some_and(|w| now >= w);
        if timer {
            self.wake = None;
        }
        Due { telemetry, timer }
    }
}

/// One console line into `line`, at most `otarig_agent::console::MAX_LINE` bytes of it (the rest of a longer
/// line is read and dropped); `false` at the end of input.
pub fn read_line_capped(input: &mut impl BufRead, line: &mut Vec<u8>) -> std::io::Result<bool> {
    line.clear();
    let mut read_any = false;
    loop {
        let buf = input.fill_buf()?;
        if buf.is_empty() {
            return Ok(read_any);
        }
        read_any = true;
        let (chunk, done) = match buf.iter().position(|b| *b == b'\n') {
            Some(i) => (&buf[..=i], true),
            None => (buf, false),
        };
        let room = otarig_agent::console::MAX_LINE.saturating_sub(line.len());
        line.extend_from_slice(&chunk[..chunk.len().min(room)]);
        let n = chunk.len();
        input.consume(n);
        if done {
            return Ok(true);
        }
    }
}

/// esp-mqtt hands a message larger than its buffer over in pieces (`MQTT_EVENT_DATA` with
/// `current_data_offset` and `total_data_len`; only the first names the topic): put them
/// back together. A message over `otarig_agent::protocol::MAX_PAYLOAD`, or pieces out of order, are dropped.
#[derive(Default)]
pub struct Reassembly {
    partial: Option<(String, Vec<u8>, usize)>,
}

impl Reassembly {
    pub fn take(
        &mut self,
        topic: Option<&str>,
        data: &[u8],
        piece: Piece,
    ) -> Option<(String, Vec<u8>)> {
        match piece {
            Piece::Whole => topic.map(|t| (t.to_string(), data.to_vec())),
            Piece::First { total } => {
                self.partial = None;
                let topic = topic?;
                if total > otarig_agent::protocol::MAX_PAYLOAD {
                    log::warn!(
                        "MQTT message of {total} bytes on {topic} dropped: over {}",
                        otarig_agent::protocol::MAX_PAYLOAD
                    );
                    return None;
                }
                let mut buf = Vec::with_capacity(total);
                buf.extend_from_slice(data);
                self.partial = Some((topic.to_string(), buf, total));
                None
            }
            Piece::Next { offset, .. } => {
                let (topic, mut buf, total) = self.partial.take()?;
                if offset != buf.len() || buf.len() + data.len() > total {
                    return None;
                }
                buf.extend_from_slice(data);
                if buf.len() == total {
                    return Some((topic, buf));
                }
                self.partial = Some((topic, buf, total));
                None
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A download's messages every 5 ms for 3 s, never a timeout: telemetry still goes out
    /// each second, and the agent's timer fires when due.
    #[test]
    fn clocks_run_while_messages_keep_coming() {
        let mut clocks = Clocks::new(0, 1_000);
        clocks.wake = Some(1_500);
        let (mut sent, mut fired) = (Vec::new(), Vec::new());
        for t in (5..=3_000).step_by(5) {
            assert!(clocks.wait(t) <= Duration::from_millis(1_000));
            let due = clocks.due(t);
            if due.telemetry {
                sent.push(t);
            }
            if due.timer {
                fired.push(t);
            }
        }
        assert_eq!(sent, [1_000, 2_000, 3_000]);
        assert_eq!(fired, [1_500]);
        assert_eq!(clocks.wake, None, "consumed until the next WakeAt");
    }

    #[test]
    fn the_wait_ends_at_the_next_clock_and_a_minute_at_most() {
        let mut clocks = Clocks::new(100, 1_000);
        assert_eq!(clocks.wait(100), Duration::from_millis(1_000));
        clocks.wake = Some(400);
        assert_eq!(clocks.wait(100), Duration::from_millis(300));
        assert_eq!(clocks.wait(900), Duration::ZERO, "overdue: no wait");
        let idle = Clocks::new(0, u64::MAX);
        assert_eq!(idle.wait(0), Duration::from_secs(60));
        // Near the end of time it saturates, never overflows.
        let mut late = Clocks::new(u64::MAX - 1, 10);
        assert!(late.due(u64::MAX).telemetry);
        assert_eq!(late.wait(u64::MAX), Duration::ZERO);
    }

    #[test]
    fn mqtt_pieces_are_put_back_together_in_order_only() {
        let mut r = Reassembly::default();
        let first = Piece::First { total: 6 };
        let next = |offset| Piece::Next { offset, total: 6 };
        assert_eq!(r.take(Some("t/cmd"), b"abc", first), None);
        assert_eq!(
            r.take(None, b"def", next(3)),
            Some(("t/cmd".to_string(), b"abcdef".to_vec()))
        );
        assert_eq!(r.take(Some("t/cmd"), b"abc", first), None);
        assert_eq!(
            r.take(None, b"def", next(4)),
            None,
            "a gap drops the message"
        );
        let huge = Piece::First {
            total: otarig_agent::protocol::MAX_PAYLOAD + 1,
        };
        assert_eq!(r.take(Some("t/cmd"), b"abc", huge), None);
        assert_eq!(
            r.take(None, b"def", next(3)),
            None,
            "an oversized message is dropped"
        );
        assert_eq!(
            r.take(Some("t"), b"x", Piece::Whole),
            Some(("t".to_string(), b"x".to_vec()))
        );
    }

    #[test]
    fn console_lines_are_capped_and_the_rest_dropped() {
        let long = "x".repeat(otarig_agent::console::MAX_LINE * 3);
        let text = format!("{long}\nshort\n");
        let mut input = std::io::BufReader::with_capacity(64, text.as_bytes());
        let mut line = Vec::new();
        assert!(read_line_capped(&mut input, &mut line).unwrap());
        assert_eq!(line.len(), otarig_agent::console::MAX_LINE);
        assert!(read_line_capped(&mut input, &mut line).unwrap());
        assert_eq!(line, b"short\n");
        assert!(!read_line_capped(&mut input, &mut line).unwrap());
    }

    #[test]
    fn only_a_kept_connection_that_failed_in_time_is_tried_again() {
        const ESP_FAIL: i32 = -1;
        assert!(retry_on_new_connection(true, ESP_FAIL), "closed while idle");
        assert!(
            !retry_on_new_connection(false, ESP_FAIL),
            "a new one failed"
        );
        for timeout in [-ESP_ERR_HTTP_EAGAIN, ESP_ERR_HTTP_EAGAIN] {
            assert!(!retry_on_new_connection(true, timeout), "no answer in time");
        }
    }

    #[test]
    fn a_200_to_a_range_is_the_whole_blob_from_byte_0() {
        assert_eq!(body_window(206, 4096, 1024, 65536), (4096, 5120));
        assert_eq!(body_window(200, 4096, 1024, 65536), (0, 65536));
    }
}
