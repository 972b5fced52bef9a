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

pub fn progress_line(p: &ferry::migrate::source::Progress) -> String {
    format!(
        "ferry: round {:>3} [{}]: sent {} pages, {} dirty, {}/s, est. downtime {:.1} ms",
        p.round,
        p.phase,
        p.pages_sent,
        p.dirty_pages,
        bytes(p.bandwidth as u64),
        p.estimated_downtime.as_secs_f64() * 1e3
    )
}

pub fn migration_summary(r: &ferry::migrate::report::MigrationReport) -> String {
    let mut s = format!(
        "migrated pid {} to {} (now pid {} there): downtime {:.1} ms, total {:.1} ms, {} sent in {} rounds; \
controller {}, stopped by {}{}\n",
        r.pid,
        r.target,
        r.target_pid,
        r.downtime_ms,
        r.total_ms,
        bytes(r.bytes_sent),
        r.rounds.len(),
        r.controller,
        r.stop_reason,
        r.pattern.as_deref().map(|p| format!(" (pattern {p})")).unwrap_or_default()
    );
    s.push_str(&format!(
        "pages: {} zero, {} raw, {} lz4, {} zstd, {} absent, {} resent; {} not present (never sent)\n",
        r.pages.zero, r.pages.raw, r.pages.lz4, r.pages.zstd, r.pages.absent, r.pages.resent, r.pages.not_present
    ));
    if let (Some(resume), Some(lat)) = (r.resume_ms, &r.fault_latency_us) {
        s.push_str(&format!(
            "{}: resumed after {:.1} ms with {} pages, {} pages after ({} shared, {} of them \
on request); {} remote faults (latency p50 {:.0} µs, p99 {:.0} µs), {} answered locally; last \
page {:.1} ms after the resume\n",
            r.mode,
            resume,
            r.pages_before_resume.unwrap_or(0),
            r.pages_after_resume.unwrap_or(0),
            r.shared_pages_after_resume.unwrap_or(0),
            r.shared_page_requests.unwrap_or(0),
            r.remote_faults.unwrap_or(0),
            lat.p50,
            lat.p99,
            r.local_faults.unwrap_or(0),
            r.last_page_ms.unwrap_or(0.0)
        ));
    }
    s.push_str("round  dirty pages  pages sent    duration ms  bandwidth\n");
    for x in &r.rounds {
        s.push_str(&format!(
            "{:>5}{} {:>11} {:>11} {:>14.1}  {}/s\n",
            x.round,
            if x.frozen { "*" } else { " " },
            x.dirty_pages,
            x.pages_sent,
            x.duration_ms,
            bytes(x.bandwidth as u64)
        ));
    }
    s.push_str("(* stop-and-copy, job frozen)");
    s
}
