//! Time since this process started: `flash run` reports its time to the
//! first token from the moment the user's command began, not from when
//! `main` ran, so the process's own start-up counts too.

use std::time::Instant;

/// Seconds since this process started, and the instant they were measured
/// at. `None` without `/proc`.
fn process_age() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // The command name (field 2) may hold spaces: count from the last ')'.
    let rest = &stat[stat.rfind(')')? + 1..];
    // Field 22 (starttime) is the 20th after the command name.
    let start_ticks: f64 = rest.split_whitespace().nth(19)?.parse().ok()?;
    let uptime = std::fs::read_to_string("/proc/uptime").ok()?;
    let up: f64 = uptime.split_whitespace().next()?.parse().ok()?;
    // USER_HZ is 100 on every Linux architecture /proc reports for.
    Some((up - start_ticks / 100.0).max(0.0))
}

/// A clock that reads seconds since this process started (in-process
/// `flash run` reads its TTFT from it too).
pub(crate) struct ProcessClock {
    age_at: f64,
    at: Instant,
}

impl ProcessClock {
    pub(crate) fn new(fallback: Instant) -> Self {
        let at = Instant::now();
        let age_at = process_age().unwrap_or_else(|| (at - fallback).as_secs_f64());
        ProcessClock { age_at, at }
    }

    pub(crate) fn now(&self) -> f64 {
        self.age_at + self.at.elapsed().as_secs_f64()
    }
}
