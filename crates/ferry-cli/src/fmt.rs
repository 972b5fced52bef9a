//! Human and JSON renderings of the library's reports.

use serde_json::{json, Value};
use std::path::Path;
use std::time::Duration;

pub fn ms(d: Duration) -> f64 {
    (d.as_secs_f64() * 1e6).round() / 1e3
}

pub fn bytes(n: u64) -> String {
    const U: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut i = 0;
    while v >= 1024.0 && i + 1 < U.len() {
        v /= 1024.0;
        i += 1;
    }
    if i == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", U[i])
    }
}

pub fn checkpoint_line(r: &ferry::checkpoint::Report, dir: &Path) -> String {
    format!(
        "checkpointed pid {} ({} process{}, {} thread{}): frozen {:.3} ms, wrote {} ({} data pages, {} zero pages) to {} in {:.3} ms{}",
        r.pid,
        r.processes,
        if r.processes == 1 { "" } else { "es" },
        r.threads,
        if r.threads == 1 { "" } else { "s" },
        ms(r.frozen),
        bytes(r.bytes_written),
        r.pages_data,
        r.pages_zero,
        dir.display(),
        ms(r.total),
        if r.leave_running { "; process left running" } else { "; process killed" }
    )
}

pub fn checkpoint_json(r: &ferry::checkpoint::Report, dir: &Path) -> Value {
    json!({
        "pid": r.pid,
        "processes": r.processes,
        "threads": r.threads,
        "frozen_ms": ms(r.frozen),
        "state_ms": ms(r.state_time),
        "total_ms": ms(r.total),
        "bytes_written": r.bytes_written,
        "pages": { "data": r.pages_data, "zero": r.pages_zero },
        "leave_running": r.leave_running,
        "dir": dir.display().to_string(),
    })
}

pub fn restore_line(r: &ferry::restore::Report) -> String {
    format!(
        "restored pid {} ({} process{}, {} thread{}): {} read ({} data pages, {} zero pages) in {:.3} ms, non-memory state {:.3} ms",
        r.pid,
        r.processes,
        if r.processes == 1 { "" } else { "es" },
        r.threads,
        if r.threads == 1 { "" } else { "s" },
        bytes(r.bytes_read),
        r.pages_data,
        r.pages_zero,
        ms(r.total),
        ms(r.state_time)
    )
}

pub fn restore_json(r: &ferry::restore::Report) -> Value {
    json!({
        "pid": r.pid,
        "processes": r.processes,
        "threads": r.threads,
        "total_ms": ms(r.total),
        "state_ms": ms(r.state_time),
        "bytes_read": r.bytes_read,
        "pages": { "data": r.pages_data, "zero": r.pages_zero },
    })
}
